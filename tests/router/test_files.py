"""router.files: files that the database refers to are complete and on disk before it commits."""

from __future__ import annotations

import os

import pytest

from router import files
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


def test_a_failed_write_leaves_neither_a_file_nor_a_temporary(tmp_path, monkeypatch):
    def broken(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken)
    with pytest.raises(OSError):
        write_durably(tmp_path / "photo.jpg", b"\xff\xd8")
    assert list(tmp_path.iterdir()) == []
