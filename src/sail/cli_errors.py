"""The CLI's one boundary for user errors: every failure a user can cause becomes one line.

Bad input raises :class:`SailError` deep inside a stage; the operating system, Arrow, safetensors
and the allocator raise their own exceptions for a read-only workspace, a full disk, a damaged
table or an absurd dictionary size. :class:`SailGroup` turns all of them into ``error: <path>:
<what happened>; <what to do>`` and exit code 2. ``sail --debug VERB`` shows the traceback.
"""

from __future__ import annotations

import errno
import os

import typer
from rich.markup import escape
from typer.core import TyperGroup

from sail.console import console
from sail.errors import SailError

EXIT_USER_ERROR = 2
_ALLOCATION_WORDS = (
    "can't allocate memory",
    "cannot allocate memory",
    "out of memory",
    "not enough memory",
)


def _os_message(exc: OSError) -> str:
    path = exc.filename if exc.filename is not None else "(unknown path)"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied; make it writable/readable or choose another --workspace"
    if exc.errno == errno.EROFS:
        return f"{path}: read-only file system; give a writable --workspace"
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        return f"{path}: no space left on the device; free some space or use another --workspace"
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return (
            f"{path}: a file is in the way where a folder is needed; "
            "move it or choose another --workspace"
        )
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a folder where a file is expected"
    if isinstance(exc, FileNotFoundError):
        return f"{path}: not found"
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{path}: {reason}"


def _is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _ALLOCATION_WORDS)


def user_message(exc: BaseException) -> str | None:
    """One line for an error the user can fix, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, SailError):
        return str(exc)
    if isinstance(exc, OSError) and (exc.filename is not None or exc.errno is not None):
        return _os_message(exc)
    if _is_allocation_failure(exc):
        return (
            f"out of memory ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else 'allocation failed'}); "
            "use smaller dictionary sizes, a smaller --batch-size, or a machine with more memory"
        )
    try:
        import pyarrow as pa

        if isinstance(exc, pa.ArrowException):
            return (
                f"a Parquet/Arrow table cannot be read ({exc}); it is damaged or not a table: "
                "rerun the stage that wrote it with --force"
            )
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        pass
    if type(exc).__name__ == "SafetensorError":
        return f"an SAE checkpoint cannot be read ({exc}); retrain it with `sail train --force`"
    return None


def one_line(text: str) -> str:
    return " ".join(text.split())


class SailGroup(TyperGroup):
    """Typer's group with the user-error boundary around every command (and sub-group)."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # the boundary: classify, then print or re-raise
            message = user_message(exc)
            if message is None or ctx.params.get("debug") or os.environ.get("SAIL_DEBUG"):
                raise
            console.print(
                f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=EXIT_USER_ERROR) from None
