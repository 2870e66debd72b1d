"""The tracker (m2f_cli.tracking) on planted masks with known tracks: crossing, occlusion, a missed
frame, a duplicate under two classes; its state round-trips exactly; the stage merges duplicates
and renumbers the instance map."""

from __future__ import annotations

import json

import numpy as np
from pycocotools import mask as mask_utils

from m2f_cli.records import FrameInfo, ImageRef, ImageResult, Instance
from m2f_cli.tracking.tracker import Detection, Tracker, TrackerConfig
from m2f_cli.tracking.stage import TrackingStage

H, W = 60, 120
KITE, FRISBEE = ("kite", 38, 1), ("frisbee", 34, 2)


def disc(cx: float, cy: float, r: float = 8) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def run(frames: list[list[tuple]], config: TrackerConfig = TrackerConfig()) -> list[list]:
    """frames: per frame [(mask, score, cls)] -> per frame the track ids."""
    t = Tracker(config)
    return [[a.track_id for a in t.step([Detection(m, s, c) for m, s, c in dets])] for dets in frames]


def test_two_discs_crossing_keep_their_ids():
    # A moves right, B moves left on the same row; they overlap in the middle frames (B on top)
    frames = []
    for k in range(20):
        a, b = disc(10 + 5 * k, 30), disc(110 - 5 * k, 30)
        frames.append([(a & ~b, 0.9, KITE), (b, 0.8, KITE)] if (a & ~b).any() else [(b, 0.8, KITE)])
    ids = run(frames)
    assert ids[10] == [2]  # A wholly hidden behind B
    assert all(f == [1, 2] for k, f in enumerate(ids) if k != 10), ids


def test_occluded_for_a_few_frames_is_picked_up_again_with_its_id():
    frames = []
    for k in range(20):
        a = disc(10 + 4 * k, 20)
        dets = [(disc(60, 45), 0.95, FRISBEE)]
        if not 8 <= k < 12:  # hidden for four frames, moving on meanwhile
            dets.append((a, 0.9, KITE))
        frames.append(dets)
    ids = run(frames)
    assert [f[1] for f in ids if len(f) == 2] == [2] * 16


def test_an_object_back_from_hiding_off_its_predicted_path_is_re_identified():
    # A moves right, hides for three frames, and comes back having turned (it bounced): neither its
    # predicted mask nor its last one meets the new detection at IoU 0.2, but the detection is near
    # (0.85 track sizes), of its size and class: the same track, not a new one
    xs = [20 + 4 * k for k in range(6)] + [None] * 3 + [28 - 4 * j for j in range(3)]
    frames = [[(disc(100, 45), 0.95, FRISBEE)] + ([(disc(x, 20), 0.9, KITE)] if x else []) for x in xs]
    assert [f[1:] for f in run(frames)] == [[2]] * 6 + [[]] * 3 + [[2]] * 3
    assert [f[1:] for f in run(frames, TrackerConfig(reid_dist=0))][9:] == [[3]] * 3  # without: a new track
    other = [f[:1] + [(f[1][0], 0.9, FRISBEE)] if len(f) > 1 and k >= 9 else f for k, f in enumerate(frames)]
    assert [f[1:] for f in run(other)][9:] == [[3]] * 3  # another class: a new track


def test_a_missed_detection_and_a_weak_one_continue_the_track():
    frames = [[(disc(10 + 6 * k, 30), 0.9, KITE)] for k in range(12)]
    frames[5] = []                                        # missed
    frames[8] = [(disc(10 + 6 * 8, 30), 0.3, KITE)]       # weak: below high, above low
    ids = run(frames)
    assert ids[5] == [] and ids[8] == [1] and all(f == [1] for k, f in enumerate(ids) if k != 5)


def test_a_weak_detection_never_starts_a_track():
    assert run([[(disc(30, 30), 0.3, KITE)]]) == [[None]]


def test_a_duplicate_under_two_classes_is_one_track_with_one_class():
    t = Tracker()
    out = []
    for k in range(6):
        m = disc(20 + 5 * k, 30)
        m2 = m.copy()
        m2[int(30), int(20 + 5 * k) + 7] = False  # almost the same mask
        scores = (0.9, 0.6) if k != 3 else (0.55, 0.7)  # frame 3: the other class scores higher
        out.append(t.step([Detection(m, scores[0], KITE), Detection(m2, scores[1], FRISBEE)]))
    for k, (a, b) in enumerate(out):
        assert a.track_id == b.track_id == 1
        assert a.cls == b.cls == KITE  # the vote: kite's summed score stays ahead
    assert out[3][1].duplicate_of is None and out[3][0].duplicate_of == 1  # the higher one is kept
    assert out[0][1].duplicate_of == 0


def test_a_looser_weaker_mask_of_a_tracked_object_is_no_second_track():
    # a second, weaker and looser mask of the same object (IoU ~0.58 with it, half of it outside it:
    # not covered) is a duplicate, not a second object that would persist as a false track
    frames = [[(disc(20 + 4 * k, 30), 0.9, KITE), (disc(20 + 4 * k, 30, 10.5), 0.65, KITE)] for k in range(5)]
    assert run(frames) == [[1, 1]] * 5
    assert run(frames, TrackerConfig(dup_iou=0.7, same_class_iou=0.7))[1:] == [[1, 2]] * 4  # the former defaults: a second track


def test_two_masks_of_one_class_at_iou_0_4_are_one_object():
    # Mask2Former's two queries on one object under the same class: two masks at IoU 0.44 (under
    # dup_iou 0.5, neither covered by the other) made a second track beside the first
    a = [disc(20 + 3 * k, 30, 8) for k in range(5)]
    b = [disc(25 + 3 * k, 30, 8) for k in range(5)]
    assert run([[(a[k], 0.9, KITE), (b[k], 0.8, KITE)] for k in range(5)]) == [[1, 1]] * 5
    assert run([[(a[k], 0.9, KITE), (b[k], 0.8, KITE)] for k in range(5)],
               TrackerConfig(same_class_iou=0.5)) == [[1, 2]] * 5     # without: a second track
    assert run([[(a[k], 0.9, KITE), (b[k], 0.8, FRISBEE)] for k in range(5)]) == [[1, 2]] * 5  # two classes: dup_iou


def test_a_track_unseen_longer_than_max_lost_ends():
    cfg = TrackerConfig(max_lost=2)
    frames = [[(disc(30, 30), 0.9, KITE)], [], [], [], [(disc(30, 30), 0.9, KITE)]]
    assert run(frames, cfg)[-1] == [2]
    assert run(frames, TrackerConfig(max_lost=3))[-1] == [1]


def test_state_round_trips_through_json_exactly():
    frames = [[(disc(10 + 5 * k, 30), 0.9, KITE), (disc(100 - 3 * k, 20 + k), 0.7, FRISBEE)] for k in range(16)]
    whole = run(frames)
    t = Tracker()
    got = [[a.track_id for a in t.step([Detection(*d) for d in f])] for f in frames[:7]]
    t = Tracker(TrackerConfig(), json.loads(json.dumps(t.state())))
    got += [[a.track_id for a in t.step([Detection(*d) for d in f])] for f in frames[7:]]
    assert got == whole


def _instance(i: int, m: np.ndarray, score: float, cls) -> Instance:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    ys, xs = np.nonzero(m)
    return Instance(i, cls[0], cls[1], cls[2], score, (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                                                       int(np.ptp(ys)) + 1), int(m.sum()), rle)


def _result(k: int, dets) -> ImageResult:
    ref = ImageRef("v.mp4", f"v.mp4/{k:06d}", f"v/{k:06d}", 0, FrameInfo(k, k / 10, k, "v"))
    inst = [_instance(i + 1, m, s, c) for i, (m, s, c) in enumerate(dets)]
    imap = np.zeros((H, W), np.uint16)
    for i in reversed([i for i in inst if i.score >= 0.5]):  # as the segmenter draws it
        imap[mask_utils.decode(i.rle).astype(bool)] = i.id
    return ImageResult(ref, W, H, inst, imap, 0.5)


def test_stage_merges_duplicates_renumbers_and_keeps_state():
    a, b = disc(30, 30), disc(80, 30)
    r = _result(0, [(a, 0.9, KITE), (a, 0.8, FRISBEE), (b, 0.7, FRISBEE), (disc(100, 50, 3), 0.1, KITE)])
    stage = TrackingStage()
    list(stage.apply([r]))
    # b (0.7, below confirm) is a tentative track in its first frame: no track id yet
    assert [(i.id, i.track_id, i.label) for i in r.instances] == [(1, 1, "kite"), (2, None, "frisbee"),
                                                                   (3, None, "kite")]
    assert r.instances[0].merged == (("frisbee", 0.8),)
    assert r.instances[0].to_json()["merged"] == [{"label": "frisbee", "score": 0.8}]
    assert set(np.unique(r.label_map)) == {0, 1, 2}
    assert (r.label_map == 2).sum() == b.sum() and (r.label_map == 1).sum() == a.sum()
    assert r.track_state["next_id"] == 2
    r = _result(1, [(a, 0.9, KITE), (b, 0.7, FRISBEE)])
    list(stage.apply([r]))
    assert [(i.id, i.track_id) for i in r.instances] == [(1, 1), (2, 2)]  # b seen again: confirmed


def test_a_mask_over_two_tracked_objects_is_not_merged_away():
    # A and B each tracked; one frame also has a higher-scoring mask over both (the pair as one
    # instance): without the span rule it would swallow both (each is covered by it)
    a, b = disc(40, 30, 8), disc(60, 30, 8)
    pair = disc(40, 30, 10) | disc(60, 30, 10)
    frames = [[(a, 0.9, KITE), (b, 0.9, KITE)]] * 3 + [[(pair, 0.95, KITE), (a, 0.85, KITE), (b, 0.6, FRISBEE)]]
    t = Tracker()
    out = [t.step([Detection(*d) for d in f]) for f in frames]
    assert [x.track_id for x in out[-1]] == [1, 1, 2]
    assert out[-1][0].duplicate_of == 1 and out[-1][1].duplicate_of is None and out[-1][2].duplicate_of is None


def test_a_tracked_object_inside_a_pair_mask_keeps_its_track():
    # A and B tracked apart; then the detector returns a stronger mask over both and B alone (no A
    # alone, so no span): B, covered by the pair mask, would be merged into it and B's track lost;
    # taken into the first assignment, B fits its own track best and keeps it
    a, b = disc(40, 30, 12), disc(70, 30, 6)
    pair = disc(40, 30, 13) | disc(70, 30, 7)
    frames = [[(a, 0.9, KITE), (b, 0.9, FRISBEE)]] * 3 + [[(pair, 0.95, KITE), (b, 0.85, FRISBEE)]] * 2
    t = Tracker()
    out = [t.step([Detection(*d) for d in f]) for f in frames]
    assert [[x.track_id for x in f] for f in out] == [[1, 2]] * 5
    assert all(x.duplicate_of is None for x in out[-1]) and out[-1][1].cls == FRISBEE
    assert run(frames, TrackerConfig(covered_match=False))[3:] == [[1, 1]] * 2  # without: merged


def test_an_object_merged_by_iou_into_a_mask_over_it_and_a_neighbour_keeps_its_track():
    # A and B tracked apart; then the detector returns a stronger mask over both (same class) and A
    # alone, no B alone (no span). A lies inside the pair mask at IoU 0.64 (> same_class_iou): merged
    # into it, A's track went to the pair mask and B's was lost. Taken into the first assignment
    # (dup_match: the pair mask is >= 1.1 times A's), A keeps its track and the pair mask takes B's
    a = [disc(20 + 3 * k, 30, 8) for k in range(6)]
    b = [disc(36 + 3 * k, 30, 6) for k in range(6)]
    frames = ([[(a[k], 0.9, KITE), (b[k], 0.9, KITE)] for k in range(4)]
              + [[(a[k] | b[k], 0.95, KITE), (a[k], 0.85, KITE)] for k in (4, 5)])
    t = Tracker()
    out = [t.step([Detection(*d) for d in f]) for f in frames]
    assert [[x.track_id for x in f] for f in out] == [[1, 2]] * 4 + [[2, 1]] * 2
    assert all(x.duplicate_of is None for x in out[-1])
    assert run(frames, TrackerConfig(dup_match=0))[4:] == [[1, 1]] * 2  # without: A merged into the pair mask


def test_a_covered_detection_that_fits_a_track_best_takes_it_in_the_first_assignment():
    # A and B tracked apart; then a stronger loose mask over B and part of A (nearer B's track than
    # A's: IoU 0.29 vs 0.24) and B alone, covered by it: merged as covered, B's track went to the
    # loose mask and A's was left. Taking B into the first assignment gives B its own track and the
    # loose mask A's (the most IoU in all)
    a, b, loose = disc(40, 30, 10), disc(58, 30, 7), disc(51, 30, 12)
    frames = [[(a, 0.9, KITE), (b, 0.9, FRISBEE)]] * 3 + [[(loose, 0.95, KITE), (b, 0.85, FRISBEE)]] * 2
    assert run(frames)[3:] == [[1, 2]] * 2
    assert run(frames, TrackerConfig(match_iou=0.2))[3:] == [[1, 2]] * 2
    # without, at match_iou 0.2 (the loose mask matches B's track at 0.29): B merged, A lost
    assert run(frames, TrackerConfig(covered_match=False, match_iou=0.2))[3:] == [[2, 2]] * 2


def test_a_mask_with_one_part_inside_is_kept():
    # one strong detection inside a bigger mask is not a pair: the bigger one stays an object
    big, small = disc(50, 30, 16), disc(45, 30, 6)
    t = Tracker()
    out = t.step([Detection(big, 0.9, KITE), Detection(small, 0.85, FRISBEE)])
    assert out[0].duplicate_of is None and out[0].track_id == 1


def test_an_unconfirmed_one_frame_blip_yields_no_track():
    steady = [(disc(20 + 3 * k, 30), 0.9, KITE) for k in range(6)]
    frames = [[steady[k]] for k in range(6)]
    frames[2] = frames[2] + [(disc(90, 40), 0.6, FRISBEE)]       # a weak blip: one frame only
    frames[4] = frames[4] + [(disc(90, 15), 0.6, FRISBEE)]       # weak, then seen again: a track
    frames[5] = frames[5] + [(disc(91, 15), 0.6, FRISBEE)]
    ids = run(frames)
    assert ids == [[1], [1], [1, None], [1], [1, None], [1, 2]]  # ids given in order of confirmation
    assert run([[(disc(90, 40), 0.85, FRISBEE)]]) == [[1]]      # strong (>= confirm): a track at once


def test_a_match_of_another_size_leaves_the_velocity():
    # a disc moving 3 cells a frame, then matched once to a mask over it and a neighbour (2.25x its
    # area, centroid 6 cells ahead): that centroid moved with the shape, not the object
    frames = [[(disc(20 + 3 * k, 30), 0.9, KITE)] for k in range(4)] + [[(disc(38, 30, 12), 0.9, KITE)]]

    def velocity(config: TrackerConfig) -> float:
        t = Tracker(config)
        for f in frames:
            t.step([Detection(m, s, c) for m, s, c in f])
        return t.tracks[0].v[0]

    assert abs(velocity(TrackerConfig()) - 3.0) < 1e-6
    assert velocity(TrackerConfig(velocity_area=0)) > 5.5  # 0: every match updates it (9 observed, smoothed)
