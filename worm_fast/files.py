"""Writing result files so that nothing already written is ever half-overwritten."""

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(file)`` on a temporary file renamed into place.

    A reader (or a crash mid-write) never sees half a file, and the old file is replaced
    only by a complete new one. The temporary name is unique to this call, so concurrent
    writers never collide on it (mode ``x``: the umask applies, as for ``open``).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with temporary.open("xb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode()))
