"""Writing result files so that nothing already written is ever half-overwritten, and
one results folder is written by one run at a time."""

import contextlib
import fcntl
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

LOCK_NAME = ".worm-fast.lock"
# Key of the top-level JSON object that lists the non-finite numbers written as null.
NON_FINITE_KEY = "non_finite_values"


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


def json_text(document: dict, **dumps_options) -> str:
    """``document`` as strict JSON: NaN and infinities (which ``json.dumps`` writes as the
    invalid literals ``NaN`` / ``Infinity``) become ``null``, and the top-level key
    ``non_finite_values`` maps the path of each to what it was, e.g.
    ``{"runs/0/rows/3/loss": "nan"}``."""
    replaced: dict[str, str] = {}

    def finite(value, path):
        if isinstance(value, float) and not math.isfinite(value):
            replaced["/".join(path)] = repr(value)
            return None
        if isinstance(value, dict):
            return {key: finite(item, (*path, str(key))) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [finite(item, (*path, str(i))) for i, item in enumerate(value)]
        return value

    clean = finite(document, ())
    if replaced:
        clean[NON_FINITE_KEY] = replaced
    return json.dumps(clean, allow_nan=False, **dumps_options)


class FolderInUseError(RuntimeError):
    """Another live process holds the results folder's lock."""


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold ``folder``'s lock (created with the folder) while the block runs; refuse at
    once, with :class:`FolderInUseError` naming the owner, if another process holds it.

    The lock is ``flock`` on ``<folder>/.worm-fast.lock``: the kernel releases it when
    its process exits, however it exits, so the lock of a crashed run never blocks the
    folder; the file stays, holding the last owner's description for the message.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_NAME).open("a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "another process"
            raise FolderInUseError(
                f"{folder} is being written by another run ({owner}); wait for it to "
                "finish or choose another output folder"
            ) from None
        file.truncate(0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {started}")
        file.flush()
        try:
            yield folder
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
