"""Real I/O errors, not mocks: a file-size limit the kernel enforces (RLIMIT_FSIZE, as a full disk
or a quota does: the write fails with an OSError) and a file the process may not read (as an
unprivileged user, also when the suite runs as root)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
from PIL import Image

from planted import planted_image

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
HERE = os.path.dirname(os.path.abspath(__file__))

LIMITED = """
import resource, signal, sys
limit = int(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from m2f_cli.cli import main
sys.argv = ["m2f"] + sys.argv[2:]
main()
"""


@pytest.fixture()
def six_images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for n in range(6):
        planted_image(160, 120, seed=n)[0].save(d / f"i{n}.png")
    return d


def _segment_limited(limit, *args):
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), "segment", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_a_write_past_the_limit_is_fatal_and_keeps_what_was_written(tmp_path, six_images, tiny_model):
    """The COCO journal grows by ~100 RLE detections per image and hits a 48 KB file-size limit a few
    images in; the small PNGs and sidecars fit. The run stops with one line naming the journal and
    the kernel's reason, leaves no temporary file, every output on disk is whole, and a rerun
    without the limit completes the folder."""
    out = tmp_path / "out"
    args = [six_images, "--out", out, "--model", tiny_model, "-f", "png", "-f", "coco", "--batch-size", "1",
            "--workers", "0", "-q"]
    p = _segment_limited(48_000, *args)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "coco.journal.jsonl: cannot write (File too large)" in lines[0]
    pngs = sorted(out.glob("*.png"))
    assert 0 < len(pngs) < 6
    for png in pngs:
        with Image.open(png) as im:
            im.load()
        json.loads(png.with_suffix(".json").read_text())
    assert not any((out / ".m2f" / "tmp").iterdir())  # no temporary file left behind
    assert json.loads((out / "m2f-run.json").read_text())["complete"] is False
    p = subprocess.run([sys.executable, "-m", "m2f_cli", "segment", *map(str, args)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert len(json.loads((out / "images.json").read_text())["images"]) == 6
    assert len(list(out.glob("*.png"))) == 6


def test_an_output_larger_than_the_limit_fails_its_write_and_cleans_up(tmp_path, six_images, tiny_model):
    """An output file itself over the limit (the PNG writer's temporary file): the error names the
    final path, and the half-written temporary file is removed."""
    out = tmp_path / "out"
    p = _segment_limited(600, six_images, "--out", out, "--model", tiny_model, "--workers", "0", "-q")
    assert p.returncode == 1, p.stderr
    assert "cannot write (File too large)" in p.stderr and str(out) in p.stderr
    assert not any((out / ".m2f" / "tmp").iterdir())
    assert not list(out.glob("*.png"))


UNPRIVILEGED = """
import os, sys
sys.path.insert(0, {here!r})
from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.inputs.decode import decode
from planted import PlantedPredictor
src, out = sys.argv[1], sys.argv[2]
# everything the run needs is imported first (as root the interpreter lives under /root), then a
# root process becomes nobody, for whom the mode of a file matters
run(RunConfig(inputs=[os.path.join(src, "ok.png")], out=os.path.join(out, "warm"), workers=0),
    segmenter=Segmenter(PlantedPredictor()))
if os.geteuid() == 0:  # root reads any file: become nobody; a normal user is refused already
    os.setgid(65534)
    os.setuid(65534)
s = run(RunConfig(inputs=[src], out=os.path.join(out, "o"), workers=0), segmenter=Segmenter(PlantedPredictor()))
import json
print(json.dumps([[f.line() for f in s.failures], s.images]))
"""


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="file modes and setuid are POSIX; no such users on Windows")
def test_an_unreadable_file_is_a_failure_and_the_run_goes_on(six_images):
    root = tempfile.mkdtemp(prefix="m2f-perm-")
    try:
        os.chmod(root, 0o755)
        src, out = os.path.join(root, "in"), os.path.join(root, "out")
        os.mkdir(src)
        os.mkdir(out)
        os.chmod(out, 0o777)
        planted_image(50, 40)[0].save(os.path.join(src, "ok.png"))
        planted_image(50, 40, seed=1)[0].save(os.path.join(src, "secret.png"))
        os.chmod(os.path.join(src, "secret.png"), 0)
        p = subprocess.run([sys.executable, "-c", UNPRIVILEGED.format(here=HERE), src, out], env=ENV,
                           capture_output=True, text=True, timeout=300, cwd=root)
        assert p.returncode == 0, p.stderr
        failures, images = json.loads(p.stdout.strip().splitlines()[-1])
        assert images == 1
        assert failures == [f"{os.path.join(src, 'secret.png')}: decode: permission denied"]
    finally:
        subprocess.run(["rm", "-rf", root])
