"""Stage 5 on the accelerator: the instance inference of instance.py for a whole batch, on the
device the logits are on, with a fixed number of device-to-host transfers per group of images.

instance.segment_instances (the CPU path) reads the top-k candidates, then every window of every
surviving query back to the host, query by query: several host syncs per instance. Here, per group of
images (all of a batch unless their packed masks would pass PACK_BYTES):

1. on the device, nothing read back: class softmax and top-k for every image at once; every query
   upsampled to the original size (bilinear, as instance.py) in chunks of DEVICE_CHUNK_BYTES, its
   mask area, sum of sigmoid inside the mask and tight box; the binary masks packed 8 pixels a byte;
2. transfer 1: one int32 tensor with all of those numbers (score bits viewed as int32);
3. the host picks the candidates that pass the threshold (exactly as instance.py), and the device
   gathers the packed bytes of their boxes into one buffer;
4. transfer 2: that buffer. The host unpacks each box, encodes its RLE (masks.window_rle) and
   paints the instance map as instance.py does.

Two transfers per group whatever the number of queries and instances (tests/test_device_path.py
counts them). On CUDA the transfers go to pinned buffers with non_blocking copies and an event, so
``launch_batch`` returns before the device has finished: the caller can queue the next batch's forward
and call ``PendingBatch.finish`` afterwards. No float64 anywhere (MPS has none).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.instance import PostprocessOptions
from m2f_cli.postprocess.masks import window_rle
from m2f_cli.postprocess.upsample import crop_to_valid
from m2f_cli.records import Instance

# float32 full-resolution logits upsampled at once on the device (bounds the device memory)
DEVICE_CHUNK_BYTES = 256 * 1024 * 1024
# packed binary masks (Q x H0 x W0 / 8 bytes per image) kept on the device for one group of images:
# 16 images of 640x480 with 100 queries take 61 MB, one group; 12 MP photos go ~1.7 per group
PACK_BYTES = 256 * 1024 * 1024

_BITS = (128, 64, 32, 16, 8, 4, 2, 1)  # np.packbits' order: the first pixel in the high bit


def _to_host(t: torch.Tensor) -> "_Transfer":
    return _Transfer(t)


class _Transfer:
    """One device-to-host copy: to a pinned buffer, asynchronously, on CUDA; a plain copy elsewhere.
    wait() returns the numpy array (the only place that waits for the device)."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.source = t

    def wait(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
            return self.host.numpy()
        return self.source.to("cpu").numpy()


_SIDE: dict = {}


@contextmanager
def _side_stream(device: torch.device, after=None) -> Iterator[None]:
    """CUDA: run the block on this device's side stream, after the event `after` (the packed masks
    it reads are complete then). Elsewhere: nothing (the work is ordered anyway)."""
    if device.type != "cuda":
        yield
        return
    side = _SIDE.get(device)
    if side is None:
        side = _SIDE[device] = torch.cuda.Stream(device)
    if after is not None:
        side.wait_event(after)
    with torch.cuda.stream(side):
        yield


def _pack(pos: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool -> (n, H, ceil(W / 8)) uint8, 8 pixels a byte as np.packbits(axis=-1)."""
    n, h, w = pos.shape
    w8 = (w + 7) // 8
    bits = torch.zeros((n, h, w8 * 8), dtype=torch.uint8, device=pos.device)
    bits[:, :, :w] = pos
    weights = torch.tensor(_BITS, dtype=torch.uint8, device=pos.device)
    return (bits.view(n, h, w8, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _first_true(x: torch.Tensor) -> torch.Tensor:
    """(n, L) bool -> (n,) index of the first true (0 when none): argmax takes the first maximum."""
    return x.to(torch.int32).argmax(1)  # int32: argmax over uint8 is not implemented everywhere (MPS)


def _query_stats(low: torch.Tensor, original: tuple[int, int]):
    """low: (Q, vh, vw) float32 valid-area logits -> per query, at the original (H0, W0) size:
    area (Q,) int64, sum of sigmoid inside the mask (Q,) float32, box (Q, 4) int64 [x, y, w, h]
    (zeros when empty), packed masks (Q, H0, ceil(W0 / 8)) uint8. No host sync."""
    h0, w0 = original
    q = low.shape[0]
    per_chunk = max(1, DEVICE_CHUNK_BYTES // max(1, h0 * w0 * 4))
    areas, inside, boxes, packed = [], [], [], []
    for s in range(0, q, per_chunk):
        up = F.interpolate(low[None, s:s + per_chunk], size=original, mode="bilinear", align_corners=False)[0]
        pos = up > 0
        area = pos.sum((1, 2))
        # the definition (mean sigmoid inside the mask) summed directly: no cancellation against
        # the 0.5 of every outside pixel, which float32 would not survive over a whole image
        inside.append(torch.where(pos, up.sigmoid(), torch.zeros((), device=up.device)).sum((1, 2)))
        rows, cols = pos.any(2), pos.any(1)
        y0, x0 = _first_true(rows), _first_true(cols)
        y1 = h0 - 1 - _first_true(rows.flip(1))
        x1 = w0 - 1 - _first_true(cols.flip(1))
        box = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1) * (area > 0)[:, None]
        areas.append(area)
        boxes.append(box)
        packed.append(_pack(pos))
    return torch.cat(areas), torch.cat(inside), torch.cat(boxes), torch.cat(packed)


def _groups(originals: Sequence[tuple[int, int]], queries: int) -> list[list[int]]:
    """Consecutive image indices whose packed masks fit PACK_BYTES together (at least one each)."""
    out: list[list[int]] = []
    used = 0
    for b, (h0, w0) in enumerate(originals):
        need = queries * h0 * ((w0 + 7) // 8)
        if out and used + need <= PACK_BYTES:
            out[-1].append(b)
            used += need
        else:
            out.append([b])
            used = need
    return out


@dataclass
class _Group:
    images: list[int]
    packed: list[torch.Tensor]   # per image (Q, H0, W8) uint8, on the device
    stats: "_Transfer"
    k: int
    q: int


class PendingBatch:
    """A batch whose device work is queued; finish() does the rest (the two transfers of each group
    and the host work) and returns, per image, (instances, (H0, W0) uint16 instance map)."""

    def __init__(self, class_logits, mask_logits, padded, valids, originals, categories, options):
        self.class_logits, self.mask_logits = class_logits, mask_logits
        self.padded, self.valids, self.originals = padded, list(valids), list(originals)
        self.categories, self.options = categories, options
        b, q, c1 = class_logits.shape
        self.num_c = c1 - 1
        self.k = min(options.top_k, q * self.num_c)
        self.top = self._topk()
        self.groups = _groups(self.originals, q)
        self.first = self._launch(self.groups[0])  # queued now; later groups in finish()

    def _topk(self):
        """(B, k) candidate probabilities, flat (query, class) indices, alive flags: all images at once."""
        probs = self.class_logits.float().softmax(-1)[..., :self.num_c]
        opts = self.options
        if opts.keep is not None:
            drop = torch.ones(self.num_c, dtype=torch.bool, device=probs.device)
            drop[torch.tensor(sorted(opts.keep), device=probs.device)] = False
            probs = probs.masked_fill(drop, -1.0)
        top_p, top_i = probs.flatten(1).topk(self.k, dim=1, sorted=True)
        alive = top_p >= max(opts.threshold, 0.0)
        if opts.keep is not None:
            alive &= top_p >= 0
        return top_p, top_i, alive

    def _launch(self, images: list[int]) -> _Group:
        top_p, top_i, alive = self.top
        parts, packed = [], []
        for b in images:
            low = crop_to_valid(self.mask_logits[b], self.padded, self.valids[b])
            area, inside, box, pk = _query_stats(low, self.originals[b])
            packed.append(pk)
            parts += [top_p[b].contiguous().view(torch.int32), top_i[b].to(torch.int32), alive[b].to(torch.int32),
                      inside.contiguous().view(torch.int32), area.to(torch.int32), box.to(torch.int32).flatten()]
        stats = _to_host(torch.cat(parts))
        return _Group(images, packed, stats, self.k, self.mask_logits.shape[1])

    def finish(self) -> list[tuple[list[Instance], np.ndarray]]:
        out: list[tuple[list[Instance], np.ndarray]] = []
        for n, images in enumerate(self.groups):
            group = self.first if n == 0 else self._launch(images)
            out += self._finish_group(group)
        self.first = None  # the device buffers can go
        return out

    def _finish_group(self, g: _Group) -> list[tuple[list[Instance], np.ndarray]]:
        stats = g.stats.wait()  # transfer 1
        k, q = g.k, g.q
        per_image = 3 * k + 6 * q
        plans = []
        slices, sizes = [], []
        for j, b in enumerate(g.images):
            s = stats[j * per_image:(j + 1) * per_image]
            plan = _plan(s, k, q, self.num_c, self.options)
            for qi in plan.needed:
                x, y, w, h = plan.box[qi]
                a, z = x // 8, (x + w - 1) // 8 + 1
                slices.append(g.packed[j][qi, y:y + h, a:z].reshape(-1))
                sizes.append((h, z - a))
            plans.append(plan)
        dev = self.mask_logits.device
        with _side_stream(dev, after=g.stats.event):
            # CUDA: on a second stream, so that this gather and copy run beside the next batch's
            # forward (queued on the main stream after this batch's stats) instead of behind it
            buf = _to_host(torch.cat(slices) if slices else torch.zeros(0, dtype=torch.uint8, device=dev))
        buf = buf.wait()  # transfer 2
        results, off = [], 0
        for j, b in enumerate(g.images):
            plan = plans[j]
            windows = {}
            for qi in plan.needed:
                x, y, w, h = plan.box[qi]
                rows, nb = h, (x + w - 1) // 8 + 1 - x // 8
                bits = np.unpackbits(buf[off:off + rows * nb].reshape(rows, nb), axis=1)
                off += rows * nb
                windows[qi] = bits[:, x % 8:x % 8 + w].astype(np.bool_)
            results.append(_assemble(plan, windows, self.originals[b], self.categories, self.options))
        return results


@dataclass
class _Plan:
    """One image's candidates after transfer 1: cand (-score, rank, score, label, query) sorted,
    per query area/box/mask score, and the queries whose masks the host needs."""

    cand: list
    area: np.ndarray
    box: np.ndarray
    needed: list[int]


def _plan(s: np.ndarray, k: int, q: int, num_c: int, options: PostprocessOptions) -> _Plan:
    """Decode one image's stats row (int32, the layout _launch writes) and pick its instances
    exactly as instance.segment_instances does."""
    top_p = s[0:k].view(np.float32)
    top_i = s[k:2 * k]
    alive = s[2 * k:3 * k].astype(bool)
    inside = s[3 * k:3 * k + q].view(np.float32)
    area = s[3 * k + q:3 * k + 2 * q]
    box = s[3 * k + 2 * q:3 * k + 6 * q].reshape(q, 4)
    p_list = top_p[alive].tolist()
    idx = top_i[alive]
    labels, queries = (idx % num_c).tolist(), (idx // num_c).tolist()
    cand = []
    for rank, (p, lab, qi) in enumerate(zip(p_list, labels, queries)):
        score = p * (float(inside[qi]) / (int(area[qi]) + 1e-6))
        if score >= options.threshold:
            cand.append((-score, rank, score, lab, qi))
    cand.sort()
    needed = sorted({c[4] for c in cand if area[c[4]] > 0})
    return _Plan(cand, area, box, needed)


def _assemble(plan: _Plan, windows: dict, original: tuple[int, int], categories: CategoryTable,
              options: PostprocessOptions) -> tuple[list[Instance], np.ndarray]:
    """Instances (ids 1..N by descending score) and the instance map, painted as instance.py does."""
    h0, w0 = original
    empty = window_rle(np.zeros((0, 0), np.bool_), 0, 0, original)
    rles = {qi: window_rle(windows[qi], int(plan.box[qi][1]), int(plan.box[qi][0]), original) for qi in windows}
    out: list[Instance] = []
    for n, (_, _, s, lab, qi) in enumerate(plan.cand, start=1):
        cat = categories[lab]
        bbox = tuple(int(v) for v in plan.box[qi]) if qi in rles else (0, 0, 0, 0)
        out.append(Instance(id=n, label=cat.name, category_id=cat.id, label_index=lab, score=float(s), bbox=bbox,
                            area=int(plan.area[qi]), rle=rles.get(qi, empty)))
    imap = np.zeros((h0, w0), np.uint16)
    # ascending score, so the best instance owns each pixel; a query listed with several classes is
    # drawn as its best-scoring instance (painted last of its own)
    for inst, (_, _, s, _, qi) in zip(reversed(out), reversed(plan.cand)):
        if s < options.map_threshold or qi not in windows:
            continue
        x, y = int(plan.box[qi][0]), int(plan.box[qi][1])
        w = windows[qi]
        region = imap[y:y + w.shape[0], x:x + w.shape[1]]
        np.copyto(region, np.uint16(inst.id), where=w)
    return out, imap


def launch_batch(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                 valids: Sequence[tuple[int, int]], originals: Sequence[tuple[int, int]],
                 categories: CategoryTable, options: PostprocessOptions) -> PendingBatch:
    """Queue the device work of a batch. class_logits: (B, Q, C+1), mask_logits: (B, Q, h, w), any
    float dtype, on any device; padded: (Hp, Wp); per image valid (h, w) and original (H0, W0)."""
    return PendingBatch(class_logits, mask_logits, padded, valids, originals, categories, options)


def segment_batch(class_logits: torch.Tensor, mask_logits: torch.Tensor, padded: tuple[int, int],
                  valids: Sequence[tuple[int, int]], originals: Sequence[tuple[int, int]],
                  categories: CategoryTable, options: PostprocessOptions,
                  ) -> list[tuple[list[Instance], np.ndarray]]:
    """instance.segment_instances for every image of a batch, on the logits' device."""
    return launch_batch(class_logits, mask_logits, padded, valids, originals, categories, options).finish()


def host_syncs_per_batch(originals: Sequence[tuple[int, int]], queries: int) -> int:
    """The device-to-host transfers segment_batch makes for these images: two per group."""
    return 2 * len(_groups(originals, queries))

