"""Thumbnails and overlays for the sampled cards of ``m2f report``.

Drawn for the sampled images only: from the run's overlay when there is one, else an overlay is
drawn into ``report/overlays/`` from the PNG map, the sidecar and the input image with
outputs/writers/overlay.render_overlay (the overlay writer's own drawing), or boxes for JSON Lines
records. Files are named by a digest of the record they show, so a rebuilt report reuses them.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from m2f_cli.outputs.folder import OutputFolder
from m2f_cli.errors import one_line
from m2f_cli.urls import is_url, local_path
from m2f_cli.tools.report.reader import REPORT_DIR, Reader

OVERLAY_MAX_PX = 1600      # longest side of the overlays the report draws itself (drawn_size)


class _Palette:
    """The overlay writer's colours (model/categories.py: stable per category id), without the
    model's category table: a sidecar names each instance's category id and label."""

    def by_id(self, category_id: int):
        from m2f_cli.model.categories import Category, _color
        return Category(0, category_id, "", _color(category_id))


def drawn_size(width: int, height: int) -> tuple[int, int]:
    """The size the report draws an overlay at: the image's, scaled down to OVERLAY_MAX_PX on its
    longest side (a 12 MP photo costs ~1 s to draw at full size, for a page that shows 200 px)."""
    scale = min(1.0, OVERLAY_MAX_PX / max(1, width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _result_from_card(card: dict, label_map):
    """An ImageResult rebuilt from a sampled sidecar, at label_map's size (masks come from the PNG
    map, not RLE; boxes are scaled with it, for the tags)."""
    from m2f_cli.records import ImageRef, ImageResult, Instance, Segment
    ref = ImageRef(card["path"], card["name"], card["rel"], 0)
    h, w = label_map.shape
    sx, sy = w / max(1, card["width"]), h / max(1, card["height"])

    def box(b):
        b = (list(b) + [0, 0, 0, 0])[:4]
        return (round(b[0] * sx), round(b[1] * sy), round(b[2] * sx), round(b[3] * sy))
    items = card["items"]
    if card["task"] == "instance":
        inst = [Instance(i.id, i.label, i.category_id, -1, i.score or 0.0, box(i.bbox), i.area, {}) for i in items]
        return ImageResult(ref, w, h, inst, label_map, map_threshold=float(card["threshold"] or 0.0))
    segs = [Segment(i.id, i.label, i.category_id, -1, i.isthing, i.score, i.area, box(i.bbox)) for i in items]
    return ImageResult(ref, w, h, [], label_map, map_threshold=0.0, task=card["task"], segments=segs)


class _Draft:
    """decode()'s DraftTarget: JPEGs decode at the smallest 1/2^k scale that covers (w, h)."""

    def __init__(self, w: int, h: int):
        self.w, self.h = w, h

    def draft_size(self, h: int, w: int) -> tuple[int, int]:
        return self.w, self.h


def _input_rgb(card: dict, size: tuple[int, int]):
    """The input image at size (w, h), or None when it moved, cannot be read, or is not the image
    of the record any more (another size)."""
    from PIL import Image
    from m2f_cli.inputs.decode import DecodeError, decode
    full = (card["width"], card["height"])
    try:
        img = decode(card["path"], max_pixels=None, draft=None if size == full else _Draft(*size))
    except (DecodeError, OSError, ValueError):
        return None
    if (img.width, img.height) != full:
        return None
    if img.rgb.shape[:2] == (size[1], size[0]):
        return img.rgb
    import numpy as np
    return np.asarray(Image.fromarray(img.rgb).resize(size, Image.Resampling.BILINEAR))


def _gray(size: tuple[int, int]):
    import numpy as np
    return np.full((size[1], size[0], 3), 96, np.uint8)


def _jpeg(img, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Drawer:
    """Thumbnails (and overlays where the run drew none) for the sampled cards."""

    def __init__(self, folder: OutputFolder, reader: Reader, thumb_px: int):
        self.folder, self.reader, self.thumb_px = folder, reader, thumb_px
        self.report = folder.join(REPORT_DIR)
        self.drawn = 0
        self._lock = threading.Lock()  # draw() runs in a thread pool

    def _report_path(self, *parts: str) -> str:
        return self.report + "/" + "/".join(parts) if self.reader.remote else os.path.join(self.report, *parts)

    def run_overlay(self, rel: str) -> Optional[str]:
        for ext in (".overlay.jpg", ".overlay.png"):
            p = self.folder.path(rel, ext)
            if self.reader.exists(p):
                return ext
        return None

    def draw(self, card: dict) -> None:
        """Set card["thumb"] and card["full"] (paths relative to report/), drawing what is missing."""
        from PIL import Image
        rel, digest = card["rel"], card["digest"]
        thumb_rel = f"thumbs/{rel}.{digest}.jpg"
        thumb = self._report_path("thumbs", f"{rel}.{digest}.jpg")
        ext = self.run_overlay(rel)
        card["note"] = None
        if ext is not None:
            card["full"] = "../" + rel + ext
            if not self.reader.exists(thumb):
                img = Image.open(io.BytesIO(self.folder.read_bytes(self.folder.path(rel, ext))))
                img.draft("RGB", (self.thumb_px, self.thumb_px))  # JPEG: decode at a reduced scale
                self._save_thumb(img, thumb)
            card["thumb"] = thumb_rel
            return
        full_rel = f"overlays/{rel}.{digest}.jpg"
        full = self._report_path("overlays", f"{rel}.{digest}.jpg")
        card["full"] = full_rel
        card["thumb"] = thumb_rel
        notes = [] if card["has_map"] else ["boxes only (no PNG maps)"]
        if not (self.reader.exists(full) and self.reader.exists(thumb)):
            rgb = _input_rgb(card, drawn_size(card["width"], card["height"]))
            if rgb is None:
                notes.append("input image not found or changed: drawn on grey")
            img = self._render(card, rgb, notes)
            self.folder.write_bytes(full, _jpeg(img, 90))
            self._save_thumb(img, thumb)
        elif not is_url(card["path"]) and not os.path.exists(local_path(card["path"])):
            notes.append("input image not found: drawn on grey")  # as it was when drawn
        card["note"] = "; ".join(notes) or None

    def _render(self, card: dict, rgb, notes: list):
        """The overlay of a card at drawn_size: masks from the PNG map (the overlay writer's
        drawing), or, for JSON Lines records, boxes; on grey without the input image."""
        from PIL import Image, ImageDraw
        size = drawn_size(card["width"], card["height"])
        base = _gray(size) if rgb is None else rgb
        if card["has_map"]:
            import numpy as np
            from m2f_cli.outputs.writers.overlay import render_overlay
            data = self.folder.read_bytes(self.folder.path(card["rel"], ".png"))
            png = Image.open(io.BytesIO(data))
            if png.size != (card["width"], card["height"]):
                notes.append("instance map of another size: not drawn")
                label_map = np.zeros((size[1], size[0]), np.uint16)
            else:
                if png.size != size:
                    png = png.resize(size, Image.Resampling.NEAREST)  # ids stay ids
                label_map = np.asarray(png)
            return render_overlay(base, _result_from_card(card, label_map), _Palette())
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        pal = _Palette()
        s = size[0] / max(1, card["width"])
        for i in card["items"]:
            x, y, w, h = [v * s for v in (list(i.bbox) + [0, 0, 0, 0])[:4]]
            draw.rectangle([x, y, x + w, y + h], outline=pal.by_id(i.category_id).color,
                           width=max(1, round(min(img.size) / 200)))
        return img

    def _save_thumb(self, img, path: str) -> None:
        img = img.convert("RGB")
        img.thumbnail((self.thumb_px, self.thumb_px))
        self.folder.write_bytes(path, _jpeg(img, 80))
        with self._lock:
            self.drawn += 1



def draw_cards(drawer: Drawer, cards: list[dict], workers: Optional[int],
               progress: Callable[[str, int, Optional[int]], None]) -> None:
    """drawer.draw every card in a pool of workers threads (default: the cores, at most 4); a card
    that cannot be drawn gets thumb and full None and a note. progress("draw", done, total)."""
    done = 0
    from PIL import Image
    pixel_limit = Image.MAX_IMAGE_PIXELS  # decode() lifts it while it reads: concurrent calls could leave it lifted
    try:
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            for c, err in zip(cards, pool.map(_safe(drawer.draw), cards)):
                if err:
                    c["thumb"] = c["full"] = None
                    c["note"] = f"not drawn: {err}"
                done += 1
                if done % 20 == 0:
                    progress("draw", done, len(cards))
    finally:
        Image.MAX_IMAGE_PIXELS = pixel_limit
    progress("draw", len(cards), len(cards))


def _safe(fn: Callable[[dict], None]) -> Callable[[dict], Optional[str]]:
    """fn(card) -> None on success, else the first line of its error: one bad image (a damaged
    map, an unreadable overlay) costs its thumbnail, not the report."""
    def call(card: dict) -> Optional[str]:
        try:
            fn(card)
            return None
        except Exception as e:  # noqa: BLE001 - PIL, numpy and fsspec backends raise their own types
            return one_line(e)
    return call


def prune(report_dir: str, keep: set) -> None:
    """Remove the thumbnails and drawn overlays of earlier builds that this page no longer shows,
    so that report/ stays as bounded as the sample (local folders; remote ones keep theirs)."""
    for sub in ("thumbs", "overlays"):
        top = os.path.join(report_dir, sub)
        for dirpath, dirnames, filenames in os.walk(top, topdown=False):
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), report_dir).replace(os.sep, "/")
                if rel not in keep:
                    try:
                        os.remove(os.path.join(dirpath, name))
                    except OSError:
                        pass
            if dirpath != top:
                try:
                    os.rmdir(dirpath)  # only when empty
                except OSError:
                    pass
