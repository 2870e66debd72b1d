"""Videos in: the reader (counts, timestamps, rotation, variable frame rates, cut files, seeking,
--every/--fps/--start/--end), every format per frame, names, eval per frame, failures, settings,
resume after an interrupt and after kill -9, shards, URLs. Every video is made here with PyAV."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_cli import RunConfig, Segmenter, run
from m2f_cli.errors import ExitCode, UsageError
from m2f_cli.inputs.frame_selection import FrameSelection, parse_time
from m2f_cli.inputs.video import Anchor, FrameError, ReadStats, read_frames
from m2f_cli.inputs.walk import shard_of, walk
from m2f_cli.outputs.writer_thread import in_order
from m2f_cli.tools.evaluate import evaluate_run

from planted import PlantedPredictor, iou
from test_never_lose_work import _all_valid, _snapshot
from videos import frame_index, planted_frame, truncate, write_audio_only, write_video

VFR_MS = [0, 40, 100, 110, 300, 310, 320, 500, 900, 1000, 1033, 1400, 1450, 1500, 2000]


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp("vids")
    return {
        "h264": write_video(d / "h264.mp4", n=40, options={"g": "12"}),    # B-frames: x264's default
        "vp9": write_video(d / "vp9.webm", n=30, codec="libvpx-vp9"),
        "vfr": write_video(d / "vfr.mkv", pts_ms=VFR_MS, options={"g": "4", "crf": "12"}),
        "rot": write_video(d / "rot.mp4", n=6, size=(96, 64), rotation=90),
        "cut_mp4": truncate(write_video(d / "whole.mp4", n=40, container_options={"movflags": "+faststart"}),
                            d / "cut.mp4"),
        "cut_mkv": truncate(write_video(d / "whole.mkv", n=40), d / "cut.mkv"),
        "audio": write_audio_only(d / "audio.mp4"),
    }


def _times(frames):
    return [round(f.time, 6) for f in frames]


# -- the reader -----------------------------------------------------------------------------------

@pytest.mark.parametrize("which,n,step", [("h264", 40, 0.1), ("vp9", 30, 0.1)])
def test_frames_counts_timestamps_and_content_exact(vids, which, n, step):
    frames = list(read_frames(vids[which]))
    assert [f.index for f in frames] == list(range(n))
    assert _times(frames) == [round(k * step, 6) for k in range(n)]
    assert [frame_index(f.rgb) for f in frames] == [k % 18 for k in range(n)]  # the k-th frame written
    assert all(f.rgb.shape == (120, 160, 3) and f.rgb.dtype == np.uint8 for f in frames)


def test_variable_frame_rate_keeps_each_frames_time(vids):
    frames = list(read_frames(vids["vfr"]))
    assert _times(frames) == [t / 1000 for t in VFR_MS]
    assert [frame_index(f.rgb) for f in frames] == list(range(len(VFR_MS)))


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path, rotation):
    rgb = np.full((64, 96, 3), 120, np.uint8)
    rgb[:16, :16] = (240, 240, 240)  # a white corner: top-left as stored
    path = write_video(tmp_path / "r.mp4", frames=[rgb] * 3, size=(96, 64), rotation=rotation)
    frames = list(read_frames(path))
    expected = np.rot90(rgb, rotation // 90)  # the display matrix turns counter-clockwise
    assert len(frames) == 3
    for f in frames:
        assert f.rgb.shape == expected.shape
        assert np.abs(f.rgb.astype(int) - expected).mean() < 8


@pytest.mark.parametrize("which", ["cut_mp4", "cut_mkv"])
def test_a_cut_video_gives_its_frames_then_names_the_frame_that_failed(vids, which):
    got = []
    with pytest.raises(FrameError) as e:
        for f in read_frames(vids[which]):
            got.append(f)
    assert 10 < len(got) < 40 and [f.index for f in got] == list(range(len(got)))
    assert e.value.frame == len(got) and str(e.value).startswith(f"frame {len(got)}: ")


def test_no_video_stream_and_not_a_video_are_clear_failures(vids, tmp_path):
    with pytest.raises(FrameError, match="no video stream .streams: audio."):
        list(read_frames(vids["audio"]))
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(FrameError, match="cannot open video"):
        list(read_frames(str(bad)))


def _nearest_expected(times, fps, start=0.0, end=None):
    """The frames --fps picks, by brute force: for each step start + j/fps in range, the nearest
    frame in range (the later one on a tie), each once."""
    inside = [k for k, t in enumerate(times) if t >= start and (end is None or t < end)]
    last = times[inside[-1]] + ((times[inside[-1]] - times[inside[-2]]) / 2 if len(inside) > 1 else 1e9)
    stop = min(end if end is not None else 1e18, last)
    picked, j = set(), 0
    while start + j / fps < stop - 1e-9:
        target = start + j / fps
        picked.add(min(inside, key=lambda k: (abs(times[k] - target), -k)))
        j += 1
    return sorted(picked)


@pytest.mark.parametrize("which", ["h264", "vfr"])
@pytest.mark.parametrize("sel", [dict(every=3), dict(fps=3), dict(fps=7.5, start=0.3), dict(start="0.5", end="1.3"),
                                 dict(every=2, start="00:00:00.35", end=1.45), dict(fps=2, end=1)])
def test_every_fps_start_end(vids, which, sel):
    times = _times(read_frames(vids[which]))
    selection = FrameSelection.parse(**sel)
    stats = ReadStats()
    got = list(read_frames(vids[which], selection, stats=stats))
    lo, hi = selection.start, selection.end if selection.end is not None else 1e9
    if selection.fps is not None:
        expected = _nearest_expected(times, selection.fps, lo, selection.end)
    else:
        expected = [k for k, t in enumerate(times) if lo <= t < hi and k % selection.every == 0]
    assert [f.index for f in got] == expected and expected
    assert _times(got) == [times[k] for k in expected]
    if which == "h264" and selection.start > 0.4:
        assert stats.decoded < len(times) - 4  # it sought to --start instead of decoding up to it
    if selection.end is not None:
        assert stats.decoded < len(times)  # and stopped at --end


@pytest.mark.parametrize("which", ["h264", "vp9", "vfr"])
@pytest.mark.parametrize("sel", [dict(), dict(fps=4), dict(every=3, start=0.2)])
def test_starting_at_any_frame_reads_exactly_what_a_whole_read_does(vids, which, sel):
    """A resumed run seeks to an anchor: the frames after it equal a read from the start."""
    selection = FrameSelection.parse(**sel)
    whole = list(read_frames(vids[which], selection))
    for i in range(0, len(whole), 3):
        a = whole[i]
        for skip in (False, True):
            tail = list(read_frames(vids[which], selection, Anchor(a.index, a.pts, skip)))
            expected = whole[i + 1:] if skip else whole[i:]
            assert [(f.index, f.pts) for f in tail] == [(f.index, f.pts) for f in expected]
            assert all(np.array_equal(x.rgb, y.rgb) for x, y in zip(tail, expected))


def test_a_moved_anchor_falls_back_to_decoding_from_the_start(vids):
    whole = list(read_frames(vids["h264"]))
    tail = list(read_frames(vids["h264"], anchor=Anchor(20, whole[20].pts + 1)))  # no frame has that pts
    assert [f.index for f in tail] == list(range(20, 40))


def test_times_and_selection_options():
    assert parse_time("90") == 90 and parse_time("1:30") == 90 and parse_time("01:02:03.5") == 3723.5
    assert parse_time(2.5) == 2.5
    for bad in ("-1", "1:75", "abc", "1:2:3:4", "nan"):
        with pytest.raises(ValueError):
            parse_time(bad)
    assert FrameSelection.parse().record() is None
    assert FrameSelection.parse(every=2, start="0:10").record() == {"every": 2, "fps": None, "start": 10.0,
                                                                      "end": None}
    for kw, needle in [(dict(every=0), "--every 0"), (dict(fps=-1), "--fps -1"),
                       (dict(every=2, fps=1), "--every and --fps"), (dict(start="5", end="4"), "--end 4"),
                       (dict(start="x"), "--start")]:
        with pytest.raises(ValueError, match=needle):
            FrameSelection.parse(**kw)


def test_in_order_keeps_units_together():
    class End:
        ends_unit = True
    end = End()
    items = [((1, 1), "v1"), (2, "img2"), ((1, 0), "v0"), (0, "img0"), ((1, 2), end), (3, "img3")]
    assert list(in_order(iter(items))) == ["img0", "v0", "v1", end, "img2", "img3"]


# -- through the pipeline -------------------------------------------------------------------------

ALL_FORMATS = ("png", "coco", "jsonl", "overlay", "yolo", "labelme", "cvat", "labels", "geojson", "cutout")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("vin")
    (d / "v").mkdir()
    write_video(d / "v" / "clip.mp4", n=12)
    Image.fromarray(planted_frame(3)[0]).save(d / "a.png")
    return d


def _run(inputs, out, formats=("png",), segmenter=None, **kw):
    kw.setdefault("workers", 0)
    return run(RunConfig(inputs=[str(i) for i in inputs], out=str(out), formats=formats, batch_size=2, **kw),
               segmenter=segmenter or Segmenter(PlantedPredictor()))


def test_every_format_per_frame(tmp_path, folder):
    out = tmp_path / "out"
    s = _run([folder], out, ALL_FORMATS, workers=1)
    assert (s.images, s.failed, s.exit_code) == (13, 0, 0)  # 12 frames + 1 image
    for k in range(12):
        stem = f"v/clip/{k:06d}"
        for path in (f"{stem}.png", f"{stem}.json", f"{stem}.overlay.jpg", f"labels/{stem}.txt",
                     f"labelme/{stem}.json", f"{stem}.labels.png", f"{stem}.geojson", f"cutouts/{stem}/index.json"):
            assert (out / path).is_file(), path
        side = json.loads((out / f"{stem}.json").read_text())
        assert (side["video"], side["frame"], side["time"]) == (str(folder / "v" / "clip.mp4"), k, round(k / 10, 6))
        assert side["name"] == f"v/clip.mp4/{k:06d}" and (side["width"], side["height"]) == (160, 120)
        masks = planted_frame(k)[1]
        png = np.asarray(Image.open(out / f"{stem}.png"))
        by_label = {i["label"]: i["id"] for i in side["instances"]}
        assert iou(png == by_label["person"], masks["red"]) > 0.9
        assert iou(png == by_label["dog"], masks["blue"]) > 0.9  # this frame's rectangle, not another's
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    frames = [l for l in lines if "video" in l]
    assert [(l["frame"], l["time"]) for l in frames] == [(k, round(k / 10, 6)) for k in range(12)]
    images = json.loads((out / "images.json").read_text())["images"]
    assert [im.get("frame") for im in images] == [None] + list(range(12))
    assert all(im["video"].endswith("clip.mp4") and im["time"] == round(im["frame"] / 10, 6) for im in images[1:])
    assert (out / "annotations.xml").read_text().count("<image ") == 13
    video = list(read_frames(str(out / "v" / "clip.overlay.mp4")))
    assert _times(video) == [round(k / 10, 6) for k in range(12)] and video[0].rgb.shape == (120, 160, 3)
    overlay = np.asarray(Image.open(out / "v/clip/000005.overlay.jpg")).astype(int)
    assert np.abs(video[5].rgb.astype(int) - overlay).mean() < 6  # the same drawing, H.264-coded


def test_eval_scores_per_frame(tmp_path, folder):
    out = tmp_path / "out"
    _run([folder / "v" / "clip.mp4"], out, ("coco",))
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}
    for k in range(12):  # the ground truth names frames as extracted images would be, with video and frame
        gt["images"].append({"id": 500 + k, "file_name": f"clip/{k + 1:06d}.png", "video": "clip.mp4", "frame": k,
                             "width": 160, "height": 120})
        for cid, m in ((1, planted_frame(k)[1]["red"]), (18, planted_frame(k)[1]["blue"])):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 500 + k, "category_id": cid,
                                      "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                      "area": int(m.sum()), "bbox": list(mask_utils.toBbox(rle)), "iscrowd": 0})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    r = evaluate_run(str(tmp_path / "gt.json"), str(out / "predictions.json"))
    assert r.images == 12 and r.stats["AP50"] > 0.95 and r.stats["AP"] > 0.6


def test_names_keep_the_extension_where_frames_would_clash(tmp_path):
    d = tmp_path / "in"
    (d / "clip").mkdir(parents=True)
    write_video(d / "clip.mp4", n=2)
    write_video(d / "b.mp4", n=2)
    Image.fromarray(planted_frame(0)[0]).save(d / "clip" / "000000.png")
    Image.fromarray(planted_frame(0)[0]).save(d / "b.png")
    rels = {r.name: r.rel for r in walk([str(d)]).refs}
    assert rels == {"clip.mp4": "clip.mp4", "clip/000000.png": "clip/000000", "b.mp4": "b.mp4", "b.png": "b.png"}
    out = tmp_path / "out"
    s = _run([d], out)
    assert (s.images, s.failed) == (6, 0)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {
        "clip.mp4/000000.png", "clip.mp4/000001.png", "clip/000000.png", "b.mp4/000000.png", "b.mp4/000001.png",
        "b.png.png"}


def test_videos_from_globs_stdin_lists_and_urls(tmp_path, folder, tiny_model):
    import fsspec
    from typer.testing import CliRunner
    from m2f_cli.cli import app
    video = folder / "v" / "clip.mp4"
    assert [r.rel for r in walk([str(folder / "v" / "*.mp4")]).refs] == [f"{str(folder).lstrip('/')}/v/clip"]
    fs = fsspec.filesystem("memory")
    fs.pipe("/vids26/cam/clip.mp4", video.read_bytes())
    out = tmp_path / "url"
    s = _run(["memory://vids26"], out, every=4)
    assert (s.images, s.failed) == (3, 0)
    assert sorted(p.name for p in (out / "cam" / "clip").glob("*.png")) == ["000000.png", "000004.png", "000008.png"]
    video_url = json.loads((out / "cam/clip/000004.json").read_text())["video"]
    assert video_url.startswith("memory://") and video_url.endswith("/vids26/cam/clip.mp4")
    r = CliRunner().invoke(app, ["segment", "-", "--out", str(tmp_path / "cli"), "--model", tiny_model, "--fps", "2",
                                 "-f", "jsonl", "--workers", "0", "-q"], input=f"{video}\n")
    assert r.exit_code == 0, r.output
    frames = [json.loads(l)["frame"] for l in (tmp_path / "cli" / "predictions.jsonl").read_text().splitlines()]
    assert frames == [0, 5, 10]


def test_a_cut_video_writes_what_decodes_and_one_failure(tmp_path, vids):
    out = tmp_path / "out"
    s = _run([vids["cut_mp4"], vids["audio"]], out, ("png", "jsonl"))
    assert s.exit_code == ExitCode.INPUTS_FAILED and s.failed == 2
    written = sorted(p.name for p in out.rglob("cut/*.png"))  # named by the absolute path given
    assert written == [f"{k:06d}.png" for k in range(len(written))] and 10 < len(written) < 40
    fails = [json.loads(l) for l in (out / "failures.jsonl").read_text().splitlines()]
    cut = next(f for f in fails if f["path"].endswith("cut.mp4"))
    assert (cut["stage"], cut["frame"]) == ("decode", len(written)) and cut["error"].startswith(f"frame {len(written)}:")
    audio = next(f for f in fails if f["path"].endswith("audio.mp4"))
    assert "frame" not in audio and audio["error"].startswith("no video stream")
    s = _run([vids["cut_mp4"], vids["audio"]], out, ("png", "jsonl"))  # a rerun: no frame twice, the same failures
    assert (s.images, s.failed) == (0, 2)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(written)


def test_another_frame_selection_is_refused_like_any_setting(tmp_path, folder):
    out = tmp_path / "out"
    s = _run([folder / "v" / "clip.mp4"], out, ("png", "coco"), every=2)
    assert sorted(p.stem for p in out.rglob("v/clip/*.png")) == [f"{k:06d}" for k in range(0, 12, 2)]
    with pytest.raises(UsageError, match=r"frames: \{\"every\": 2.*-> \{\"every\": 3"):
        _run([folder / "v" / "clip.mp4"], out, ("png", "coco"), every=3)
    s = _run([folder / "v" / "clip.mp4"], out, ("png", "coco"), every=2)
    assert (s.images, s.skipped) == (0, 1)  # the finished video is skipped whole
    s = _run([folder / "v" / "clip.mp4"], out, ("png", "coco"), every=3, overwrite=True)
    assert s.images == 4


class _InterruptAfter(PlantedPredictor):
    """The planted model, sending this process SIGINT at its n-th forward: the run stops after
    that batch, as after Ctrl-C."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def __call__(self, x):
        if self.calls + 1 == self.n:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__call__(x)


_InterruptAfter.__name__ = "PlantedPredictor"  # the same model to the settings record (named by type)


@pytest.mark.parametrize("sel", [dict(), dict(fps=6), dict(every=3, start=0.3)])
def test_an_interrupted_run_resumes_at_the_first_frame_without_outputs(tmp_path, vids, sel):
    formats = ("png", "coco", "jsonl", "overlay")
    ref = tmp_path / "ref"
    full = _run([vids["vfr"], vids["h264"]], ref, formats, **sel)
    out = tmp_path / "out"
    first = _run([vids["vfr"], vids["h264"]], out, formats, segmenter=Segmenter(_InterruptAfter(7)), **sel)
    assert first.interrupted == signal.SIGINT and 0 < first.images < full.images
    again = _run([vids["vfr"], vids["h264"]], out, formats, **sel)
    assert again.images == full.images - first.images  # no finished frame redone
    assert _snapshot(out) == _snapshot(ref)


def test_shards_split_by_video_and_never_do_a_frame_twice(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    names = [f"cam{i}" for i in range(12)]
    by_shard = {0: [n for n in names if shard_of(n, 2) == 0][:2], 1: [n for n in names if shard_of(n, 2) == 1][:2]}
    for n in by_shard[0] + by_shard[1]:
        write_video(d / f"{n}.mp4", n=5)
    whole = _run([d], tmp_path / "whole", ("png", "coco"))
    out = tmp_path / "sharded"
    counts = [_run([d], out, ("png", "coco"), shard=(i, 2)).images for i in (0, 1)]
    assert counts == [10, 10] and sum(counts) == whole.images == 20
    for i in (0, 1):
        journal = (out / ".m2f" / f"frames.shard-{i}-of-2.journal.jsonl").read_text().splitlines()
        videos = {json.loads(l)["video"] for l in journal}
        assert videos == set(by_shard[i])  # a video's frames all in one shard
    from m2f_cli.tools.merge import merge
    merge(str(out))
    assert _snapshot(out) == _snapshot(tmp_path / "whole")


def _m2f(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "m2f_cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _descendants(pid: int) -> list[int]:
    """Every live process under pid, and the forkservers it started (their parent is pid)."""
    kids, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                if ppid == parent:
                    kids.append(int(d))
                    todo.append(int(d))
    return kids


def test_kill_9_mid_video_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model):
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "clip.mp4", n=48, size=(192, 144), options={"g": "10"})
    args = ["--model", tiny_model, "-f", "png", "-f", "coco", "-f", "jsonl", "-f", "overlay", "--batch-size", "1",
            "--workers", "1", "--fps", "8"]
    ref = tmp_path / "ref"
    p = _m2f("segment", d, "--out", ref, *args)
    assert p.wait(timeout=600) == 0, p.stderr.read()
    total = len(list((ref / "clip").glob("*.png")))
    out = tmp_path / "out"
    p = _m2f("segment", d, "--out", out, *args)
    t0 = time.time()
    while time.time() - t0 < 300 and p.poll() is None and len(list(out.glob("clip/*.png"))) < 4:
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    children = _descendants(p.pid)  # its decode worker, forked by a forkserver (inputs/batch.make_loader)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=60) == -signal.SIGKILL
    t0 = time.time()  # nothing it started outlives it: the worker and the server leave too
    while time.time() - t0 < 30 and any(os.path.exists(f"/proc/{c}") and _state(c) != "Z" for c in children):
        time.sleep(0.1)
    assert children and all(not os.path.exists(f"/proc/{c}") or _state(c) == "Z" for c in children)
    done = len(list(out.glob("clip/*.png")))
    assert 0 < done < total and not (out / "clip.overlay.mp4").exists()
    _all_valid(out)
    p = _m2f("segment", d, "--out", out, *args, "--summary-json", tmp_path / "s.json")
    assert p.wait(timeout=600) == 0, p.stderr.read()
    assert json.loads((tmp_path / "s.json").read_text())["images"] <= total - done + 1  # at most one redone
    assert _snapshot(out) == _snapshot(ref)  # the annotated video too, byte for byte
    assert _times(read_frames(str(out / "clip.overlay.mp4"))) == \
        [json.loads(p.read_text())["time"] for p in sorted((ref / "clip").glob("*.json"))]  # --fps 8's frames


@pytest.mark.ray
def test_ray_reads_a_video_in_chunks_equal_to_a_local_run(tmp_path, tiny_model):
    import logging
    import ray
    d = tmp_path / "in"
    d.mkdir()
    write_video(d / "clip.mp4", n=9, options={"g": "4"})
    Image.fromarray(planted_frame(0)[0]).save(d / "a.png")

    def config(out, **kw):  # batch size 1: chunks of 2 frames, each seeking to where the last one stopped
        return RunConfig(inputs=[str(d)], out=str(out), formats=("png", "coco", "jsonl"), model=tiny_model,
                         batch_size=1, workers=0, **kw)
    local = run(config(tmp_path / "local"))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2, log_to_driver=False,
             logging_level=logging.ERROR)
    try:
        s = run(config(tmp_path / "ray", ray="auto"))
    finally:
        ray.shutdown()
    assert (s.images, s.failed) == (local.images, 0) == (10, 0)
    assert _snapshot(tmp_path / "ray") == _snapshot(tmp_path / "local")
