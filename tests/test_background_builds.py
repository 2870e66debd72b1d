"""Nothing outlives the command unless a person is there (builds.py), tested on the real chain: the
`m2f` entry point in subprocesses, under a pseudo-terminal where a person would be, a real
AOTInductor compile of a tiny model, and the process table read from /proc after each command."""

import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2f_cli import Segmenter
from m2f_cli.model.startup import builds, cache as m2f_cache, compiled, traced
from m2f_cli.model import loading as m2f_model
from planted import planted_image
from tiny import make_tiny_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads the process table from /proc (Linux); the pause and SCHED_IDLE are Linux-only")

M2F = os.path.join(os.path.dirname(sys.executable), "m2f")
CMD = [M2F] if os.path.exists(M2F) else [sys.executable, "-m", "m2f_cli"]


@pytest.fixture()
def env(tmp_path, monkeypatch) -> dict:
    """This test's own cache folder with the compiled cache on, here and in every m2f subprocess."""
    monkeypatch.setenv("M2F_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("M2F_STARTUP_CACHE", "auto")  # conftest turns packages off for the rest of the suite
    monkeypatch.delenv(builds.ENV, raising=False)
    return os.environ.copy()


@pytest.fixture()
def model_dir(tmp_path) -> str:
    """A model folder of this test only: its path names this test's processes in /proc."""
    return make_tiny_model(str(tmp_path / "model"), seed=21)


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    planted_image(96, 64, seed=1)[0].save(d / "a.png")
    return d


def processes_naming(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains text."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z" and int(pid) != os.getpid():
            found.append((int(pid), cmd))
    return found


def builders(model_dir: str) -> list[int]:
    """The detached builders of model_dir: not counting a builder's own child in the moment between
    its fork and its exec, when it still shows its parent's command line."""
    found = [pid for pid, cmd in processes_naming(model_dir) if "--background" in cmd]
    parents = {}
    for pid in found:
        try:
            parents[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
    return [pid for pid in found if parents.get(pid) not in found]


def run_at_terminal(args: list[str], env: dict) -> tuple[int, str]:
    """Run m2f with stderr on a pseudo-terminal (a person is there), stdin from /dev/null."""
    master, slave = pty.openpty()
    p = subprocess.Popen(CMD + args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's last writer closed it
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return p.wait(timeout=120), out.decode(errors="replace")


def segment_args(images: Path, out: Path, model_dir: str) -> list[str]:
    return ["segment", str(images), "--out", str(out), "--model", model_dir]


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def gone(pid: int) -> bool:
    """Exited, its files closed (a zombie at most): a dying process's command line empties before
    its files are closed, so the state is what tells."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def kill_builders(model_dir: str) -> None:
    pids = [pid for pid, _ in processes_naming(model_dir)]
    for pid in builders(model_dir):
        try:
            os.killpg(pid, signal.SIGKILL)  # the builder leads its own session; its child dies with it
        except ProcessLookupError:
            pass
    wait_until(lambda: all(gone(p) for p in pids) and not processes_naming(model_dir), 30,
               "the killed builder and its child to go")


def test_a_run_in_a_pipeline_and_the_library_leave_no_process_and_say_what_would_help(
        env, model_dir, images, tmp_path):
    with open(tmp_path / "log", "w") as log:  # cron: stdin from /dev/null, output to a log
        rc = subprocess.run(CMD + segment_args(images, tmp_path / "out", model_dir), stdin=subprocess.DEVNULL,
                            stdout=log, stderr=subprocess.STDOUT, env=env, timeout=180).returncode
    assert rc == 0
    assert processes_naming(model_dir) == []
    lines = (tmp_path / "log").read_text().strip().splitlines()
    assert lines[-2].startswith("m2f: done: 1 images")
    assert f"`m2f cache build --model {model_dir}`" in lines[-1] and "compiles this model" in lines[-1]
    assert not (tmp_path / "cache" / "traced").exists() or not list((tmp_path / "cache" / "traced").glob("*.pt*"))

    seg = Segmenter(model_dir, device="cpu", builds="none")  # a notebook: nothing started, nothing built
    assert processes_naming(model_dir) == [] and isinstance(seg.predictor, m2f_model.HFPredictor)
    assert f"m2f cache build --model {model_dir}" in seg.startup_hint
    with pytest.raises(ValueError, match="only `m2f segment` at a terminal"):
        Segmenter(model_dir, device="cpu", builds="detach")


def test_runs_at_a_terminal_start_one_builder_whose_compile_the_cache_commands_never_disturb(
        env, model_dir, images, tmp_path):
    """Two interactive runs at once start one builder between them (the lock is taken before it
    starts); `m2f cache list` never shows the package being written and `m2f cache clear` during
    the compile does not break it; the next run loads the package."""
    procs = []
    for n in range(2):
        master, slave = pty.openpty()
        procs.append((subprocess.Popen(CMD + segment_args(images, tmp_path / f"out{n}", model_dir),
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                                       env=env), master))
        os.close(slave)
    said = []
    for p, master in procs:
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
        assert p.wait(timeout=120) == 0
        said.append(out.decode(errors="replace"))
    assert len(builders(model_dir)) == 1
    assert sum("building the start-up cache in the background" in s for s in said) == 1
    path = compiled.cache_path(model_dir, (384, 384), torch.float32)
    saw_partial = False
    while builders(model_dir):
        partial = list((path.parent / m2f_cache.PARTIAL).glob("*.pt2"))
        listed = subprocess.run(CMD + ["cache", "list", "--json"], capture_output=True, text=True, env=env)
        assert m2f_cache.PARTIAL not in listed.stdout and "~" not in listed.stdout
        if partial and not saw_partial:  # once, as the compile starts (~40 s before its package is done:
            # a clear after the rename would rightly delete the finished package, in use by nobody)
            subprocess.run(CMD + ["cache", "clear"], capture_output=True, env=env, check=True)
        saw_partial = saw_partial or bool(partial)
        time.sleep(0.5)
    assert saw_partial, "the compile was never seen writing its package"
    assert path.exists() and not builds.started_marker(path).exists()
    assert processes_naming(model_dir) == []
    rc, said = run_at_terminal(segment_args(images, tmp_path / "out2", model_dir), env)
    assert rc == 0 and "background" not in said and builders(model_dir) == []
    assert isinstance(Segmenter(model_dir, device="cpu").predictor, compiled.CompiledPredictor)


def test_a_builder_killed_twice_is_not_started_a_third_time(env, model_dir, images, tmp_path):
    for n in range(2):
        rc, said = run_at_terminal(segment_args(images, tmp_path / f"out{n}", model_dir), env)
        assert rc == 0 and "building the start-up cache in the background" in said
        kill_builders(model_dir)  # a job's cgroup torn down, kill -9
    path = compiled.cache_path(model_dir, (384, 384), torch.float32)
    assert builds.killed_count(path) == 2
    rc, said = run_at_terminal(segment_args(images, tmp_path / "out2", model_dir), env)
    assert rc == 0 and builders(model_dir) == []
    (why,) = [line for line in said.splitlines() if "killed" in line]
    assert "last 2 builds were killed before they finished" in why and "m2f cache clear" in why
    subprocess.run(CMD + ["cache", "clear"], capture_output=True, env=env, check=True)
    assert builds.killed_count(path) == 0  # allowed again


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def test_the_builder_holds_the_lock_from_the_start_idles_and_imports_nothing_heavy_while_it_waits(env, model_dir):
    """builds.spawn takes the build lock before the builder exists and hands it over; the builder
    lowers its priority (nice 19, SCHED_IDLE) and waits without torch loaded until its run (here:
    this test process, the holder of the pipe) lets it go."""
    path = compiled.cache_path(model_dir, (384, 384), torch.float32)
    plan = builds.Plan("compiled", path, model_dir, (384, 384), "float32", model_dir)
    said = []
    assert builds.spawn(plan, said.append) and len(said) == 1
    try:
        assert builds.take_lock(path) is None and m2f_cache.being_built(path)  # held from the start
        assert builds.spawn(plan, said.append) is False and len(said) == 1  # one builder per key
        wait_until(lambda: len(builders(model_dir)) == 1, 30, "the builder to start")  # fork, then exec
        (pid,) = builders(model_dir)
        wait_until(lambda: int(_stat(pid)[16]) == 19 and int(_stat(pid)[38]) == os.SCHED_IDLE, 30,
                   "nice 19 and SCHED_IDLE")
        time.sleep(1.0)  # it waits on the pipe: still no torch in its address space
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
        assert not list((path.parent / m2f_cache.PARTIAL).glob("*.pt2"))
    finally:
        kill_builders(model_dir)
        while builds._WRITE_ENDS:
            os.close(builds._WRITE_ENDS.pop())
    assert builds.take_lock(path) is not None  # the kernel dropped it with the builder


def test_a_compile_run_does_not_wait_long_on_a_builder_that_holds_the_lock(env, model_dir, monkeypatch):
    """A --compile run waits at most BUILD_WAIT_S for another process's build, then goes on (here:
    the lock is held by this test, as a paused detached builder would hold it) and says so."""
    monkeypatch.setattr(m2f_model, "BUILD_WAIT_S", 0.5)
    monkeypatch.setattr(compiled, "_compile", lambda *a, **k: pytest.fail("compiled beside another builder"))
    path = compiled.cache_path(model_dir, (384, 384), torch.float32)
    fd = builds.take_lock(path)
    try:
        notes = []
        t0 = time.perf_counter()
        seg = Segmenter(model_dir, device="cpu", compile=True, notify=notes.append)
        assert time.perf_counter() - t0 < 60
        assert isinstance(seg.predictor, traced.TracedPredictor)  # the trace, built inline instead
        assert any("does not compile it too" in n for n in notes)
    finally:
        os.close(fd)


def test_clear_keeps_what_a_running_build_writes_and_drops_what_a_dead_one_left(env, model_dir):
    path = compiled.cache_path(model_dir, (384, 384), torch.float32)
    fd, name = m2f_cache.partial_file(path, ".pt2")
    os.close(fd)
    partial = Path(name)
    assert partial.parent.name == m2f_cache.PARTIAL and partial.name.startswith(path.name + "~")
    lock = builds.take_lock(path)  # a build of path runs
    try:
        m2f_cache.clear()
        assert partial.exists() and m2f_cache.entries() == []  # never listed, never deleted
    finally:
        os.close(lock)
    m2f_cache.clear()  # its builder is gone: what it left goes
    assert not partial.exists()
