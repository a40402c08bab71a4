"""`finetune predict`'s pieces that need no trained model: label maps back on the input's grid, and finding raw
subjects (the end-to-end runs on a real fine-tuning run are in tests/test_demo.py)."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.predict import find_subjects, seg_to_input


def test_labels_go_back_through_the_affines_to_the_input_grid():
    """A stored plane at 2 mm (origin half a pixel in) over a 1 mm input: each stored pixel covers a 2 x 2 block
    of input pixels, nothing outside the crop, nothing on another slice."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (3, 4, 4)).astype(np.uint8)  # (T, S, S)
    stored = np.diag([2.0, 2.0, 1.0, 1.0])
    stored[:3, 3] = [0.5, 0.5, 0.0]
    out = seg_to_input(labels, stored, np.eye(4), (10, 9), k=0)
    assert out.shape == (10, 9, 3)
    for t in range(3):
        np.testing.assert_array_equal(out[:8, :8, t], np.kron(labels[t], np.ones((2, 2), np.uint8)))
    assert not out[8:].any() and not out[:, 8:].any()
    assert not seg_to_input(labels, stored, np.eye(4), (10, 9), k=1).any()  # 1 mm off the stored plane
    # an input rotated by 90 degrees in plane: the same anatomy, transposed indices
    rot = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(seg_to_input(labels, stored, rot, (9, 10), k=0), out.transpose(1, 0, 2))


def test_find_subjects_in_both_layouts(tmp_path):
    for eid in ("1000002", "1000001"):
        (tmp_path / eid).mkdir()
        (tmp_path / eid / "sa.nii.gz").write_bytes(b"")
    for name in ("1000003_20209_2_0.zip", "1000003_20208_2_0.zip", "1000004_20209_2_0.zip"):  # 1000004: no LA zip
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes").mkdir()
    found = find_subjects(tmp_path)
    assert [k for k, _ in found] == ["1000001", "1000002", "1000003"]
    assert found[2][1] == (tmp_path / "1000003_20209_2_0.zip", tmp_path / "1000003_20208_2_0.zip")
    assert find_subjects(tmp_path / "1000001") == [("1000001", tmp_path / "1000001")]  # one subject folder
    with pytest.raises(FileNotFoundError, match="no subjects"):
        find_subjects(tmp_path / "notes")
