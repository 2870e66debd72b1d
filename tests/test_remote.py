"""Remote inputs and outputs through fsspec: memory:// in-process, and a real S3 API (moto's server
on 127.0.0.1, started and stopped here) through s3fs and the installed ``m2f`` entry point."""

import io
import json
import os
import socket
import subprocess
import sys
import time

import fsspec
import pytest
from PIL import Image

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli import storage
from m2f_cli.merge import merge
from m2f_cli.pipeline import UsageError
from m2f_cli.state import OutputLockedError
from m2f_cli.walk import InputError, walk

from planted import PlantedPredictor, planted_image

SIZES = [(320, 240), (200, 300), (500, 180), (260, 260)]
FORMATS = ("png", "coco", "jsonl", "overlay")


def _image_bytes(n, w, h, fmt="PNG"):
    img, _ = planted_image(w, h, seed=n)
    b = io.BytesIO()
    img.save(b, fmt)
    return b.getvalue()


def _inputs() -> dict[str, bytes]:
    files = {f"im{n}.png" if n % 2 else f"sub/im{n}.jpg": _image_bytes(n, w, h, "PNG" if n % 2 else "JPEG")
             for n, (w, h) in enumerate(SIZES)}
    files["broken.jpg"] = b"not a jpeg"
    files[".hidden/skip.png"] = _image_bytes(9, 50, 50)
    files["notes.txt"] = b"not an image name"
    return files


@pytest.fixture()
def mem(request):
    """A fresh memory:// namespace for one test, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/t-{request.node.name[:40]}-{time.time_ns()}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _put_tree(fs, root, files):
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)


def _tree(get_files) -> dict[str, bytes]:
    """{name: bytes} of the user-visible outputs; the recorded input location is normalised,
    m2f-run.json (timings) left out."""
    out = {}
    for name, data in get_files():
        if name.startswith((".m2f/", "m2f-run")):
            continue
        out[name] = data
    return out


def _local_files(d):
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            yield os.path.relpath(p, d).replace(os.sep, "/"), open(p, "rb").read()


def _remote_files(fs, root):
    for p in fs.find(root):
        yield p[len(root) + 1:], fs.cat_file(p)


def _normalise(tree, location):
    return {k: v.replace(location.encode(), b"<in>") for k, v in tree.items()}


def test_url_detection():
    assert storage.is_url("s3://b/k") and storage.is_url("memory://x") and storage.is_url("gs://b")
    assert not storage.is_url("/data/imgs") and not storage.is_url("file:///data") and not storage.is_url("a:b")
    assert storage.local_path("file:///data/x.jpg") == "/data/x.jpg"


def test_walk_remote_folder_glob_and_object(mem):
    fs, root = mem
    _put_tree(fs, root, _inputs())
    fs.pipe_file(f"{root}/out/im1.png", b"an output, not an input")
    url = f"memory://{root}"
    found = walk([url], exclude=f"{url}/out")
    assert [r.name for r in found.refs] == ["broken.jpg", "im1.png", "im3.png", "sub/im0.jpg", "sub/im2.jpg"]
    assert [r.rel for r in found.refs] == ["broken", "im1", "im3", "sub/im0", "sub/im2"]
    assert all(r.path == f"memory://{root}/{r.name}" for r in found.refs)
    # a glob and a single object are named by their path without the protocol
    found = walk([f"{url}/sub/*.jpg", f"{url}/im1.png"])
    assert [r.name for r in found.refs] == [f"{root.lstrip('/')}/sub/im0.jpg", f"{root.lstrip('/')}/sub/im2.jpg",
                                            f"{root.lstrip('/')}/im1.png"]
    with pytest.raises(InputError, match="no such object or folder"):
        walk([f"{url}/nothing-here"])
    with pytest.raises(InputError, match="no object matches"):
        walk([f"{url}/*.tiff"])
    with pytest.raises(InputError, match="nosuchproto://x"):
        walk(["nosuchproto://x"])


def test_memory_run_equals_local_run_and_resumes(mem, tmp_path):
    fs, root = mem
    files = _inputs()
    _put_tree(fs, root, files)
    url = f"memory://{root}"
    cfg = RunConfig(inputs=[url], out=f"{url}-out", formats=FORMATS, workers=1)
    s = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert (s.images, s.failed) == (len(SIZES), 1)

    local_in = tmp_path / "in"
    for name, data in files.items():
        (local_in / name).parent.mkdir(parents=True, exist_ok=True)
        (local_in / name).write_bytes(data)
    local = RunConfig(inputs=[str(local_in)], out=str(tmp_path / "out"), formats=FORMATS, workers=1)
    run(local, segmenter=Segmenter(PlantedPredictor()))

    remote_tree = _normalise(_tree(lambda: _remote_files(fs, f"{root}-out")), f"memory://{root}")
    local_tree = _normalise(_tree(lambda: _local_files(tmp_path / "out")), str(local_in))
    assert set(remote_tree) == set(local_tree)
    assert {"sub/im0.png", "sub/im0.json", "im1.overlay.jpg", "predictions.json"} <= set(remote_tree)
    for name in local_tree:
        assert remote_tree[name] == local_tree[name], name
    failures = [json.loads(line) for line in fs.cat_file(f"{root}-out/failures.jsonl").splitlines()]
    assert [f["path"] for f in failures] == [f"{url}/broken.jpg"]

    # resume: everything is found done from one listing, nothing is rewritten
    before = {p: fs.info(p)["created"] for p in fs.find(f"{root}-out") if p.endswith(".png")}
    s = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert (s.images, s.skipped) == (0, len(SIZES))
    assert {p: fs.info(p)["created"] for p in fs.find(f"{root}-out") if p.endswith(".png")} == before


def test_lost_journal_chunk_is_redone_not_lost(mem, monkeypatch):
    """A run killed before its last journal chunk was uploaded: those images are redone on resume,
    and predictions.json ends up with every image exactly once."""
    fs, root = mem
    _put_tree(fs, root, {k: v for k, v in _inputs().items() if k != "broken.jpg"})
    monkeypatch.setattr(storage, "JOURNAL_FLUSH_RECORDS", 1)
    url = f"memory://{root}"
    cfg = RunConfig(inputs=[url], out=f"{url}-out", formats=("coco",), workers=0)
    run(cfg, segmenter=Segmenter(PlantedPredictor()))
    reference = json.loads(fs.cat_file(f"{root}-out/predictions.json"))
    chunks = sorted(fs.find(f"{root}-out/.m2f/coco.journal"))
    assert len(chunks) == len(SIZES)  # one chunk per record at this flush size
    fs.rm_file(chunks[-1])
    reads = []
    real_cat_file = type(fs).cat_file
    monkeypatch.setattr(type(fs), "cat_file", lambda self, path, *a, **k: reads.append(path) or
                        real_cat_file(self, path, *a, **k))
    s = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert (s.images, s.skipped) == (1, len(SIZES) - 1)
    # each chunk is fetched once, although the journal is read four times (done set + 3 files)
    chunk_reads = [p for p in reads if "/coco.journal/" in p]
    assert sorted(chunk_reads) == sorted(set(chunk_reads)) and len(chunk_reads) == len(SIZES) - 1
    again = json.loads(fs.cat_file(f"{root}-out/predictions.json"))
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == \
        sorted(json.dumps(r, sort_keys=True) for r in reference)


def test_remote_lease_lock(mem):
    fs, root = mem
    _put_tree(fs, root, {"a.png": _image_bytes(0, 64, 48)})
    url = f"memory://{root}"
    cfg = RunConfig(inputs=[url], out=f"{url}-out", workers=0)
    lock = f"{root}-out/.m2f/lock"
    fs.pipe_file(lock, json.dumps({"holder": "otherhost:123:abc", "time": time.time()}).encode())
    with pytest.raises(OutputLockedError, match="otherhost:123"):
        run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert not fs.exists(f"{root}-out/a.png")
    # a lease nobody renewed for longer than LEASE_STALE_S belonged to a dead run: taken over
    fs.pipe_file(lock, json.dumps({"holder": "otherhost:123:abc",
                                   "time": time.time() - storage.LEASE_STALE_S - 1}).encode())
    assert run(cfg, segmenter=Segmenter(PlantedPredictor())).images == 1
    assert not fs.exists(lock)  # released at the end


def test_merge_remote_shards(mem):
    fs, root = mem
    _put_tree(fs, root, {k: v for k, v in _inputs().items() if k != "broken.jpg"})
    url = f"memory://{root}"
    for i in range(2):
        run(RunConfig(inputs=[url], out=f"{url}-out", formats=("coco", "jsonl"), workers=0, shard=(i, 2)),
            segmenter=Segmenter(PlantedPredictor()))
    report = merge(f"{url}-out")
    assert report.ok and report.images == len(SIZES)
    lines = fs.cat_file(f"{root}-out/predictions.jsonl").splitlines()
    assert [json.loads(line)["name"] for line in lines] == ["im1.png", "im3.png", "sub/im0.jpg", "sub/im2.jpg"]


def test_unknown_protocol_for_out_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="nosuchproto"):
        run(RunConfig(inputs=[str(tmp_path)], out="nosuchproto://bucket/out"),
            segmenter=Segmenter(PlantedPredictor()))


# --- a real S3 API -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    pytest.importorskip("s3fs", reason="s3fs is in the test extra")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    yield env
    server.stop()


def test_s3_end_to_end_through_the_cli(s3_server, tiny_model, tmp_path):
    import s3fs
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"])
    fs.mkdir("imgs")
    files = {k: v for k, v in _inputs().items()}
    for name, data in files.items():
        fs.pipe_file(f"imgs/photos/{name}", data)
    env = {**os.environ, **s3_server}
    m2f = [sys.executable, "-m", "m2f_cli", "segment", "s3://imgs/photos", "--out", "s3://imgs/masks",
           "--model", tiny_model, "-f", "png", "-f", "coco", "--batch-size", "1", "--workers", "1", "-q"]
    p = subprocess.run(m2f, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stderr  # the broken file
    assert "s3://imgs/photos/broken.jpg" in p.stderr
    fs.invalidate_cache()
    names = sorted(k.split("imgs/masks/", 1)[1] for k in fs.find("imgs/masks"))
    assert {"im1.png", "im1.json", "sub/im0.png", "predictions.json", "failures.jsonl", "m2f-run.json"} <= set(names)
    label = Image.open(io.BytesIO(fs.cat_file("imgs/masks/im1.png")))
    assert label.size == SIZES[1] and label.mode.startswith("I")

    # the same inputs locally give the same files
    local_in = tmp_path / "in"
    for name, data in files.items():
        (local_in / name).parent.mkdir(parents=True, exist_ok=True)
        (local_in / name).write_bytes(data)
    q = subprocess.run([*m2f[:4], str(local_in), "--out", str(tmp_path / "out"), *m2f[7:]], env=env,
                       capture_output=True, text=True, timeout=300)
    assert q.returncode == 3, q.stderr
    remote = _normalise(_tree(lambda: ((k.split("imgs/masks/", 1)[1], fs.cat_file(k)) for k in fs.find("imgs/masks"))),
                        "s3://imgs/photos")
    local = _normalise(_tree(lambda: _local_files(tmp_path / "out")), str(local_in))
    assert remote == local

    # resume against S3: all done
    p = subprocess.run(m2f, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stderr
    m = json.loads(fs.cat_file("imgs/masks/m2f-run.json"))
    assert (m["images"], m["skipped"]) == (0, len(SIZES))


def test_staging_folders_of_dead_runs_are_swept(mem, tmp_path, monkeypatch):
    """A SIGKILLed remote run leaves <tmp>/m2f-stage-<pid>-*; the next remote run removes those
    whose process is gone and leaves live ones alone."""
    monkeypatch.setattr(storage.tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"m2f-stage-{dead.pid}-abc"
    (stale / "x").mkdir(parents=True)
    live = tmp_path / f"m2f-stage-{os.getpid()}-def"
    live.mkdir()
    other = tmp_path / "m2f-stage-notapid"
    other.mkdir()
    fs, root = mem
    _put_tree(fs, root, {"a.png": _image_bytes(0, 64, 48)})
    url = f"memory://{root}"
    assert run(RunConfig(inputs=[url], out=f"{url}-out", workers=0),
               segmenter=Segmenter(PlantedPredictor())).images == 1
    assert not stale.exists() and live.exists() and other.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f"m2f-stage-{os.getpid()}-")] == [live]
