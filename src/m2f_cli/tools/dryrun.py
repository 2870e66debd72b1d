"""``m2f segment --dry-run``: what a run would do, from the same steps a run takes before its model
is loaded (pipeline.py): the options checked, the inputs walked, the model's config read (no
weights), the output folder's settings record compared and each format's journal read. Nothing is
created, locked, repaired or written, and no model is loaded."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Optional

from m2f_cli.config import RunConfig
from m2f_cli.errors import RemoteError, UsageError
from m2f_cli.choices import device_and_dtype, validate
from m2f_cli.inputs.walk import is_video_name
from m2f_cli.outputs.video_resume import plan_videos
from m2f_cli.pipeline import find_inputs, model_facts, open_writers, plan_outputs, settings_check
from m2f_cli.outputs.open import open_output


@dataclass
class FormatPlan:
    """One format: inputs whose outputs it would write, and inputs it has already done."""

    name: str
    todo: int
    done: int


@dataclass
class RunPlan:
    """What ``m2f segment`` with these options would do now. refused: the one line a run would
    exit 2 with (outputs made with other settings), or None."""

    inputs: list[str]
    out: str
    model: str
    task: str
    device: str
    dtype: str
    images: int  # inputs: images and videos
    videos: int = 0
    not_images: dict = field(default_factory=dict)
    unreadable: list = field(default_factory=list)  # [{"path", "error"}]: failures known before decoding
    todo: int = 0
    skipped: int = 0
    overwrite: bool = False
    formats: list = field(default_factory=list)  # FormatPlan
    refused: Optional[str] = None

    @property
    def exit_code(self) -> int:
        return 2 if self.refused else 0

    def as_dict(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}

    def lines(self) -> list[str]:
        """The plan for a person, one fact a line."""
        out = ["dry run: no model loaded, nothing written",
               f"inputs: {self.images} images" + (f" (of them {self.videos} videos)" if self.videos else "")
               + (f", {len(self.unreadable)} unreadable" if self.unreadable else "")
               + ("; not images (skipped): " + ", ".join(f"{n} {ext}" for ext, n in sorted(self.not_images.items()))
                  if self.not_images else ""),
               f"model: {self.model} ({self.task}) on {self.device}, {self.dtype}",
               f"output: {self.out}"]
        for f in self.formats:
            out.append(f"  {f.name}: {f.todo} to {'redo' if self.overwrite and f.done else 'do'}"
                       + (f", {f.done} done" if f.done and not self.overwrite else ""))
        if self.refused:
            out.append(f"refused: {self.refused}")
        else:
            verb = "redo" if self.overwrite else "do"
            out.append(f"would {verb} {self.todo} images, skip {self.skipped} (already done)")
        out += [f"unreadable: {u['path']}: {u['error']}" for u in self.unreadable]
        return out


def plan(config: RunConfig) -> RunPlan:
    """The RunPlan of config. Raises what a run raises before its model is loaded (UsageError,
    NoImagesError, ModelLoadError, ...), except a settings conflict: that is RunPlan.refused."""
    validate(config)
    device, dtype = device_and_dtype(config, None, None)
    try:
        folder = None if config.out == "-" else open_output(config.out, config.shard)
    except RemoteError as e:
        raise UsageError(f"--out {e}") from None
    if folder is not None:
        folder.read_only = True
    found = find_inputs(config, folder)
    m = model_facts(config, None)
    writers = open_writers(config, folder, m.categories, m.identity.name, io.StringIO(), m.task)
    result = RunPlan(inputs=list(config.inputs), out=config.out, model=config.model, task=m.task,
                     device=str(device), dtype=dtype, images=len(found.refs), not_images=dict(found.not_images),
                     unreadable=[{"path": f.ref.path, "error": f.error} for f in found.failures],
                     overwrite=config.overwrite)
    if folder is not None:
        try:
            settings_check(config, folder, writers, m, dtype, found)
        except UsageError as e:
            result.refused = str(e)
    images = [r for r in found.refs if not is_video_name(r.name)]
    outputs, todo = plan_outputs(config, writers, images)
    outputs, todo = plan_videos(config, folder, writers, outputs, todo, found.refs)  # a video: one input
    result.todo, result.skipped = len(todo), len(found.refs) - len(todo)
    result.videos = len(found.refs) - len(images)
    for w in writers:
        need = sum(1 for ref in found.refs if w in outputs.get(ref.rel, ()))
        result.formats.append(FormatPlan(w.name, need, len(found.refs) - need))
    return result
