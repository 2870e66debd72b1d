"""The writer interface and registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Callable, ClassVar, Iterable, Iterator, Optional

from m2f_cli.model.categories import CategoryTable
from m2f_cli.records import ImageRef, ImageResult
from m2f_cli.outputs.folder import OutputFolder


@dataclass
class WriterContext:
    """What every writer may need. threshold: the score threshold this writer applies (set per
    writer from its default unless the user gave --threshold)."""

    folder: Optional[OutputFolder]
    categories: CategoryTable
    model: str
    revision: Optional[str]
    top_k: int
    threshold: float = 0.5
    overwrite: bool = False
    stdout: Optional[IO[str]] = None
    options: dict = field(default_factory=dict)


class Writer:
    """One output format. Subclasses set name (one of formats.FORMATS) and default_threshold and
    implement the methods.

    done(ref): True when this image's output is complete on disk (resume skips the image when
        every writer says so, and asks only the writers that are not done for the others): whole
        files (OutputFolder.complete), never mere existence.
    write(result): write one image's outputs atomically; raises OutputError on I/O failure.
    close(): finalise run-level files (also after an interrupt); must leave only valid files.
    """

    name: ClassVar[str] = ""
    default_threshold: ClassVar[float] = 0.5
    # The entries of ctx.options this writer's files depend on (besides the model, task, resize,
    # dtype, classes, top-k and its own threshold, which every writer's files depend on). They go
    # into the folder's settings record; a rerun that changes one of them is refused (settings.py).
    recorded: ClassVar[tuple[str, ...]] = ()
    # Bumped when this writer's file layout changes: old outputs are then never taken as done.
    schema: ClassVar[int] = 1

    def __init__(self, ctx: WriterContext):
        self.ctx = ctx
        self.threshold = ctx.threshold

    def done(self, ref: ImageRef) -> bool:
        return False

    def has_outputs(self, refs) -> bool:
        """Whether any file of this writer for these inputs exists (the settings check asks)."""
        return any(self.done(r) for r in refs)

    def write(self, result: ImageResult) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def unique_records(records: Iterable[dict], id_of: Optional[Callable[[dict], object]] = None) -> Iterator[dict]:
    """A journal's records, one per image (the first; "rel" names the image) and, with id_of, one
    per id: a record whose id an earlier record already has is dropped, and its image is then not
    done, so it is redone under a fresh id. Journals hold such records only after two runs wrote
    into one folder at once (a lease lost on an object store: outputs/lease.py); the files built from them
    must still name each image once and never give two images one id."""
    seen_rel: set = set()
    seen_id: set = set()
    for r in records:
        if id_of is not None:
            i = id_of(r)
            if i in seen_id:
                continue
        rel = r.get("rel")
        if rel is not None and rel in seen_rel:
            continue
        seen_rel.add(rel)
        if id_of is not None:
            seen_id.add(i)
        yield r


REGISTRY: dict[str, type[Writer]] = {}


def register(cls: type[Writer]) -> type[Writer]:
    REGISTRY[cls.name] = cls
    return cls


# (format name, task) -> the class that writes that format for that task where the task needs its
# own (``-f coco`` of a panoptic model writes COCO panoptic results); REGISTRY's class otherwise.
TASK_VARIANTS: dict[tuple[str, str], type[Writer]] = {}


def register_variant(task: str) -> Callable[[type[Writer]], type[Writer]]:
    def add(cls: type[Writer]) -> type[Writer]:
        TASK_VARIANTS[(cls.name, task)] = cls
        return cls
    return add


def writer_class(fmt: str, task: str) -> type[Writer]:
    """The class that writes format fmt for a model of this task."""
    return TASK_VARIANTS.get((fmt, task), REGISTRY[fmt])
