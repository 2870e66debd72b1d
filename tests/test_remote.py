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
from fsspec.implementations.memory import MemoryFileSystem
import pytest
from PIL import Image

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli import urls
from m2f_cli.outputs import lease, remote as storage, staging
from m2f_cli.tools.merge import merge
from m2f_cli.errors import InputError, LeaseLostError, OutputLockedError, UsageError
from m2f_cli.outputs.open import open_output
from m2f_cli.inputs.walk import walk

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
    assert urls.is_url("s3://b/k") and urls.is_url("memory://x") and urls.is_url("gs://b")
    assert not urls.is_url("/data/imgs") and not urls.is_url("file:///data") and not urls.is_url("a:b")
    assert urls.local_path("file:///data/x.jpg") == "/data/x.jpg"


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


def test_remote_lease_lock(mem, monkeypatch):
    """memory:// (one process): a held lease refuses a second run, naming its holder; a lease the
    store has not seen renewed for LEASE_STALE_S is taken over; the lease is released at the end."""
    fs, root = mem
    _put_tree(fs, root, {"a.png": _image_bytes(0, 64, 48)})
    url = f"memory://{root}"
    cfg = RunConfig(inputs=[url], out=f"{url}-out", workers=0)
    lock = f"{root}-out/.m2f/lock"
    fs.pipe_file(lock, json.dumps({"holder": "otherhost:123:abc", "renewals": 4}).encode())
    with pytest.raises(OutputLockedError, match="otherhost:123"):
        run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert not fs.exists(f"{root}-out/a.png")
    # nobody renewed it for LEASE_STALE_S (by the store's clock: here this process's): a dead run's
    monkeypatch.setattr(lease, "LEASE_STALE_S", 0.3)
    time.sleep(0.4)
    assert run(cfg, segmenter=Segmenter(PlantedPredictor())).images == 1
    assert not fs.exists(lock)  # released at the end


def test_memory_lease_is_exact_between_folders_of_one_process(mem):
    fs, root = mem
    a, b = open_output(f"memory://{root}/out"), open_output(f"memory://{root}/out")
    a.lock()
    try:
        with pytest.raises(OutputLockedError, match="in use by another m2f run"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


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
    # moto[server] and s3fs are in the test extra: missing, this fails (never a skip)
    import moto.server as moto_server
    import s3fs  # noqa: F401
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
    monkeypatch.setattr(staging.tempfile, "tempdir", str(tmp_path))
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


# --- exclusivity on S3: conditional writes against the moto server ----------------------------------

@pytest.fixture()
def s3_out(s3_server, monkeypatch):
    """A fresh s3:// output location on the moto server (this process's environment points at it)."""
    import s3fs
    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    # fsspec reads FSSPEC_S3_* when it is imported: give this process the same settings directly
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server["FSSPEC_S3_ENDPOINT_URL"],
                                                   "key": "testing", "secret": "testing"})
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server["FSSPEC_S3_ENDPOINT_URL"])
    bucket = f"lease-{time.time_ns()}"
    fs.mkdir(bucket)
    yield fs, f"s3://{bucket}/out"
    s3fs.S3FileSystem.clear_instance_cache()


def _holder_of(fs, url):
    fs.invalidate_cache()
    return json.loads(fs.cat_file(f"{url[5:]}/.m2f/lock"))["holder"]


def test_two_drivers_racing_for_s3_exactly_one_wins(s3_out):
    """The race that write-sleep-read lost: B finds the location free, A takes it meanwhile with
    an upload slower than any sleep, then B's create arrives. If-None-Match makes B lose, and B's
    run writes nothing. Then the same race with both creates released at once, a few times."""
    fs, url = s3_out
    a, b = open_output(url), open_output(url)
    real_create = b.store.create

    def slow_create(key, body):
        a.lock()  # A's whole acquisition happens while B's request is on its way
        return real_create(key, body)
    b.store.create = slow_create
    with pytest.raises(OutputLockedError, match="in use by another m2f run"):
        b.lock()
    assert _holder_of(fs, url) == a._lease.holder
    assert b._lease is None and not b.tmp  # the loser holds nothing and stages nothing
    a.unlock()
    assert not fs.exists(f"{url[5:]}/.m2f/lock")

    import threading
    for round_ in range(3):
        folders = [open_output(url) for _ in range(2)]
        barrier = threading.Barrier(2)
        won, lost = [], []

        def go(f):
            create = f.store.create
            f.store.create = lambda key, body: (barrier.wait(), create(key, body))[1]
            try:
                f.lock()
                won.append(f)
            except OutputLockedError:
                lost.append(f)
        threads = [threading.Thread(target=go, args=(f,)) for f in folders]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert (len(won), len(lost)) == (1, 1), round_
        assert _holder_of(fs, url) == won[0]._lease.holder
        won[0].unlock()


def test_the_loser_of_an_s3_race_writes_nothing(s3_out, tmp_path):
    """A run that finds the location held exits before any writer: no chunk, no output."""
    fs, url = s3_out
    img = tmp_path / "in"
    img.mkdir()
    (img / "a.png").write_bytes(_image_bytes(0, 64, 48))
    holder = open_output(url)
    holder.lock()
    try:
        before = set(fs.find(url[5:]))
        with pytest.raises(OutputLockedError, match=holder._lease.holder):
            run(RunConfig(inputs=[str(img)], out=url, formats=("png", "coco"), workers=0),
                segmenter=Segmenter(PlantedPredictor()))
        fs.invalidate_cache()
        assert set(fs.find(url[5:])) == before
    finally:
        holder.unlock()


def test_a_renewal_after_a_takeover_fails_and_the_old_holder_stops_writing(s3_out, monkeypatch):
    """A stops renewing (a long pause); by the store's clock its lease goes stale and B takes it
    over with If-Match on the version it read. A's next renewal fails on its condition: A stops,
    its journal chunk and outputs are refused, its release leaves B's lease alone."""
    fs, url = s3_out
    monkeypatch.setattr(lease, "LEASE_RENEW_S", 3600.0)   # A's renewal thread stays asleep
    monkeypatch.setattr(lease, "LEASE_STALE_S", 2.0)
    monkeypatch.setattr(lease, "LEASE_VALID_S", 3600.0)  # only the failed condition can stop A here
    a, b = open_output(url), open_output(url)
    a.lock()
    journal = a.journal("coco")
    journal.append({"rel": "x", "image": {"id": 1}, "dets": []})
    journal.flush()  # while A holds the lease: one chunk
    with pytest.raises(OutputLockedError, match="in use"):
        b.lock()  # not stale yet: refused, by the store's own clock
    time.sleep(3.2)  # HTTP dates have 1 s resolution
    b.lock()
    assert _holder_of(fs, url) == b._lease.holder
    chunks = sorted(fs.find(f"{url[5:]}/.m2f/coco.journal"))
    assert len(chunks) == 1

    with pytest.raises(LeaseLostError, match="taken over by " + b._lease.holder):
        a._lease.renew()
    journal.append({"rel": "y", "image": {"id": 2}, "dets": []})
    with pytest.raises(LeaseLostError):
        journal.flush()
    with pytest.raises(LeaseLostError):
        a.write_bytes(a.join("late.json"), b"{}")
    a.unlock()
    fs.invalidate_cache()
    assert sorted(fs.find(f"{url[5:]}/.m2f/coco.journal")) == chunks  # nothing of A's after the takeover
    assert not fs.exists(f"{url[5:]}/late.json")
    assert _holder_of(fs, url) == b._lease.holder  # A's release did not remove B's lease
    assert b._lease.renew()  # and B's conditional renewals go on
    b.unlock()
    assert not fs.exists(f"{url[5:]}/.m2f/lock")


def test_a_takeover_loses_to_a_renewal_in_between(s3_out, monkeypatch):
    """B reads a stale lease, A renews before B writes: B's If-Match fails, B refuses."""
    fs, url = s3_out
    monkeypatch.setattr(lease, "LEASE_RENEW_S", 3600.0)
    monkeypatch.setattr(lease, "LEASE_STALE_S", 1.0)
    a, b = open_output(url), open_output(url)
    a.lock()
    time.sleep(2.2)
    real_read = b.store.read

    def read_then_a_renews(key):
        seen = real_read(key)
        assert seen.age_s >= lease.LEASE_STALE_S
        assert a._lease.renew()
        return seen
    b.store.read = read_then_a_renews
    with pytest.raises(OutputLockedError, match="just taken over"):
        b.lock()
    assert _holder_of(fs, url) == a._lease.holder
    a.unlock()


def test_a_holder_that_cannot_renew_stops_before_a_takeover_is_possible(mem, monkeypatch):
    fs, root = mem
    folder = open_output(f"memory://{root}/out")
    folder.lock()
    clock = [time.monotonic()]
    monkeypatch.setattr(lease.time, "monotonic", lambda: clock[0])
    folder.write_bytes(folder.join("a.json"), b"{}")
    clock[0] += lease.LEASE_VALID_S + 1  # renewals failed all that time (store unreachable)
    with pytest.raises(LeaseLostError, match="not renewed"):
        folder.write_bytes(folder.join("b.json"), b"{}")
    assert lease.LEASE_VALID_S < lease.LEASE_STALE_S
    folder.unlock()


def test_an_s3_store_that_ignores_conditions_is_refused(s3_out, monkeypatch, tmp_path):
    fs, url = s3_out
    (tmp_path / "a.png").write_bytes(_image_bytes(0, 64, 48))
    real_call = lease._S3Store._call

    def ignoring(self, method, key, **kw):
        kw.pop("IfNoneMatch", None), kw.pop("IfMatch", None)
        return real_call(self, method, key, **kw)
    monkeypatch.setattr(lease._S3Store, "_call", ignoring)
    with pytest.raises(UsageError, match="does not enforce conditional writes.*M2F_UNSAFE_REMOTE=1"):
        run(RunConfig(inputs=[str(tmp_path)], out=url, workers=0), segmenter=Segmenter(PlantedPredictor()))
    fs.invalidate_cache()
    assert not fs.exists(f"{url[5:]}/a.png")


class _PlainFS(MemoryFileSystem):
    """A filesystem-like backend with no conditional writes (as sftp, hdfs, smb)."""

    protocol = "m2fplain"
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("m2fplain://"))


def test_a_backend_without_conditional_writes_is_refused_unless_opted_in(mem, monkeypatch, tmp_path):
    fsspec.register_implementation("m2fplain", _PlainFS, clobber=True)
    fs, root = mem
    _put_tree(fs, root, {"a.png": _image_bytes(0, 64, 48)})
    out = "m2fplain://bucket/out"
    from typer.testing import CliRunner
    from m2f_cli.cli import app
    r = CliRunner().invoke(app, ["segment", f"memory://{root}", "--out", out, "--model", str(tmp_path / "none")])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "m2fplain:// offers no conditional writes" in lines[0] and \
        "M2F_UNSAFE_REMOTE=1" in lines[0], r.stderr
    monkeypatch.setenv("M2F_UNSAFE_REMOTE", "1")
    s = run(RunConfig(inputs=[f"memory://{root}"], out=out, formats=("png", "coco"), workers=0),
            segmenter=Segmenter(PlantedPredictor()))
    assert s.images == 1
    plain = _PlainFS()
    names = [p.split("bucket/out/", 1)[1] for p in plain.find("bucket/out")]
    assert {"a.png", "a.json", "predictions.json"} <= set(names)
    assert not [n for n in names if ".m2f-part-" in n]  # uploaded under a temporary name, then moved


class _FakeGcs:
    """The three calls _GcsStore makes through gcsfs (GET an object's resource, a multipart upload
    with ifGenerationMatch, DELETE with ifGenerationMatch), with GCS's precondition semantics and
    gcsfs's exceptions (404 -> FileNotFoundError, 412 -> FileExistsError). No GCS server is in the
    suite: this checks the protocol m2f speaks, not a store."""

    _location = "https://storage.googleapis.com"

    def __init__(self):
        self.objects, self.gen = {}, 0

    def split_path(self, path):
        bucket, _, key = path.partition("/")
        return bucket, key, None

    def invalidate_cache(self, path=None):
        pass

    def call(self, method, path, *args, ifGenerationMatch=None, data=None, json_out=False, **kw):
        import email.utils
        if method == "GET":
            key = "/".join(args)
            if key not in self.objects:
                raise FileNotFoundError(key)
            meta = self.objects[key]
            return {"Date": email.utils.formatdate(usegmt=True)}, json.dumps(meta).encode()
        if method == "POST":
            head = json.loads(data.split(b"\n\n", 1)[1].split(b"\n--==0==", 1)[0])
            key = f"{path.rsplit('/b/', 1)[1].split('/')[0]}/{head['name']}"
        else:
            key = "/".join(args)
        current = self.objects.get(key, {}).get("generation", "0")
        if ifGenerationMatch is not None and str(ifGenerationMatch) != current:
            raise FileExistsError(key)  # gcsfs: HTTP 412
        if method == "DELETE":
            del self.objects[key]
            return {}, b""
        self.gen += 1
        self.objects[key] = {"generation": str(self.gen), "metadata": head["metadata"],
                             "updated": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        return {"generation": str(self.gen)}


def test_gcs_lease_speaks_generation_preconditions(monkeypatch):
    fake = _FakeGcs()
    a, b = lease._GcsStore(fake), lease._GcsStore(fake)
    v1 = a.create("bkt/out/.m2f/lock", b'{"holder": "a"}')
    with pytest.raises(lease._Conflict):
        b.create("bkt/out/.m2f/lock", b'{"holder": "b"}')
    seen = b.read("bkt/out/.m2f/lock")
    assert seen.holder == {"holder": "a"} and seen.version == v1 and 0 <= seen.age_s < 5
    v2 = a.replace("bkt/out/.m2f/lock", b'{"holder": "a", "renewals": 1}', v1)
    with pytest.raises(lease._Conflict):  # a takeover from a stale read loses to the renewal
        b.replace("bkt/out/.m2f/lock", b'{"holder": "b"}', v1)
    b.delete("bkt/out/.m2f/lock", v1)  # not the current generation: left alone
    assert b.read("bkt/out/.m2f/lock").version == v2
    a.delete("bkt/out/.m2f/lock", v2)
    assert a.read("bkt/out/.m2f/lock") is None
    assert lease.LEASE_STORES["gs"] is lease._GcsStore
