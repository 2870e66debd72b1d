"""Durable local outputs: data fsynced before each rename and directories after (batched), resume
that never takes an empty or cut-off file as done, journals that survive a garbage tail, COCO ids
that never repeat, and a clear refusal where the filesystem has no flock."""

import errno
import fcntl
import json
import os
import stat

import pytest
from typer.testing import CliRunner

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.outputs import local as state
from m2f_cli.cli import app
from m2f_cli.errors import ExitCode
from m2f_cli.errors import OutputError
from m2f_cli.outputs.local import Journal, LocalOutputFolder, file_is_whole

from planted import PlantedPredictor


def _run(image_dir, out, formats=("png", "overlay")):
    return run(RunConfig(inputs=[str(image_dir)], out=str(out), formats=formats, workers=0),
               segmenter=Segmenter(PlantedPredictor()))


def _outputs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".m2f" not in p.parts and not p.name.startswith(("m2f-run", "failures"))}


def test_resume_redoes_empty_and_cut_off_files(image_dir, tmp_path):
    out = tmp_path / "out"
    assert _run(image_dir, out).images == 4
    reference = _outputs(out)
    assert all(file_is_whole(str(out / name)) for name in reference)
    (out / "img0.png").write_bytes(b"")                                            # renamed, never written
    (out / "img1.json").write_bytes(reference["img1.json"][:-7])                   # sidecar cut off
    (out / "img2.overlay.jpg").write_bytes(reference["img2.overlay.jpg"][:4096])  # JPEG cut at a block
    (out / "sub/img3.png").write_bytes(reference["sub/img3.png"][:-12])           # PNG without its IEND
    for name in ("img0.png", "img1.json", "img2.overlay.jpg", "sub/img3.png"):
        assert not file_is_whole(str(out / name)), name
    s = _run(image_dir, out)
    assert (s.images, s.skipped) == (4, 0)
    assert _outputs(out) == reference
    s = _run(image_dir, out)
    assert (s.images, s.skipped) == (0, 4)


def _fd_path(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


def test_data_is_synced_before_the_rename_and_directories_after(image_dir, tmp_path, monkeypatch):
    """The order a power cut needs: fsync(data) < rename < fsync(directory) for every output, the
    directories synced in batches (each once here, with a long DIR_SYNC_S), all before unlock."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync-{kind}", _fd_path(fd)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(state.os, "fsync", fsync)
    monkeypatch.setattr(state.os, "replace", replace)
    monkeypatch.setattr(state, "DIR_SYNC_S", 3600.0)
    out = tmp_path / "out"
    _run(image_dir, out, formats=("png", "coco"))
    renames = [e for e in events if e[0] == "rename"]
    finals = {e[2] for e in renames}
    assert {str(out / "img0.png"), str(out / "sub/img3.json"), str(out / "predictions.json")} <= finals
    for i, e in enumerate(events):
        if e[0] != "rename":
            continue
        _, src, dst = e
        assert ("fsync-file", src) in events[:i], f"{dst}: renamed before its data was synced"
        later = [x for x in events[i + 1:] if x == ("fsync-dir", os.path.dirname(dst))]
        assert later, f"{dst}: its directory was never synced after the rename"
    dir_syncs = [e[1] for e in events if e[0] == "fsync-dir"]
    assert len(dir_syncs) < len(renames) / 2  # batched, not one per file
    assert str(out) in dir_syncs and str(out / "sub") in dir_syncs and str(tmp_path) in dir_syncs
    # the journal is synced in the same batch, after the directories
    journal = str(out / ".m2f" / "coco.journal.jsonl")
    last_journal = max(i for i, e in enumerate(events) if e == ("fsync-file", journal))
    first_dir = min(i for i, e in enumerate(events) if e[0] == "fsync-dir")
    assert first_dir < last_journal


def test_directories_are_synced_every_dir_sync_s(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(state, "fsync_dir", lambda d: synced.append(d))
    clock = [0.0]
    monkeypatch.setattr(state.time, "monotonic", lambda: clock[0])
    folder = LocalOutputFolder(str(tmp_path / "out"))
    folder.check_writable()
    folder.lock()
    folder.write_bytes(folder.join("a.json"), b"{}")
    assert synced == []                       # within DIR_SYNC_S of the last sync: batched
    clock[0] += state.DIR_SYNC_S
    folder.write_bytes(folder.join("b.json"), b"{}")
    out = str(tmp_path / "out")
    # due: the batch went to disk, each directory once (the new folders' parents too)
    assert sorted(synced) == [str(tmp_path), out, os.path.join(out, ".m2f")]
    folder.write_bytes(folder.join("c.json"), b"{}")
    assert len(synced) == 3
    folder.unlock()                           # the last batch at the end of the run
    assert synced[3:] == [out]


def test_a_journal_tail_of_garbage_is_cut(tmp_path):
    path = tmp_path / "j.jsonl"
    good = [json.dumps({"rel": f"r{i}"}).encode() + b"\n" for i in range(3)]
    path.write_bytes(b"".join(good) + b"\0" * 100 + b"\n" + json.dumps({"rel": "after"}).encode() + b"\n")
    j = Journal(str(path))
    assert [r["rel"] for r in j.records()] == ["r0", "r1", "r2"]
    j.append({"rel": "r3"})
    j.close()
    assert [r["rel"] for r in Journal(str(path)).records()] == ["r0", "r1", "r2", "r3"]


def test_coco_image_ids_never_repeat(image_dir, tmp_path):
    """Two records with one image id (two runs wrote one journal): the first keeps the id, the
    other image is redone under a fresh one."""
    out = tmp_path / "out"
    _run(image_dir, out, formats=("coco",))
    jpath = out / ".m2f" / "coco.journal.jsonl"
    recs = [json.loads(line) for line in jpath.read_text().splitlines()]
    recs[2]["image"]["id"] = recs[0]["image"]["id"]
    jpath.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = _run(image_dir, out, formats=("coco",))
    assert (s.images, s.skipped) == (1, 3)
    images = json.loads((out / "images.json").read_text())["images"]
    ids = [im["id"] for im in images]
    assert len(ids) == len(set(ids)) == 4
    assert sorted(im["file_name"] for im in images) == sorted(r["image"]["file_name"] for r in recs)
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} <= set(ids)


def _no_flock(*args, **kw):
    raise OSError(errno.ENOLCK, "No locks available")


def test_unsupported_flock_is_one_clear_line(image_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fcntl, "flock", _no_flock)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        _run(image_dir, out)
    msg = e.value.args[-1]
    assert str(out) in msg and "does not support file locks" in msg and "M2F_NO_LOCK=1" in msg
    assert "filesystem at /" in msg  # the filesystem, from /proc/mounts
    r = CliRunner().invoke(app, ["segment", str(image_dir), "--out", str(out), "--model", str(tmp_path / "none")])
    assert r.exit_code == ExitCode.FATAL
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("m2f: error: ") and "M2F_NO_LOCK" in lines[0], r.stderr
    # the documented way out for a folder only this run writes into
    monkeypatch.setenv("M2F_NO_LOCK", "1")
    assert _run(image_dir, out).images == 4
