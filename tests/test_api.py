"""``m2f_cli.segment``: inputs of every kind, input order, failures as records, bounded memory, the
options and their defaults, and each view of a Result equal to the file the CLI writes for it."""

import itertools
import json

import fsspec
import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

import m2f_cli
from m2f_cli import Failure, Result, RunConfig, Segmenter, run
from m2f_cli.api import OPTIONS, VIEWS
from m2f_cli.errors import UsageError

from planted import PlantedPredictor, planted_dir, planted_image

SIZES = [(320, 240), (200, 300), (500, 180)]


def _planted_arrays():
    return [np.asarray(planted_image(w, h, seed=n)[0]) for n, (w, h) in enumerate(SIZES)]


def test_every_kind_of_input_gives_the_same_result_in_input_order(tmp_path):
    d, truth = planted_dir(tmp_path, SIZES)
    arrays = _planted_arrays()
    fs = fsspec.filesystem("memory")
    url = f"memory:///api-{tmp_path.name}/im2.png"
    fs.pipe_file(url.partition("://")[2], (d / "im2.png").read_bytes())
    try:
        inputs = [str(d / "im0.png"), d / "im1.png", url, Image.fromarray(arrays[0]), arrays[1],
                  Image.fromarray(arrays[2]).convert("RGBA")]
        for workers in (0, 1):
            got = list(m2f_cli.segment(iter(inputs), model=Segmenter(PlantedPredictor()), workers=workers))
            assert [r.index for r in got] == list(range(6)) and all(isinstance(r, Result) for r in got)
            for r in got:
                want = got[r.index % 3]
                assert np.array_equal(r.label_map, want.label_map)
                assert r.to_json()["instances"] == want.to_json()["instances"]
                assert np.array_equal(r.image(), arrays[r.index % 3])
            person = got[0].instances[0] if got[0].instances[0].label == "person" else got[0].instances[1]
            m, red = got[0].mask(person), truth["im0.png"]["red"]
            assert m.dtype == bool and (m & red).sum() / (m | red).sum() > 0.9
    finally:
        fs.rm(url.partition("://")[2])


def test_inputs_that_cannot_be_read_are_failures_in_their_place(tmp_path):
    arrays = _planted_arrays()
    inputs = [arrays[0], str(tmp_path / "missing.jpg"), arrays[1].astype(np.float32), 7, arrays[2]]
    got = list(m2f_cli.segment(inputs, model=Segmenter(PlantedPredictor()), workers=0))
    assert [type(r).__name__ for r in got] == ["Result", "Failure", "Failure", "Failure", "Result"]
    assert [r.ref.index for r in got] == list(range(5))
    assert {f.stage for f in got if isinstance(f, Failure)} == {"decode"}
    assert "file not found" in got[1].error and "uint8" in got[2].error and "int" in got[3].error


def test_a_long_iterable_is_drawn_lazily_and_memory_stays_bounded():
    img = np.asarray(planted_image(64, 48)[0])
    drawn = []

    def endless():
        for n in itertools.count():
            drawn.append(n)
            if n > 1000:  # an implementation that reads the whole iterable first fails here, not hangs
                raise RuntimeError("drawn too far ahead")
            yield img

    ahead = []
    for workers in (0, 1):
        drawn.clear()
        results = m2f_cli.segment(endless(), model=Segmenter(PlantedPredictor()), batch_size=2, workers=workers)
        for r in itertools.islice(results, 60):
            ahead.append(len(drawn) - r.index)
        results.close()
    # in flight: the loader's prefetch (4 per worker) + group_batches' buffer (4 x batch size) + a batch
    assert max(ahead) <= 20, max(ahead)


def test_options_are_the_clis_with_its_defaults():
    seg = Segmenter(PlantedPredictor())
    img = _planted_arrays()[0]
    with pytest.raises(TypeError, match="formats"):
        m2f_cli.segment([img], model=seg, formats=("png",))
    for bad in ({"threshold": 1.5}, {"top_k": 0}, {"cutout_pad": -2}, {"classes": "unicorn"},
                {"tile_full": True}):
        with pytest.raises(UsageError):
            m2f_cli.segment([img], model=seg, **bad)
    assert set(OPTIONS) <= {f for f in RunConfig.__dataclass_fields__}
    r = next(m2f_cli.segment([img], model=seg))
    assert r.threshold == 0.5 and len(r.instances) == 2  # png's default
    assert len(r.coco()["segm"]) == 100  # coco's default threshold 0: the top-k candidates
    assert r.views.overlay_alpha == RunConfig.overlay_alpha and r.views.cutout_pad == RunConfig.cutout_pad
    r = next(m2f_cli.segment([img], model=seg, threshold=0.3, classes=["dog"], cutout_pad=4))
    assert [i.label for i in r.instances] == ["dog"] and len(r.coco()["segm"]) == 1
    assert r.cutouts()[0].box[2] == r.instances[0].bbox[2] + 8
    assert seg.options.threshold == 0.5 and seg.options.keep is None  # the given Segmenter is not changed
    assert VIEWS == ("png", "coco", "overlay", "cutout")


def test_each_view_is_the_file_the_cli_writes(tmp_path):
    """In-process run() with the planted model: sidecar, COCO records, overlay, cut-outs, polygons."""
    d, _ = planted_dir(tmp_path, SIZES)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), formats=("png", "coco", "overlay", "cutout", "geojson"),
                  overlay_format="png", cutout_pad=3, workers=0), segmenter=Segmenter(PlantedPredictor()))
    paths = [str(d / f"im{n}.png") for n in range(len(SIZES))]
    got = list(m2f_cli.segment(paths, model=Segmenter(PlantedPredictor()), cutout_pad=3, workers=0))
    preds = json.loads((out / "predictions.json").read_text())
    for r in got:
        stem = f"im{r.index}"
        assert r.to_json() == json.loads((out / f"{stem}.json").read_text())
        assert r.coco()["segm"] == [p for p in preds if p["image_id"] == r.index + 1]
        assert np.array_equal(np.asarray(r.overlay()), np.asarray(Image.open(out / f"{stem}.overlay.png")))
        cuts = r.cutouts()
        index = json.loads((out / "cutouts" / stem / "index.json").read_text())
        assert [c.to_json() for c in cuts] == index["cutouts"] and len(cuts) == 2
        for c in cuts:
            assert np.array_equal(c.rgba, np.asarray(Image.open(out / "cutouts" / stem / c.file)))
        geo = json.loads((out / f"{stem}.geojson").read_text())
        shapes = r.polygons()
        assert [s.id for s in shapes] == [f["properties"]["id"] for f in geo["features"]]
        assert [sum(p.area for p in s.parts) for s in shapes] == [i.area for i in r.instances]


def _sidecar_without_names(doc):
    return {k: v for k, v in doc.items() if k not in ("image", "name")}


def _rle_mask(seg):
    return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})


@pytest.mark.slow
def test_trained_fixture_results_equal_the_clis_files_at_every_batch_size(tmp_path):
    """The trained fixture through the real CLI (png, coco, overlay, cutout) and through segment() on
    the same images given as paths, arrays and PIL images: equal bit for bit at the CLI's batch size
    (1 on CPU); at batch sizes 2 and 5 masks, boxes and ids equal and scores within 1e-5 (CPU scores
    may move in the last bits when the batch changes: docs/mask2former.md)."""
    from test_trained_model import MODEL, VAL_SEED, m2f
    import shapes

    val = tmp_path / "val"
    shapes.write_val_set(str(val), n=9, seed=VAL_SEED)
    out = tmp_path / "out"
    m2f("segment", str(val), "--out", str(out), "--model", str(MODEL), "-f", "png", "-f", "coco", "-f", "overlay",
        "-f", "cutout", "--overlay-format", "png", "--startup-cache", "off", "-q")
    paths = sorted(str(p) for p in val.glob("*.jpg"))
    upright = [ImageOps.exif_transpose(Image.open(p)).convert("RGB") for p in paths]
    inputs = [p if n % 3 == 0 else np.asarray(upright[n]) if n % 3 == 1 else upright[n] for n, p in enumerate(paths)]
    preds = json.loads((out / "predictions.json").read_text())
    boxes = json.loads((out / "predictions_bbox.json").read_text())
    images = json.loads((out / "images.json").read_text())["images"]
    got = list(m2f_cli.segment(inputs, model=str(MODEL), startup_cache="off"))
    assert len(got) == len(paths) == 9 and sum(len(r.instances) for r in got) > 9
    for r, path in zip(got, paths):
        stem = path.rsplit("/", 1)[-1][:-4]
        assert np.array_equal(r.label_map, np.asarray(Image.open(out / f"{stem}.png")))
        side = json.loads((out / f"{stem}.json").read_text())
        assert _sidecar_without_names(r.to_json()) == _sidecar_without_names(side)
        if r.index % 3 == 0:  # a path: named as the CLI names it
            assert r.to_json() == side
        coco = r.coco()
        assert coco["image"]["id"] == images[r.index]["id"] and coco["image"]["width"] == images[r.index]["width"]
        assert coco["segm"] == [p for p in preds if p["image_id"] == r.index + 1]
        assert coco["bbox"] == [b for b in boxes if b["image_id"] == r.index + 1]
        assert np.array_equal(np.asarray(r.overlay()), np.asarray(Image.open(out / f"{stem}.overlay.png")))
        index = json.loads((out / "cutouts" / stem / "index.json").read_text())
        cuts = r.cutouts()
        assert [c.to_json() for c in cuts] == index["cutouts"]
        for c in cuts:
            assert np.array_equal(c.rgba, np.asarray(Image.open(out / "cutouts" / stem / c.file)))
    seg = Segmenter(str(MODEL), startup_cache="off")
    for bs in (2, 5):
        other = list(m2f_cli.segment(paths, model=seg, batch_size=bs))
        for a, b in zip(got, other):
            ia, ib = a.record.instances, b.record.instances  # every candidate, down to score 0
            assert [(i.id, i.category_id, i.bbox, i.area) for i in ia] == [(i.id, i.category_id, i.bbox, i.area)
                                                                            for i in ib]
            assert all(i.rle == j.rle and abs(i.score - j.score) <= 1e-5 for i, j in zip(ia, ib))
            assert np.array_equal(a.label_map, b.label_map)


def _forwards_seen(monkeypatch, copies: int) -> tuple[list, list]:
    """segment() over copies x the planted arrays, batch 1, no workers: (the results, and for each
    forward (its thread's name, its call number, how many results had come when it ran))."""
    import threading

    received: list = []
    seen: list[tuple[str, int, int]] = []
    predictor = PlantedPredictor()
    real = predictor.__call__
    monkeypatch.setattr(PlantedPredictor, "__call__", lambda self, x: seen.append(
        (threading.current_thread().name, self.calls, len(received))) or real(x))
    for r in m2f_cli.segment(_planted_arrays() * copies, model=Segmenter(predictor), batch_size=1, workers=0):
        received.append(r)
    assert [r.index for r in received] == list(range(3 * copies))
    for r in received:  # the same results whichever thread ran the forwards
        assert r.to_json()["instances"] == received[r.index % 3].to_json()["instances"]
    return received, seen


@pytest.mark.parametrize("ahead", [True, False])
def test_cpu_forwards_run_on_a_thread_of_the_call_one_batch_ahead_when_worth_it(ahead, monkeypatch):
    """engines.batches on CPU: the first batch runs on the caller's thread; then, where the
    post-processing is worth it (AHEAD_SHARE 0: always; inf: never), forwards run on one thread of
    the call, the next started before a batch's post-processing: the same results either way, and
    no thread is left once the call is done or closed early."""
    import threading

    from m2f_cli.engines import batches
    monkeypatch.setattr(batches, "AHEAD_SHARE", 0.0 if ahead else float("inf"))
    _, seen = _forwards_seen(monkeypatch, 3)
    main = threading.main_thread().name  # serial batches run on the caller's thread
    assert [name for name, _, _ in seen] == [main] + ["m2f-forward_0" if ahead else main] * 8
    started_early = [k for _, k, got in seen if got < k]  # forward k (0-based) began before result k-1 came
    assert bool(started_early) == ahead, seen
    gen = m2f_cli.segment(_planted_arrays() * 3, model=Segmenter(PlantedPredictor()), batch_size=1, workers=0)
    next(gen)
    gen.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("m2f-forward")]


def test_a_first_batch_of_large_images_runs_ahead_from_the_start(monkeypatch):
    """engines.batches: before any batch is measured, a first batch with an image of at least
    AHEAD_FIRST_PIXELS is guessed worth running ahead: every forward on the forward thread, one
    started before the result before it came; the same results as serial batches."""
    from m2f_cli.engines import batches
    monkeypatch.setattr(batches, "AHEAD_FIRST_PIXELS", 1)
    monkeypatch.setattr(batches, "AHEAD_SHARE", 0.0)
    _, seen = _forwards_seen(monkeypatch, 2)
    assert [name for name, _, _ in seen] == ["m2f-forward_0"] * 6  # the first one too
    assert [k for _, k, got in seen if got < k], seen


@pytest.mark.parametrize("setting,kept", [(None, False), ("0", True)])
def test_the_cli_process_flushes_denormals_unless_told_not_to(setting, kept):
    """model.runtime.tune_process (what `m2f segment` and its device workers apply first): denormal
    floats read as zero in the calling thread, in a thread started after it and in torch's OpenMP
    pool (a large multiplication runs in parallel); M2F_FLUSH_DENORMALS=0 keeps them. In a child
    process: the setting stays with the process (the tests that invoke the CLI in this one set it
    here too, as the command does in its own)."""
    import os
    import subprocess
    import sys
    code = (
        "import threading, torch\n"
        "from m2f_cli.model.runtime import tune_process\n"
        "tune_process()\n"
        "x = torch.full((1 << 20,), 1e-39)\n"
        "out = {'main': float((x * 1.0).max())}\n"
        "t = threading.Thread(target=lambda: out.__setitem__('thread', float((x * 1.0).max())))\n"
        "t.start(); t.join()\n"
        "print(out['main'], out['thread'], torch.get_num_threads())\n")
    env = {k: v for k, v in os.environ.items() if k != "M2F_FLUSH_DENORMALS"}
    if setting is not None:
        env["M2F_FLUSH_DENORMALS"] = setting
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    main, thread, _ = (float(v) for v in r.stdout.split())
    assert (main > 0, thread > 0) == (kept, kept), r.stdout
