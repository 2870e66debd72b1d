"""The one category table: model index -> COCO category id -> name -> colour.

Never compute a COCO id as ``index + 1``: COCO's 80 thing classes use ids 1..90 with gaps
(index 11 is "stop sign", COCO id 13).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Mapping, Sequence

COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

COCO_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)

_COCO_ID_BY_NAME = dict(zip(COCO_NAMES, COCO_IDS))
# transformers' COCO checkpoints spell a few names differently from the COCO annotation files.
_ALIASES = {"motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch", "tvmonitor": "tv",
            "diningtable": "dining table", "pottedplant": "potted plant", "hair dryer": "hair drier"}


@dataclass(frozen=True)
class Category:
    """One class of the model.

    index: the model's label index (0-based, column of class_queries_logits).
    id: the category id written to outputs (COCO id when the labels are COCO's, else index + 1,
        since 0 means background in the PNG and COCO ids start at 1).
    name: the label name.
    color: (r, g, b) uint8 display colour, stable per id.
    """

    index: int
    id: int
    name: str
    color: tuple[int, int, int]


def _color(key: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps give well separated, stable colours without a hand-made palette.
    h = (key * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def canonical_name(name: str) -> str:
    """A class name as compared across files: lower case, "_"/"-" as spaces, COCO's spellings."""
    n = name.strip().lower().replace("_", " ").replace("-", " ")
    return _ALIASES.get(n, n)




class CategoryTable:
    """The classes of one model, in model index order, with lookups by name and id."""

    def __init__(self, categories: Sequence[Category]):
        self.categories: tuple[Category, ...] = tuple(categories)
        self._by_id = {c.id: c for c in self.categories}
        self._by_name = {canonical_name(c.name): c for c in self.categories}

    @classmethod
    def coco(cls) -> "CategoryTable":
        return cls([Category(i, cid, name, _color(cid)) for i, (name, cid) in
                    enumerate(zip(COCO_NAMES, COCO_IDS))])

    @classmethod
    def from_id2label(cls, id2label: Mapping[int, str]) -> "CategoryTable":
        """Build the table from a checkpoint's ``config.id2label``.

        COCO ids are used only when every label is a COCO thing name; otherwise ids are index + 1.
        """
        names = [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
        canon = [canonical_name(n) for n in names]
        if all(c in _COCO_ID_BY_NAME for c in canon) and len(set(canon)) == len(canon):
            ids = [_COCO_ID_BY_NAME[c] for c in canon]
        else:
            ids = [i + 1 for i in range(len(names))]
        return cls([Category(i, cid, n, _color(cid)) for i, (n, cid) in enumerate(zip(names, ids))])

    @property
    def is_coco(self) -> bool:
        return all(_COCO_ID_BY_NAME.get(canonical_name(c.name)) == c.id for c in self.categories)

    def __len__(self) -> int:
        return len(self.categories)

    def __getitem__(self, index: int) -> Category:
        return self.categories[index]

    def by_id(self, category_id: int) -> Category:
        return self._by_id[category_id]

    def resolve(self, spec: str) -> Category:
        """A class given as a name ("dog", case-insensitive) or an output category id ("18").

        Raises KeyError with the valid names when nothing matches.
        """
        s = spec.strip()
        if s.isdigit() and int(s) in self._by_id:
            return self._by_id[int(s)]
        c = self._by_name.get(canonical_name(s))
        if c is None:
            raise KeyError(f"unknown class {spec!r}; valid classes: "
                           + ", ".join(c.name for c in self.categories))
        return c

    def coco_categories(self) -> list[dict]:
        """The ``categories`` list of a COCO dataset file."""
        return [{"id": c.id, "name": c.name, "supercategory": ""} for c in self.categories]


def categories_of(id2label: dict) -> CategoryTable:
    """The label table of a model config's id2label (keys may be str, as in config.json); COCO's
    table when it has none."""
    return CategoryTable.from_id2label({int(k): v for k, v in id2label.items()}) if id2label \
        else CategoryTable.coco()
