"""``--format cvat``: one CVAT for images 1.1 XML for the run, ``<out>/annotations.xml``.

``<annotations><version>1.1</version><meta><task>`` with the run's size and every class of the model
as a ``<label>`` (name, colour, type polygon, a text attribute ``score``), then one
``<image id name width height>`` per image (name: its source name, the relative path CVAT knows it
by when the folder is uploaded as the task's data) holding one ``<polygon label source="auto"
occluded="0" points="x1,y1;x2,y2;..." z_order="0" group_id>`` per part of each object with
``<attribute name="score">``. The parts of an instance share a group_id (CVAT's grouping): its
instance id, the PNG pixel value; holes are joined to their part by zero-width seams (polygons.seamed), since CVAT
polygons have none. The score is a text attribute: CVAT's number attributes are integers.

Images stream into a journal as they finish and the XML is rebuilt from it atomically at the end of
every run, like predictions.json (coco.py); with ``--shard`` each shard writes
``annotations.shard-I-of-N.xml`` and ``m2f merge`` combines them (merge.py).
"""

from __future__ import annotations

from typing import Iterable, Sequence
from xml.sax.saxutils import escape, quoteattr

from m2f_cli.outputs.polygons import seamed
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import register
from m2f_cli.outputs.writers.cvat_video import write_videos
from m2f_cli.outputs.writers.vector import PolygonWriter, number


def header(labels: Sequence[tuple[str, str]], size: int, attributes: Sequence[str] = ("score",)) -> bytes:
    """The XML up to the first <image>: version and meta (task size, labels as (name, "#rrggbb"),
    each with these text attributes)."""
    attrs = "".join(
        "          <attribute>\n"
        f"            <name>{a}</name>\n"
        "            <mutable>False</mutable>\n"
        "            <input_type>text</input_type>\n"
        "            <default_value></default_value>\n"
        "            <values></values>\n"
        "          </attribute>\n" for a in attributes)
    text = "".join(
        "      <label>\n"
        f"        <name>{escape(name)}</name>\n"
        f"        <color>{color}</color>\n"
        "        <type>polygon</type>\n"
        f"        <attributes>\n{attrs}        </attributes>\n"
        "      </label>\n" for name, color in labels)
    return ('<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n'
            "  <meta>\n    <task>\n      <name>m2f</name>\n"
            f"      <size>{size}</size>\n      <mode>annotation</mode>\n      <overlap>0</overlap>\n"
            f"      <start_frame>0</start_frame>\n      <stop_frame>{max(size - 1, 0)}</stop_frame>\n"
            f"      <labels>\n{text}      </labels>\n    </task>\n  </meta>\n").encode()


def labels_of(categories) -> list[tuple[str, str]]:
    """(name, "#rrggbb") of every class of a CategoryTable."""
    return [(c.name, "#%02x%02x%02x" % tuple(c.color)) for c in categories.categories]


FOOTER = b"</annotations>\n"


def image_element(image_id: int, rec: dict) -> bytes:
    """One <image> element from a journal record {"name", "width", "height", "polygons"}."""
    lines = [f'  <image id="{image_id}" name={quoteattr(rec["name"])} width="{rec["width"]}" '
             f'height="{rec["height"]}">\n']
    for p in rec["polygons"]:
        lines.append(f'    <polygon label={quoteattr(p["label"])} source="auto" occluded="0" '
                     f'points="{p["points"]}" z_order="0" group_id="{p["group"]}">\n')
        if p.get("score") is not None:
            lines.append(f'      <attribute name="score">{p["score"]}</attribute>\n')
        if p.get("track") is not None:
            lines.append(f'      <attribute name="track_id">{p["track"]}</attribute>\n')
        lines.append("    </polygon>\n")
    lines.append("  </image>\n")
    return "".join(lines).encode()


def write_document(f, labels: Sequence[tuple[str, str]], records: Iterable[tuple[int, dict]], size: int,
                   tracked: bool = False) -> None:
    """The whole XML to the binary file f: header, one <image> per (id, record), footer. tracked:
    the labels also declare the track_id attribute (--track)."""
    f.write(header(labels, size, ("score", "track_id") if tracked else ("score",)))
    for image_id, rec in records:
        f.write(image_element(image_id, rec))
    f.write(FOOTER)


@register
class CvatWriter(PolygonWriter):
    name = "cvat"
    def __init__(self, ctx):
        super().__init__(ctx)
        self.journal = ctx.folder.journal("cvat", fresh=ctx.overwrite)
        self._done = {r["rel"] for r in self.journal.records()}
        self.tracked = bool(ctx.options.get("track"))

    def done(self, ref: ImageRef) -> bool:
        return ref.rel in self._done

    def record(self, result: ImageResult) -> dict:
        polygons = []
        for s in self.shapes(result):
            score = None if s.score is None else f"{s.score:.6f}".rstrip("0").rstrip(".")
            for part in s.parts:
                pts = ";".join(f"{number(x)},{number(y)}" for x, y in seamed(part))
                polygons.append({"label": s.label, "points": pts, "group": s.id, "score": score,
                                 **({"track": s.track_id} if s.track_id is not None else {})})
        rec = {"rel": result.ref.rel, "name": result.ref.name, "width": result.width,
               "height": result.height, "polygons": polygons}
        if result.ref.frame is not None:  # a video's frame: its tracks also go to cvat/<video>.xml
            rec.update(video=result.ref.frame.video_rel, frame=result.ref.frame.index)
        return rec

    def write(self, result: ImageResult) -> None:
        if result.ref.rel in self._done:  # journaled by a run killed before the other writers
            return
        self.journal.append(self.record(result))
        self._done.add(result.ref.rel)

    def close(self) -> None:
        self.journal.close()
        folder = self.ctx.folder
        size = sum(1 for _ in self.journal.records())

        def write(f):
            write_document(f, labels_of(self.ctx.categories), enumerate(self.journal.records()), size,
                           self.tracked)
        folder.write_atomic(folder.run_file("annotations", ".xml"), write)
        if self.tracked:  # --track: each video's tracks in CVAT for video 1.1
            labels = labels_of(self.ctx.categories)
            write_videos(folder, lambda size: header(labels, size, ("score", "track_id")), FOOTER,
                         self.journal.records())


def read_document(data: bytes) -> tuple[list[tuple[str, str]], list[dict]]:
    """(labels, image records) of an XML written by this writer (m2f merge reads the shards' parts)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(data)
    labels = [(el.findtext("name", ""), el.findtext("color", "")) for el in root.findall("meta/task/labels/label")]
    records = []
    for im in root.findall("image"):
        polygons = [{"label": p.get("label"), "points": p.get("points"), "group": int(p.get("group_id", 0)),
                     "score": p.findtext("attribute[@name='score']")} for p in im.findall("polygon")]
        records.append({"name": im.get("name"), "width": int(im.get("width")), "height": int(im.get("height")),
                        "polygons": polygons})
    return labels, records
