"""Ctrl-C once (a clean stop), twice (at once), and the reordering that keeps outputs in input order."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from m2f_cli.outputs.writer_thread import in_order

from planted import planted_image

N = 24
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("signal_imgs")
    rng = np.random.default_rng(1)
    for n in range(N):
        w, h = int(rng.integers(200, 400)), int(rng.integers(150, 300))
        planted_image(w, h, seed=n)[0].save(d / f"img{n:02d}.jpg", quality=90)
    return d


def _start(images, out, model):
    return subprocess.Popen([sys.executable, "-m", "m2f_cli", "segment", str(images), "--out", str(out), "--model",
                             model, "-f", "png", "-f", "coco", "--batch-size", "1", "--workers", "1"],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(out, n, p, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        if len(list(out.glob("*.png"))) >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {n} outputs in time (exit {p.poll()})")


def _whole(out):
    for p in out.glob("*.png"):
        with Image.open(p) as im:
            im.load()
        json.loads(p.with_suffix(".json").read_text())


def test_one_ctrl_c_stops_cleanly_and_the_rerun_finishes(tmp_path, images, tiny_model):
    out = tmp_path / "out"
    p = _start(images, out, tiny_model)
    _wait_for(out, 3, p)
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    assert rc == 130, err
    assert "(interrupted)" in err and "Traceback" not in err and "KeyboardInterrupt" not in err
    done = len(list(out.glob("*.png")))
    assert done < N
    _whole(out)
    manifest = json.loads((out / "m2f-run.json").read_text())
    assert manifest["complete"] is False and manifest["interrupted"] == signal.SIGINT
    images_json = json.loads((out / "images.json").read_text())["images"]  # finalised from the journal
    assert len(images_json) == done
    p = _start(images, out, tiny_model)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    assert len(json.loads((out / "images.json").read_text())["images"]) == N


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_exits_at_once_leaving_only_whole_files(tmp_path, images, tiny_model, sig):
    out = tmp_path / "out"
    p = _start(images, out, tiny_model)
    _wait_for(out, 3, p)
    p.send_signal(sig)
    p.send_signal(sig)
    rc = p.wait(timeout=60)
    assert rc == 128 + sig
    assert "Traceback" not in p.stderr.read()
    _whole(out)
    assert len(list(out.glob("*.png"))) < N


def testin_order_reorders_and_streams():
    arrivals = [2, 0, 1, 5, 3, 4, 6]
    emitted = []

    def source():
        for seq in arrivals:
            yield seq, f"item{seq}"
            emitted.append(("in", seq))
    out = []
    for item in in_order(source()):
        out.append(item)
        emitted.append(("out", item))
    assert out == [f"item{i}" for i in range(7)]
    # each item leaves as soon as all before it have arrived, not at the end
    assert emitted.index(("out", "item0")) < emitted.index(("in", 1))
    assert emitted.index(("out", "item2")) < emitted.index(("in", 5))
    assert list(in_order(iter([]))) == []
