import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may try the network
# The start-up cache (traced.py) of every tiny model goes to a folder of this test session, here and
# in every m2f subprocess, never into the user's ~/.cache; most runs below therefore take the traced
# path after their model's first load, and test_traced.py checks it against the eager model.
_CACHE = tempfile.mkdtemp(prefix="m2f-test-cache-")
os.environ["M2F_CACHE_DIR"] = _CACHE
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The compiled start-up cache (compiled.py) would run a real AOTInductor compile (~40 s for a tiny
# model) wherever a test asks for compile=True at a fixed size: the trace only here;
# tests/test_compiled.py (a stubbed compiler) and tests/test_background_builds.py (a real compile)
# turn it back on.
os.environ["M2F_STARTUP_CACHE"] = "trace"
# No run at a (pseudo-)terminal may leave a real compile behind it, except in
# tests/test_background_builds.py, which turns this back on.
os.environ["M2F_BACKGROUND_BUILD"] = "off"
# One intra-op thread for the tiny test models, here and in every m2f subprocess the tests start:
# they gain nothing from threads, and two spinning OpenMP threads per process on a 2-core CI
# machine shared with DataLoader workers and subprocesses make each forward ~20x slower.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest

from tiny import make_tiny_model
from planted import PlantedPredictor, planted_image


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Mask2Former (80 COCO labels) saved with save_pretrained."""
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture()
def planted():
    return PlantedPredictor()


@pytest.fixture()
def image_dir(tmp_path):
    """A folder with planted images of several sizes (and a subfolder)."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    sizes = [(640, 480), (300, 500), (1000, 250), (384, 384)]
    for n, (w, h) in enumerate(sizes):
        img, _ = planted_image(w, h, seed=n)
        img.save(d / (f"sub/img{n}.jpg" if n == 3 else f"img{n}.png"))
    return d
