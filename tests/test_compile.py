"""--compile/--no-compile/auto: the rule, that the pipeline applies it, and that a compiled run writes
what the eager model's run writes (instances' labels, scores, boxes and masks, and the PNG maps, within
the tolerances below). Two compiled paths: torch.compile, run for real by TorchDynamo with its "eager"
backend (the inductor code generation behind the default backend takes minutes on 2 cores and is
torch's to test), and the AOTInductor package that `--compile` builds on CPU (compiled.py), built for
real once for this module on a tiny model (~40 s)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_cli import RunConfig, run
from m2f_cli import choices
from m2f_cli.engines import batches
from m2f_cli.choices import resolve_compile
from m2f_cli.model.startup import compiled
from planted import planted_image

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# How close a compiled run's outputs must be to the eager model's. Measured on these tiny models: both
# the dynamo graph and the AOTInductor package (frozen weights, fused kernels, another summation
# order) give scores within 1e-6 (the JSON's rounding), the same boxes and maps, mask IoU >= 0.99999;
# the bounds leave room for float noise only. Masks shifted by 3 px (a compiled graph computing
# something else) give IoU ~0.73 with the same instance counts.
SCORE_ATOL = 1e-3
BOX_PX = 1
MASK_IOU = 0.99
MAP_AGREE = 0.999  # fraction of pixels with the same value in the PNG instance maps


def _outputs(out: Path, inputs: Path) -> dict[str, tuple[dict, np.ndarray]]:
    """relative input path -> (its JSON Lines record, its PNG instance map (H, W) uint16)."""
    found = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rel = os.path.relpath(rec["image"], inputs)
        found[rel] = (rec, np.asarray(Image.open(out / Path(rel).with_suffix(".png"))))
    return found


def _iou(a: dict, b: dict) -> float:
    return float(mask_utils.iou([a], [b], [0])[0][0])


def assert_same_outputs(got: Path, want: Path, inputs: Path) -> int:
    """got's outputs are want's, within the tolerances above; returns the number of instances."""
    g, w = _outputs(got, inputs), _outputs(want, inputs)
    assert sorted(g) == sorted(w) and w
    instances = 0
    for rel, (want_rec, want_map) in w.items():
        got_rec, got_map = g[rel]
        a, b = got_rec["instances"], want_rec["instances"]
        assert [(i["label"], i["category_id"]) for i in a] == [(i["label"], i["category_id"]) for i in b], rel
        for x, y in zip(a, b):
            assert abs(x["score"] - y["score"]) <= SCORE_ATOL, (rel, x["score"], y["score"])
            assert max(abs(p - q) for p, q in zip(x["bbox"], y["bbox"])) <= BOX_PX, (rel, x["bbox"], y["bbox"])
            assert _iou(x["segmentation"], y["segmentation"]) >= MASK_IOU, (rel, x["label"])
        assert got_map.shape == want_map.shape and (got_map == want_map).mean() >= MAP_AGREE, rel
        instances += len(b)
    return instances


def test_auto_compiles_long_fixed_size_cpu_runs_only():
    n = choices.COMPILE_AUTO_MIN_IMAGES
    assert resolve_compile(None, CPU, n, fixed_size=True)
    assert not resolve_compile(None, CPU, n - 1, fixed_size=True)   # too short to pay back
    assert not resolve_compile(None, CPU, n, fixed_size=False)      # one compile per input shape
    assert not resolve_compile(None, CUDA, n, fixed_size=True)      # unmeasured there
    assert resolve_compile(True, CPU, 1, fixed_size=False)          # the user decides
    assert not resolve_compile(False, CPU, 10 * n, fixed_size=True)


@pytest.mark.parametrize("choice, expect", [(None, True), (False, False)])
def test_pipeline_applies_the_rule(tmp_path, image_dir, tiny_model, monkeypatch, choice, expect):
    import torch._dynamo
    compiled_models = []
    real_compile = torch.compile

    def eager_compile(model, *a, **k):
        compiled_models.append(model)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(choices, "COMPILE_AUTO_MIN_IMAGES", 2)
    sizes = []
    real = batches.start_batch  # every batch goes through it (engines.batches.segment_samples)
    monkeypatch.setattr(batches, "start_batch",
                        lambda seg, batch, notify=None: sizes.append(len(batch)) or real(seg, batch, notify))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    outputs = {"formats": ("png", "jsonl"), "rle": True, "workers": 0}
    s = run(RunConfig(inputs=[str(image_dir)], out=str(tmp_path / "out"), model=tiny_model, compile=choice,
                      **outputs))
    assert s.images == 4
    assert bool(compiled_models) == expect
    if expect:
        assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced and ran the model
        assert set(sizes) == {1}  # compiled on CPU: one input shape, never a partial batch
        plain = run(RunConfig(inputs=[str(image_dir)], out=str(tmp_path / "plain"), model=tiny_model,
                              compile=False, startup_cache="off", **outputs))
        assert plain.instances == s.instances
        # the compiled graph computes what the model does
        assert assert_same_outputs(tmp_path / "out", tmp_path / "plain", image_dir) == s.instances > 0
    else:
        assert not counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def aoti_runs(tmp_path_factory, tiny_model) -> dict:
    """`m2f segment --compile` with the compiled start-up cache on (conftest sets the trace only
    for the rest of the suite), in a cache folder of its own: a real AOTInductor build of the tiny model,
    then the run through the package; and the eager model's run of the same images."""
    from typer.testing import CliRunner

    from m2f_cli.cli import app
    tmp = tmp_path_factory.mktemp("aoti")
    imgs = tmp / "imgs"
    imgs.mkdir()
    for n, (w, h) in enumerate([(640, 480), (300, 500), (401, 233)]):
        planted_image(w, h, seed=n)[0].save(imgs / f"i{n}.png")
    base = ["segment", str(imgs), "--model", tiny_model, "-f", "png", "-f", "jsonl", "--rle", "-q"]
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("M2F_CACHE_DIR", str(tmp / "cache"))
        mp.setenv("M2F_STARTUP_CACHE", "auto")
        real_call = compiled.CompiledPredictor.__call__
        mp.setattr(compiled.CompiledPredictor, "__call__",
                   lambda self, x: calls.append(tuple(x.shape)) or real_call(self, x))
        package = compiled.cache_path(tiny_model, (384, 384), torch.float32)
        assert not package.exists()
        r = CliRunner().invoke(app, base + ["--out", str(tmp / "compiled"), "--compile"])
        assert r.exit_code == 0, r.output
        built = package.exists()
        eager = CliRunner().invoke(app, base + ["--out", str(tmp / "eager"), "--no-compile", "--startup-cache", "off"])
        assert eager.exit_code == 0, eager.output
    return {"imgs": imgs, "compiled": tmp / "compiled", "eager": tmp / "eager", "built": built, "calls": calls,
            "package": package}


def test_compile_builds_an_aotinductor_package_whose_outputs_are_the_eager_models(aoti_runs):
    # the package was compiled into this run's cache folder (a C++ compiler is needed: as in the
    # real-compile tests of test_background_builds.py, none is a failure here, not a skip)
    assert aoti_runs["built"], f"no package built (C++ compiler found: {compiled.has_compiler()})"
    assert aoti_runs["calls"] == [(1, 3, 384, 384)] * 3  # every image went through it, one at a time
    assert assert_same_outputs(aoti_runs["compiled"], aoti_runs["eager"], aoti_runs["imgs"]) > 0


def test_the_package_runs_with_the_gil_released_and_computes_what_torchs_loader_does(aoti_runs):
    """aoti.py's runner (the package's C interface through ctypes) against torch's own loader, on the
    package built above: the same outputs bit for bit, and Python threads run during its forward
    (torch's loader holds the GIL for the whole call: a writer thread waited ~0.4 s an image)."""
    import threading

    from m2f_cli.model.startup import aoti
    assert aoti_runs["built"]
    runner = aoti.load_runner(str(aoti_runs["package"]))
    assert isinstance(runner, aoti.GilFreeRunner) and runner.num_inputs == 1 and runner.num_outputs == 2
    reference = torch._C._aoti.AOTIModelPackageLoader(str(aoti_runs["package"]), "model", False, 1, -1)
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    ours, theirs = runner([x]), reference.boxed_run([x.clone()])
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in theirs]
    assert ours[1].shape[-2:] == (96, 96)  # masks at 1/4 of the input
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))

    ticks, stop = [0], threading.Event()

    def spin():  # pure Python: it can only count while no other thread holds the GIL
        while not stop.is_set():
            ticks[0] += 1
    thread = threading.Thread(target=spin)
    thread.start()
    during = 0
    try:
        for _ in range(5):
            before = ticks[0]
            runner([x])
            during += ticks[0] - before
    finally:
        stop.set()
        thread.join()
    assert during > 1000, f"only {during} Python steps ran beside 5 forwards: the GIL was held"


def test_the_packages_library_is_checked_and_loads_without_memfd_too(aoti_runs, tmp_path, monkeypatch):
    """aoti.gil_free copies the library out of the archive by offset (sendfile) and checks its CRC:
    a flipped byte inside it is refused (load_runner then tries torch's loader; compiled.load
    removes a package neither can load); without memfd_create the library goes through a
    temporary folder that is gone once it is loaded."""
    import shutil
    import zipfile

    from m2f_cli.model.startup import aoti
    package = str(aoti_runs["package"])
    with zipfile.ZipFile(package) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(".so"))
    assert info.compress_type == zipfile.ZIP_STORED  # the sendfile path is the one measured
    damaged = tmp_path / "damaged.pt2"
    shutil.copy(package, damaged)
    with open(damaged, "r+b") as f:  # a byte in the middle of the library's data
        f.seek(info.header_offset + 30 + len(info.filename.encode()) + info.file_size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(OSError, match="CRC mismatch"):
        aoti.gil_free(str(damaged))

    # a check passed is remembered for the file as it is: the next load skips the CRC, a file
    # written again (a damaged copy put in its place) is checked again
    monkeypatch.setenv("M2F_CACHE_DIR", str(tmp_path / "memo"))
    crcs = []
    real_crc32 = aoti.zlib.crc32
    monkeypatch.setattr(aoti.zlib, "crc32", lambda view: crcs.append(1) or real_crc32(view))
    good = tmp_path / "good.pt2"
    shutil.copy(package, good)
    aoti.gil_free(str(good)).close()
    aoti.gil_free(str(good)).close()
    assert len(crcs) == 1
    shutil.copy(damaged, good)
    with pytest.raises(OSError, match="CRC mismatch"):
        aoti.gil_free(str(good))
    assert len(crcs) == 2

    monkeypatch.delattr(aoti.os, "memfd_create")
    made = []
    real_mkdtemp = aoti.tempfile.mkdtemp
    monkeypatch.setattr(aoti.tempfile, "mkdtemp", lambda **kw: made.append(real_mkdtemp(**kw)) or made[-1])
    runner = aoti.gil_free(package)
    assert made and not Path(made[0]).exists()
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    reference = torch._C._aoti.AOTIModelPackageLoader(package, "model", False, 1, -1)
    assert all(torch.equal(a, b) for a, b in zip(runner([x]), reference.boxed_run([x.clone()])))


def _rss_shmem_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssShmem:"))


@pytest.mark.skipif(not hasattr(os, "memfd_create"),
                    reason="os.memfd_create is Linux-only; elsewhere aoti.py loads the library from a temporary "
                           "folder, whose file is gone once loaded (test above), so there is no memory file to punch")
def test_the_librarys_copy_of_the_weights_is_freed_once_the_container_holds_its_own(aoti_runs):
    """The container copies the weights out of the library when it is created, so aoti.py punches
    the library's constants section out of its memory file: the process keeps one copy, not two
    (~190 MB less for Swin-T), and computes what torch's loader does (equal outputs)."""
    import ctypes

    from m2f_cli.model.startup import aoti
    before = _rss_shmem_kb()
    runner = aoti.gil_free(str(aoti_runs["package"]))
    grown = _rss_shmem_kb() - before
    start = ctypes.addressof(ctypes.c_uint8.in_dll(runner._lib, "_binary_constants_bin_start"))
    end = ctypes.addressof(ctypes.c_uint8.in_dll(runner._lib, "_binary_constants_bin_end"))
    constants_kb = (end - start) // 1024
    assert constants_kb > 256  # the tiny model's weights are in there
    assert grown < constants_kb // 2, (grown, constants_kb)  # its code pages only; unpunched: all of it too
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    reference = torch._C._aoti.AOTIModelPackageLoader(str(aoti_runs["package"]), "model", False, 1, -1)
    assert all(torch.equal(a, b) for a, b in zip(runner([x]), reference.boxed_run([x.clone()])))


@pytest.mark.parametrize("extra,covered", [
    ({}, True),
    ({"data/aotinductor/model/x.json": b'{"nodes": []}'}, False),   # extern kernels: a proxy executor
    ({"data/aotinductor/model/y.so": b"\x7fELF"}, False),            # two libraries
    ({"data/aotinductor/model/x_metadata.json": b'{"AOTI_DEVICE_KEY": "cuda"}'}, False),
])
def test_only_packages_the_c_interface_covers_run_through_it(tmp_path, extra, covered):
    """aoti._library_member: one CPU library and no extern-kernel table, else torch's loader runs
    the package (a graph with fallback ops needs its proxy executor)."""
    import zipfile

    from m2f_cli.model.startup import aoti
    files = {"data/aotinductor/model/x.so": b"\x7fELF", "data/aotinductor/model/x_metadata.json":
             b'{"AOTI_DEVICE_KEY": "cpu"}', "data/aotinductor/other/z.so": b"\x7fELF", **extra}
    with zipfile.ZipFile(tmp_path / "p.pt2", "w") as z:
        for name, data in files.items():
            z.writestr("p/" + name, data)
    with zipfile.ZipFile(tmp_path / "p.pt2") as z:
        member = aoti._library_member(z, "model")
    assert member == ("p/data/aotinductor/model/x.so" if covered else None)


def test_each_load_of_a_package_is_a_library_of_its_own(aoti_runs):
    """dlopen hands back a library already loaded under the same name, and a closed memfd's number
    comes back for the next one: two packages loaded one after the other as /proc/self/fd/N ran the
    first package's model for both (seen in the full suite). Each load maps a library of its own."""
    from m2f_cli.model.startup import aoti

    def libraries() -> int:
        with open("/proc/self/maps") as f:
            return len({line.split()[4] for line in f if "m2f-model.so" in line})
    first = aoti.gil_free(str(aoti_runs["package"]))
    before = libraries()
    second = aoti.gil_free(str(aoti_runs["package"]))
    assert libraries() == before + 1
    assert second._lib._name != first._lib._name
