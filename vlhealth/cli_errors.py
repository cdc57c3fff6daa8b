"""One line per wrong input, for both command lines (``vlhealth`` and ``healthgpt``).

Every command runs inside :class:`ErrorGroup` (:class:`ErrorCommand` for an app of one command): an error
of the project's own types (the ``ValueError`` / ``OSError`` family the code raises for bad input, every
exception class defined in ``vlhealth``, ``healthgpt`` or ``builders``, and the usual "not that kind of
file" errors of the readers it uses) is printed as one line ``error: <what>, <why>, <what to do>`` on
stderr and the command exits 2. Paths are
shown as the user typed them (the working folder is never prefixed). ``--debug`` (anywhere on the
command line) or ``HEALTHGPT_DEBUG=1`` shows the traceback instead.

Public API::

    ErrorGroup                    typer.Typer(cls=ErrorGroup)
    ErrorCommand                  app.command(cls=ErrorCommand), for an app of one command
    error_line(err) -> str        the one line printed for ``err``
    print_error(err_or_text)      print that line (for commands that catch an error themselves)
    is_user_error(err) -> bool
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["DEBUG_ENV", "ErrorCommand", "ErrorGroup", "error_line", "is_user_error", "print_error", "shown_path"]

DEBUG_ENV = "HEALTHGPT_DEBUG"
_PROJECT_MODULES = ("vlhealth", "healthgpt", "builders")
# errors of the readers behind the commands that mean "this file is not of the expected kind"
_FORMAT_ERRORS = ("SafetensorError", "UnpicklingError", "BadZipFile", "YAMLError", "JSONDecodeError",
                  "UnidentifiedImageError", "DecompressionBombError", "ParserError", "ScannerError")
_OS_HINTS = {
    FileNotFoundError: "no such file or folder; check the path",
    NotADirectoryError: "not a folder; give the folder, not a file in it",
    IsADirectoryError: "is a folder; give a file",
    PermissionError: "permission denied; check the file's permissions",
}


def shown_path(path: str | os.PathLike[str]) -> str:
    """A path for a message: as typed when relative; an absolute one relative to the working folder when it
    lies below it, else its name only (no machine's absolute paths in messages or records)."""
    raw = os.fspath(path)
    if not os.path.isabs(raw):
        return raw
    try:
        return Path(raw).relative_to(Path.cwd()).as_posix()
    except ValueError:
        return Path(raw).name or raw


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_user_error(err: BaseException) -> bool:
    """True for the errors a wrong input causes (see the module docstring), not for Click's own exits."""
    if type(err).__module__.split(".")[0] in ("typer", "click"):  # usage errors and exits: Click's own output
        return False
    if not isinstance(err, Exception):
        return False
    if type(err).__module__.split(".")[0] in _PROJECT_MODULES:
        return True
    if isinstance(err, ValueError | OSError | tarfile.TarError):
        return True
    return any(c.__name__ in _FORMAT_ERRORS for c in type(err).__mro__)


def _as_typed(text: str) -> str:
    """No absolute prefix of the working folder: a path reads as the user typed it (relative)."""
    cwd = str(Path.cwd())
    return text.replace(cwd + os.sep, "").replace(cwd, ".")


def error_line(err: BaseException | str) -> str:
    """``error: <what>, <why>, <what to do>`` on one line."""
    if isinstance(err, str):
        text = err
    elif isinstance(err, OSError) and getattr(err, "filename", None) and type(err) in _OS_HINTS:
        text = f"{shown_path(err.filename)}: {_OS_HINTS[type(err)]}"
    elif isinstance(err, OSError) and getattr(err, "filename", None) and err.strerror:
        text = f"{shown_path(err.filename)}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
        if isinstance(err, KeyError):
            text = f"missing key {text}"
        if type(err).__module__.split(".")[0] not in _PROJECT_MODULES and not isinstance(err, OSError):
            text = f"{text} ({type(err).__name__}; --debug shows where)"
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<object>", text)  # never a memory address
    text = " ".join(part.strip() for part in _as_typed(text).splitlines() if part.strip())
    # an absolute path outside the working folder keeps its name only (no machine's paths on screen or in logs)
    text = re.sub(r"(?<![\w.:/~])/(?:[^\s/:;,'\"()<>]+/)+([^\s/:;,'\"()<>]+)", r"\1", text)
    return text if text.startswith("error: ") else f"error: {text}"


def print_error(err: BaseException | str) -> None:
    """Print the one line for ``err`` on stderr (plain text: never wrapped, no markup)."""
    typer.echo(error_line(err), err=True)


def _is_usage_error(err: BaseException) -> bool:
    """Click's usage errors (a bad option value, a missing option), but not ``no_args_is_help``'s help."""
    names = {c.__name__ for c in type(err).__mro__}
    return "UsageError" in names and "NoArgsIsHelpError" not in names and hasattr(err, "format_message")


def _sub_path(ctx: Any) -> str:
    sub = getattr(ctx, "invoked_subcommand", None) or ""
    return f"{sub} " if sub else ""


class _OneLineErrors:
    """What both classes below share: ``--debug`` is taken off the command line, and a wrong input raised
    while the command runs (or, for a single command, while its options are parsed) becomes one line and
    exit 2."""

    debug = False

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        end = argv.index("--") if "--" in argv else len(argv)
        self.debug = debug_enabled() or "--debug" in argv[:end]
        argv = [a for i, a in enumerate(argv) if not (i < end and a == "--debug")]
        if prog_name is None and args is None:
            prog_name = Path(sys.argv[0]).name
        return super().main(args=argv, prog_name=prog_name, complete_var=complete_var,  # type: ignore[misc]
                            standalone_mode=standalone_mode, **extra)

    def _in_one_line(self, ctx: Any, err: Exception) -> bool:
        """Print the one line for ``err`` and return True, or return False to let it propagate."""
        if _is_usage_error(err) and not self.debug:
            ctx = ctx if ctx is not None else getattr(err, "ctx", None)
            hint = f"; see `{ctx.command_path} {_sub_path(ctx)}--help`".replace("  ", " ") if ctx is not None else ""
            print_error(f"{err.format_message()}{hint}")  # type: ignore[attr-defined]
            return True
        if self.debug or not is_user_error(err):
            return False
        print_error(err)
        return True

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except Exception as err:
            if not self._in_one_line(ctx, err):
                raise
            raise typer.Exit(2) from None


class ErrorGroup(_OneLineErrors, TyperGroup):
    """The command group both apps use: one line and exit 2 for a wrong input, the traceback with --debug."""


class ErrorCommand(_OneLineErrors, TyperCommand):
    """The same for an app of one command (``python -m healthgpt.training``): ``app.command(cls=ErrorCommand)``.
    A single command parses its options before it is invoked, so a bad option value is caught here too."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except Exception as err:
            if not self._in_one_line(None, err):
                raise
            raise typer.Exit(2) from None
