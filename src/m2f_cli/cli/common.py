"""The ``m2f`` app and what its commands share: one-line errors and exit codes, logging, the exit.

No torch/transformers import at module level anywhere in the CLI: ``m2f --help`` must stay fast.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import typer

from m2f_cli.config import RunConfig

# Help follows the terminal's width (click caps it at 80 columns unless told otherwise).
_CONTEXT = {"max_content_width": 160, "help_option_names": ["-h", "--help"]}

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,  # plain click help: no rich import, so --help stays fast
                  context_settings=_CONTEXT,
                  help="Mask2Former instance segmentation over folders of images.")

DEFAULTS = RunConfig(inputs=[], out="")  # the defaults, from their one place


def _version(value: bool) -> None:
    if value:
        from m2f_cli.version import __version__
        typer.echo(f"m2f {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Mask2Former instance segmentation over folders of images: PNG instance maps, overlays,
    COCO results, JSON Lines and polygons, resumable, from the shell."""


def silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered for a closed pipe is dropped quietly."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (a test runner's buffer)
        pass


@contextlib.contextmanager
def errors_as_exit_codes():
    """Any of m2f's own errors (errors.py) -> its one line on stderr and its exit code."""
    from m2f_cli.errors import KNOWN, exit_code_for, one_line
    try:
        yield
    except KNOWN as e:
        raise error(one_line(e), exit_code_for(e)) from None


def error(msg: str, code: int) -> "typer.Exit":
    typer.echo(f"m2f: error: {msg}", err=True)
    return typer.Exit(code)


def setup_logging(quiet: bool, verbose: int = 0) -> None:
    """-q: errors only; default: warnings; -v: what m2f decides and does (INFO); -vv: DEBUG."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO)[min(verbose, 1)] if verbose < 2 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="m2f: %(levelname)s: %(message)s", stream=sys.stderr)


def verbose_option():
    return typer.Option(0, "--verbose", "-v", count=True, help="Log what m2f decides and does (-vv: debug).")


def main() -> None:
    """The console entry point (``m2f``, ``python -m m2f_cli``).

    When a command has finished (every output written, renamed and closed, journals closed, locks
    released, workers joined), the process leaves without Python's interpreter teardown, which
    spends ~2 s freeing torch and the model for nothing (measured by benchmarks/run.py). Streams
    and log handlers are flushed first. Library callers (``run``, CliRunner) are unaffected.
    """
    try:
        app()
    except SystemExit as e:
        code = e.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
        exit_now(code)


def exit_now(code: int) -> None:
    import os
    import threading
    logging.shutdown()

    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (m2f ... | head) or a closed stream
                pass
    # A reader that stopped reading (a full pipe) must not keep m2f alive after a signal: flush
    # in a thread and leave without it after a moment.
    t = threading.Thread(target=flush, daemon=True)
    t.start()
    t.join(timeout=2.0)
    os._exit(code)


if __name__ == "__main__":
    main()
