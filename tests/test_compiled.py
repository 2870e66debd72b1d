"""The compiled start-up cache (compiled.py): built only when asked (a long run, m2f cache build),
then loaded by every later run of the same key; same key, lock, staleness and fallback rules as the
trace. The AOTInductor compile itself takes minutes on 2 cores, so it is stubbed here: the stub
"package" is a TorchScript trace of the eager predictor and its runner calls it; the real compile
is measured in benchmarks/ (README "Speed")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2f_cli import Segmenter
from m2f_cli.model.startup import builds, cache as m2f_cache, compiled, traced
from m2f_cli.model.loading import HFPredictor, load_model, resolve_model
from planted import planted_image
from tiny import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("M2F_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("M2F_STARTUP_CACHE", "auto")  # conftest turns packages off for the rest of the suite
    return tmp_path / "cache" / "traced"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("compiled_model")), seed=4)


class StubCompiler:
    """compiled._compile / compiled._load_runner stand-ins: a 'package' is a saved trace."""

    def __init__(self, monkeypatch, fail: bool = False):
        self.builds, self.loads, self.fail = [], [], fail
        monkeypatch.setattr(compiled, "_compile", self.compile)
        monkeypatch.setattr(compiled, "_load_runner", self.load)

    def compile(self, model, dtype, size, package):
        if self.fail:
            raise RuntimeError("no C++ compiler")
        self.builds.append((dtype, tuple(size)))
        fwd = compiled._Forward(model, dtype).eval()
        with torch.no_grad(), traced._quiet():
            module = torch.jit.freeze(torch.jit.trace(fwd, (torch.zeros(1, 3, *size),), check_trace=False))
            torch.jit.save(module, package)

    def load(self, path):
        self.loads.append(path)
        with traced._quiet():
            module = torch.jit.load(path)  # raises on a damaged file, as the real loader does
        return lambda inputs: list(module(*inputs))


def packages(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pt2")) if cache.exists() else []


def test_short_runs_never_compile_long_ones_build_once_and_every_later_run_loads(model_dir, cache, monkeypatch):
    stub = StubCompiler(monkeypatch)
    short = Segmenter(model_dir, device="cpu")
    assert isinstance(short.predictor, traced.TracedPredictor) and not stub.builds and not packages(cache)
    long = Segmenter(model_dir, device="cpu", compile=True)  # what resolve_compile says for a long run
    assert isinstance(long.predictor, compiled.CompiledPredictor)
    assert stub.builds == [(torch.float32, (384, 384))] and len(packages(cache)) == 1
    later = Segmenter(model_dir, device="cpu")  # a short run after it: compiled speed, no compile
    assert isinstance(later.predictor, compiled.CompiledPredictor) and len(stub.builds) == 1
    assert later.predictor.path == long.predictor.path
    eager = HFPredictor(load_model(resolve_model(model_dir)), CPU)
    torch.manual_seed(0)
    for batch in (1, 3):  # a batch runs image by image through the batch-1 package
        x = torch.randn(batch, 3, 384, 384)
        for got, want in zip(later.predictor(x), eager(x)):
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert list(later.categories) == list(eager.categories)
    img, _ = planted_image(500, 300, seed=1)
    a, b = later(img), Segmenter(model_dir, device="cpu", startup_cache="off")(img)
    assert [i.label for i in a.instances] == [i.label for i in b.instances] and a.instances
    with pytest.raises(ValueError, match="384x384"):
        later.predictor(torch.zeros(1, 3, 384, 416))


def test_the_key_follows_the_trace_key_dtype_and_the_cpu(model_dir, cache, monkeypatch):
    size = (384, 384)
    first = compiled.cache_path(model_dir, size, torch.float32)
    assert first.suffix == ".pt2" and first.parent == cache
    assert compiled.cache_path(model_dir, size, torch.float32) == first
    assert compiled.cache_path(model_dir, size, torch.bfloat16) != first
    assert compiled.cache_path(model_dir, (512, 512), torch.float32) != first
    monkeypatch.setenv("M2F_FAST_DEFORMABLE", "0")
    assert compiled.cache_path(model_dir, size, torch.float32) != first
    monkeypatch.delenv("M2F_FAST_DEFORMABLE")
    kind = compiled.cpu_kind()
    monkeypatch.setattr(compiled, "cpu_kind", lambda: {**kind, "capability": "AVX2", "flags": ["avx2"]})
    other_cpu = compiled.cache_path(model_dir, size, torch.float32)
    assert other_cpu != first  # a package runs the vector code of the CPU it was built for
    assert other_cpu.name.split("-")[:-2] == first.name.split("-")[:-2]  # same folder and size


def test_a_failed_build_warns_once_and_the_run_goes_on_with_the_trace(model_dir, cache, monkeypatch, caplog):
    stub = StubCompiler(monkeypatch, fail=True)
    seg = Segmenter(model_dir, device="cpu", compile=True)
    assert "cannot build the compiled model" in caplog.text and "no C++ compiler" in caplog.text
    assert isinstance(seg.predictor, traced.TracedPredictor)  # not torch.compile: it needs that compiler too
    assert not packages(cache) and not list(cache.glob(".*tmp*"))  # no half-written package left
    assert not stub.builds


def test_a_damaged_package_is_removed_and_rebuilt_only_when_asked(model_dir, cache, monkeypatch, caplog):
    stub = StubCompiler(monkeypatch)
    path = Segmenter(model_dir, device="cpu", compile=True).predictor.path
    path.write_bytes(b"not a package")
    seg = Segmenter(model_dir, device="cpu")
    assert "unusable compiled model" in caplog.text
    assert isinstance(seg.predictor, traced.TracedPredictor) and not path.exists()
    assert isinstance(Segmenter(model_dir, device="cpu", compile=True).predictor, compiled.CompiledPredictor)
    assert len(stub.builds) == 2 and path.exists()


def test_new_weights_replace_the_old_package_and_one_in_use_is_kept(tmp_path, cache, monkeypatch):
    StubCompiler(monkeypatch)
    d = make_tiny_model(str(tmp_path / "m"), seed=1)
    old = Segmenter(d, device="cpu", compile=True).predictor
    make_tiny_model(d, seed=2)
    new = Segmenter(d, device="cpu", compile=True).predictor
    assert new.path != old.path
    assert sorted(p.name for p in packages(cache)) == sorted([old.path.name, new.path.name])  # old in use
    old.release()
    make_tiny_model(d, seed=3)
    newest = Segmenter(d, device="cpu", compile=True).predictor
    # the released stale package is gone; the one still in use (new) stays until its process lets go
    assert sorted(p.name for p in packages(cache)) == sorted([new.path.name, newest.path.name])
    assert not old.path.exists()


def test_the_cache_command_lists_clears_and_builds(model_dir, cache, monkeypatch):
    StubCompiler(monkeypatch)
    pred = Segmenter(model_dir, device="cpu", compile=True).predictor
    pred.release()
    names = [e.path.name for e in m2f_cache.entries()]
    assert pred.path.name in names  # listed and evicted with the traces (LRU cap)
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "m2f_cli", "cache", "list", "--json"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert pred.path.name in {Path(e["path"]).name for e in json.loads(out.stdout)}
    removed, kept = m2f_cache.clear()
    assert pred.path in [e.path for e in removed] and not packages(cache)


def test_cache_build_command(model_dir, cache, monkeypatch):
    from typer.testing import CliRunner

    from m2f_cli.cli import app
    stub = StubCompiler(monkeypatch)
    r = CliRunner().invoke(app, ["cache", "build", "--model", model_dir])
    assert r.exit_code == 0, r.output
    assert stub.builds == [(torch.float32, (384, 384))] and len(packages(cache)) == 1
    r = CliRunner().invoke(app, ["cache", "build", "--model", model_dir])  # already there: loads it
    assert r.exit_code == 0 and len(stub.builds) == 1
    stub.fail = True
    compiled_path = packages(cache)[0]
    compiled_path.unlink()
    r = CliRunner().invoke(app, ["cache", "build", "--model", model_dir])
    assert r.exit_code == 1 and "could not be built" in r.output


def test_off_switches(model_dir, cache, monkeypatch):
    stub = StubCompiler(monkeypatch)
    monkeypatch.setattr(torch, "compile", lambda m, *a, **k: m)
    assert isinstance(Segmenter(model_dir, device="cpu", compile=True, startup_cache="off").predictor, HFPredictor)
    monkeypatch.setenv("M2F_STARTUP_CACHE", "trace")
    assert isinstance(Segmenter(model_dir, device="cpu", compile=True).predictor, HFPredictor)
    assert not stub.builds and not packages(cache)


def test_a_failed_compile_is_marked_and_neither_retried_nor_suggested_until_cleared(model_dir, cache, monkeypatch):
    """A build that fails writes <package>.failed: later runs neither compile nor name the compile
    command (builds.hint) until `m2f cache clear` forgets it. Without a C++ compiler no run names it."""
    stub = StubCompiler(monkeypatch)
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    path = compiled.cache_path(model_dir, (384, 384), torch.float32)
    first = Segmenter(model_dir, device="cpu", builds="none")
    assert first.startup_hint and "compiles this model" in first.startup_hint and not packages(cache)
    stub.fail = True
    assert not isinstance(Segmenter(model_dir, device="cpu", compile=True).predictor, compiled.CompiledPredictor)
    assert "no C++ compiler" in compiled.failed_marker(path).read_text()
    later = Segmenter(model_dir, device="cpu", builds="none", compile=True)
    assert isinstance(later.predictor, traced.TracedPredictor) and later.startup_hint is None
    assert len(stub.builds) == 0
    m2f_cache.clear()  # m2f cache clear forgets the failure: named again
    assert not compiled.failed_marker(path).exists()
    assert "compiles this model" in Segmenter(model_dir, device="cpu", builds="none").startup_hint
    monkeypatch.setattr(compiled, "has_compiler", lambda: False)
    no_cxx = Segmenter(model_dir, device="cpu", builds="none")
    assert no_cxx.startup_hint is None or "compiles" not in no_cxx.startup_hint
    stub.fail = False
    monkeypatch.setattr(compiled, "has_compiler", lambda: True)
    Segmenter(model_dir, device="cpu", compile=True)
    done = Segmenter(model_dir, device="cpu", builds="none")
    assert isinstance(done.predictor, compiled.CompiledPredictor) and done.startup_hint is None


_COUNTER = """
import sys, time
n = 0
while True:
    n += 1
    with open(sys.argv[1], "w") as f:
        f.write(str(n))
    if n >= int(sys.argv[2]):
        break
    time.sleep(0.01)
"""


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pausing the builder is Linux-only (/proc, prctl)")
def test_the_detached_build_pauses_while_m2f_runs_and_dies_with_its_parent(tmp_path):
    """run_yielding stops the build's whole process group while busy() (an m2f run uses the cache)
    and continues it after; killing the builder (even with SIGKILL) kills its stopped child too."""
    import threading
    import time
    count = tmp_path / "count"
    busy = {"now": False}
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", builds.run_yielding(
        [sys.executable, "-c", _COUNTER, str(count), "400"], lambda: busy["now"], poll_s=0.05)))
    t.start()
    deadline = time.time() + 60
    while not (count.exists() and count.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    busy["now"] = True
    time.sleep(0.5)
    frozen = count.read_text()
    time.sleep(0.5)
    assert count.read_text() == frozen  # stopped: no progress while a run goes on
    busy["now"] = False
    t.join(60)
    assert result["rc"] == 0 and count.read_text() == "400"

    # SIGKILL the builder while its child is stopped: the child must not outlive it
    pidfile = tmp_path / "child"
    builder = subprocess.Popen([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import subprocess
from m2f_cli.model.startup import builds
real = subprocess.Popen
def record(*a, **k):
    p = real(*a, **k)
    open({str(pidfile)!r}, "w").write(str(p.pid))
    return p
builds.subprocess.Popen = record
builds.run_yielding([sys.executable, "-c", "import time; time.sleep(120)"], lambda: True, poll_s=0.05)
"""])
    deadline = time.time() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    while _state(child) != "T" and time.time() < deadline:
        time.sleep(0.05)
    assert _state(child) == "T"
    builder.kill()
    builder.wait()
    while time.time() < deadline:
        try:
            if _state(child) == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the stopped child outlived its killed builder")


def test_the_key_follows_the_compiled_code_not_the_plumbing_around_it(model_dir, cache, monkeypatch):
    """A package is stale when what is exported or how it is compiled changes (or deformable.py,
    inside the graph), not when code that finds, loads or builds packages in the background does."""
    size = (384, 384)
    first = compiled.cache_path(model_dir, size, torch.float32)
    monkeypatch.setattr(traced, "_SOURCES", ())  # traced.py edited: the trace's key moves...
    assert compiled.cache_path(model_dir, size, torch.float32) == first  # ...the package's does not
    switches = compiled.INDUCTOR
    monkeypatch.setattr(compiled, "INDUCTOR", {"freezing": False})
    assert compiled.cache_path(model_dir, size, torch.float32) != first
    monkeypatch.setattr(compiled, "INDUCTOR", switches)
    assert compiled.cache_path(model_dir, size, torch.float32) == first
    import inspect
    real = inspect.getsource
    monkeypatch.setattr(inspect, "getsource", lambda obj: real(obj) + ("#" if obj is compiled._compile else ""))
    assert compiled.cache_path(model_dir, size, torch.float32) != first
