"""Reruns with other settings, added formats, pipes closed by the reader, writers that fail, and
signals while the writer is stuck: never a silently stale result, never a hang."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image
from typer.testing import CliRunner

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.cli import app
from m2f_cli.errors import ExitCode
from m2f_cli.model.loading import cpu_has_fast_bf16
from m2f_cli.errors import WriterError
from m2f_cli.outputs.settings_record import differences
from m2f_cli.outputs.writers.png import PngWriter

from planted import PlantedPredictor, planted_image
from tiny import make_tiny_model

runner = CliRunner()
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _m2f_cmd():
    return [sys.executable, "-m", "m2f_cli"]


def _files(out):
    """Every output file (not our bookkeeping) -> its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and ".m2f" not in p.parts and not p.name.startswith(("m2f-run", "failures"))}


@pytest.fixture()
def done_folder(tmp_path, image_dir, tiny_model):
    """A finished png + jsonl run of the tiny model over image_dir."""
    out = tmp_path / "out"
    r = _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "-f", "png", "-f", "jsonl", "-q")
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same architecture and labels as tiny_model, other weights."""
    return make_tiny_model(str(tmp_path_factory.mktemp("other_model")), seed=7)


@pytest.mark.parametrize("args,setting", [
    (["--threshold", "0.9"], "threshold: 0.5 -> 0.9"),
    (["--classes", "person,dog"], 'classes: null -> ["dog", "person"]'),
    (["--top-k", "7"], "top_k: 100 -> 7"),
    (["--resize", "320"], 'resize: "checkpoint" -> "320"'),
    (["--rle"], "rle: false -> true"),
    (["--fast-decode"], "fast_decode: false -> true"),
    (["--task", "semantic"], 'task: "instance" -> "semantic"'),
    (["--model", "OTHER"], "model: "),
])
def test_a_changed_setting_is_refused_before_the_model_loads(done_folder, image_dir, tiny_model, other_model,
                                                             args, setting):
    before = _files(done_folder)
    args = [other_model if a == "OTHER" else a for a in args]
    model = other_model if "--model" in args else tiny_model
    rest = [a for a in args if a not in ("--model", other_model)]
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", model, "-f", "png", "-f", "jsonl", *rest)
    assert r.exit_code == ExitCode.USAGE, r.output
    line = r.stderr.strip()
    assert line.count("\n") == 0 and setting in line, line
    assert "--overwrite" in line and "--out" in line
    assert _files(done_folder) == before  # nothing rewritten, nothing removed
    # --overwrite takes the new settings, and the record then holds them
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", model, "-f", "png", "-f", "jsonl", *rest,
                "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    again = _invoke("segment", image_dir, "--out", done_folder, "--model", model, "-f", "png", "-f", "jsonl",
                    *rest)
    assert again.exit_code == 0 and "4 skipped" in again.stderr, again.output


def test_the_model_is_known_by_its_content_not_its_path(done_folder, image_dir, tiny_model, tmp_path):
    copy = tmp_path / "copy_of_the_model"
    shutil.copytree(tiny_model, copy)
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", copy, "-f", "png", "-f", "jsonl")
    assert r.exit_code == 0 and "4 skipped" in r.stderr, r.output


def test_switching_a_coco_run_to_annotations_is_refused(tmp_path, image_dir, tiny_model):
    out = tmp_path / "out"
    assert _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "-f", "coco", "-q").exit_code == 0
    images = json.loads((out / "images.json").read_text())["images"]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{**im, "id": 1000 + n} for n, im in enumerate(images)],
                              "annotations": [], "categories": [{"id": 1, "name": "person"}]}))
    r = _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "-f", "coco", "--coco-annotations", gt)
    assert r.exit_code == ExitCode.USAGE and "coco_annotations: null ->" in r.stderr, r.output


def test_adding_a_format_only_does_the_missing_work(done_folder, image_dir, tiny_model):
    pngs = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done_folder.rglob("*.png")}
    assert len(pngs) == 4
    summary = done_folder.parent / "summary.json"
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", tiny_model, "-f", "png", "-f", "jsonl",
                "-f", "coco", "--summary-json", summary)
    assert r.exit_code == 0, r.output
    assert json.loads(summary.read_text())["images"] == 4  # run for the COCO files
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done_folder.rglob("*.png")} == pngs
    assert len(json.loads((done_folder / "images.json").read_text())["images"]) == 4
    assert len((done_folder / "predictions.jsonl").read_text().splitlines()) == 4  # not doubled
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", tiny_model, "-f", "coco")
    assert r.exit_code == 0 and "4 skipped" in r.stderr


def test_a_folder_without_a_record_is_adopted_then_checked(done_folder, image_dir, tiny_model, caplog):
    for p in (done_folder / ".m2f").glob("*.settings.json"):
        p.unlink()  # as an m2f before settings records left it
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", tiny_model, "-f", "png", "-f", "jsonl")
    assert r.exit_code == 0 and "4 skipped" in r.stderr
    assert any("kept no settings record" in rec.message for rec in caplog.records)
    assert (done_folder / ".m2f" / "png.settings.json").exists()
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", tiny_model, "-f", "png", "-t", "0.8")
    assert r.exit_code == ExitCode.USAGE and "threshold: 0.5 -> 0.8" in r.stderr


def test_differences_compare_content_and_name_old_and_new():
    base = {"schema": 1, "settings": {"model": {"name": "a", "fingerprint": "f1"}, "dtype": "float32",
                                      "coco_annotations": {"path": "/x/gt.json", "digest": "d1"}}}
    moved = {"schema": 1, "settings": {"model": {"name": "./b", "fingerprint": "f1"}, "dtype": "float32",
                                       "coco_annotations": {"path": "/y/gt.json", "digest": "d1"}}}
    assert differences(base, moved) == []
    other = json.loads(json.dumps(moved))
    other["settings"]["dtype"] = "bfloat16"
    other["settings"]["model"]["fingerprint"] = "f2"
    other["schema"] = 2
    diff = differences(base, other)
    assert diff[0] == "output schema: 1 -> 2" and diff[1].startswith("model: a (fingerprint f1) -> ./b")
    assert 'dtype: "float32" -> "bfloat16"' in diff


def test_options_are_checked_on_a_finished_folder_too(done_folder, image_dir, tiny_model):
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", tiny_model, "-f", "png", "-f", "jsonl",
                "--dtype", "float16", "--device", "cpu")
    assert r.exit_code == ExitCode.USAGE and "float16" in r.stderr


def test_bf16_is_run_where_the_cpu_has_it_and_refused_where_not(tmp_path, image_dir, tiny_model):
    """Each kind of CPU does what it should: AVX512-BF16/AMX CPUs run bfloat16 (and record it),
    others refuse it; this CPU as an AVX2-only one sees it (oneDNN capped at AVX2) refuses it."""
    out = tmp_path / "bf16"
    r = _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "--dtype", "bfloat16",
                "--device", "cpu", "-q")
    if cpu_has_fast_bf16():
        assert r.exit_code == ExitCode.OK, r.output
        record = json.loads((out / ".m2f" / "png.settings.json").read_text())
        assert record["settings"]["dtype"] == "bfloat16"
    else:
        assert r.exit_code == ExitCode.USAGE and "bfloat16" in r.stderr
        assert not out.exists()  # refused before anything was made
    capped = subprocess.run(_m2f_cmd() + ["segment", str(image_dir), "--out", str(tmp_path / "avx2"), "--model",
                                          tiny_model, "--dtype", "bfloat16", "--device", "cpu"],
                            env=dict(ENV, ONEDNN_MAX_CPU_ISA="AVX2"), capture_output=True, text=True, timeout=120)
    assert capped.returncode == ExitCode.USAGE and "no fast bfloat16" in capped.stderr, capped.stderr
    r = _invoke("segment", image_dir, "--out", tmp_path / "f16", "--model", tiny_model, "--dtype", "float16",
                "--device", "cpu")
    assert r.exit_code == ExitCode.USAGE and "float16" in r.stderr


@pytest.fixture(scope="module")
def many_small(tmp_path_factory):
    """More images than the writer queue holds (2 x batch + 2)."""
    d = tmp_path_factory.mktemp("many_small")
    for n in range(40):
        planted_image(96, 72, seed=n)[0].save(d / f"im{n:02d}.png")
    return d


def test_a_pipe_closed_by_the_reader_ends_the_run_like_a_filter(tmp_path, many_small, tiny_model):
    summary = tmp_path / "summary.json"
    p = subprocess.Popen(_m2f_cmd() + ["segment", str(many_small), "-f", "jsonl", "--out", "-", "--model",
                                       tiny_model, "--rle", "--workers", "0", "--summary-json", str(summary)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()   # what `| head -n 1` reads, then it closes the pipe
    p.stdout.close()
    _, err = p.communicate(timeout=120)
    assert json.loads(first)["name"] == "im00.png"
    assert p.returncode == ExitCode.STDOUT_CLOSED, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err
    done = json.loads(summary.read_text())
    assert done["stdout_closed"] is True and done["images"] < 40  # stopped, did not run to the end


def test_an_unexpected_writer_error_stops_the_run_cleanly(tmp_path, many_small):
    out = tmp_path / "out"
    calls = []
    real = PngWriter.write

    def failing(self, result):
        calls.append(result.ref.rel)
        if len(calls) > 2:
            raise MemoryError("cannot allocate 2 GB")
        real(self, result)

    cfg = RunConfig(inputs=[str(many_small)], out=str(out), formats=("png", "jsonl"), workers=0, batch_size=1)
    PngWriter.write = failing
    try:
        with pytest.raises(WriterError, match="png writer failed on .*im02.png: MemoryError: cannot allocate"):
            run(cfg, segmenter=Segmenter(PlantedPredictor()))
    finally:
        PngWriter.write = real
    assert len(calls) == 3  # stopped at the failure, not after 40 images
    for rel in ("im00", "im01"):
        with Image.open(out / f"{rel}.png") as im:
            im.load()
        json.loads((out / f"{rel}.json").read_text())
    assert not (out / "im02.png").exists()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2  # finalised, valid
    assert json.loads((out / "m2f-run.json").read_text())["complete"] is False
    # the next run redoes what is missing, with the same settings
    s = run(cfg, segmenter=Segmenter(PlantedPredictor()))
    assert (s.images, s.skipped) == (38, 2)


def test_a_writer_error_through_the_cli_is_one_line_and_exit_1(tmp_path, many_small):
    code = ("import sys\nfrom m2f_cli.outputs.writers import overlay\n"
            "def boom(self, result):\n    raise RuntimeError('font cache is corrupt')\n"
            "overlay.OverlayWriter.write = boom\nfrom m2f_cli.cli import main\nsys.argv = ['m2f'] + sys.argv[1:]\n"
            "main()\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", code, "segment", str(many_small), "--out", str(out), "-f", "overlay",
                        "--model", "tests/fixtures/shapes_model", "-q"], env=ENV, capture_output=True, text=True,
                       timeout=180, cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert p.returncode == ExitCode.FATAL, p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "Traceback" not in p.stderr
    assert "overlay writer failed on" in p.stderr and "font cache is corrupt" in p.stderr


def test_sigterm_ends_the_run_while_the_writer_is_blocked(tmp_path, many_small, tiny_model):
    """stdout is a pipe nobody reads: the writer thread blocks on a full pipe; one SIGTERM still
    ends the process (after the writer's grace time), with the SIGTERM exit code."""
    p = subprocess.Popen(_m2f_cmd() + ["segment", str(many_small), "-f", "jsonl", "--out", "-", "--model",
                                       tiny_model, "--rle", "--workers", "0"],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    import fcntl
    fcntl.fcntl(p.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: one page, full after a few records
    try:
        _wait_for_blocked_pipe(p)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM


def _wait_for_blocked_pipe(p, timeout=120):
    """Until the child stops making progress (its CPU time stops growing): the pipe is full, the
    writer thread blocks on it and the queue in front of it is full too."""
    t0 = time.time()
    last = -1.0
    while time.time() - t0 < timeout and p.poll() is None:
        time.sleep(1.5)
        with open(f"/proc/{p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = float(fields[11]) + float(fields[12])  # utime + stime, clock ticks
        if cpu == last:
            return
        last = cpu
    raise AssertionError("the child never blocked on its full stdout")


def test_a_failure_before_the_first_image_leaves_nothing_behind(tmp_path, image_dir, tiny_model):
    out = tmp_path / "new" / "out"
    r = _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "--classes", "unicorn")
    assert r.exit_code == ExitCode.USAGE
    assert not (tmp_path / "new").exists()
    r = _invoke("segment", image_dir, "--out", out, "--model", "nobody/not-a-model-xyz")
    assert r.exit_code == ExitCode.FATAL and not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    r = _invoke("segment", image_dir, "--out", kept, "--model", tiny_model, "--classes", "unicorn")
    assert r.exit_code == ExitCode.USAGE and sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_overwrite_that_fails_to_load_keeps_the_journal(done_folder, image_dir, tiny_model):
    journal = done_folder / ".m2f" / "jsonl.journal.jsonl"
    before = journal.read_bytes()
    r = _invoke("segment", image_dir, "--out", done_folder, "--model", tiny_model, "-f", "png", "-f", "jsonl",
                "--overwrite", "--classes", "unicorn")
    assert r.exit_code == ExitCode.USAGE
    assert journal.read_bytes() == before and len((done_folder / "predictions.jsonl").read_text().splitlines()) == 4
