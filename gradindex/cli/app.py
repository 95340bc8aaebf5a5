"""The ``gradindex`` command group and its one error policy.

Every :class:`~gradindex.errors.GradIndexError` (and every expected failure: usage errors, errors in a
user's task code, operating-system errors) becomes one line on stderr and exit status 2. Progress bars
go to stderr; results to stdout. Only this module configures logging handlers.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import warnings
from typing import Any

import click

from gradindex import faults
from gradindex.errors import GradIndexError


class _Group(click.Group):
    """Turns expected errors into one line on stderr and exit status 2: gradindex's own
    (:class:`GradIndexError`), click's usage errors, errors raised inside a user's task code
    (naming the hook and the user's file:line) and operating-system errors (a read-only folder,
    a full disk). Anything else is a bug in gradindex and keeps its traceback."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            if isinstance(err, _HELP):
                raise
            _fail(_usage_line(err))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GradIndexError as err:
            _fail(str(err))
        except click.UsageError as err:
            if isinstance(err, _HELP):
                raise
            _fail(_usage_line(err))
        except (click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as err:  # raised by a task module, not by Ctrl-C: one line, exit 2
            task_module = sys.modules.get("gradindex.task")
            message = task_module.task_code_error(err) if task_module is not None else None
            if message is None:
                raise
            _fail(message)
        except (Exception, SystemExit) as err:
            task_module = sys.modules.get("gradindex.task")  # not imported: no task code ran (and no torch)
            message = task_module.task_code_error(err) if task_module is not None else None
            if message is None and isinstance(err, OSError) and err.errno != errno.EPIPE:  # click handles EPIPE
                message = _os_error_line(err)
            if message is None and isinstance(err, ValueError) and "null byte" in str(err):
                message = "a path or argument contains a NUL byte (\\x00)"
            if message is None and isinstance(err, EOFError):
                message = f"unexpected end of data ({err or 'a truncated or empty input file?'})"
            if message is None:
                raise
            _fail(message)


def _fail(message: str) -> None:
    text = " ".join(message.split())
    if len(text) > MAX_ERROR_CHARS:  # a 200 KB word from an input file is not echoed whole
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text):,} characters)"
    click.echo("error: " + text, err=True)
    sys.exit(2)


MAX_ERROR_CHARS = 1000


_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # a bare group prints its help (click >= 8.2)


def _usage_line(err: click.UsageError) -> str:
    where = err.ctx.command_path if err.ctx is not None else "gradindex"
    return f"{where}: {err.format_message()} (see {where} --help)"


def _os_error_line(err: OSError) -> str:
    """``PATH: No space left on device`` and the like (the error's own text when it names no file)."""
    target = err.filename if err.filename is not None else ""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{target}: {reason}" if target else f"{type(err).__name__}: {reason}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log messages.")
@click.option("-v", "--verbose", is_flag=True, help="Debug log messages.")
@click.version_option(package_name="gradindex")
def main(quiet: bool, verbose: bool) -> None:
    """gradindex: which training examples made my model produce this?

    Per-example projected gradients → Parquet feature store → FAISS index →
    top-k attribution lookups. Start with `gradindex demo`.
    """
    faults.enable()  # a native crash names the command and stage (gradindex.faults)
    faults.set_stage(click.get_current_context().invoked_subcommand or "gradindex")
    if quiet:  # -q: no library warnings either (torch's, transformers')
        warnings.simplefilter("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("transformers", "torch", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("gradindex")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO))
