"""The CLI's error boundary classifies what a user can fix; all else stays a traceback (a bug)."""

from __future__ import annotations

import errno

import pyarrow as pa
import pytest

from sail.cli_errors import user_message
from sail.errors import SailError


@pytest.mark.parametrize(
    ("exc", "expect"),
    [
        (SailError("x.csv: column 'a' row 3: bad"), "x.csv: column 'a' row 3: bad"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/ws/data"),
            "/ws/data: permission denied",
        ),
        (OSError(errno.EROFS, "Read-only file system", "/ws"), "/ws: read-only file system"),
        (OSError(errno.ENOSPC, "No space left on device", "/ws/x.tmp"), "/ws/x.tmp: no space left"),
        (FileExistsError(errno.EEXIST, "File exists", "/ws"), "/ws: a file is in the way"),
        (
            NotADirectoryError(errno.ENOTDIR, "Not a directory", "/ws/data"),
            "/ws/data: a file is in the way",
        ),
        (MemoryError(), "out of memory"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 5 TB"),
            "out of memory",
        ),
        (pa.ArrowInvalid("Parquet magic bytes not found"), "Parquet/Arrow table cannot be read"),
    ],
)
def test_user_errors_become_one_line(exc, expect):
    message = user_message(exc)
    assert message is not None and expect in message and "\n" not in message


@pytest.mark.parametrize(
    "exc", [KeyError("x"), IndexError("list index out of range"), RuntimeError("shape mismatch")]
)
def test_bugs_keep_their_traceback(exc):
    assert user_message(exc) is None
