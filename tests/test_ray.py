"""The Ray engine on a real local cluster (ray.init(num_cpus=2)) with the tiny model: outputs equal
a plain local run, resume, a worker killed mid-run, the CLI. Kept small: it runs in CI."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2f_cli import RunConfig, run
from m2f_cli.cli import app
from m2f_cli.choices import segmenter_options

from crash_once import CrashOnce
from test_never_lose_work import _snapshot

pytestmark = pytest.mark.ray

TESTS = os.path.dirname(os.path.abspath(__file__))
# batch size 1 in both runs: CPU kernels may change the last bits with the batch composition
FORMATS = ("png", "coco", "jsonl")
N_GOOD = 6
VICTIM = "d3.jpg"  # the 5th of 7 inputs (a0 b1 broken c2 d3 e4 rot): killed mid-run


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray_in")
    rng = np.random.default_rng(7)
    for n in range(N_GOOD - 1):
        w, h = int(rng.integers(120, 320)), int(rng.integers(100, 260))
        arr = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((w, h)).save(d / f"{'abcde'[n]}{n}.jpg", quality=90)
    stored = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).resize((240, 160))
    exif = stored.getexif()
    exif[0x0112] = 6  # displayed rotated: 160 wide, 240 high
    stored.save(d / "rot.jpg", exif=exif, quality=90)
    (d / "broken.jpg").write_bytes(b"not an image")
    return d


def _config(images, out, tiny_model, **kw):
    return RunConfig(inputs=[str(images)], out=str(out), formats=FORMATS, model=tiny_model, batch_size=1,
                     workers=0, **kw)


@pytest.fixture(scope="module")
def local(tmp_path_factory, images, tiny_model):
    out = tmp_path_factory.mktemp("ray_local")
    s = run(_config(images, out, tiny_model))
    assert (s.images, s.failed) == (N_GOOD, 1)
    return out


def _check_outputs(out, local):
    assert _snapshot(out) == _snapshot(local)
    assert len(list(out.glob("**/*.png"))) == N_GOOD
    side = json.loads((out / "rot.json").read_text())
    with Image.open(out / "rot.png") as im:
        assert (side["width"], side["height"]) == im.size == (160, 240)  # EXIF applied on the actor
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(os.path.basename(f["path"]), f["stage"]) for f in failures] == [("broken.jpg", "decode")]


def test_cli_ray_local_equals_a_local_run(tmp_path, images, tiny_model, local):
    """Runs before the module's cluster starts: the CLI starts (and stops) a local one of its own."""
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", str(images), "--out", str(out),
                        "--model", tiny_model, *[a for f in FORMATS for a in ("-f", f)], "--batch-size", "1",
                        "--ray", "local", "--summary-json", str(tmp_path / "s.json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 3, p.stderr  # the broken file
    assert p.stdout == ""  # Ray's own messages never reach stdout (--out - streams JSON Lines there)
    assert p.stderr.count("broken.jpg") == 1 and f"done: {N_GOOD} images" in p.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert (summary["total"], summary["images"], summary["failed"]) == (N_GOOD + 1, N_GOOD, 1)
    assert summary["stages"]["forward"] > 0  # the actors' stage seconds reach the summary
    _check_outputs(out, local)


@pytest.fixture(scope="module")
def cluster():
    import ray
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2, log_to_driver=False,
             logging_level=logging.ERROR,
             # the actors import tests/crash_once.py
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [TESTS, *filter(None, [os.environ.get("PYTHONPATH")])])}})
    yield ray
    ray.shutdown()


def test_run_on_ray_equals_a_local_run_and_resumes(tmp_path, cluster, images, tiny_model, local):
    out = tmp_path / "out"
    cfg = _config(images, out, tiny_model, ray="auto")  # auto: this process is connected already
    s = run(cfg)
    assert (s.total, s.images, s.skipped, s.failed, s.exit_code) == (N_GOOD + 1, N_GOOD, 0, 1, 3)
    assert s.instances > 0 and s.stages.forward > 0
    _check_outputs(out, local)
    assert cluster.is_initialized()  # not ours to shut down

    s = run(cfg)  # resume: everything done is skipped (the broken file is tried again)
    assert (s.images, s.skipped, s.failed) == (0, N_GOOD, 1)
    _check_outputs(out, local)


def test_a_worker_killed_mid_run_is_retried(tmp_path, cluster, images, tiny_model, local):
    from m2f_cli.engines.ray import RayEngine
    out, marker = tmp_path / "out", tmp_path / "crashed"
    cfg = _config(images, out, tiny_model, ray="auto")
    engine = RayEngine(cfg, "instance", segmenter_factory=CrashOnce(segmenter_options(cfg, "instance"),
                                                                    str(marker), VICTIM))
    s = run(cfg, engine=engine)
    assert marker.exists()  # the actor process did die on the victim
    assert (engine.plan_used.actors, engine.plan_used.num_cpus) == (1, 1)  # one of the 2 CPUs kept free
    assert (s.images, s.failed, s.exit_code) == (N_GOOD, 1, 3)  # only the broken file failed
    _check_outputs(out, local)


def test_ray_usage_errors(tmp_path, images, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(app, ["segment", str(images), "--out", str(tmp_path / "o"), "--ray", "local",
                            "--devices", "cpu,cpu"])
    assert r.exit_code == 2 and "--ray and --devices" in r.stderr
    r = runner.invoke(app, ["segment", str(images), "--out", str(tmp_path / "o"), "--ray", "local",
                            "--ray-actors", "0"])
    assert r.exit_code == 2 and "--ray-actors 0" in r.stderr
    monkeypatch.setattr("m2f_cli.choices._ray_installed", lambda: False)
    r = runner.invoke(app, ["segment", str(images), "--out", str(tmp_path / "o"), "--ray", "auto"])
    assert r.exit_code == 2 and "--ray needs Ray: pip install 'm2f[ray]'" in r.stderr
    assert not (tmp_path / "o").exists()  # found before anything was written


def test_actors_leave_a_cpu_free_and_take_one_gpu_each(monkeypatch):
    """The no-deadlock sizing, on made-up clusters."""
    import ray
    from m2f_cli.engines.ray import RayEngine

    def plan(cpus_per_node, gpus=0, **kw):
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(sum(cpus_per_node)),
                                                               "GPU": float(gpus)})
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": float(c)}}
                                                   for c in cpus_per_node])
        p = RayEngine(RunConfig(inputs=[], out="o", ray="auto", **kw)).plan()
        return p.actors, p.num_cpus, p.num_gpus, p.batch_size

    assert plan([2]) == (1, 1, 0, 2)
    assert plan([16]) == (3, 4, 0, 2)            # 3 x 4 CPUs, 4 left
    assert plan([16, 16], threads=8) == (3, 8, 0, 2)  # 31 // 8; each node fits one or two
    assert plan([5, 5], threads=4) == (2, 4, 0, 2)    # (10 - 1) // 4 = 2, one per node
    assert plan([32, 32], gpus=4) == (4, 8, 1, 16)    # one per GPU, (64 - 1) // 4 CPUs each, at most 8
    assert plan([32, 32], gpus=4, ray_cpus_per_actor=3) == (4, 3, 1, 16)
    assert plan([6], gpus=4) == (4, 1, 1, 16)         # small nodes: at least one
    assert plan([32], gpus=2, device="cpu")[2] == 0
    assert plan([4], ray_actors=7, batch_size=3) == (7, 3, 0, 3)
    with pytest.raises(Exception, match="no node of the Ray cluster has 8 CPUs"):
        plan([4, 4], threads=8)


def test_gpu_actors_get_their_node_share_of_cpus_and_set_their_threads(monkeypatch):
    """Decoding and post-processing need CPUs next to each GPU: a node's CPUs less one, split among its
    GPUs (so every actor can be placed), and the actor's torch threads follow (--ray-cpus-per-actor)."""
    import ray
    import torch
    from m2f_cli.engines.ray import RayEngine, _Actor, gpu_actor_cpus

    assert gpu_actor_cpus([{"CPU": 16, "GPU": 2}, {"CPU": 48, "GPU": 8}], 64, 10) == 5  # min(15//2, 47//8)
    assert gpu_actor_cpus([{"CPU": 128, "GPU": 2}], 128, 2) == 8                         # capped
    assert gpu_actor_cpus([{"CPU": 4, "GPU": 8}], 4, 8) == 1
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 24.0, "GPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 24.0, "GPU": 2.0}}])
    p = RayEngine(RunConfig(inputs=[], out="o", ray="auto")).plan()
    assert (p.actors, p.num_cpus, p.num_gpus, p.threads) == (2, 8, 1, 8)
    p = RayEngine(RunConfig(inputs=[], out="o", ray="auto", ray_cpus_per_actor=4, threads=2)).plan()
    assert (p.num_cpus, p.threads) == (4, 2)
    before = torch.get_num_threads()
    try:
        from planted import PlantedPredictor
        from m2f_cli import Segmenter
        actor = _Actor({}, lambda: Segmenter(PlantedPredictor()), 3, 2, None, False, decoders=3)
        assert torch.get_num_threads() == 3 and actor.decoders == 3
    finally:
        torch.set_num_threads(before)


def test_ray_cpus_per_actor_is_checked(tmp_path, images):
    runner = CliRunner()
    r = runner.invoke(app, ["segment", str(images), "--out", str(tmp_path / "o"), "--ray-cpus-per-actor", "2"])
    assert r.exit_code == 2 and "--ray-cpus-per-actor needs --ray" in r.stderr
    r = runner.invoke(app, ["segment", str(images), "--out", str(tmp_path / "o"), "--ray", "local",
                            "--ray-cpus-per-actor", "0"])
    assert r.exit_code == 2 and "--ray-cpus-per-actor 0" in r.stderr


def test_an_actor_decoding_in_threads_gives_the_same_results(images):
    from planted import PlantedPredictor
    from m2f_cli import Segmenter
    from m2f_cli.engines.ray import _Actor
    from m2f_cli.inputs.walk import walk
    refs = walk([str(images)]).refs
    items = list(enumerate(refs))
    outs = []
    for decoders in (1, 3):
        actor = _Actor({}, lambda: Segmenter(PlantedPredictor()), None, 2, None, False, decoders=decoders)
        out, seconds = actor.process(items)
        outs.append([(seq, getattr(r, "stage", None) or len(r.instances)) for seq, r in sorted(out, key=lambda t: t[0])])
        assert seconds["decode"] > 0
    assert outs[0] == outs[1] and len(outs[0]) == len(refs)
