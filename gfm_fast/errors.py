"""The errors a user can fix: one base class, so every command line tool catches one type.

Each message names the problem and the fix; the CLIs print it as one line, without a traceback.
Leaf module (no imports from gfm_fast), so config, data, models and training can all use it.
Each subclass also derives from the builtin it used to be (``ValueError``, ``RuntimeError``), so
code that caught those keeps working.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple, Type

__all__ = ["GFMError", "ConfigError", "CheckpointError", "ManifestError", "BuildError", "TooManyFailures",
           "TrainingError", "ShardError", "os_error_message", "exit_status"]


class GFMError(Exception):
    """A problem with the user's input, files or settings; the message says how to fix it."""


class ConfigError(GFMError, ValueError):
    """A configuration value is unknown or invalid; the message names the key and the fix."""


class CheckpointError(GFMError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model; the message says which keys/file."""


class ManifestError(GFMError, ValueError):
    """A manifest is missing, unreadable or of an unknown format; the message says which file."""


class BuildError(GFMError, ValueError):
    """The shard build cannot start (bad source, mismatching output dir); the message says how to fix it."""


class TooManyFailures(GFMError, RuntimeError):
    """Too many consecutive unreadable shards or corrupt samples: the input itself is broken."""


class TrainingError(GFMError, RuntimeError):
    """Training cannot continue (bad checkpoint, too many non-finite losses, ...)."""


class ShardError(GFMError, FileNotFoundError):
    """The loader's shards do not exist or are not tar files; the message names the path."""


def os_error_message(exc: OSError) -> str:
    """One line for a file the OS refused (a CLI's output under a file, no permission, a full disk)."""
    if exc.filename is None:
        return str(exc)
    where = repr(str(exc.filename))
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return f"cannot create {where}: a file is in the way of a folder on that path"
    return f"cannot use {where}: {exc.strerror}"


def exit_status(work: Callable[[], Optional[int]],
                user_errors: Tuple[Type[BaseException], ...] = (GFMError, OSError)) -> int:
    """A command line tool's exit status: what ``work()`` returns (``None`` is 0), or 2 after one
    ``error:`` line on stderr, without a traceback, when it raises one of ``user_errors``: problems
    the user can fix, whose message says how (an ``OSError`` as :func:`os_error_message` words it)."""
    try:
        status = work()
    except user_errors as exc:
        message = os_error_message(exc) if isinstance(exc, OSError) and not isinstance(exc, GFMError) else str(exc)
        print("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
        return 2
    return 0 if status is None else status
