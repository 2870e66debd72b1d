"""--track end to end (the planted model on a generated video): every format's track field, and a
run interrupted mid-video then resumed gives the same tracks, file for file, as an uninterrupted one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from m2f_cli import RunConfig, Segmenter, run

from test_never_lose_work import _snapshot
from test_video import _InterruptAfter
from planted import PlantedPredictor
from videos import write_video

FORMATS = ("png", "coco", "jsonl", "overlay", "labelme", "cvat", "geojson")


def _run(video, out, segmenter=None, formats=FORMATS):
    return run(RunConfig(inputs=[str(Path(video).parent)], out=str(out), formats=formats, batch_size=2, workers=0, track=True),
               segmenter=segmenter or Segmenter(PlantedPredictor()))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", n=16, options={"g": "5"})


@pytest.fixture(scope="module")
def ref(tmp_path_factory, video):
    out = tmp_path_factory.mktemp("ref")
    assert _run(video, out).images == 16
    return out


def test_every_format_carries_the_track(ref):
    sidecars = [json.loads(p.read_text()) for p in sorted((ref / "clip").glob("*.json"))]
    tracks = [[i["track_id"] for i in s["instances"]] for s in sidecars]
    assert len(tracks) == 16 and all(sorted(t) == [1, 2] for t in tracks)  # two planted objects, two tracks
    by_label = {(i["label"], i["track_id"]) for s in sidecars for i in s["instances"]}
    assert len(by_label) == 2  # one class per track
    lines = [json.loads(l) for l in (ref / "predictions.jsonl").read_text().splitlines()]
    assert [[i["track_id"] for i in r["instances"]] for r in lines] == tracks
    preds = json.loads((ref / "predictions.json").read_text())
    assert {p["track_id"] for p in preds if p["score"] >= 0.5} == {1, 2}
    lm = json.loads((ref / "labelme" / "clip" / "000003.json").read_text())
    assert sorted({(s["group_id"], s["track_id"]) for s in lm["shapes"]}) == [(1, 1), (2, 2)]
    geo = json.loads((ref / "clip" / "000003.geojson").read_text())
    assert sorted(f["properties"]["track_id"] for f in geo["features"]) == [1, 2]
    xml = (ref / "annotations.xml").read_text()
    assert xml.count('<attribute name="track_id">') >= 32 and "<name>track_id</name>" in xml
    video_xml = (ref / "cvat" / "clip.xml").read_text()
    assert video_xml.count("<track ") == 2 and video_xml.count('outside="0"') == 32
    journal = [json.loads(l) for l in (ref / ".m2f" / "frames.journal.jsonl").read_text().splitlines()]
    assert all("tracks" in r for r in journal if not r.get("end"))


def test_interrupted_then_resumed_video_keeps_its_track_ids(tmp_path, video, ref):
    out = tmp_path / "out"
    first = _run(video, out, Segmenter(_InterruptAfter(4)))
    assert first.interrupted == signal.SIGINT and 0 < first.images < 16
    again = _run(video, out)
    assert again.images == 16 - first.images
    assert _comparable(_snapshot(out)) == _comparable(_snapshot(ref))


def _comparable(snap: dict) -> dict:
    """A snapshot less LabelMe's imagePath (relative to the output folder, which sits elsewhere)."""
    for k, v in snap.items():
        if k.startswith("labelme/"):
            v.pop("imagePath")
    return snap


def test_a_tracked_rerun_of_untracked_outputs_is_refused(tmp_path, video):
    from m2f_cli.errors import UsageError
    out = tmp_path / "out"
    run(RunConfig(inputs=[str(Path(video).parent)], out=str(out), formats=("png",), batch_size=2, workers=0),
        segmenter=Segmenter(PlantedPredictor()))
    with pytest.raises(UsageError, match="other settings"):
        _run(video, out, formats=("png",))
