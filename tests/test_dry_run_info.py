"""`m2f segment --dry-run` says what a run would do without loading the model or writing anything;
`m2f info OUT` shows an output folder's settings record and last run; -v logs m2f's decisions."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from m2f_cli.cli import app
from planted import planted_image

M2F = [sys.executable, "-m", "m2f_cli"]


@pytest.fixture()
def imgs(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for n in range(3):
        planted_image(120, 90, seed=n)[0].save(d / f"i{n}.png")
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


def snapshot(folder: Path) -> dict:
    """Every file under folder with its bytes' digest and mtime: what a dry run must not change."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dry(imgs: Path, out: Path, model: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(M2F + ["segment", str(imgs), "--out", str(out), "--model", model, "--dry-run", *extra],
                          capture_output=True, text=True, timeout=120)


def test_a_dry_run_loads_no_model_writes_nothing_and_says_what_would_happen(imgs, tmp_path, tiny_model):
    out = tmp_path / "out"
    first = dry(imgs, out, tiny_model, "-f", "png", "-f", "coco")
    assert first.returncode == 0, first.stderr
    assert not out.exists()  # not even the folder
    lines = first.stdout.splitlines()
    assert lines[0] == "dry run: no model loaded, nothing written"
    assert "inputs: 4 images; not images (skipped): 1 .txt" in lines  # a corrupt JPEG shows when decoded
    assert "  png: 4 to do" in lines and "  coco: 4 to do" in lines
    assert "would do 4 images, skip 0 (already done)" in lines

    # without the model: the plan is made in a process that never imports transformers
    code = (f"import sys; from m2f_cli.config import RunConfig; from m2f_cli.tools.dryrun import plan; "
            f"p = plan(RunConfig(inputs=[{str(imgs)!r}], out={str(out)!r}, model={tiny_model!r})); "
            f"print(p.todo, 'transformers' in sys.modules)")
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["4", "False"], probe.stderr

    run = subprocess.run(M2F + ["segment", str(imgs), "--out", str(out), "--model", tiny_model, "-f", "png",
                                "-q", "--startup-cache", "off"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 3  # the broken JPEG
    before = snapshot(out)
    again = dry(imgs, out, tiny_model, "-f", "png", "-f", "overlay")
    assert again.returncode == 0
    assert "  png: 1 to do, 3 done" in again.stdout.splitlines()  # the broken one is tried again
    assert "  overlay: 4 to do" in again.stdout.splitlines()
    refused = dry(imgs, out, tiny_model, "-f", "png", "--threshold", "0.3")
    assert refused.returncode == 2
    (why,) = [line for line in refused.stdout.splitlines() if line.startswith("refused: ")]
    assert "png: threshold: 0.5 -> 0.3" in why and "--overwrite" in why
    redo = dry(imgs, out, tiny_model, "-f", "png", "--threshold", "0.3", "--overwrite")
    assert redo.returncode == 0 and "would redo 4 images, skip 0 (already done)" in redo.stdout
    assert snapshot(out) == before  # no journal repaired, no record, no lock, no temporary folder


def test_info_shows_the_settings_record_and_the_last_run(imgs, tmp_path, tiny_model):
    out = tmp_path / "out"
    subprocess.run(M2F + ["segment", str(imgs), "--out", str(out), "--model", tiny_model, "-f", "png", "-f", "coco",
                          "-q", "--startup-cache", "off"], capture_output=True, text=True, timeout=300)
    shown = CliRunner().invoke(app, ["info", str(out)])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0] == f"output: {out}"
    assert lines[1].startswith("last run (m2f-run.json): complete; 3 images, 1 failed, 0 skipped")
    assert lines[1].endswith("exit 3; formats png, coco")
    assert any(line.startswith(f"png: model {tiny_model}") and "threshold 0.5" in line for line in lines)
    assert any(line.startswith("coco: ") and "threshold 0.0" in line for line in lines)
    doc = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).output)
    assert set(doc) == {"out", "settings", "runs"} and set(doc["settings"]) == {"png", "coco"}
    assert doc["settings"]["png"]["settings"]["model"]["name"] == tiny_model
    assert doc["runs"]["m2f-run.json"]["exit_code"] == 3
    empty = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert empty.exit_code == 2 and "no m2f outputs here" in empty.output


def test_verbose_logs_what_m2f_decided(imgs, tmp_path, tiny_model):
    args = M2F + ["segment", str(imgs), "--out", str(tmp_path / "out"), "--model", tiny_model, "--startup-cache",
                  "off", "--workers", "0"]
    loud = subprocess.run(args + ["-v"], capture_output=True, text=True, timeout=300)
    (line,) = [x for x in loud.stderr.splitlines() if x.startswith("m2f: INFO: model: ")]
    assert "NativePredictor" in line and "batch size 1" in line and "0 decode workers" in line
    quiet = subprocess.run(args + ["--overwrite"], capture_output=True, text=True, timeout=300)
    assert "INFO" not in quiet.stderr
