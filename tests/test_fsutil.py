import os
import zipfile

import pytest

from core.fsutil import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_bytes_and_text(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_text(tmp_path / "b.txt", "replaced")  # overwrite in place
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "replaced"
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "b.txt"]  # no temp files left


def test_atomic_write_failure_removes_temp(tmp_path):
    (tmp_path / "t.txt").write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "t.txt", "not bytes")  # type: ignore[arg-type]
    assert (tmp_path / "t.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]


def test_atomic_path_success_keeps_suffix(tmp_path):
    target = tmp_path / "sa.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name != target.name
        assert tmp.name.endswith(".nii.gz") and tmp.suffixes[-2:] == [".nii", ".gz"]
        tmp.write_bytes(b"data")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["sa.nii.gz"]


def test_atomic_path_with_zipfile(tmp_path):
    target = tmp_path / "x.zip"
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        zf.writestr("a.txt", "hi")
    with zipfile.ZipFile(target) as zf:
        assert zf.read("a.txt") == b"hi"


def test_atomic_path_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "out.h5"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-written")
            raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.h5"]


def test_atomic_path_directory(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert (target / "zarr.json").read_text() == "{}"
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "other.zarr") as tmp:
            tmp.mkdir()
            (tmp / "chunk").write_text("x")
            raise RuntimeError
    assert os.listdir(tmp_path) == ["store.zarr"]


def test_temp_names_unique(tmp_path):
    names = set()
    for _ in range(20):
        with atomic_path(tmp_path / "f.txt") as tmp:
            names.add(tmp.name)
            tmp.write_text("x")
    assert len(names) == 20
