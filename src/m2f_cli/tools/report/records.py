"""The per-image records of ``m2f report``: what a PNG sidecar or a ``predictions.jsonl`` line says of
one image (the same keys, README "Outputs"), without its masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Item:
    """One instance (or panoptic/semantic segment) of an image, as the outputs describe it."""

    id: int
    label: str
    category_id: int
    score: Optional[float]
    area: int
    bbox: tuple
    isthing: bool = True


@dataclass
class ImageRecord:
    """One image's outputs. digest: of the bytes the record came from (names its thumbnail)."""

    rel: str
    name: str
    path: str
    width: int
    height: int
    task: str
    model: Optional[str]
    revision: Optional[str]
    threshold: Optional[float]
    items: list
    digest: str
    has_map: bool


def _items(doc: dict) -> list:
    raw = doc.get("instances")
    if raw is None:
        raw = doc.get("segments_info") or []
    out = []
    for i in raw:
        score = i.get("score")
        out.append(Item(int(i.get("id", 0)), str(i.get("label", "?")), int(i.get("category_id", 0)),
                        None if score is None else float(score), int(i.get("area", 0)),
                        tuple(i.get("bbox") or (0, 0, 0, 0)), bool(i.get("isthing", True))))
    return out


def record_of(doc: dict, rel: str, digest: str, has_map: bool) -> ImageRecord:
    """An ImageRecord from a sidecar or a JSON Lines record (the same keys, README "Outputs")."""
    return ImageRecord(rel=rel, name=str(doc.get("name", rel)), path=str(doc.get("image", "")),
                       width=int(doc.get("width", 0)), height=int(doc.get("height", 0)),
                       task=str(doc.get("task", "instance")), model=doc.get("model"),
                       revision=doc.get("revision"), threshold=doc.get("threshold"), items=_items(doc),
                       digest=digest, has_map=has_map)

