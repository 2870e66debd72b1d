"""Overlay tags (writers/overlay.py place_tags): never overlapping, inside the image, none for a
hidden instance, at the largest visible part, scores optional, and drawn as placed."""

import numpy as np
import pytest

from m2f_cli.model.categories import CategoryTable
from m2f_cli.records import ImageRef, ImageResult, Instance
from m2f_cli.outputs.writers.overlay import overlay_tags, render_overlay

COCO = CategoryTable.coco()


def _result(label_map: np.ndarray, boxes: dict, hidden=()) -> ImageResult:
    """An ImageResult whose instances are the values of label_map (ids 1..N, descending score),
    plus instances listed in hidden: a box and an area but no pixel in the map."""
    h, w = label_map.shape
    insts = []
    n = max(max(boxes, default=0), max(hidden, default=0))
    for k in range(1, n + 1):
        cat = COCO[(k * 7) % 80]
        area = int((label_map == k).sum()) if k not in hidden else 50
        insts.append(Instance(id=k, label=cat.name, category_id=cat.id, label_index=cat.index,
                              score=1.0 - 0.4 * k / (n + 1), bbox=boxes[k], area=area, rle={}))
    return ImageResult(ref=ImageRef("x.png", "x.png", "x", 0), width=w, height=h, instances=insts,
                       label_map=label_map, map_threshold=0.5)


def _crowded(w: int, h: int, cols: int, rows: int, seed: int = 0):
    """A grid of small touching blobs of random sizes: many more tags than fit next to their objects."""
    rng = np.random.default_rng(seed)
    m = np.zeros((h, w), np.uint16)
    boxes = {}
    cw, ch = w // cols, h // rows
    k = 0
    for r in range(rows):
        for c in range(cols):
            k += 1
            bw, bh = int(rng.integers(cw // 3, cw + 1)), int(rng.integers(ch // 3, ch + 1))
            x, y = c * cw, r * ch
            m[y:y + bh, x:x + bw] = k
            boxes[k] = (x, y, bw, bh)
    return m, boxes


def _check(result: ImageResult, tags):
    assert tags, "no tag placed"  # every case below has room for at least one
    h, w = result.label_map.shape
    for t in tags:
        x0, y0, x1, y1 = t.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, t  # inside the image
    for i, a in enumerate(tags):
        for b in tags[i + 1:]:
            ax0, ay0, ax1, ay1 = a.box
            bx0, by0, bx1, by1 = b.box
            assert not (ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1), (a, b)
    counts = np.bincount(result.label_map.ravel())
    for t in tags:
        assert counts[t.value] > 0 and result.label_map[t.anchor[1], t.anchor[0]] == t.value


@pytest.mark.parametrize("w,h,cols,rows", [(300, 200, 10, 8), (640, 480, 12, 10), (4000, 3000, 10, 8)])
def test_crowded_tags_never_overlap_and_stay_inside(w, h, cols, rows):
    m, boxes = _crowded(w, h, cols, rows)
    result = _result(m, boxes)
    tags = overlay_tags(result)
    _check(result, tags)
    assert len({t.value for t in tags}) == len(tags)
    # crowded: most get a tag, and the best-scoring ones get theirs first
    assert len(tags) >= 0.3 * len(boxes) and tags[0].value == 1


def test_no_tag_for_a_hidden_instance_and_one_per_visible_instance():
    m = np.zeros((200, 300), np.uint16)
    m[20:120, 20:150] = 1
    m[50:180, 180:280] = 3
    boxes = {1: (20, 20, 130, 100), 2: (40, 40, 50, 50), 3: (180, 50, 100, 130)}  # 2: under 1
    result = _result(m, boxes, hidden=(2,))
    tags = overlay_tags(result)
    assert sorted(t.value for t in tags) == [1, 3]
    _check(result, tags)


def test_tag_sits_on_the_largest_visible_part():
    m = np.zeros((240, 320), np.uint16)
    m[10:30, 10:30] = 1    # a small piece in the box's corner, where the old tags went
    m[100:220, 150:300] = 1  # the large piece
    result = _result(m, {1: (10, 10, 290, 210)})
    (tag,) = overlay_tags(result)
    ax, ay = tag.anchor
    assert 150 <= ax < 300 and 100 <= ay < 220
    x0, y0, x1, y1 = tag.box
    assert x0 <= ax < x1 and y0 <= ay < y1  # centred on it, since nothing is in the way


def test_scores_can_be_hidden():
    m, boxes = _crowded(300, 200, 3, 2)
    result = _result(m, boxes)
    with_scores = overlay_tags(result)
    without = overlay_tags(result, show_scores=False)
    assert len(with_scores) == len(without) == len(boxes)  # six blobs with room for all six tags
    assert all(t.text.rsplit(" ", 1)[-1].replace(".", "").isdigit() for t in with_scores)
    labels = {i.id: i.label for i in result.instances}
    assert [t.text for t in without] == [labels[t.value] for t in without]


def test_a_tag_wider_than_a_tiny_image_is_shortened_to_fit():
    m = np.ones((24, 40), np.uint16)
    result = _result(m, {1: (0, 0, 40, 24)})
    tags = overlay_tags(result)
    _check(result, tags)
    assert len(tags) == 1 and (tags[0].text.endswith("\u2026") or tags[0].box[2] <= 40)


def test_tags_are_drawn_where_placed():
    m, boxes = _crowded(640, 480, 6, 5, seed=3)
    result = _result(m, boxes)
    rgb = np.full((480, 640, 3), 128, np.uint8)
    img = np.asarray(render_overlay(rgb, result, COCO, alpha=0.5))
    tags = overlay_tags(result)
    assert len(tags) == len(boxes)  # room for all thirty here
    for t in tags:
        x0, y0, x1, y1 = t.box
        colour = np.array(COCO.by_id(result.instances[t.value - 1].category_id).color)
        corner = img[y0, x0].astype(int)  # the tag's background at its corner is the class colour
        assert np.abs(corner - colour).max() <= 1, t
