"""``m2f report OUT``: one static page about a run, built from what the run left in ``OUT``.

``build_report(out)`` writes ``OUT/report/index.html`` (plus ``thumbs/``, ``overlays/`` and
``no_instances.txt`` next to it) without running the model, for a finished or interrupted run, local
or remote (fsspec URL) ``--out``. The page needs nothing but the files beside it: no server, no CDN,
plots are inline SVG (page.py), the filters a few lines of inline JavaScript.

Streaming, so memory stays flat in the number of images:
- one pass over the per-image records (reader.py): the PNG sidecars (``<name>.json`` next to
  ``<name>.png``), or, for runs without ``--format png``, ``predictions.jsonl`` (or its shard parts);
- only counters and fixed-bin histograms are kept (stats.py; per class: count, images, score
  histogram), plus a bounded **sample** for the gallery (sample.py): the images of smallest hash of
  their name (bottom-k), ``gallery`` of them over all images and ``per_stratum`` in each stratum (each
  class, each score band of 0.1, images with no instance, failed inputs). Hash order makes the sample
  deterministic and lets strata share images, so the gallery of a million-image run is a few hundred
  cards and the page opens at once;
- thumbnails (draw.py; at most ``thumb_px`` on a side, lazy-loaded) are drawn for the sampled images
  only: from the run's overlay when there is one, else an overlay is drawn into ``report/overlays/``
  from the PNG map, the sidecar and the input image with outputs/writers/overlay.render_overlay (the
  overlay writer's own drawing). Files are named by a digest of the record they show, so a rebuilt
  report reuses them.

The modules: records.py (one image's record), stats.py, reader.py, sample.py, draw.py, page.py; each
imports only modules listed before it, none imports this one.

Remote folders: the listing of OUT (names only) is held in memory; sidecars are fetched 64 at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from m2f_cli.errors import ReportError
from m2f_cli.errors import RemoteError
from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.outputs.open import open_output
from m2f_cli.tools.report.draw import Drawer, draw_cards, prune
from m2f_cli.tools.report.page import render_page
from m2f_cli.tools.report.reader import (REPORT_DIR, Reader, iter_records, read_candidates, read_failures,
                                         read_manifest, read_settings)
from m2f_cli.tools.report.sample import Sampler, card_of, gallery_sampler, offer_failure, strata_of
from m2f_cli.tools.report.stats import Stats

__all__ = ["REPORT_DIR", "Progress", "ReportSummary", "build_report"]

Progress = Callable[[str, int, Optional[int]], None]
"""progress(phase, done, total): phase "read" (total unknown) or "draw" (total known)."""


@dataclass
class ReportSummary:
    """What build_report wrote. index: the page (a path, or a URL for remote OUT)."""

    index: str
    source: str
    images: int
    instances: int
    no_instance: int
    failed: int
    gallery: int
    drawn: int
    seconds: float

    def line(self) -> str:
        return (f"{self.index}: {self.images} images, {self.instances} instances, {self.no_instance} with "
                f"none, {self.failed} failed; gallery of {self.gallery} ({self.drawn} thumbnails drawn) "
                f"in {self.seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# The whole report


def build_report(out: str, *, gallery: int = 240, per_stratum: int = 12, thumb_px: int = 320,
                 workers: Optional[int] = None, progress: Optional[Progress] = None) -> ReportSummary:
    """Write OUT/report/index.html for the run in out (a folder or an fsspec URL).

    gallery: images sampled over the whole run; per_stratum: images sampled in each class, each
    score band, among images with no instance and among failed inputs (0 turns strata off).
    thumb_px: the longest side of a thumbnail. workers: threads drawing thumbnails (default: the
    cores, at most 4). Raises ReportError when OUT holds no outputs, OutputError when report/
    cannot be written.
    """
    t0 = time.perf_counter()
    progress = progress or (lambda phase, done, total: None)
    try:
        folder = open_output(out)
    except RemoteError as e:
        raise ReportError(str(e)) from None
    reader = Reader(folder)
    if not reader.remote and not os.path.isdir(folder.out):
        raise ReportError(f"{out}: no such folder")

    sampler = gallery_sampler(gallery, per_stratum)
    stats = Stats()
    manifest = read_manifest(reader)
    settings = read_settings(reader)

    # Our own staging area: a run starting meanwhile empties .m2f/tmp (outputs/folder.py), never this.
    staging = tempfile.mkdtemp(prefix="m2f-report-")
    folder.tmp = staging if reader.remote else os.path.join(folder.out, REPORT_DIR,
                                                              f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(folder.tmp, exist_ok=True)
        empty_list = os.path.join(staging, "no_instances.txt")
        source = _read_records(reader, stats, sampler, empty_list, progress)
        failed, failed_stages, failure_rows, failure_files = read_failures(reader, lambda f: offer_failure(sampler, f))

        candidates = read_candidates(reader)
        cards = sorted(sampler.cards(), key=lambda c: (c["failed"] is not None, c["rel"]))
        drawer = Drawer(folder, reader, thumb_px)
        to_draw = [c for c in cards if c["failed"] is None]
        draw_cards(drawer, to_draw, workers, progress)
        if not reader.remote:
            prune(os.path.join(folder.out, REPORT_DIR), {c[k] for c in to_draw for k in ("thumb", "full") if c.get(k)})

        with open(empty_list, "rb") as src:
            folder.write_atomic(_join(reader, folder, "no_instances.txt"), lambda f: shutil.copyfileobj(src, f))
        page = render_page(out=out, source=source, stats=stats, manifest=manifest, settings=settings,
                           cards=cards, failed=failed, failed_stages=failed_stages, failure_rows=failure_rows,
                           failure_files=failure_files, candidates=candidates,
                           sample_sizes={"gallery": gallery, "per_stratum": per_stratum})
        index = _join(reader, folder, "index.html")
        folder.write_bytes(index, page.encode("utf-8"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not reader.remote:
            shutil.rmtree(folder.tmp, ignore_errors=True)
    return ReportSummary(index=index, source=source, images=stats.images, instances=stats.instances,
                         no_instance=stats.no_instance, failed=failed, gallery=len(cards), drawn=drawer.drawn,
                         seconds=time.perf_counter() - t0)


def _read_records(reader: Reader, stats: Stats, sampler: Sampler, empty_list: str, progress: Progress) -> str:
    """Count every image record of OUT into stats, offer each to sampler and list the images with
    no instance in the file empty_list, one rel a line. Returns the source: "sidecars" or "jsonl"."""
    source, records = iter_records(reader)
    with open(empty_list, "wb") as empties:
        for n, r in enumerate(records, 1):
            stats.add(r)
            if not r.items:
                empties.write(r.rel.encode("utf-8", "surrogateescape") + b"\n")
            sampler.offer(r.rel, strata_of(r), lambda r=r: card_of(r))
            if n % 500 == 0:
                progress("read", n, None)
    progress("read", stats.images, stats.images)
    return source


def _join(reader: Reader, folder: OutputFolder, name: str) -> str:
    return folder.join(f"{REPORT_DIR}/{name}") if reader.remote else os.path.join(folder.out, REPORT_DIR, name)
