"""The start-up cache (traced.py): the traced model computes what the eager one does, later loads
skip transformers, and the cache is keyed, replaced, repaired and bypassed where it must be."""

import errno
import fcntl
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2f_cli import Segmenter
from m2f_cli.model.startup import traced
from m2f_cli.model.loading import HFPredictor, eager_predictor, read_categories, resolve_model
from planted import planted_image
from tiny import make_tiny_model

CPU = torch.device("cpu")


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test only (subprocesses inherit it through the environment)."""
    monkeypatch.setenv("M2F_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "traced"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return make_tiny_model(str(tmp_path_factory.mktemp("traced_model")), seed=3)


def traces(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pt")) if cache.exists() else []


def test_traced_model_computes_what_the_eager_model_computes(model_dir, cache):
    seg = Segmenter(model_dir, device="cpu")
    assert isinstance(seg.predictor, traced.TracedPredictor)
    eager = eager_predictor(resolve_model(model_dir), CPU, torch.float32)
    assert list(seg.predictor.categories) == list(eager.categories)  # kept in the archive
    torch.manual_seed(0)
    for batch in (1, 2, 3):  # traced at batch 1: the batch dimension must stay free
        x = torch.randn(batch, 3, 384, 384)
        got, want = seg.predictor(x), eager(x)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    # and end to end, on an image with instances: the same label map and scores
    img, _ = planted_image(500, 300, seed=1)
    a = seg(img)
    b = Segmenter(model_dir, device="cpu", startup_cache="off")(img)
    assert isinstance(b, type(a)) and len(a.instances) == len(b.instances) > 0
    np.testing.assert_array_equal(a.label_map, b.label_map)
    assert [i.label for i in a.instances] == [i.label for i in b.instances]
    np.testing.assert_allclose([i.score for i in a.instances], [i.score for i in b.instances], atol=1e-5)


def test_a_cached_model_loads_without_transformers(model_dir, cache):
    Segmenter(model_dir, device="cpu")  # builds the trace
    assert len(traces(cache)) == 1
    probe = textwrap.dedent(f"""
        import sys
        from m2f_cli import Segmenter
        seg = Segmenter({model_dir!r}, device="cpu")
        print(type(seg.predictor).__name__, "transformers" in sys.modules, len(seg.categories))
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TracedPredictor", "False", "80"]


def test_the_key_follows_weights_size_and_switches(model_dir, cache, tmp_path, monkeypatch):
    size = (384, 384)
    first = traced.cache_path(model_dir, size, torch.float32)
    assert traced.cache_path(model_dir, size, torch.float32) == first          # stable
    assert traced.cache_path(model_dir, (512, 512), torch.float32) != first    # another input size
    monkeypatch.setenv("M2F_FAST_DEFORMABLE", "0")
    assert traced.cache_path(model_dir, size, torch.float32) != first          # another attention op
    monkeypatch.delenv("M2F_FAST_DEFORMABLE")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in os.listdir(model_dir):
        (copy / f).write_bytes(Path(model_dir, f).read_bytes())
    assert traced.cache_path(str(copy), size, torch.float32) != first          # another folder
    before = traced.cache_path(str(copy), size, torch.float32)
    weights = copy / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert traced.cache_path(str(copy), size, torch.float32) == before          # touched, same bytes
    data = bytearray(weights.read_bytes())
    st = weights.stat()
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])  # other values, same size...
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the same mtime (rsync -a, tar)
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert traced.cache_path(str(copy), size, torch.float32) != before          # content, not stat
    before = traced.cache_path(str(copy), size, torch.float32)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["id2label"]["0"] = "human"
    (copy / "config.json").write_text(json.dumps(cfg))
    assert traced.cache_path(str(copy), size, torch.float32).name.rsplit("-", 1)[0] == \
        before.name.rsplit("-", 1)[0]                                            # same stem: replaces


def test_new_weights_replace_the_old_trace(tmp_path, cache):
    d = make_tiny_model(str(tmp_path / "m"), seed=1)
    old = Segmenter(d, device="cpu").predictor
    assert [p.name for p in traces(cache)] == [old.path.name]
    old_path = old.path
    old.release()  # nothing uses the old trace any more (test_a_trace_in_use_is_never_deleted)
    make_tiny_model(d, seed=2)  # retrained in place: new weights, same folder
    new = Segmenter(d, device="cpu").predictor
    assert isinstance(new, traced.TracedPredictor) and new.path != old_path
    assert [p.name for p in traces(cache)] == [new.path.name]  # the stale trace is gone
    x = torch.randn(1, 3, 384, 384)
    want = eager_predictor(resolve_model(d), CPU, torch.float32)(x)
    torch.testing.assert_close(new(x)[0], want[0], rtol=0, atol=1e-4)


def test_a_damaged_trace_is_rebuilt(model_dir, cache, caplog):
    path = Segmenter(model_dir, device="cpu").predictor.path
    path.write_bytes(b"not a torchscript archive")
    seg = Segmenter(model_dir, device="cpu")
    assert "unusable cached trace" in caplog.text
    assert isinstance(seg.predictor, traced.TracedPredictor) and seg.predictor.path == path
    assert traced.load(path, (384, 384), CPU) is not None  # a whole archive again


def test_an_unwritable_cache_only_costs_the_speed(model_dir, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("M2F_CACHE_DIR", str(blocker))
    seg = Segmenter(model_dir, device="cpu")
    assert isinstance(seg.predictor, HFPredictor)
    assert "cannot build the start-up cache" in caplog.text
    img, _ = planted_image(320, 240, seed=2)
    assert seg(img).label_map.shape == (240, 320)


@pytest.mark.parametrize("options", [dict(startup_cache="off"), dict(resize="paper"), dict(compile=True)])
def test_not_used_where_it_would_not_be_right(model_dir, cache, options, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda m, *a, **k: m)  # compile=True: only the decision matters
    seg = Segmenter(model_dir, device="cpu", **options)
    assert isinstance(seg.predictor, HFPredictor)  # paper resize: many input sizes; compile: its own path
    assert traces(cache) == []


def test_a_trace_refuses_other_input_sizes(model_dir, cache):
    pred = Segmenter(model_dir, device="cpu").predictor
    with pytest.raises(ValueError, match="384x384"):
        pred(torch.zeros(1, 3, 384, 416))


def test_cli_runs_are_identical_with_and_without_the_cache(model_dir, cache, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n, (w, h) in enumerate([(640, 480), (300, 500), (401, 233)]):
        planted_image(w, h, seed=n)[0].save(imgs / f"i{n}.png")
    outs = {}
    m2f = [sys.executable, "-m", "m2f_cli"]
    for name, flag in (("first", []), ("eager", ["--startup-cache", "off"]), ("build", None), ("cached", [])):
        if flag is None:  # what the first run's last line names
            r = subprocess.run(m2f + ["cache", "build", "--model", model_dir, "--trace"], capture_output=True,
                               text=True, env=os.environ.copy(), timeout=300)
            assert r.returncode == 0 and "building the start-up cache" in r.stderr, r.stderr
            continue
        out = tmp_path / name
        r = subprocess.run(m2f + ["segment", str(imgs), "--out", str(out), "--model", model_dir, "--format", "png",
                                  "--format", "jsonl", "--batch-size", "1", *flag],
                           capture_output=True, text=True, env=os.environ.copy(), timeout=300)
        assert r.returncode == 0, r.stderr
        assert "building the start-up cache" not in r.stderr  # short runs never build it
        assert (f"`m2f cache build --model {model_dir} --trace`" in r.stderr) == (name == "first")
        outs[name] = {p: np.asarray(Image.open(out / f"i{n}.png")) for n, p in enumerate(sorted(os.listdir(imgs)))}
    assert len(traces(cache)) == 1
    for name in ("cached", "eager"):
        for k, v in outs["first"].items():
            np.testing.assert_array_equal(outs[name][k], v)


def test_cached_labels_are_those_transformers_gives(tmp_path, cache):
    """A config.json without id2label: transformers names the classes LABEL_i; a cached load must
    give the same table, not another guess."""
    d = make_tiny_model(str(tmp_path / "m"), seed=4)
    cfg = json.loads(Path(d, "config.json").read_text())
    del cfg["id2label"], cfg["label2id"]
    cfg["num_labels"] = 80
    Path(d, "config.json").write_text(json.dumps(cfg))
    built = Segmenter(d, device="cpu", threshold=0.1, task="instance")
    cached = Segmenter(d, device="cpu", threshold=0.1, task="instance")
    assert isinstance(cached.predictor, traced.TracedPredictor) and cached.predictor.path.exists()
    eager = eager_predictor(resolve_model(d), CPU, torch.float32)
    assert list(cached.categories) == list(built.categories) == list(eager.categories)
    assert list(read_categories(resolve_model(d))) == list(eager.categories)  # without loading
    assert len(eager.categories) == 80 and eager.categories[0].name == "LABEL_0"


def test_runs_starting_together_build_once(tmp_path, cache):
    """While one process builds the trace (holds its build lock), another waits, then loads the
    trace it built instead of building its own (and never imports transformers)."""
    d = make_tiny_model(str(tmp_path / "m"), seed=5)
    path = traced.cache_path(d, (384, 384), torch.float32)
    path.parent.mkdir(parents=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" is building
    probe = textwrap.dedent(f"""
        import sys
        from m2f_cli import Segmenter
        seg = Segmenter({d!r}, device="cpu", notify=lambda m: print(m, file=sys.stderr, flush=True))
        print(type(seg.predictor).__name__, "transformers" in sys.modules)
    """)
    waiter = subprocess.Popen([sys.executable, "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=os.environ.copy())
    try:
        deadline = time.time() + 120
        seen = ""
        while "waiting for another m2f process" not in seen:
            assert time.time() < deadline, f"the second process never waited: {seen!r}"
            assert waiter.poll() is None, waiter.communicate()
            if select.select([waiter.stderr], [], [], 0.5)[0]:
                seen += waiter.stderr.readline()
        assert "waiting for another m2f process" in seen
        assert not path.exists()
        # the builder finishes: its trace appears, then the lock is released
        traced.build(eager_predictor(resolve_model(d), CPU, torch.float32), (384, 384), path)
    finally:
        os.close(fd)
    out, err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, err
    assert out.split() == ["TracedPredictor", "False"]
    assert "building the start-up cache" not in err


def test_same_size_same_mtime_weights_of_other_values_get_a_new_trace(tmp_path, cache):
    """Weights retrained with the same shapes, copied over the old file with its mtime kept: the
    cached trace of the old weights must not be loaded (the key is the weights' content)."""
    d = make_tiny_model(str(tmp_path / "m"), seed=6)
    other = make_tiny_model(str(tmp_path / "other"), seed=7)
    old = Segmenter(d, device="cpu").predictor
    assert isinstance(old, traced.TracedPredictor)
    weights = Path(d, "model.safetensors")
    st = weights.stat()
    new_bytes = Path(other, "model.safetensors").read_bytes()
    assert len(new_bytes) == st.st_size and new_bytes != weights.read_bytes()
    weights.write_bytes(new_bytes)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    new = Segmenter(d, device="cpu").predictor
    assert isinstance(new, traced.TracedPredictor) and new.path != old.path
    x = torch.randn(1, 3, 384, 384)
    want = eager_predictor(resolve_model(other), CPU, torch.float32)(x)
    torch.testing.assert_close(new(x)[1], want[1], rtol=0, atol=1e-4)


def test_weights_hashed_ahead_give_the_same_digest_once(tmp_path, cache, monkeypatch):
    """fingerprint.prefetch_digests (the CLI's, while torch is imported): the weights are hashed
    on a thread of their own, file_digest takes that result (not hashing again) and memoizes it,
    and the fingerprint equals the one computed without it; a folder that is gone is no error."""
    from m2f_cli.model.startup import fingerprint
    d = make_tiny_model(str(tmp_path / "m"), seed=8)
    want = fingerprint._hash(os.path.realpath(os.path.join(d, "model.safetensors")))
    hashed = []
    real_hash = fingerprint._hash
    monkeypatch.setattr(fingerprint, "_hash", lambda real: hashed.append(real) or real_hash(real))
    fingerprint.prefetch_digests(d)
    fingerprint.prefetch_digests(d)  # the same file is hashed once
    assert fingerprint.file_digest(os.path.join(d, "model.safetensors")) == want
    assert hashed == [os.path.realpath(os.path.join(d, "model.safetensors"))]
    assert want in json.loads((cache.parent / "digests.json").read_text()).values()
    fingerprint.prefetch_digests(d)  # memoized now: nothing hashed ahead
    assert fingerprint.model_fingerprint(d) and len(hashed) == 1 and not fingerprint._ahead
    fingerprint.prefetch_digests(str(tmp_path / "gone"))


def _plant(cache: Path, name: str, size: int, age_s: float) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    p = cache / name
    p.write_bytes(b"\0" * size)
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_lru_eviction_keeps_the_cap_and_skips_traces_in_use(cache, monkeypatch):
    from m2f_cli.model.startup import cache as cachefiles
    monkeypatch.setenv("M2F_CACHE_MAX_BYTES", "2500")
    assert cachefiles.max_bytes() == 2500
    oldest = _plant(cache, "a-1-384x384-e-k1.pt", 1000, 400)
    older = _plant(cache, "b-1-384x384-e-k1.pt", 1000, 300)
    old = _plant(cache, "c-1-384x384-e-k1.pt", 1000, 200)
    new = _plant(cache, "d-1-384x384-e-k1.pt", 1000, 0)
    hold = cachefiles.open_in_use(oldest)  # a live user (it also touches it: used now)
    try:
        os.utime(oldest, (time.time() - 500,) * 2)  # still the least recently used
        assert [e.path for e in cachefiles.entries()] == [oldest, older, old, new]
        assert [e.in_use for e in cachefiles.entries()] == [True, False, False, False]
        removed = cachefiles.evict(keep=new)
        assert removed == [older, old]  # 4000 -> 2000 bytes: the oldest is in use, skipped
        assert oldest.exists() and new.exists()
    finally:
        hold.close()
    assert cachefiles.evict(keep=new) == []  # within the cap now
    monkeypatch.setenv("M2F_CACHE_MAX_BYTES", "1k")
    assert cachefiles.evict(keep=new) == [oldest]


def test_a_load_touches_the_trace(model_dir, cache):
    path = Segmenter(model_dir, device="cpu").predictor.path
    os.utime(path, (1, 1))
    Segmenter(model_dir, device="cpu")
    assert path.stat().st_mtime > time.time() - 60  # most recently used again


def test_a_trace_in_use_is_never_deleted(tmp_path, cache):
    """Another live process uses the old trace while new weights replace it: the old file stays
    until it is released; m2f cache clear skips it too, and removes it once free."""
    d = make_tiny_model(str(tmp_path / "m"), seed=8)
    Segmenter(d, device="cpu")
    (old,) = traces(cache)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from m2f_cli import Segmenter
        seg = Segmenter({d!r}, device="cpu")
        print(type(seg.predictor).__name__, flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().split() == ["TracedPredictor"]
        make_tiny_model(d, seed=9)  # retrained: the next load builds a new trace
        new = Segmenter(d, device="cpu").predictor
        assert new.path != old and sorted(traces(cache)) == sorted([old, new.path])  # old one in use: kept
        new.release()
        r = subprocess.run([sys.executable, "-m", "m2f_cli", "cache", "clear"], capture_output=True, text=True,
                           env=os.environ.copy(), timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"kept {old.name}: in use" in r.stderr and "removed 1 traces" in r.stderr
        assert traces(cache) == [old]
    finally:
        holder.communicate("", timeout=60)
    r = subprocess.run([sys.executable, "-m", "m2f_cli", "cache", "clear", "--all"], capture_output=True,
                       text=True, env=os.environ.copy(), timeout=120)
    assert r.returncode == 0 and "removed 1 traces" in r.stderr, r.stderr
    assert traces(cache) == [] and not (cache.parent / "digests.json").exists()


def test_environments_sharing_a_cache_keep_each_others_traces(tmp_path, cache, monkeypatch):
    d = make_tiny_model(str(tmp_path / "m"), seed=10)
    mine = Segmenter(d, device="cpu").predictor
    mine.release()
    stem, env, _ = mine.path.name.rsplit("-", 2)
    theirs = _plant(cache, f"{stem.rsplit('-', 1)[0]}-{stem.rsplit('-', 1)[1]}-0123456789-{'f' * 20}.pt", 10, 0)
    real_versions = traced._versions
    monkeypatch.setattr(traced, "_versions", lambda: {**real_versions(), "torch": "another"})
    assert traced.cache_path(d, (384, 384), torch.float32).name.rsplit("-", 2)[1] != env  # another env
    monkeypatch.setattr(traced, "_versions", real_versions)
    make_tiny_model(d, seed=11)  # new weights in this environment: replaces this environment's trace only
    new = Segmenter(d, device="cpu").predictor
    assert sorted(traces(cache)) == sorted([theirs, new.path])


def test_the_cache_command_lists_and_clears_without_torch(model_dir, cache):
    Segmenter(model_dir, device="cpu").predictor.release()
    probe = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from m2f_cli.cli import app
        r = CliRunner().invoke(app, ["cache", "list"])
        print(r.exit_code, "torch" in sys.modules, "numpy" in sys.modules)
        print(r.output)
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    first, *listing = out.stdout.splitlines()
    assert first.split() == ["0", "False", "False"]
    (trace,) = traces(cache)
    assert any(trace.name in line and "MB" in line for line in listing)
    assert "1 traces" in listing[-2] and str(cache) in listing[-2] and "M2F_CACHE_MAX_BYTES" in listing[-2]


def test_no_flock_in_the_cache_folder_is_one_line_and_the_run_goes_on(model_dir, cache, monkeypatch, caplog):
    def no_flock(*a, **k):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    seg = Segmenter(model_dir, device="cpu")
    assert isinstance(seg.predictor, HFPredictor)
    (msg,) = [r.getMessage() for r in caplog.records if "file locks" in r.getMessage()]
    assert "\n" not in msg and "filesystem at /" in msg and "M2F_CACHE_DIR" in msg and "--startup-cache off" in msg
    assert traces(cache) == []


def test_build_mode_follows_the_run_length_and_the_terminal():
    from m2f_cli.choices import TRACE_INLINE_MIN_IMAGES, build_mode
    assert build_mode(TRACE_INLINE_MIN_IMAGES, False) == "inline" == build_mode(TRACE_INLINE_MIN_IMAGES, True)
    assert build_mode(16, False) == "none" and build_mode(16, True) == "detach"


def test_a_short_run_builds_nothing_and_names_the_command(model_dir, cache):
    seg = Segmenter(model_dir, device="cpu", builds="none")
    assert isinstance(seg.predictor, HFPredictor) and traces(cache) == []
    assert f"m2f cache build --model {model_dir}" in seg.startup_hint
