"""processing.atomic_files: a failed write leaves the previous file whole and no temporary file behind."""

import json

import pytest

from processing.atomic_files import append_durably, fsync_path, write_atomically, write_json_atomically


def test_write_json_replaces_the_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    write_json_atomically(path, {"a": [1, 2]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ]\n}\n'
    write_json_atomically(path, [1], indent=None)
    assert json.loads(path.read_text()) == [1] and path.read_text() == "[1]\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomically(path, {"finished": 3})

    def half_then_fail(stream):
        stream.write(b'{"finish')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, half_then_fail)
    with pytest.raises(TypeError):  # not JSON-serialisable: raised before the file is touched
        write_json_atomically(path, {"finished": object()})
    assert json.loads(path.read_text()) == {"finished": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_append_durably_and_fsync_path(tmp_path):
    path = tmp_path / "journal.jsonl"
    append_durably(path, "one\n")
    append_durably(path, "two\n")
    assert path.read_text() == "one\ntwo\n"
    fsync_path(path)
    fsync_path(tmp_path)  # a folder's entries too
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "missing")
