"""Resume, atomic outputs, interrupts, the lock, failing disks and hostile inputs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.errors import ExitCode
from m2f_cli.outputs.local import Journal

from planted import PlantedPredictor, iou, planted_image

N_KILL = 24


def _m2f(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "m2f_cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for n in range(N_KILL):
        w, h = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        planted_image(w, h, seed=n)[0].save(d / f"img{n:02d}.jpg", quality=90)
    return d


def _snapshot(out):
    """Every output file (not our .m2f bookkeeping) -> its parsed or raw content."""
    snap = {}
    for p in sorted(out.rglob("*")):
        if (not p.is_file() or ".m2f" in p.parts or p.name.startswith(("failures", "m2f-run"))
                or ".shard-" in p.name):  # bookkeeping and shard parts
            continue
        rel = p.relative_to(out).as_posix()
        if p.suffix == ".json" and p.name.startswith("predictions"):
            recs = json.loads(p.read_text())
            snap[rel] = sorted(json.dumps(r, sort_keys=True) for r in recs)
        elif p.suffix == ".json":
            snap[rel] = json.loads(p.read_text())
        elif p.suffix == ".png":
            with Image.open(p) as im:
                snap[rel] = np.asarray(im).tobytes()
        elif p.suffix == ".jsonl":
            snap[rel] = sorted(p.read_text().splitlines())
        else:
            snap[rel] = p.read_bytes()
    return snap


def _all_valid(out):
    for p in out.rglob("*"):
        if not p.is_file() or ".m2f" in p.parts:
            continue
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix in (".json",):
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            [json.loads(l) for l in p.read_text().splitlines()]


def _wait_for_outputs(out, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return
        if out.exists() and len(list(out.glob("*.png"))) >= n:
            return
        time.sleep(0.02)


ARGS = ["--format", "png", "--format", "coco", "--format", "jsonl", "--batch-size", "1", "--workers", "0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, many_images, tiny_model):
    """The outputs of one uninterrupted run."""
    ref_out = tmp_path_factory.mktemp("reference")
    p = _m2f("segment", many_images, "--out", ref_out, "--model", tiny_model, *ARGS)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    return _snapshot(ref_out)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_part_way_then_resume_equals_uninterrupted(tmp_path, many_images, tiny_model, reference, sig):
    out = tmp_path / "out"
    p = _m2f("segment", many_images, "--out", out, "--model", tiny_model, *ARGS)
    _wait_for_outputs(out, 5, p)
    assert p.poll() is None, "the run finished before it could be interrupted"
    p.send_signal(sig)
    rc = p.wait(timeout=120)
    stderr = p.stderr.read()
    done_at_kill = len(list(out.glob("*.png")))
    assert done_at_kill < N_KILL
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM, stderr
        assert "(interrupted)" in stderr
        # a clean stop finalises run-level files from what was done
        recs = json.loads((out / "predictions.json").read_text())
        assert recs and len({r["image_id"] for r in recs}) <= done_at_kill
    else:
        assert rc == -signal.SIGKILL
    _all_valid(out)  # whatever is on disk is complete

    p = _m2f("segment", many_images, "--out", out, "--model", tiny_model, *ARGS)
    assert p.wait(timeout=600) == 0
    stderr = p.stderr.read()
    assert "skipped (already done)" in stderr
    assert _snapshot(out) == reference


def test_two_runs_into_one_folder(tmp_path, many_images, tiny_model):
    out = tmp_path / "out"
    first = _m2f("segment", many_images, "--out", out, "--model", tiny_model, "--batch-size", "1",
                 "--workers", "1")
    _wait_for_outputs(out, 1, first)
    assert first.poll() is None
    first.send_signal(signal.SIGSTOP)  # frozen mid-run: it holds the folder for as long as we need
    second = _m2f("segment", many_images, "--out", out, "--model", tiny_model)
    assert second.wait(timeout=120) == ExitCode.LOCKED
    assert "in use by another m2f run" in second.stderr.read()
    first.kill()
    first.wait()
    # the killed run's lock dies with it, even while its orphaned decode worker lingers
    third = _m2f("segment", many_images, "--out", out, "--model", tiny_model, "-q")
    assert third.wait(timeout=600) == 0, third.stderr.read()


def test_journal_drops_a_partial_last_line(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_bytes(b'{"rel":"a"}\n{"rel":"b"}\n{"rel":"c", "dets": [')
    j = Journal(str(p))
    assert [r["rel"] for r in j.records()] == ["a", "b"]
    j.append({"rel": "d"})
    j.close()
    assert [json.loads(l)["rel"] for l in p.read_text().splitlines()] == ["a", "b", "d"]


# A full disk mid-run (a real kernel error, not a mock): tests/test_disk_errors.py.


def test_unwritable_out_is_found_before_the_model_loads(tmp_path, image_dir):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", str(image_dir), "--out",
                        str(blocker / "out"), "--model", "nobody/never-loaded"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == ExitCode.FATAL
    assert "not writable" in p.stderr and str(blocker / "out") in p.stderr
    assert "nobody/never-loaded" not in p.stderr


def test_max_failures_stops_the_run(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in range(10):
        (d / f"bad{n}.jpg").write_bytes(b"not a jpeg")
    planted_image(100, 80)[0].save(d / "zgood.png")
    s = run(RunConfig(inputs=[str(d)], out=str(tmp_path / "o"), max_failures=3, workers=0, batch_size=1),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.failed == 3 and s.stopped_early and s.exit_code == ExitCode.INPUTS_FAILED
    assert len((tmp_path / "o" / "failures.jsonl").read_text().splitlines()) == 3


def test_hostile_inputs_through_the_pipeline(tmp_path, tiny_model):
    d = tmp_path / "in"
    d.mkdir()
    base, masks = planted_image(160, 120)
    base.save(d / "name with spaces.png")
    base.save(d / "ünïcödé.png")
    base.save(d / "new\nline.png")
    Image.fromarray(np.zeros((10, 10), np.uint16) + 40000).save(d / "sixteen.png")
    base.convert("P").save(d / "palette.png")
    base.convert("CMYK").save(d / "cmyk.jpg")
    base.convert("RGBA").save(d / "rgba.png")
    base.save(d / "anim.gif", save_all=True, append_images=[base.rotate(90)])
    base.save(d / "pages.tiff", save_all=True, append_images=[base.rotate(90)])
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    Image.new("RGB", (10000, 20), (90, 140, 90)).save(d / "wide.png")
    Image.new("L", (5000, 5000)).save(d / "bomb.png")
    os.symlink(d / "missing.png", d / "broken.png")
    os.symlink(d, d / "loop")
    out = tmp_path / "out"
    for resize in ("checkpoint", "paper"):
        s = run(RunConfig(inputs=[str(d)], out=str(out / resize), max_pixels=10_000_000, model=tiny_model,
                          device="cpu", workers=1, resize=resize))
        fails = {os.path.basename(f.ref.path): f for f in s.failures}
        assert set(fails) == {"bomb.png", "broken.png"}, fails
        assert "too large" in fails["bomb.png"].error
        assert s.images == 11
        for name in ("name with spaces", "ünïcödé", "new\nline", "sixteen", "palette", "cmyk", "rgba",
                     "anim", "pages", "one", "wide"):
            with Image.open(out / resize / f"{name}.png") as im:
                side = json.loads((out / resize / f"{name}.json").read_text())
                assert im.size == (side["width"], side["height"])
        with Image.open(out / resize / "wide.png") as im:
            assert im.size == (10000, 20)


def test_exif_rotated_jpeg_masks_line_up(tmp_path):
    img, masks = planted_image(300, 200)
    stored = img.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote (200x300)
    exif = stored.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display" undoes ROTATE_90 (counter-clockwise)
    d = tmp_path / "in"
    d.mkdir()
    stored.save(d / "rot.jpg", exif=exif, quality=95)
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(d)], out=str(out), workers=0), segmenter=Segmenter(PlantedPredictor()))
    png = np.asarray(Image.open(out / "rot.png"))
    assert png.shape == (200, 300)
    side = json.loads((out / "rot.json").read_text())
    red = next(i for i in side["instances"] if i["label"] == "person")
    assert iou(png == red["id"], masks["red"]) >= 0.9


# An unreadable input (as an unprivileged user, also when the suite runs as root):
# tests/test_disk_errors.py.
