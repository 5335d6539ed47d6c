"""router.files: files that the database refers to are complete and on disk before it commits."""

from __future__ import annotations

import errno
import os

import pytest

from router import files
from router.channel import StorageUnavailable
from router.files import write_durably


def _flushed(monkeypatch) -> list[str]:
    """What os.fsync was asked to flush, by path (the real fsync still runs)."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    return seen


def test_the_file_and_every_folder_made_for_it_are_flushed(tmp_path, monkeypatch):
    seen = _flushed(monkeypatch)
    target = tmp_path / "email" / "attachments" / "abc"
    write_durably(target, b"Baustellenfoto")
    assert target.read_bytes() == b"Baustellenfoto"
    # the data first (under its temporary name), then the folders, innermost first
    assert seen[0].startswith(str(target.parent / ".abc."))
    assert seen[1:] == [str(target.parent), str(tmp_path / "email"), str(tmp_path)]
    assert [p.name for p in target.parent.iterdir()] == ["abc"]  # no temporary file left


def test_a_second_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "mark.json"
    write_durably(target, b"old")
    write_durably(target, b"new and longer")
    assert target.read_bytes() == b"new and longer"
    assert [p.name for p in tmp_path.iterdir()] == ["mark.json"]


@pytest.mark.parametrize(
    "error, raised",
    [
        (OSError(errno.ENOSPC, "No space left on device"), StorageUnavailable),  # the disk's fault: retried later
        (OSError(errno.EROFS, "Read-only file system"), StorageUnavailable),
        (OSError(errno.EACCES, "Permission denied"), PermissionError),  # stays what it is
    ],
)
def test_a_failed_write_leaves_neither_a_file_nor_a_temporary(tmp_path, monkeypatch, error, raised):
    def broken(fd: int) -> None:
        raise OSError(error.errno, error.strerror)

    monkeypatch.setattr(files.os, "fsync", broken)
    with pytest.raises(raised) as caught:
        write_durably(tmp_path / "photo.jpg", b"\xff\xd8")
    if raised is StorageUnavailable:
        assert caught.value.__cause__.errno == error.errno and "photo.jpg" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
