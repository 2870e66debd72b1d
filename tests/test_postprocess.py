import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from m2f_cli.model.categories import CategoryTable
from m2f_cli.postprocess.instance import PostprocessOptions, instances_from_logits, segment_instances

COCO = CategoryTable.coco()


def _logits(q=4, c=80, h=24, w=32):
    cls = torch.full((q, c + 1), -8.0)
    cls[:, c] = 8.0  # every query "no object" unless set
    masks = torch.full((q, h, w), -10.0)
    return cls, masks


def test_scores_labels_boxes_and_coco_ids():
    cls, masks = _logits()
    cls[0, 11] = 9.0; cls[0, 80] = -8.0           # query 0: stop sign, confident
    masks[0, 4:12, 8:20] = 10.0                   # at 1/4 of a 96x128 input
    out = instances_from_logits(cls, masks, (96, 128), (96, 128), (96, 128), COCO,
                                PostprocessOptions(threshold=0.5))
    assert len(out) == 1
    inst = out[0]
    assert (inst.id, inst.label, inst.category_id, inst.label_index) == (1, "stop sign", 13, 11)
    p = torch.softmax(cls[0], -1)[11].item()
    # mean sigmoid inside the mask: ~1 in the interior, lower on the bilinear edge pixels
    assert 0.97 * p < inst.score < p
    x, y, w, h = inst.bbox
    assert abs(x - 32) <= 2 and abs(y - 16) <= 2 and abs(w - 48) <= 3 and abs(h - 32) <= 3
    m = mask_utils.decode(inst.rle)
    assert m.shape == (96, 128) and int(m.sum()) == inst.area
    assert mask_utils.toBbox(inst.rle).tolist() == [float(v) for v in inst.bbox]


def test_topk_threshold_and_query_with_two_classes():
    cls, masks = _logits()
    cls[0, 0] = 8.0; cls[0, 16] = 8.0; cls[0, 80] = -8.0  # query 0 is half person, half dog
    masks[0, 2:10, 2:10] = 10.0
    out = instances_from_logits(cls, masks, (96, 128), (96, 128), (96, 128), COCO,
                                PostprocessOptions(threshold=0.0, top_k=100))
    assert len(out) == 100  # threshold 0 keeps all top-k pairs (the COCO protocol)
    top = out[:2]
    assert {i.label for i in top} == {"person", "dog"} and top[0].rle == top[1].rle
    assert all(a.score >= b.score for a, b in zip(out, out[1:]))
    assert [i.id for i in out] == list(range(1, 101))
    strict = instances_from_logits(cls, masks, (96, 128), (96, 128), (96, 128), COCO,
                                   PostprocessOptions(threshold=0.4))
    assert len(strict) == 2
    only_dogs = instances_from_logits(cls, masks, (96, 128), (96, 128), (96, 128), COCO,
                                      PostprocessOptions(threshold=0.0, keep=frozenset({16})))
    assert {i.label for i in only_dogs} == {"dog"}


def test_padding_is_cropped_before_upsampling():
    # padded input 128x128 of which the top-left 96x64 is the image; original is 300x200
    cls, masks = _logits(h=32, w=32)
    cls[0, 0] = 9.0; cls[0, 80] = -8.0
    masks[0, :, :] = -10.0
    masks[0, 0:24, 0:8] = 10.0  # the left half of the valid area (valid = 24x16 at 1/4)
    out = instances_from_logits(cls, masks, (128, 128), (96, 64), (300, 200), COCO,
                                PostprocessOptions(threshold=0.5))
    m = mask_utils.decode(out[0].rle)
    assert m.shape == (300, 200)
    assert m[:, :90].mean() > 0.95 and m[:, 110:].mean() < 0.05  # left half of the ORIGINAL image


def test_instance_map_owner_is_highest_score():
    cls, masks = _logits()
    cls[0, 0] = 9.0; cls[0, 80] = -8.0
    cls[1, 16] = 5.0; cls[1, 80] = -8.0
    masks[0, 4:12, 4:12] = 10.0
    masks[1, 8:16, 8:16] = 10.0  # overlaps query 0 at [8:12, 8:12]
    out, m = segment_instances(cls, masks, (96, 128), (96, 128), (96, 128), COCO,
                               PostprocessOptions(threshold=0.5, map_threshold=0.5))
    assert [i.label for i in out] == ["person", "dog"]
    assert m.dtype == np.uint16 and m[40, 40] == 1  # overlap belongs to the better instance
    assert m[56, 56] == 2 and m[0, 0] == 0
    _, none = segment_instances(cls, masks, (96, 128), (96, 128), (96, 128), COCO,
                                PostprocessOptions(threshold=0.5, map_threshold=0.99))
    assert none.max() == 0


def _reference(cls, masks, padded, valid, original, top_k=100):
    """The original algorithm, straight: upsample ALL masks to full size, then score."""
    ph, pw = padded
    vh, vw = valid
    up = F.interpolate(masks[None].float(), size=(ph, pw), mode="bilinear", align_corners=False)
    up = up[:, :, :vh, :vw]
    up = F.interpolate(up, size=original, mode="bilinear", align_corners=False)[0]
    probs = cls.float().softmax(-1)[:, :-1]
    c = probs.shape[1]
    s, idx = probs.flatten().topk(top_k)
    q = idx // c
    binm = up[q] > 0
    ms = (up[q].sigmoid() * binm).flatten(1).sum(1) / (binm.flatten(1).sum(1) + 1e-6)
    return s * ms, idx % c, binm


@pytest.mark.parametrize("padded,valid,original", [((96, 96), (96, 96), (480, 640)),
                                                   ((128, 96), (110, 90), (333, 517)),
                                                   ((64, 160), (50, 160), (37, 1000))])
def test_agrees_with_straightforward_reference(padded, valid, original):
    g = torch.Generator().manual_seed(0)
    q = 30
    cls = torch.randn(q, 81, generator=g) * 4
    masks = torch.randn(q, padded[0] // 4, padded[1] // 4, generator=g) * 3
    ref_scores, ref_labels, ref_masks = _reference(cls, masks, padded, valid, original)
    ours = instances_from_logits(cls, masks, padded, valid, original, COCO,
                                 PostprocessOptions(threshold=0.0, top_k=100))
    ref = sorted(zip(ref_scores.tolist(), ref_labels.tolist(), range(100)), key=lambda t: -t[0])
    assert len(ours) == len(ref) == 100
    for inst, (s, _, _) in zip(ours, ref):
        assert inst.score == pytest.approx(s, abs=1e-3)  # the same ranking of scores
    # Every instance against the reference pair it is (same class, same score; among near ties the
    # best mask), one to one: all 100 masks are compared, not only those whose ranks happen to agree.
    left = list(ref)
    for inst in ours:
        m = mask_utils.decode(inst.rle).astype(bool)
        cands = [t for t in left if t[1] == inst.label_index and abs(t[0] - inst.score) < 1e-3]
        assert cands, f"no reference pair for {inst.label} {inst.score}"

        def iou_with(t):
            r = ref_masks[t[2]].numpy()
            union = (m | r).sum()
            return 1.0 if union == 0 else (m & r).sum() / union
        best = max(cands, key=iou_with)
        assert iou_with(best) >= 0.99
        left.remove(best)
    assert not left


@pytest.mark.parametrize("seed", range(6))
def test_window_rle_equals_pycocotools_on_the_full_mask(seed):
    from m2f_cli.postprocess.masks import window_rle
    rng = np.random.default_rng(seed)
    h0, w0 = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    R, C = int(rng.integers(0, h0 + 1)), int(rng.integers(0, w0 + 1))
    r0, c0 = int(rng.integers(0, h0 - R + 1)), int(rng.integers(0, w0 - C + 1))
    density = [0.0, 1.0, 0.5, 0.05, 0.95, 0.3][seed]
    b = rng.random((R, C)) < density
    full = np.zeros((h0, w0), np.uint8)
    full[r0:r0 + R, c0:c0 + C] = b
    want = mask_utils.encode(np.asfortranarray(full))
    got = window_rle(b, r0, c0, (h0, w0))
    assert got["size"] == [h0, w0]
    assert got["counts"] == want["counts"].decode()
    # corners: a window filling the image, and one touching the last row and column
    full[:] = 1
    assert window_rle(np.ones((h0, w0), bool), 0, 0, (h0, w0))["counts"] == \
        mask_utils.encode(np.asfortranarray(full))["counts"].decode()


@pytest.mark.parametrize("rows", ["some", "all"])
def test_window_rle_of_a_window_with_many_runs_equals_pycocotools(rows):
    """Windows with more than 2048 run changes are put in column order by a radix sort on the
    column (window_rle): the same string, including a window spanning every row (runs joined
    across columns) and one spanning the whole image."""
    from m2f_cli.postprocess.masks import window_rle
    rng = np.random.default_rng(7)
    h0, w0 = 300, 420
    R, r0 = (120, 90) if rows == "some" else (h0, 0)
    for C, c0, density in ((200, 100, 0.5), (w0, 0, 0.5), (150, 270, 0.97)):
        b = rng.random((R, C)) < density
        full = np.zeros((h0, w0), np.uint8)
        full[r0:r0 + R, c0:c0 + C] = b
        want = mask_utils.encode(np.asfortranarray(full))["counts"].decode()
        assert window_rle(b, r0, c0, (h0, w0))["counts"] == want


@pytest.mark.parametrize("valid,original", [((96, 96), (480, 640)), ((110, 90), (333, 517)),
                                            ((96, 72), (3000, 4000)), ((50, 160), (37, 1000))])
def test_window_upsampling_equals_full_image_upsampling(valid, original):
    """Both window paths (separable over a small window; torch's kernel over the whole image for a
    large one) give the full-image bilinear logits on the window, and nothing positive outside it."""
    from m2f_cli.postprocess.sampling import FULL_WINDOW, MaskSampler
    g = torch.Generator().manual_seed(sum(original))
    vh, vw = valid
    sampler = MaskSampler(valid, original, torch.device("cpu"))
    yy, xx = torch.meshgrid(torch.arange(vh).float(), torch.arange(vw).float(), indexing="ij")
    sizes = []
    for radius in (1.5, 4.0, 12.0, 0.45 * max(vh, vw)):   # small blobs to nearly the whole image
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([vh, vw])).tolist()
        low = 8.0 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() / radius) + torch.randn(vh, vw, generator=g) * 0.3
        full = F.interpolate(low[None, None], size=original, mode="bilinear", align_corners=False)[0, 0]
        r0, c0, win = sampler.window(low)
        r1, c1 = r0 + win.shape[0], c0 + win.shape[1]
        sizes.append(win.numel() / (original[0] * original[1]))
        torch.testing.assert_close(win, full[r0:r1, c0:c1], rtol=0, atol=1e-4)
        outside = full > 0
        outside[r0:r1, c0:c1] = False
        assert not outside.any()
    assert min(sizes) < FULL_WINDOW  # the separable path ran


def _scattered_low(vh, vw, g, density):
    """Low-resolution logits whose positives are specks scattered over the whole image (the worst
    case for a window: it spans the photo while the mask covers a few percent of it)."""
    low = -(torch.rand(vh, vw, generator=g) * 6 + 0.5)
    specks = torch.rand(vh, vw, generator=g) < density
    return torch.where(specks, torch.rand(vh, vw, generator=g) * 6 + 0.5, low)


@pytest.mark.parametrize("valid,original", [((96, 96), (480, 640)), ((90, 110), (997, 1213)),
                                            ((64, 48), (3000, 4000)), ((50, 160), (640, 700))])
def test_cells_equal_full_image_upsampling_on_scattered_masks(valid, original):
    """The cell path (CellGrid: only the output cells that sample a positive logit) gives the mask,
    its area and its mask score of the full-image bilinear upsampling, on masks scattered enough
    to take it, at sizes whose cells are uneven (clamped edges, a last partial column)."""
    from m2f_cli.postprocess.sampling import CELL_SHARE, MaskSampler, _positive_box, _scattered
    g = torch.Generator().manual_seed(sum(original))
    sampler = MaskSampler(valid, original, torch.device("cpu"))
    assert sampler.cells is not None
    for density in (0.002, 0.01, 0.03):
        low = _scattered_low(*valid, g, density)
        assert _scattered(low > 0, _positive_box(low > 0))
        act = sampler.cells.active(low > 0)
        assert act is not None and act.share < CELL_SHARE  # measure() takes the cell path
        m = sampler.measure(low)
        full = F.interpolate(low[None, None], size=original, mode="bilinear", align_corners=False)[0, 0]
        want = full > 0
        got = np.zeros(original, bool)
        got[m.r0:m.r0 + m.binary.shape[0], m.c0:m.c0 + m.binary.shape[1]] = m.binary
        differ = got != want.numpy()
        assert not (differ & (full.abs() > 1e-5).numpy()).any()  # at most float rounding at 0
        assert abs(m.area - int(want.sum())) <= int(differ.sum())
        ref_score = float(full.sigmoid()[want].sum()) / (float(want.sum()) + 1e-6)
        assert m.score == pytest.approx(ref_score, abs=1e-5)
        # the RLE built from the cells (never from a window) is pycocotools' encoding of that mask
        assert m.cells is not None
        assert m.rle(original)["counts"] == mask_utils.encode(np.asfortranarray(got.astype(np.uint8)))["counts"].decode()


@pytest.mark.parametrize("valid,original", [((64, 48), (3000, 4000)), ((90, 110), (997, 1213))])
def test_cells_rle_where_runs_cross_cells_and_columns(valid, original):
    """A mask held as cells whose runs go on across cell rows (vertically adjacent active cells),
    reach the image's last row and go on at the top of the next column (the first and last source
    rows positive), and fill the last partial cell column: its RLE is pycocotools' encoding of its
    window, and its area the RLE's."""
    from m2f_cli.postprocess.sampling import MaskSampler
    vh, vw = valid
    low = torch.full(valid, -3.0)
    low[0], low[-1], low[:, -1] = 4.0, 4.0, 4.0      # top and bottom rows, last column
    low[vh // 2, ::3] = 2.0                            # specks in between
    sampler = MaskSampler(valid, original, torch.device("cpu"))
    m = sampler.measure(low)
    assert m.cells is not None                         # the cell path
    full = np.zeros(original, np.uint8)
    full[m.r0:m.r0 + m.binary.shape[0], m.c0:m.c0 + m.binary.shape[1]] = m.binary
    assert full[0].all() and full[-1].all() and full[:, -1].all()
    rle = m.rle(original)
    assert rle["counts"] == mask_utils.encode(np.asfortranarray(full))["counts"].decode()
    assert m.area == int(full.sum()) == int(mask_utils.area({"size": rle["size"], "counts": rle["counts"].encode()}))
    want = F.interpolate(low[None, None], size=original, mode="bilinear", align_corners=False)[0, 0] > 0
    assert (want.numpy() == full.astype(bool)).all()


def test_scattered_candidates_instance_map_matches_painting_in_score_order():
    """On a large image whose candidates are all scattered over it (cell path): instances against
    the straightforward reference, and the map against painting every full-size mask in ascending
    score (the best instance owns each pixel)."""
    g = torch.Generator().manual_seed(7)
    q, padded, original = 12, (96, 96), (768, 1024)
    cls = torch.randn(q, 81, generator=g)
    cls[:, 0] += 9.0; cls[:, 80] = -5.0
    masks = torch.stack([_scattered_low(24, 24, g, 0.1) for _ in range(q)])
    out, imap = segment_instances(cls, masks, padded, padded, original, COCO,
                                  PostprocessOptions(threshold=0.3, map_threshold=0.3, top_k=q))
    scores, labels, ref_masks = _reference(cls, masks, padded, padded, original, top_k=q)
    order = sorted(range(q), key=lambda i: -float(scores[i]))
    order = [i for i in order if float(scores[i]) >= 0.3]
    assert [round(i.score, 4) for i in out] == [round(float(scores[i]), 4) for i in order]
    want = np.zeros(original, np.uint16)
    for n in range(len(order), 0, -1):
        want[ref_masks[order[n - 1]].numpy()] = n
    near_zero = np.zeros(original, bool)
    up = F.interpolate(F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False),
                       size=original, mode="bilinear", align_corners=False)[0]
    near_zero = (up.abs() < 1e-5).any(0).numpy()
    assert len(out) >= 8 and (imap == want)[~near_zero].all()


def test_instance_map_of_cell_and_window_masks_together():
    """Scattered candidates (held as cells, painted in a cell-major map) and compact ones (dense
    windows, painted in the map itself) on one large image: the map equals painting every
    full-size mask in ascending score, whichever kind owns a pixel."""
    g = torch.Generator().manual_seed(11)
    q, padded, original = 16, (96, 96), (997, 1213)
    cls = torch.randn(q, 81, generator=g)
    cls[:, 0] += 9.0; cls[:, 80] = -5.0
    yy, xx = torch.meshgrid(torch.arange(24).float(), torch.arange(24).float(), indexing="ij")
    blobs = [6.0 * (1 - ((yy - 3 * k) ** 2 + (xx - 2 * k - 2) ** 2).sqrt() / 5.0) for k in range(1, 8)]
    masks = torch.stack([_scattered_low(24, 24, g, 0.1) for _ in range(q - len(blobs))] + blobs)
    out, imap = segment_instances(cls, masks, padded, padded, original, COCO,
                                  PostprocessOptions(threshold=0.3, map_threshold=0.3, top_k=q))
    scores, labels, ref_masks = _reference(cls, masks, padded, padded, original, top_k=q)
    order = [i for i in sorted(range(q), key=lambda i: -float(scores[i])) if float(scores[i]) >= 0.3]
    want = np.zeros(original, np.uint16)
    for n in range(len(order), 0, -1):
        want[ref_masks[order[n - 1]].numpy()] = n
    up = F.interpolate(F.interpolate(masks[None], size=padded, mode="bilinear", align_corners=False),
                       size=original, mode="bilinear", align_corners=False)[0]
    near_zero = (up.abs() < 1e-5).any(0).numpy()
    owners = set(np.unique(imap).tolist())
    assert len(out) >= 12 and (imap == want)[~near_zero].all()
    assert {i.id for i in out if i.bbox[2] * i.bbox[3] < 0.2 * original[0] * original[1]} & owners  # blobs drawn
    assert {i.id for i in out if i.bbox[2] > 1000} & owners                                        # scattered drawn
    for inst in out:  # each RLE is its reference mask (up to rounding at 0)
        ref = ref_masks[order[inst.id - 1]].numpy()
        assert ((mask_utils.decode(inst.rle).astype(bool) != ref) & ~near_zero).sum() == 0


_MEMORY_PROBE = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from test_postprocess import COCO, _scattered_low
from m2f_cli.postprocess.instance import PostprocessOptions, segment_instances
g = torch.Generator().manual_seed(3)
q, padded, original = 40, (96, 128), (3000, 4000)
cls = torch.randn(q, 81, generator=g)
cls[:, 0] += 12.0; cls[:, 80] = -5.0
masks = torch.stack([_scattered_low(24, 32, g, 0.05) for _ in range(q)])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, imap = segment_instances(cls, masks, padded, padded, original, COCO,
                              PostprocessOptions(threshold=0.3, map_threshold=0.3, top_k=q))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
wide = sum(i.bbox[2] > 3000 and i.bbox[3] > 2000 for i in out)
print(len(out), wide, grown * (1 if sys.platform == "darwin" else 1024))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="ru_maxrss (the peak resident memory) is POSIX-only")
def test_many_full_image_candidates_do_not_hold_a_mask_each():
    """Post-processing memory does not grow as one mask per candidate: 40 candidates scattered over
    a 12 MP photo (each window the whole image) held ~12 MB of bool each until the map was painted
    (the peak grew ~550 MB); the drawn windows are now kept as bits (~140 MB, most of it the map and
    one candidate's working set). The peak resident memory of a fresh process, before and after."""
    r = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n, wide, grown = map(int, r.stdout.split())
    assert n == 40 and wide == 40  # every candidate spreads over the whole image
    assert grown < 300 * 2 ** 20, f"peak RSS grew {grown / 2 ** 20:.0f} MiB"
