"""Shards + merge, and several devices on one machine (two CPU "devices" here)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2f_cli.cli import app
from m2f_cli.inputs.walk import parse_shard, shard_of

from test_never_lose_work import _snapshot

runner = CliRunner()
# batch size 1: CPU kernels may differ in the last bits (~1e-6) with the batch composition, and
# the scores are compared to the 6th decimal here
FORMATS = ["-f", "png", "-f", "coco", "-f", "jsonl", "--batch-size", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard_in")
    rng = np.random.default_rng(3)
    for n in range(14):
        w, h = int(rng.integers(120, 300)), int(rng.integers(100, 260))
        arr = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
        sub = d / ("a" if n % 3 == 0 else "") 
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).resize((w, h)).save(sub / f"s{n:02d}.jpg")
    (d / "broken.jpg").write_bytes(b"nope")
    return d


@pytest.fixture(scope="module")
def single(tmp_path_factory, folder, tiny_model):
    out = tmp_path_factory.mktemp("single")
    r = runner.invoke(app, ["segment", str(folder), "--out", str(out), "--model", tiny_model, *FORMATS, "-q",
                            "--workers", "0"])
    assert r.exit_code == 3, r.output  # the broken file
    return out


def test_shard_assignment_is_stable_balanced_and_order_free():
    names = [f"dir{i % 7}/img{i:05d}" for i in range(4000)]
    counts = np.bincount([shard_of(n, 4) for n in names], minlength=4)
    assert counts.min() > 900  # balanced
    assert [shard_of(n, 4) for n in reversed(names)] == [shard_of(n, 4) for n in names][::-1]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_shards_then_merge_equal_one_run(tmp_path, folder, tiny_model, single):
    out = tmp_path / "out"
    codes = []
    for i in range(3):
        r = runner.invoke(app, ["segment", str(folder), "--out", str(out), "--model", tiny_model, *FORMATS,
                                "--shard", f"{i}/3", "-q", "--workers", "0"])
        codes.append(r.exit_code)
    assert sorted(codes) == [0, 0, 3]  # exactly one shard owns the broken file
    parts = sorted(p.name for p in out.glob("predictions.shard-*"))
    assert len(parts) == 6  # .json and .jsonl per shard
    r = runner.invoke(app, ["merge", str(out)])
    assert r.exit_code == 0, r.output
    assert _snapshot(out) == {k: v for k, v in _snapshot(single).items()}
    merged = json.loads((out / "images.json").read_text())
    assert merged["images"] == json.loads((single / "images.json").read_text())["images"]
    assert len((out / "failures.jsonl").read_text().splitlines()) == 1


def test_merge_reports_a_missing_shard(tmp_path, folder, tiny_model):
    out = tmp_path / "out"
    for i in (0, 2):
        runner.invoke(app, ["segment", str(folder), "--out", str(out), "--model", tiny_model, "-f", "coco",
                            "--shard", f"{i}/3", "-q", "--workers", "0"])
    r = runner.invoke(app, ["merge", str(out)])
    assert r.exit_code == 3 and "shard 1/3 is missing" in r.stderr
    assert "merged 2 of 3 shards (1 missing, 0 incomplete)" in r.stderr
    assert json.loads((out / "predictions.json").read_text())  # what exists is still merged


def test_two_cpu_devices_equal_one_run(tmp_path, folder, tiny_model, single):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", str(folder), "--out", str(out), "--model",
                        tiny_model, *FORMATS, "--devices", "cpu,cpu", "--workers", "0"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 3, p.stderr  # the broken file, reported once
    assert p.stderr.count("broken.jpg") == 1
    assert "done: 14 images" in p.stderr
    assert _snapshot(out) == _snapshot(single)


# --- --devices: one card per worker, signals, progress, exit codes; merge and shard locks ------

def test_each_cuda_worker_sees_only_its_card():
    from m2f_cli.engines.devices import _child_env, child_device
    assert child_device("cuda:1", None) == ({"CUDA_VISIBLE_DEVICES": "1"}, "cuda:0")
    assert child_device("cuda:1", "4,6") == ({"CUDA_VISIBLE_DEVICES": "6"}, "cuda:0")  # this process's numbering
    assert child_device("cuda", "GPU-abc") == ({"CUDA_VISIBLE_DEVICES": "GPU-abc"}, "cuda:0")
    assert child_device("cpu", "0,1") == ({}, "cpu") and child_device("mps", None) == ({}, "mps")
    os.environ.pop("M2F_TEST_VAR", None)
    with _child_env({"M2F_TEST_VAR": "3"}):
        assert os.environ["M2F_TEST_VAR"] == "3"
    assert "M2F_TEST_VAR" not in os.environ


def test_worker_failures_map_to_exit_codes():
    from m2f_cli.engines.devices import _worker_failure
    devs = ["cuda:0", "cuda:1"]
    same = [(0, "ModelLoadError", "m: cannot load the model (x)"), (1, "ModelLoadError", "m: cannot load the model (x)")]
    e = _worker_failure(same, devs, every=True)
    assert (e.code, str(e)) == (1, "every device worker: m: cannot load the model (x)")
    assert _worker_failure([(0, "UsageError", "bad"), (1, "UsageError", "bad")], devs, every=True).code == 2
    assert _worker_failure([(0, "OutputLockedError", "l"), (1, "OutputLockedError", "l")], devs, True).code == 4
    one = _worker_failure([(1, "DeviceError", "no card")], devs, every=False)
    assert (one.code, str(one)) == (1, "device worker 1 (cuda:1): no card")


def test_rich_progress_takes_events_before_it_starts():
    import io
    from m2f_cli.progress import RichReporter, Summary
    from m2f_cli.records import Failure, ImageRef
    r = RichReporter(io.StringIO())
    r.advance(2, 3)
    r.failure(Failure(ImageRef("/a.jpg", "a", "a.jpg", 0), "decode", "broken"))
    r.start(5, 0)
    assert r.progress.tasks[0].completed == 3
    r.advance(1, 0)
    r.finish(Summary(images=3, failed=1))
    RichReporter(io.StringIO()).finish(Summary())  # never started (every worker failed): no error


def test_every_worker_failing_to_load_the_model_exits_1(tmp_path, folder, tiny_model):
    import shutil
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", str(folder), "--out", str(tmp_path / "o"),
                        "--model", str(broken), "--devices", "cpu,cpu", "--workers", "0", "--startup-cache", "off"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 1, p.stderr
    assert "every device worker:" in p.stderr and "cannot load the model" in p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("m2f: error:") == 1


def test_merge_refuses_while_a_shard_holds_its_lock(tmp_path, folder, tiny_model):
    from m2f_cli.outputs.local import LocalOutputFolder
    out = tmp_path / "out"
    for i in range(2):
        runner.invoke(app, ["segment", str(folder), "--out", str(out), "--model", tiny_model, "-f", "jsonl",
                            "--shard", f"{i}/2", "-q", "--workers", "0"])
    running = LocalOutputFolder(str(out), (1, 2))
    running.lock()  # shard 1 is "still running"
    try:
        r = runner.invoke(app, ["merge", str(out)])
        assert r.exit_code == 4 and "shard 1/2 is still running" in r.stderr, r.output
        assert not (out / "predictions.jsonl").exists()
    finally:
        running.unlock()
    r = runner.invoke(app, ["merge", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "predictions.jsonl").exists()


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    """Enough work for a Ctrl-C to land mid-run: 48 photos-sized images."""
    d = tmp_path_factory.mktemp("sigint_in")
    rng = np.random.default_rng(5)
    for n in range(48):
        arr = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((1600, 1200)).save(d / f"p{n:02d}.jpg")
    return d


def _start_devices(folder, out, tiny_model):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # its own session, like a shell job: the test sends the SIGINT to the whole process group as a
    # terminal does for Ctrl-C
    return subprocess.Popen([sys.executable, "-m", "m2f_cli", "segment", str(folder), "--out", str(out),
                             "--model", tiny_model, "-f", "png", "-f", "jsonl", "--batch-size", "1",
                             "--devices", "cpu,cpu", "--workers", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _wait_for_outputs(out, n, p, timeout=300):
    import time
    t0 = time.monotonic()
    while len(list(out.glob("*.png"))) < n:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.2)


def test_ctrl_c_finishes_every_worker_and_merges(tmp_path, big_folder, tiny_model):
    import signal
    out = tmp_path / "out"
    p = _start_devices(big_folder, out, tiny_model)
    _wait_for_outputs(out, 4, p)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: every process of the group
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "(interrupted)" in err
    done = len(list(out.glob("*.png")))
    assert 4 <= done < 48
    for i in range(2):  # each worker finalised its shard: manifest written, journal lines = outputs
        manifest = json.loads((out / f"m2f-run.shard-{i}-of-2.json").read_text())
        assert manifest["complete"] is False and manifest["interrupted"] == signal.SIGINT
    merged = (out / "predictions.jsonl").read_text().splitlines()
    assert len(merged) == done  # merged after the workers stopped: every written image, once
    r = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", str(big_folder), "--out", str(out),
                        "--model", tiny_model, "-f", "png", "-f", "jsonl", "--batch-size", "1",
                        "--devices", "cpu,cpu", "--workers", "0"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{done} skipped" in r.stderr and len((out / "predictions.jsonl").read_text().splitlines()) == 48


def test_a_second_ctrl_c_exits_at_once(tmp_path, big_folder, tiny_model):
    import signal
    import time
    out = tmp_path / "out"
    p = _start_devices(big_folder, out, tiny_model)
    _wait_for_outputs(out, 2, p)
    os.killpg(p.pid, signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and time.monotonic() - t0 < 10, err
    assert "Traceback" not in err
    time.sleep(1)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(out) not in ps  # no worker left behind
