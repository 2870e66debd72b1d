"""The gallery of ``m2f report``: which images get a card, chosen while the records stream past.

Bottom-k per stratum: the images of smallest hash of their name, ``gallery`` of them over all images
and ``per_stratum`` in each stratum (each class, each score band of 0.1, images with no instance,
failed inputs). Hash order makes the sample deterministic and lets strata share images.
"""

from __future__ import annotations

import hashlib
import heapq
from typing import TYPE_CHECKING, Callable, Iterable

from m2f_cli.tools.report.stats import score_bin

if TYPE_CHECKING:
    from m2f_cli.tools.report.records import ImageRecord


def gallery_sampler(gallery: int, per_stratum: int) -> Sampler:
    """A Sampler keeping gallery images over all, per_stratum in each class and score band, and
    twice per_stratum among images with no instance and among failed inputs."""
    sizes = {"all": gallery, "failed": 2 * per_stratum, "empty": 2 * per_stratum}
    return Sampler(lambda s: sizes.get(s, per_stratum))


def name_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


class Sampler:
    """Bottom-k sampling per stratum: each stratum keeps the k entries of smallest hash.

    Entries are stored once however many strata hold them and dropped when none does, so memory
    is bounded by the sum of the ks whatever the number of images.
    """

    def __init__(self, sizes: Callable[[str], int]):
        self.sizes = sizes
        self.heaps: dict[str, list] = {}     # stratum -> max-heap of (-hash, key)
        self.entries: dict[str, list] = {}   # key -> [card, number of strata holding it]

    def offer(self, key: str, strata: Iterable[str], card: Callable[[], dict]) -> None:
        h = name_hash(key)
        for s in strata:
            k = self.sizes(s)
            heap = self.heaps.setdefault(s, [])
            if k <= 0 or (len(heap) >= k and h >= -heap[0][0]):
                continue
            if key in self.entries:
                if any(e[1] == key for e in heap):  # offered twice for one stratum: once is enough
                    continue
                self.entries[key][1] += 1
            else:
                self.entries[key] = [card(), 1]
            heapq.heappush(heap, (-h, key))
            if len(heap) > k:
                _, dropped = heapq.heappop(heap)
                e = self.entries[dropped]
                e[1] -= 1
                if e[1] == 0:
                    del self.entries[dropped]

    def cards(self) -> list[dict]:
        return [e[0] for e in self.entries.values()]


def strata_of(r: ImageRecord) -> list[str]:
    """The strata an image counts in: all, each of its classes, each score band, no instance."""
    s = ["all"] + sorted({f"class:{i.label}" for i in r.items})
    s += sorted({f"score:{score_bin(i.score, 10)}" for i in r.items if i.score is not None})
    if not r.items:
        s.append("empty")
    return s


def card_of(r: ImageRecord) -> dict:
    """What the gallery and the thumbnail drawing need of one sampled image (no masks)."""
    return {"rel": r.rel, "name": r.name, "path": r.path, "width": r.width, "height": r.height,
            "task": r.task, "threshold": r.threshold, "digest": r.digest, "has_map": r.has_map,
            "items": r.items, "failed": None}


def offer_failure(sampler: Sampler, f: dict) -> None:
    """Offer a failed input (a failures.jsonl line: path, stage, error) to the "failed" stratum."""
    sampler.offer("failed:" + f["path"], ["failed"],
                  lambda: {"rel": f["path"], "name": f["path"], "failed": f, "items": []})
