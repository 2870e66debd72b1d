"""Never lose work on videos: the frames journal, where a rerun starts, and which writers a frame
still needs.

Frames are outputs like images: each format writes a frame's files atomically through the output
folder, and the run-level formats journal them. On top of that the frames journal
(``<out>/.m2f/frames.journal.jsonl``, one per shard like every journal) gets, from the writer
thread, one line per frame once all its files are written (``{"rel", "video", "frame", "pts",
"time"}``, with ``"tracks"``: the tracker's state after the frame, with --track) and one line per video read to its end (``{"video", "end": true, "frames"}``).

A rerun (resume_point) goes through a video's journaled frames in order: at the first one some
writer of this run lacks, it seeks there and redoes it; when all are whole it seeks to the last
and goes on after it; a video that was read to its end with every frame whole (and its annotated
video there, -f overlay) is skipped like a finished image. The frame's index and timestamp come
from the journal, so the reader (inputs/video.py) numbers the frames after it exactly as a run from the
start would. Nothing else is kept: a frame without a journal line is redone (its writers skip the
files it has).
"""

from __future__ import annotations

from typing import Optional

from m2f_cli.config import RunConfig
from m2f_cli.engines.video import PIXEL_FORMATS, VideoEnd, VideoJob
from m2f_cli.inputs.frame_selection import selection_of
from m2f_cli.inputs.video import Anchor, estimate_frames, frame_ref
from m2f_cli.inputs.walk import is_video_name
from m2f_cli.records import ImageRef


# The progress bar's total counts the frames each video's header announces (one open per video,
# a few ms each, before the run starts); with more videos than this each counts as one.
ESTIMATE_MAX_VIDEOS = 200


class FrameLog:
    """The frames journal (module docstring), read once when the run starts and kept up to date
    by the writer thread. frames: video rel -> {frame index: (pts, time)}; ended: video rels read
    to their end. overlay_video: writers.video_overlay.OverlayVideo, built at each video's end."""

    name = "frames"  # in the writer thread's plan; it has no settings record of its own

    def __init__(self, folder, fresh: bool, overlay_video=None):
        self.journal = folder.journal("frames", fresh=fresh)
        self.frames: dict[str, dict[int, tuple]] = {}
        self.states: dict[str, dict[int, dict]] = {}  # --track: the tracker's state after each frame
        self.ended: set[str] = set()
        self.overlay_video = overlay_video
        for r in self.journal.records():
            if r.get("end"):
                self.ended.add(r["video"])
            else:
                self.frames.setdefault(r["video"], {})[int(r["frame"])] = (r.get("pts"), r.get("time"))
                if r.get("tracks") is not None:
                    self.states.setdefault(r["video"], {})[int(r["frame"])] = r["tracks"]

    def write(self, item) -> None:
        if isinstance(item, VideoEnd):
            if self.overlay_video is not None:
                self.overlay_video.build(item.ref, self.frames.get(item.ref.rel, {}))
            if item.complete:
                self.journal.append({"video": item.ref.rel, "end": True, "frames": item.frames})
                self.ended.add(item.ref.rel)
            return
        fr = item.ref.frame
        line = {"rel": item.ref.rel, "video": fr.video_rel, "frame": fr.index, "pts": fr.pts, "time": fr.time}
        if getattr(item, "track_state", None) is not None:  # --track (tracking/stage.py)
            line["tracks"] = item.track_state
        self.journal.append(line)
        self.frames.setdefault(fr.video_rel, {})[fr.index] = (fr.pts, fr.time)

    def close(self) -> None:
        self.journal.close()


class FramePlan(dict):
    """The pipeline's plan (output name -> the writers that image still needs) for a run with
    videos: a frame's writers are decided when it comes (those lacking its files, then the frames
    journal, so its line follows its files); a video's end goes to the frames journal."""

    def __init__(self, plan: dict, log: Optional[FrameLog], overwrite: bool):
        super().__init__(plan)
        self.log, self.overwrite = log, overwrite

    def writers_for(self, item) -> list:
        tail = [self.log] if self.log is not None else []
        if isinstance(item, VideoEnd):
            return tail
        ref = item.ref
        if ref.frame is None:
            return list(self.get(ref.rel, ()))
        wanted = self.get(ref.frame.video_rel, ())
        return (list(wanted) if self.overwrite else [w for w in wanted if not w.done(ref)]) + tail

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def resume_point(video: ImageRef, log: FrameLog, writers: list) -> tuple[Optional[Anchor], bool]:
    """(where the reader starts, whether the video is done): see the module docstring."""
    frames = sorted(log.frames.get(video.rel, {}).items())
    for k, (pts, t) in frames:
        ref = frame_ref(video, k, t, pts)
        if not all(w.done(ref) for w in writers):
            return Anchor(k, pts), False
    if video.rel in log.ended and (log.overlay_video is None or log.overlay_video.done(video)):
        return None, True
    if not frames:
        return None, False
    k, (pts, _) = frames[-1]
    return Anchor(k, pts, skip=True), False


def plan_videos(config: RunConfig, folder, writers: list, plan: dict, todo: list, refs: list
                ) -> tuple[dict, list]:
    """Add the videos among refs to the work list (VideoJobs in input order) unless they are done;
    plan becomes a FramePlan. Without videos, (plan, todo) as they are."""
    videos = [r for r in refs if is_video_name(r.name)]
    if not videos:
        return plan, todo
    selection = selection_of(config)
    log = None
    if folder is not None:
        from m2f_cli.outputs.writers.video_overlay import OverlayVideo
        overlay = OverlayVideo.for_run(folder, writers, bool(config.overlay_video))
        log = FrameLog(folder, fresh=config.overwrite, overlay_video=overlay)
    keep_rgb = bool(PIXEL_FORMATS & {w.name for w in writers})
    estimate = len(videos) <= ESTIMATE_MAX_VIDEOS
    jobs = []
    for v in videos:
        anchor, done = resume_point(v, log, writers) if log is not None and not config.overwrite else (None, False)
        if done:
            continue
        expected = estimate_frames(v.path, selection) if estimate else 0
        expected -= len(log.frames.get(v.rel, {})) if log is not None else 0
        jobs.append(VideoJob(v, selection, anchor, keep_rgb, config.max_pixels, max(1, expected)))
        plan[v.rel] = list(writers)
    return FramePlan(plan, log, config.overwrite), sorted(todo + jobs, key=lambda r: r.index)


def track_states(plan, todo: list) -> dict[str, dict]:
    """--track: for each video of todo that resumes, the tracker's state it continues from (video rel
    -> state): the one journaled with the frame before its anchor (with the anchor itself when the
    anchor is skipped). Videos that start from their beginning, or whose journal has no state, are
    left out (their tracks start afresh). The states are then dropped from memory."""
    log = getattr(plan, "log", None)
    if log is None:
        return {}
    out = {}
    for job in todo:
        anchor = getattr(job, "anchor", None)
        states = log.states.get(getattr(job, "rel", None), {})
        if anchor is None or not states:
            continue
        before = [k for k in states if k < anchor.index or (anchor.skip and k == anchor.index)]
        if before:
            out[job.rel] = states[max(before)]
    log.states.clear()
    return out


def work_count(todo: list) -> int:
    """How many images and frames the work list is expected to give (the progress bar's total)."""
    return sum(t.expected if isinstance(t, VideoJob) else 1 for t in todo)
