"""Files next to the database (mail originals, attachments, media) written so that they are on
disk before the transaction that names them commits.

The database commits with ``synchronous=FULL``; a file it refers to must be at least as durable,
or a crash right after the provider's 2xx leaves a row pointing at an empty or missing file
(a new file's data may reach the disk only seconds after its name does)."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from .channel import StorageUnavailable

# Errors that say the disk cannot take files now, whatever the file: full, over quota,
# read-only, failing.
_OUTAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably: a temporary file in the same folder,
    flushed to disk, renamed over the final name, then the folder flushed (and the folders this
    call created, up to one that existed). A file under the final name is always complete.

    Raises ``StorageUnavailable`` (with the ``OSError`` as its cause) when the disk is full,
    read-only or failing: like a database that refuses writes, not the content's fault."""
    try:
        _write_durably(path, data)
    except OSError as exc:
        if exc.errno in _OUTAGE_ERRNOS:
            raise StorageUnavailable(f"cannot write {path.name}: {exc.strerror or exc}") from exc
        raise


def _write_durably(path: Path, data: bytes) -> None:
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temporary, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    for folder in (path.parent, *(p.parent for p in created)):
        _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
