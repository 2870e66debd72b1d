import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from m2f_cli.categories import CategoryTable
from m2f_cli.postprocess import PostprocessOptions, instances_from_logits, segment_instances

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
    from m2f_cli.postprocess import window_rle
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


@pytest.mark.parametrize("valid,original", [((96, 96), (480, 640)), ((110, 90), (333, 517)),
                                            ((96, 72), (3000, 4000)), ((50, 160), (37, 1000))])
def test_window_upsampling_equals_full_image_upsampling(valid, original):
    """Both window paths (separable over a small window; torch's kernel over the whole image for a
    large one) give the full-image bilinear logits on the window, and nothing positive outside it."""
    from m2f_cli.postprocess import FULL_WINDOW, _Sampler
    g = torch.Generator().manual_seed(sum(original))
    vh, vw = valid
    sampler = _Sampler(valid, original, torch.device("cpu"))
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


def _painted_reference(cls, masks, padded, valid, original, opts):
    """Every candidate's full-size mask from torch's upsampling, the instances painted in ascending
    score order (the best owns a pixel): the straightforward form of segment_instances' map."""
    ph, pw = padded
    up = F.interpolate(masks[None].float(), size=(ph, pw), mode="bilinear", align_corners=False)
    up = F.interpolate(up[:, :, :valid[0], :valid[1]], size=original, mode="bilinear", align_corners=False)[0]
    return up > 0


@pytest.mark.parametrize("kind", ["diffuse", "scattered", "blobs"])
@pytest.mark.parametrize("valid,original", [((96, 96), (480, 640)), ((110, 90), (333, 517)),
                                            ((50, 160), (37, 1000)), ((96, 96), (40, 30))])
def test_sparse_masks_equal_the_full_masks_however_scattered(kind, valid, original):
    """sparse_mask evaluates only where a mask can be positive: its runs, area and score are those of
    the full-size upsampling, for compact blobs and for positives scattered over the whole image."""
    from m2f_cli.postprocess import _Bands, _Sampler, sparse_mask
    g = torch.Generator().manual_seed(sum(original) + len(kind))
    vh, vw = valid
    sampler = _Sampler(valid, original, torch.device("cpu"))
    bands = _Bands(sampler)
    for n in range(6):
        if kind == "diffuse":
            low = torch.randn(vh, vw, generator=g) * 3 - 1
        elif kind == "scattered":  # isolated positive logits over the whole image
            mag = 2 + 5 * torch.rand(vh, vw, generator=g)  # (not exactly opposite values: no ties at 0)
            low = torch.where(torch.rand(vh, vw, generator=g) < 0.01, mag, -mag.flip(0))
        else:
            yy, xx = torch.meshgrid(torch.arange(vh).float(), torch.arange(vw).float(), indexing="ij")
            cy, cx = (torch.rand(2, generator=g) * torch.tensor([vh, vw])).tolist()
            low = 8.0 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() / (3 + 6 * n))
        full = F.interpolate(low[None, None], size=original, mode="bilinear", align_corners=False)[0, 0]
        m = sparse_mask(sampler, low, bands)
        b = (full > 0).numpy()
        if m is None:
            assert b.sum() <= 2  # only last-bit ties at 0 may differ from torch's one-pass kernel
            continue
        got = mask_utils.decode({"size": list(original), "counts": m.rle["counts"].encode()}).astype(bool)
        assert abs(int(got.sum()) - int(b.sum())) <= 2 and int(got.sum()) == m.area
        assert (got != b).sum() <= 2
        # the pixels it paints are exactly the mask's
        owner = np.zeros(original, np.uint16)
        m.paint(owner, 7, lambda cur: cur == 0)
        np.testing.assert_array_equal(owner == 7, got)
        want = float(full.sigmoid()[torch.from_numpy(got)].double().sum())
        assert m.inside == pytest.approx(want, rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("threshold,map_threshold", [(0.0, 0.0), (0.3, 0.5), (0.5, 0.2)])
def test_the_map_is_the_instances_painted_in_ascending_score(threshold, map_threshold):
    """The owner map (no mask kept after its query) paints what painting each instance in
    ascending score order paints, a query listed with several classes as its best instance."""
    g = torch.Generator().manual_seed(7)
    q, padded, valid, original = 40, (96, 128), (96, 120), (300, 410)
    cls = torch.randn(q, 81, generator=g) * 4
    cls[5] = cls[3]  # two queries with the same classes: equal probabilities, ties in score
    masks = torch.randn(q, 24, 32, generator=g) * 3 - 1
    masks[5] = masks[3]
    opts = PostprocessOptions(threshold=threshold, map_threshold=map_threshold)
    insts, imap = segment_instances(cls, masks, padded, valid, original, COCO, opts)
    assert insts
    want = np.zeros(original, np.uint16)
    for inst in sorted(insts, key=lambda i: (i.score, -i.id)):  # ascending; among ties the lower id last
        if inst.score >= max(threshold, map_threshold):
            m = mask_utils.decode({"size": list(original), "counts": inst.rle["counts"].encode()}).astype(bool)
            want[m] = inst.id
    np.testing.assert_array_equal(imap, want)


def test_many_diffuse_candidates_on_a_large_image_keep_no_mask_per_candidate():
    """Memory does not grow with candidates x image size: diffuse candidates on a 12 MP image
    (positives over the whole image, every one kept and drawn) peak at a few image-size buffers
    whether there are 8 or 32 of them, where keeping each candidate's mask would add 12 MB each."""
    import tracemalloc
    g = torch.Generator().manual_seed(3)
    padded, valid, original = (384, 384), (288, 384), (3000, 4000)
    pixels = original[0] * original[1]
    peaks = []
    for q in (8, 32):
        cls = torch.full((q, 81), -10.0)
        cls[:, 0] = 10.0  # every query a confident person
        masks = torch.randn(q, 96, 96, generator=g) * 3 - 2
        tracemalloc.start()  # numpy's buffers (torch's are not traced: the logits are small here)
        try:
            insts, imap = segment_instances(cls, masks, padded, valid, original, COCO,
                                            PostprocessOptions(0.5, 0.5))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert len(insts) == q and len(np.unique(imap)) == q + 1  # all kept, all drawn
        assert min(i.area for i in insts) > 0.05 * pixels  # diffuse: each covers a good part of the image
    # 24 more candidates add their RLE strings (~1 MB each for such masks), not 24 x 12 MB of masks
    assert peaks[1] - peaks[0] < 24 * pixels / 4
    assert peaks[1] < 20 * pixels
