"""Atomic outputs (fileio.py): a file is written beside its path and renamed into place, so a reader sees
the old file or the new one, never half of one; a failed write leaves the old file and no temporary one, and
one that found no room (a full disk, a quota, a file-size limit) is one line naming the folder."""

from __future__ import annotations

import errno
import json
import subprocess

import pytest

from wflw_pipeline.fileio import NoRoomError, atomic_path, atomic_paths, write_json, write_text


def test_write_text_creates_the_folders_and_leaves_only_the_file_readable_by_all(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    write_text(path, "one\ntwo\n")
    assert path.read_text() == "one\ntwo\n"
    assert [p.name for p in path.parent.iterdir()] == ["out.txt"]
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600: DVC and other users read outputs


def test_write_json_is_indented_by_two_with_a_final_newline(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"nme": 4.5, "subsets": [1, 2], "run_id": None})
    assert path.read_text() == (
        '{\n  "nme": 4.5,\n  "subsets": [\n    1,\n    2\n  ],\n  "run_id": null\n}\n'
    )


def test_the_temporary_file_is_a_hidden_sibling_with_the_same_suffix(tmp_path):
    path = tmp_path / "per_face.parquet"
    with atomic_path(path) as temp:
        assert temp.parent == tmp_path and temp.is_file()
        assert temp.name.startswith(".per_face.parquet.") and temp.name.endswith(".tmp.parquet")
        assert not path.exists()  # nothing at the path until the block succeeds
        temp.write_bytes(b"PAR1")
    assert path.read_bytes() == b"PAR1"
    assert [p.name for p in tmp_path.iterdir()] == ["per_face.parquet"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "out.txt"
    write_text(path, "old")
    with pytest.raises(TypeError):
        write_text(path, 123)  # the write raises inside the block
    assert path.read_text() == "old"
    with pytest.raises(RuntimeError), atomic_path(path) as temp:
        temp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_write_json_of_what_json_cannot_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"nme": 1.0})
    with pytest.raises(TypeError):
        write_json(path, {"nme": object()})
    assert json.loads(path.read_text()) == {"nme": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_several_outputs_are_all_replaced_or_none(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_text(a, "old a")
    write_text(b, "old b")
    with pytest.raises(RuntimeError), atomic_paths([a, b]) as temps:
        temps[a].write_text("new a")
        temps[b].write_text("new b")
        raise RuntimeError("the second output failed its check")
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    with atomic_paths([str(a), b]) as temps:  # keyed by Path, whatever the caller passed
        assert list(temps) == [a, b]
        temps[a].write_text("new a")
        temps[b].write_text("new b")
    assert (a.read_text(), b.read_text()) == ("new a", "new b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_temporaries_left_by_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """A writer killed mid-write (kill -9 during a checkpoint save) leaves its temporary; the next write of
    the same file removes it. A temporary of a live process, or of another file, is left alone."""
    finished = subprocess.Popen(["true"])
    finished.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        path = tmp_path / "checkpoint.pt"
        stale = [
            tmp_path / f".checkpoint.pt.{finished.pid}.k2j4h1x0.tmp.pt",  # this version's name: pid inside
            tmp_path / ".checkpoint.pt.q8w_3zr1.tmp.pt",  # an older version's name: no pid
        ]
        kept = [
            tmp_path / f".checkpoint.pt.{alive.pid}.a1b2c3d4.tmp.pt",  # a writer still running
            tmp_path / f".history.csv.{finished.pid}.a1b2c3d4.tmp.csv",  # another file's
        ]
        for leftover in [*stale, *kept]:
            leftover.write_bytes(b"half a checkpoint")

        write_text(path, "new")

        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, *(p.name for p in kept)])
    finally:
        alive.kill()
        alive.wait()


def _disk_full() -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_like_failure() -> None:
    """What torch.save through a file object raises on a full disk: a RuntimeError during the OSError."""
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


@pytest.mark.parametrize("failure", [_disk_full, _torch_like_failure])
def test_a_write_that_finds_no_room_is_one_line_naming_the_folder_and_keeps_the_old_file(tmp_path, failure):
    path = tmp_path / "model.pt"
    path.write_text("old")
    with pytest.raises(NoRoomError) as raised, atomic_path(path) as temp:
        temp.write_text("half")
        failure()
    assert str(raised.value) == (
        f"cannot write to {tmp_path}/: No space left on device (errno 28); free some space there or write "
        "the outputs elsewhere (the files already there are unchanged)"
    )
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_no_room_in_one_of_several_outputs_is_reported_once_and_other_errors_pass_unchanged(tmp_path):
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    with pytest.raises(NoRoomError, match=r"^cannot write to ") as raised, atomic_paths(paths):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert isinstance(raised.value.__cause__, OSError)
    with pytest.raises(OSError, match="Permission denied"), atomic_path(tmp_path / "c.json"):
        raise OSError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []
