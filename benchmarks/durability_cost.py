"""What durability costs (docs/reruns.md: Durability): writing N small outputs through
LocalOutputFolder with fsync (data before each rename, directories in batches) and without, and
resume's whole-file check (outputs/local.py: file_is_whole) against a bare existence check over the
same files.

    python benchmarks/durability_cost.py [--n 500] [--dir /path/on/the/disk/to/measure]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from m2f_cli.outputs import local as state
from m2f_cli.outputs.local import LocalOutputFolder, file_is_whole, mount_of


def _write(root: str, n: int, durable: bool) -> float:
    real_fsync, real_dir = state.os.fsync, state.fsync_dir
    if not durable:
        state.os.fsync = lambda fd: None
        state.fsync_dir = lambda d: None
    try:
        folder = LocalOutputFolder(root)
        folder.check_writable()
        folder.lock()
        png = b"\x89PNG\r\n\x1a\n" + os.urandom(3000) + b"\x00\x00\x00\x00IEND\xaeB`\x82"
        t0 = time.perf_counter()
        for i in range(n):
            sub = f"d{i % 10}"
            folder.write_bytes(folder.path(f"{sub}/img{i}", ".png"), png)
            folder.write_bytes(folder.path(f"{sub}/img{i}", ".json"), b'{"instances": []}')
        folder.unlock()  # the final sync
        return time.perf_counter() - t0
    finally:
        state.os.fsync, state.fsync_dir = real_fsync, real_dir


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500, help="images (each a PNG and a JSON sidecar)")
    ap.add_argument("--dir", default=None, help="where to write (default: the temporary folder)")
    a = ap.parse_args()
    base = tempfile.mkdtemp(prefix="m2f-durability-", dir=a.dir)
    try:
        print(f"{a.n} images x 2 files on the {mount_of(base) or base}")
        for durable in (False, True, False, True):
            root = os.path.join(base, f"out-{durable}-{time.time_ns()}")
            dt = _write(root, a.n, durable)
            print(f"  {'fsync' if durable else 'no fsync'}: {dt:.3f} s ({dt / (2 * a.n) * 1e3:.2f} ms per file)")
        paths = [os.path.join(root, f"d{i % 10}", f"img{i}{ext}") for i in range(a.n) for ext in (".png", ".json")]
        for name, check in (("exists", os.path.exists), ("file_is_whole", file_is_whole)):
            t0 = time.perf_counter()
            assert all(check(p) for p in paths)
            dt = time.perf_counter() - t0
            print(f"  resume check {name}: {dt * 1e3:.1f} ms for {len(paths)} files "
                  f"({dt / len(paths) * 1e6:.1f} us per file)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
