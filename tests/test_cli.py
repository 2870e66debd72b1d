import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from m2f_cli.cli import SEGMENT_PANELS, app
from m2f_cli.outputs.formats import FORMATS
from m2f_cli.errors import ExitCode
from m2f_cli.outputs.local import LocalOutputFolder
from m2f_cli.outputs.writers import REGISTRY

runner = CliRunner()


def _invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_cli_formats_are_the_writer_registry():
    assert set(FORMATS) == set(REGISTRY)


def test_labels_from_a_saved_model(tiny_model):
    r = _invoke("labels", "--model", tiny_model)
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 80 and lines[11].split() == ["11", "13", "stop", "sign"]
    j = json.loads(_invoke("labels", "--model", tiny_model, "--json").stdout)
    assert j[-1] == {"index": 79, "id": 90, "name": "toothbrush"}


def test_info_names_the_resolved_model(tiny_model):
    r = _invoke("info", "--model", tiny_model)
    assert r.exit_code == 0
    assert "torch:" in r.stdout and "devices: cpu" in r.stdout
    assert f"model path: {os.path.abspath(tiny_model)}" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--classes", "person,unicorn"], "unknown class 'unicorn'"),
    (["--format", "tiff"], "--format 'tiff'"),
    (["--device", "cuda:0"], "--device cuda:0"),
    (["--threshold", "1.5"], "--threshold 1.5"),
    (["--resize", "huge"], "--resize 'huge'"),
    (["--simplify", "-1", "--format", "geojson"], "--simplify -1"),
    (["--out", "-", "--format", "png"], "--out -"),
])
def test_usage_errors_exit_2_before_any_work(tmp_path, image_dir, tiny_model, args, needle):
    out = tmp_path / "out"
    base = ["segment", image_dir, "--model", tiny_model]
    if "--out" not in args:
        base += ["--out", out]
    r = _invoke(*base, *args)
    assert r.exit_code == ExitCode.USAGE, r.output
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not list(out.glob("**/*.png"))


def test_missing_input_is_a_usage_error(tmp_path, tiny_model):
    r = _invoke("segment", tmp_path / "nope", "--out", tmp_path / "o", "--model", tiny_model)
    assert r.exit_code == ExitCode.USAGE and "no such file or folder" in r.stderr


def test_unreachable_hub_model_is_one_clear_line(tmp_path, image_dir):
    r = _invoke("segment", image_dir, "--out", tmp_path / "o", "--model", "nobody/not-a-model-xyz")
    assert r.exit_code == ExitCode.FATAL
    assert "--model DIR" in r.stderr and "HF_HUB_OFFLINE" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_pickle_only_checkpoint_is_refused(tmp_path, image_dir, tiny_model):
    import shutil
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model, d)
    from safetensors.torch import load_file
    import torch
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    r = _invoke("segment", image_dir, "--out", tmp_path / "o", "--model", d)
    assert r.exit_code == ExitCode.FATAL and "--allow-pickle" in r.stderr
    r = _invoke("segment", image_dir, "--out", tmp_path / "o", "--model", d, "--allow-pickle", "-q")
    assert r.exit_code == ExitCode.OK, r.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads other processes' environments in /proc")
def test_a_model_that_fails_to_load_leaves_no_decode_worker(tmp_path, image_dir, tiny_model):
    """The decode workers start before the model loads (engines/local.EarlyLoader); a model that
    then fails to load (its weights cut short) ends the run with exit 1 and takes them along: no
    process of the run is left once it has exited."""
    import shutil
    import uuid
    d = tmp_path / "broken"
    shutil.copytree(tiny_model, d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4000])
    marker = f"m2f-test-{uuid.uuid4().hex}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "M2F_TEST_MARKER": marker, "M2F_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", str(image_dir), "--out", str(tmp_path / "o"),
                        "--model", str(d), "--startup-cache", "off", "--workers", "1", "-vv"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == ExitCode.FATAL, r.stderr
    assert "started before the model loads" in r.stderr

    def marked(pid: str) -> bool:
        try:
            return marker.encode() in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            return False
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and marked(pid)]


def test_locked_output_folder_exit_4(tmp_path, image_dir, tiny_model):
    out = tmp_path / "out"
    other = LocalOutputFolder(str(out))
    other.check_writable()
    other.lock()
    try:
        r = _invoke("segment", image_dir, "--out", out, "--model", tiny_model)
        assert r.exit_code == ExitCode.LOCKED and "in use" in r.stderr
    finally:
        other.unlock()
    assert _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "-q").exit_code == 0


def test_bad_inputs_are_reported_and_the_rest_written(tmp_path, image_dir, tiny_model):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image_dir / "full.jpg")
    data = (image_dir / "full.jpg").read_bytes()
    (image_dir / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (image_dir / "empty.jpg").write_bytes(b"")
    (image_dir / "text.png").write_text("this is not a png")
    out = tmp_path / "out"
    r = _invoke("segment", image_dir, "--out", out, "--model", tiny_model, "--workers", "1")
    assert r.exit_code == ExitCode.INPUTS_FAILED, r.output
    for bad in ("truncated.jpg", "empty.jpg", "text.png"):
        line = next(l for l in r.stderr.splitlines() if bad in l)
        assert line.startswith("m2f: error:") and str(image_dir / bad) in line
    good = ["img0", "img1", "img2", "sub/img3", "full"]
    for rel in good:
        assert Image.open(out / f"{rel}.png").size and json.loads((out / f"{rel}.json").read_text())
    failures = [json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(os.path.basename(f["path"]) for f in failures) == ["empty.jpg", "text.png", "truncated.jpg"]
    assert {f["stage"] for f in failures} == {"decode"}
    assert "3 failed" in r.stderr


def test_installed_entry_point_reads_stdin_without_a_terminal(tmp_path, image_dir, tiny_model):
    paths = sorted(str(p) for p in image_dir.rglob("*") if p.is_file())
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    exe = os.path.join(os.path.dirname(sys.executable), "m2f")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "m2f_cli"]
    p = subprocess.run(cmd + ["segment", "-", "--out", str(out), "--model", tiny_model],
                       input="\n".join(paths) + "\n", capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\x1b[" not in p.stderr and p.stdout == ""
    assert "done: 4 images" in p.stderr
    written = sorted(q.name for q in out.rglob("*.png"))
    assert len(written) == 4
    # a second run resumes: nothing to do, the same exit code
    p2 = subprocess.run(cmd + ["segment", "-", "--out", str(out), "--model", tiny_model],
                        input="\n".join(paths), capture_output=True, text=True, env=env, timeout=300)
    assert p2.returncode == 0 and "4 skipped" in p2.stderr


ROOT = Path(__file__).resolve().parents[1]


def _documentation() -> str:
    """README.md and every docs/*.md page: an option or a variable may be documented in any of them."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n".join(p.read_text(encoding="utf-8") for p in pages)


def _mentioned(name: str, text: str) -> bool:
    """name as a whole token: `--ray` is not satisfied by `--ray-actors`, nor M2F_CACHE by M2F_CACHE_DIR."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def _commands(cmd, path: tuple[str, ...] = ("m2f",)):
    """(command path, click command) of the app and every visible (sub)command, groups included."""
    yield path, cmd
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        if not sub.hidden:
            yield from _commands(sub, (*path, name))


def test_every_option_of_every_command_is_documented():
    import typer.main
    docs = _documentation()
    options = [(" ".join(path), name) for path, cmd in _commands(typer.main.get_command(app))
               for p in cmd.params if p.param_type_name == "option" and not p.hidden
               for name in (*p.opts, *p.secondary_opts)]
    assert len(options) > 60 and ("m2f segment", "--ray") in options and ("m2f cache build", "--trace") in options
    missing = [f"{path} {name}" for path, name in options if not _mentioned(name, docs)]
    assert not missing, f"undocumented options (README.md or docs/*.md): {missing}"


def test_every_environment_variable_m2f_reads_is_documented():
    """Every M2F_* name in the package's source (the tests' own variables live in tests/)."""
    names = {m for p in (ROOT / "src" / "m2f_cli").rglob("*.py")
             for m in re.findall(r"M2F_[A-Z0-9_]*[A-Z0-9]", p.read_text(encoding="utf-8"))}
    assert {"M2F_CACHE_DIR", "M2F_STARTUP_CACHE", "M2F_NO_LOCK"} <= names  # the search finds them
    docs = _documentation()
    missing = sorted(n for n in names if not _mentioned(n, docs))
    assert not missing, f"undocumented environment variables (README.md or docs/*.md): {missing}"


def test_no_image_found_is_said_with_exit_5(tmp_path, tiny_model):
    d = tmp_path / "phone"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    (d / "song.mp3").write_bytes(b"x")  # (a .mov is a video: an input)
    r = _invoke("segment", d, "--out", tmp_path / "o", "--model", tiny_model)
    assert r.exit_code == ExitCode.NO_IMAGES, r.output
    assert "no images found" in r.stderr and "2 files that are not an image" in r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _invoke("segment", empty, "--out", tmp_path / "o", "--model", tiny_model).exit_code == ExitCode.NO_IMAGES


def test_files_that_are_not_images_are_counted_in_the_summary(tmp_path, image_dir, tiny_model):
    (image_dir / "notes.txt").write_text("x")
    summary = tmp_path / "s.json"
    r = _invoke("segment", image_dir, "--out", tmp_path / "o", "--model", tiny_model, "--summary-json", summary)
    assert r.exit_code == 0 and "skipped 1 file that is not an image (.txt 1)" in r.stderr
    assert json.loads(summary.read_text())["not_images"] == {".txt": 1}


def test_print0_input_without_the_flag_suggests_it(tmp_path, image_dir, tiny_model):
    paths = "\0".join(str(p) for p in sorted(image_dir.rglob("*.png")))
    r = _invoke("segment", "-", "--out", tmp_path / "o", "--model", tiny_model, input=paths + "\0")
    assert r.exit_code == ExitCode.USAGE and "pass -0" in r.stderr


def test_help_imports_neither_torch_nor_numpy():
    code = ("import sys\nfrom m2f_cli.cli import app\nfrom typer.testing import CliRunner\n"
            "r = CliRunner().invoke(app, ['segment', '--help'])\nassert r.exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'rich', 'ray') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_every_segment_option_has_a_help_panel_and_a_readable_placeholder():
    import typer.main
    cmd = typer.main.get_command(app).commands["segment"]
    placed = {name for names in SEGMENT_PANELS.values() for name in names}
    assert [p.name for p in cmd.params if p.name not in placed] == []
    text = _invoke("segment", "--help").stdout
    assert "<list[str]>" not in text and "<str>" not in text and "<int>" not in text
    panels = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ") and
              line.endswith(":")]
    assert panels[:7] == ["Inputs", "Outputs", "Model", "Quality", "Speed", "Scale-out", "Bookkeeping"]
    assert "Examples:" in text and all(f"  {name} " in text for name in FORMATS)


def test_help_follows_the_terminal_width():
    narrow = runner.invoke(app, ["segment", "--help"], terminal_width=80).stdout
    wide = runner.invoke(app, ["segment", "--help"], terminal_width=150).stdout
    assert max(map(len, narrow.splitlines())) <= 80 < max(map(len, wide.splitlines()))


def test_version():
    from m2f_cli import __version__
    r = _invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"m2f {__version__}"
