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
from m2f_cli.walk import parse_shard, shard_of

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
