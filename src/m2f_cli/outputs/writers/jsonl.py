"""``--format jsonl``: one JSON object per image, for pipelines.

To ``<out>/predictions.jsonl`` (built from a journal, so resumable), or to stdout with ``--out -``,
flushed per image.
"""

from __future__ import annotations

import json

from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.writers.base import Writer, register, unique_records


def image_record(result: ImageResult, threshold: float, with_rle: bool) -> dict:
    rec = {"image": result.ref.path, "name": result.ref.name, "width": result.width, "height": result.height,
           **result.ref.video_fields()}  # a video frame: "video", "frame", "time"
    if result.task == "instance":
        rec["instances"] = [i.to_json(with_rle=with_rle) for i in result.instances_above(threshold)]
    else:
        rec["segments_info"] = [s.to_json() for s in result.segments]
    return rec


@register
class JsonlWriter(Writer):
    name = "jsonl"
    recorded = ("rle",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.with_rle = bool(ctx.options.get("rle", False))
        self.journal = None
        self._done: set[str] = set()
        if ctx.folder is not None:
            self.journal = ctx.folder.journal("jsonl", fresh=ctx.overwrite)
            self._done = {r["rel"] for r in unique_records(self.journal.records())}

    def done(self, ref: ImageRef) -> bool:
        return ref.rel in self._done

    def has_outputs(self, refs) -> bool:
        return bool(self._done)

    def write(self, result: ImageResult) -> None:
        rec = image_record(result, self.threshold, self.with_rle)
        if self.journal is None:
            out = self.ctx.stdout
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            return
        if result.ref.rel in self._done:  # already journaled by a run killed before the other writers
            return
        self.journal.append({"rel": result.ref.rel, "record": rec})
        self._done.add(result.ref.rel)

    def close(self) -> None:
        if self.journal is None:
            return
        self.journal.close()
        folder = self.ctx.folder

        def write(f):
            for r in unique_records(self.journal.records()):
                f.write(json.dumps(r["record"], ensure_ascii=False).encode() + b"\n")
        folder.write_atomic(folder.run_file("predictions", ".jsonl"), write)
