"""``m2f cache list|clear|build``: the start-up cache (model/startup/), and the detached builder's entry."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from m2f_cli.errors import ExitCode

from m2f_cli.cli.common import DEFAULTS, error, errors_as_exit_codes, setup_logging, verbose_option, app

cache_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="The start-up cache (traced and compiled models in M2F_CACHE_DIR or ~/.cache/m2f): list, "
                             "clear or build it.")
app.add_typer(cache_app, name="cache")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@cache_app.command("list")
def cache_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """Each cached trace (least recently used first): size, last use, whether a live process uses it."""
    import time

    from m2f_cli.model.startup.cache import entries, max_bytes, traces_dir
    items = entries()
    if as_json:
        typer.echo(json.dumps([{"path": str(e.path), "bytes": e.size, "last_used": e.last_used,
                                "in_use": e.in_use} for e in items]))
        return
    for e in items:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        typer.echo(f"{_mb(e.size):>10}  {when}  {'in use' if e.in_use else '      '}  {e.path.name}")
    cap = max_bytes()
    typer.echo(f"{len(items)} traces, {_mb(sum(e.size for e in items))} in {traces_dir()} "
               f"(cap {_mb(cap) if cap > 0 else 'none'}: M2F_CACHE_MAX_BYTES)")


@cache_app.command("clear")
def cache_clear(everything: bool = typer.Option(False, "--all", help="Also forget the weight digests "
                                                "(digests.json: weights are hashed again on next use)."),
                ) -> None:
    """Delete every cached trace no live process is using (those in use are kept and named)."""
    from m2f_cli.model.startup.cache import clear
    removed, kept = clear(everything)
    for e in kept:
        typer.echo(f"m2f: kept {e.path.name}: in use by a running m2f process", err=True)
    typer.echo(f"m2f: removed {len(removed)} traces ({_mb(sum(e.size for e in removed))})"
               f"{' and the weight digests' if everything else ''}", err=True)


@cache_app.command("build")
def cache_build(model: str = typer.Option(DEFAULTS.model, "--model", help="Hub id or save_pretrained folder."),
                revision: Optional[str] = typer.Option(None, "--revision", metavar="REV", help="Hub revision."),
                dtype: str = typer.Option("float32", "--dtype", help="float32, or bfloat16 on CPUs with "
                                          "fast bf16 kernels (AVX512-BF16/AMX)."),
                threads: Optional[int] = typer.Option(None, "--threads", metavar="N", help="torch threads."),
                trace: bool = typer.Option(False, "--trace", help="Build the TorchScript trace (seconds; "
                                           "what runs use where no C++ compiler is found) instead of compiling."),
                size: Optional[str] = typer.Option(None, "--size", metavar="HxW", help="With --trace: the "
                                                   "model input size (default: the checkpoint's)."),
                background: bool = typer.Option(False, "--background", hidden=True),
                entry: Optional[str] = typer.Option(None, "--entry", hidden=True),
                lock_fd: Optional[int] = typer.Option(None, "--lock-fd", hidden=True),
                wait_fd: Optional[int] = typer.Option(None, "--wait-fd", hidden=True),
                verbose: int = verbose_option(),
                ) -> None:
    """Compile the model for this CPU (AOTInductor, ~2 min on 2 cores) into the start-up cache, so
    that every later `m2f segment` of this model at its checkpoint input size loads it compiled;
    with --trace, build the start-up trace instead (seconds). Run it once where the runs will run:
    in a container image's build, on each kind of cluster node (docs/startup-cache.md)."""
    from pathlib import Path
    if background:  # the detached builder a run at a terminal left (builds.spawn): nothing heavy yet
        from m2f_cli.model.startup.builds import run_detached
        child = [a for a in sys.argv[1:] if a != "--background"]
        at = child.index("--wait-fd")
        del child[at:at + 2]
        raise typer.Exit(run_detached(Path(entry), [sys.executable, "-m", "m2f_cli", *child], lock_fd, wait_fd))
    setup_logging(False, verbose)
    if lock_fd is not None and entry:
        from m2f_cli.model.startup.cache import adopt_lock
        adopt_lock(Path(entry), lock_fd)  # held by the builder that started us

    import torch

    from m2f_cli.model.loading import load_predictor, resolve_dtype, resolve_model
    from m2f_cli.inputs.preprocess import load_checkpoint_spec, spec_for_resize
    if threads:
        torch.set_num_threads(threads)
    if trace:
        _build_trace(model, revision, size)
        return
    try:
        source = resolve_model(model, revision)
        dt = resolve_dtype(dtype, torch.device("cpu"))
    except (ValueError, RuntimeError) as e:
        raise error(str(e), ExitCode.USAGE)
    spec = spec_for_resize("checkpoint", load_checkpoint_spec(source.local_dir))
    if spec.mode != "fixed":
        raise error(f"{model}: its preprocessing has no single input size; nothing to compile", ExitCode.USAGE)
    predictor = load_predictor(source, torch.device("cpu"), dt, compile=True, trace_size=spec.padded_size(1, 1),
                               notify=lambda m: typer.echo(f"m2f: {m}", err=True))
    path = getattr(predictor, "path", None)
    if not str(path or "").endswith(".pt2"):
        raise error("the compiled model could not be built (see the warning above); runs use the trace",
                     ExitCode.FATAL)
    typer.echo(f"m2f: compiled model ready: {path}", err=True)


def _build_trace(model: str, revision: Optional[str], size: Optional[str]) -> None:
    import torch

    from m2f_cli.model.loading import load_predictor, resolve_model
    from m2f_cli.inputs.preprocess import load_checkpoint_spec, spec_for_resize
    with errors_as_exit_codes():
        source = resolve_model(model, revision)
    if size:
        try:
            h, w = (int(x) for x in size.lower().split("x"))
        except ValueError:
            raise error(f"--size {size!r}: expected HxW, e.g. 384x384", ExitCode.USAGE)
    else:
        spec = spec_for_resize("checkpoint", load_checkpoint_spec(source.local_dir))
        if spec.mode != "fixed":
            raise error(f"{model}: its preprocessing has no single input size; nothing to trace", ExitCode.USAGE)
        h, w = spec.padded_size(1, 1)
    predictor = load_predictor(source, torch.device("cpu"), torch.float32, trace_size=(h, w),
                               notify=lambda m: typer.echo(f"m2f: {m}", err=True))
    typer.echo(f"m2f: start-up cache ready: {getattr(predictor, 'path', None) or 'not built (see above)'}", err=True)
