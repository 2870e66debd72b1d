"""How much --fast-decode (JPEG draft mode) changes the model input, and what it saves.

    python benchmarks/fast_decode.py DIR [DIR ...]

For every JPEG: decode+preprocess time with and without draft mode, and the difference of the
resulting pixel_values (normalised units; one 8-bit step is ~0.017). The default path must match
the checkpoint's preprocessing, so draft mode stays opt-in unless these differences are negligible.
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

from m2f_cli.inputs.decode import decode
from m2f_cli.inputs.preprocess import PreprocessSpec, preprocess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+")
    args = ap.parse_args()
    spec = PreprocessSpec()  # the checkpoint's 384x384
    print(f"{'set':<28} {'n':>3} {'plain s/img':>11} {'draft s/img':>11} {'speed-up':>8} "
          f"{'max |diff|':>10} {'mean |diff|':>11}")
    for d in args.dirs:
        files = sorted(glob.glob(os.path.join(d, "*.jpg")))
        tp = td = 0.0
        maxd, means = 0.0, []
        for f in files:
            t0 = time.perf_counter()
            a = preprocess(decode(f).rgb, spec).pixel_values
            t1 = time.perf_counter()
            img = decode(f, draft=spec)
            b = preprocess(img.rgb, spec, original=(img.height, img.width)).pixel_values
            t2 = time.perf_counter()
            tp, td = tp + t1 - t0, td + t2 - t1
            diff = np.abs(a - b)
            maxd, means = max(maxd, float(diff.max())), means + [float(diff.mean())]
        n = len(files)
        print(f"{os.path.basename(d.rstrip('/')):<28} {n:>3} {tp / n:>11.3f} {td / n:>11.3f} {tp / td:>7.1f}x "
              f"{maxd:>10.3f} {np.mean(means):>11.4f}")


if __name__ == "__main__":
    main()
