"""The statistics of ``m2f report``: counters and fixed-bin histograms over every image (constant memory
per image), and the histograms' bins, which the page's plots are drawn for."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2f_cli.tools.report.records import ImageRecord

# The histograms' bins: stats.py counts into them and page.py draws the plots for them.
SCORE_BINS = 20            # score histograms: 0.05 wide
COUNT_BINS = 21            # instances per image: 0..19, then "20+"
AREA_DECADES = 6           # mask area / image area from 1e-6 to 1 ...
AREA_PER_DECADE = 4        # ... in bins a quarter decade wide

MAX_MODELS = 20            # distinct model ids counted (a folder normally has one)


@dataclass
class ClassStats:
    count: int = 0
    images: int = 0
    score_sum: float = 0.0
    scored: int = 0
    scores: list = field(default_factory=lambda: [0] * SCORE_BINS)
    category_id: int = 0


def _area_bin(area: int, image_area: int) -> int:
    """Bin of log10(area / image_area) over [-AREA_DECADES, 0]; tinier masks go to bin 0."""
    if area <= 0 or image_area <= 0:
        return 0
    x = math.log10(min(1.0, area / image_area))
    return max(0, min(AREA_DECADES * AREA_PER_DECADE - 1, int((x + AREA_DECADES) * AREA_PER_DECADE)))


def score_bin(score: float, bins: int = SCORE_BINS) -> int:
    return max(0, min(bins - 1, int(score * bins)))


@dataclass
class Stats:
    """Counters and fixed-bin histograms over every image: constant memory per image."""

    images: int = 0
    instances: int = 0
    no_instance: int = 0
    classes: dict = field(default_factory=dict)        # label -> ClassStats
    per_image: list = field(default_factory=lambda: [0] * COUNT_BINS)
    areas: list = field(default_factory=lambda: [0] * (AREA_DECADES * AREA_PER_DECADE))
    coco_sizes: dict = field(default_factory=lambda: {"small": 0, "medium": 0, "large": 0})
    scores: list = field(default_factory=lambda: [0] * SCORE_BINS)
    models: dict = field(default_factory=dict)          # (model, revision) -> images
    tasks: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    def add(self, r: ImageRecord) -> None:
        self.images += 1
        n = len(r.items)
        self.instances += n
        self.no_instance += n == 0
        self.per_image[min(n, COUNT_BINS - 1)] += 1
        key = (r.model, r.revision)
        if key in self.models or len(self.models) < MAX_MODELS:
            self.models[key] = self.models.get(key, 0) + 1
        self.tasks[r.task] = self.tasks.get(r.task, 0) + 1
        if r.threshold is not None:
            self.thresholds[r.threshold] = self.thresholds.get(r.threshold, 0) + 1
        image_area = r.width * r.height
        seen = set()
        for i in r.items:
            c = self.classes.get(i.label)
            if c is None:
                c = self.classes[i.label] = ClassStats(category_id=i.category_id)
            c.count += 1
            if i.label not in seen:
                seen.add(i.label)
                c.images += 1
            if i.score is not None:
                b = score_bin(i.score)
                c.scores[b] += 1
                self.scores[b] += 1
                c.score_sum += i.score
                c.scored += 1
            self.areas[_area_bin(i.area, image_area)] += 1
            # COCOeval's size ranges (pixels): small < 32^2 <= medium < 96^2 <= large
            size = "small" if i.area < 32 ** 2 else "medium" if i.area < 96 ** 2 else "large"
            self.coco_sizes[size] += 1


@dataclass
class Candidates:
    """Scores of every detection in the COCO results (kept down to the coco writer's threshold,
    0 by default): where the map threshold could go. per_class: category id -> score histogram."""

    count: int = 0
    scores: list = field(default_factory=lambda: [0] * SCORE_BINS)
    per_class: dict = field(default_factory=dict)

