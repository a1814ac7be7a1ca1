"""The one error type user mistakes raise, and the one boundary every command line runs inside.

A ``UserError`` (bad data, checkpoint, flag) and the OS errors a user can fix (a full disk, a
read-only folder) end a command as one ``error: ...`` line and exit code 2; anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import logging
import sys
from typing import Callable

__all__ = ["UserError", "DataError", "ModelConfigError", "USER_FACING_ERRNOS", "is_user_facing", "one_line", "cli_main", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# OS errors the user fixes (space, permissions, a path that is not there), not the code.
USER_FACING_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                                errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST})


class UserError(Exception):
    """A mistake of the user's (data, checkpoint, flag), phrased as what to do about it."""


class DataError(UserError, ValueError):
    """A dataset folder or file that cannot be used, with what to do about it."""


class ModelConfigError(UserError, ValueError):
    """A backbone name, hyper-parameter or initialisation file (``--rain_kernel``) that cannot be used."""


def is_user_facing(exc: BaseException, also: tuple = ()) -> bool:
    """True for a ``UserError`` (or one of ``also``) and for an ``OSError`` whose errno the user can fix."""
    if isinstance(exc, (UserError, *also)):
        return True
    return isinstance(exc, OSError) and exc.errno in USER_FACING_ERRNOS


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, without the worker traceback a DataLoader wraps around it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    if isinstance(exc, OSError) and exc.strerror and not lines:
        return exc.strerror
    return " ".join(lines) or type(exc).__name__


def cli_main(work: Callable[[], int], interrupted: str = "stopped", also: tuple = ()) -> int:
    """Run a command's body: user-facing errors become one ``error:`` line and exit code 2.

    ``also``: further exception types a command treats as user mistakes (a tool that may not
    import this package at module level). ``KeyboardInterrupt`` prints ``interrupted`` and
    exits 130. Every other exception
    propagates with its traceback: it is a bug, and the traceback is what finds it.
    """
    try:
        return work()
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not is_user_facing(exc, also):
            raise
        logging.getLogger("coic").debug("user-facing error", exc_info=True)
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
