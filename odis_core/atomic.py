"""Atomic file writes: every checkpoint, store, feature file and report goes through here.

A file is written to a temporary sibling, flushed to disk and renamed over its final name,
so a reader (or a run killed mid-write) sees the old file or the new one, never half of
one. The pid in the temporary name keeps concurrent writers (two SAM shards finishing
together, several ranks) from sharing a temporary file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_write(
    path: Path | str, mode: str = "wb", encoding: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on a clean exit it replaces `path`,
    on an error it is removed and `path` is left as it was."""
    path = Path(path)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
