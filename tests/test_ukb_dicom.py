"""UK Biobank-style DICOM zips: writer (data_prep.synth.ukb_dicom) <-> reader (data_prep.ukb.dicom)."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from data_prep.ukb.dicom import (
    CorruptZipError,
    DicomHeaderError,
    DicomZipError,
    DicomZipWarning,
    GeometryError,
    SeriesError,
    read_ukb_dicom_zip,
)
from data_prep.synth.ukb_dicom import INLINE_VF_DESCRIPTION, CinePlane, ukb_zip_name, write_ukb_dicom_zip

X, Y, T = 24, 20, 50
Z = 4
EID = 1234567
SEED = 7
F = np.diag([-1.0, -1.0, 1.0])


def _rotation(rng: np.random.Generator, det: float) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.sign(np.linalg.det(q)) != det:
        q[:, 2] *= -1
    return q


def _affine(rot: np.ndarray, spacing: tuple[float, float, float], origin: np.ndarray) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def _shift(a: np.ndarray, k: int) -> np.ndarray:
    t = np.eye(4)
    t[2, 3] = k
    return a @ t


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("ukb")
    # Left-handed voxel->RAS (det < 0, like most DICOM-derived NIfTIs): b1 (k=0) lies at the *high* end of the
    # normal cross(row, col), so the reader must orient the stack by slice number, not by the normal.
    sa_affine = _affine(_rotation(rng, -1.0), (1.8, 1.8, 10.0), np.array([-20.3, 35.7, 12.1]))
    sa = rng.integers(0, 4096, size=(X, Y, Z, T), dtype=np.uint16)
    sa_planes = [
        CinePlane(f"CINE_segmented_SAX_b{k + 1}", sa[:, :, k, :], _shift(sa_affine, k), 8.0, 20.5, 10.0)
        for k in range(Z)
    ]
    la = {}
    la_planes = []
    for view in ("2Ch", "3Ch", "4Ch"):
        aff = _affine(_rotation(rng, 1.0), (1.8, 1.8, 6.0), rng.normal(0, 30, size=3))
        px = rng.integers(0, 4096, size=(X, Y, T), dtype=np.uint16)
        la[f"la_{view.lower()}"] = (px, aff)
        la_planes.append(CinePlane(f"CINE_segmented_LAX_{view}", px, aff, 6.0, 20.5))
    sa_zip = out / ukb_zip_name(EID, 20209)
    la_zip = out / ukb_zip_name(EID, 20208)
    patient = {"PatientSex": "F", "PatientAge": "063Y", "PatientWeight": "70.5", "PatientSize": "1.65"}
    write_ukb_dicom_zip(sa_zip, EID, 20209, sa_planes, seed=SEED, patient=patient, add_inline_vf=True)
    write_ukb_dicom_zip(la_zip, EID, 20208, la_planes, seed=SEED, patient=patient)
    return {
        "dir": out,
        "sa": sa,
        "sa_affine": sa_affine,
        "sa_planes": sa_planes,
        "la": la,
        "la_planes": la_planes,
        "sa_zip": sa_zip,
        "la_zip": la_zip,
        "patient": patient,
    }


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rezip(src: Path, dst: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


# ------------------------------------------------------------------------------------------------ writer


def test_zip_layout_and_dicom_headers(cohort: dict) -> None:
    members = _members(cohort["sa_zip"])
    assert "manifest.csv" in members
    dcms = [n for n in members if n.endswith(".dcm")]
    assert len(dcms) == Z * T + 3  # + the InlineVF frames
    assert all(n.startswith("1.3.12.2.1107.5.2.18.") for n in dcms)
    with zipfile.ZipFile(cohort["sa_zip"]) as zf:
        assert {i.date_time for i in zf.infolist()} == {(2020, 1, 1, 0, 0, 0)}
        order = [i.filename for i in zf.infolist() if i.filename.endswith(".dcm")]

    seen_t = set()
    descriptions = []
    for name in dcms:
        ds = pydicom.dcmread(io.BytesIO(members[name]))
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MR" and ds.Manufacturer == "SIEMENS" and ds.ManufacturerModelName == "AERA"
        assert float(ds.MagneticFieldStrength) == 1.5
        assert ds.PatientID == str(EID) and ds.PatientSex == "F" and ds.PatientAge == "063Y"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        descriptions.append(ds.SeriesDescription)
        if ds.SeriesDescription == INLINE_VF_DESCRIPTION:
            assert ds.ImageType[0] == "DERIVED"
            continue
        assert ds.ImageType[0] == "ORIGINAL"
        k = int(ds.SeriesDescription.rsplit("_b", 1)[1]) - 1
        t = int(ds.InstanceNumber) - 1
        seen_t.add((k, t))
        assert float(ds.TriggerTime) == pytest.approx(t * 20.5)
        assert int(ds.CardiacNumberOfImages) == T
        assert (ds.Rows, ds.Columns) == (Y, X)
        np.testing.assert_array_equal(ds.pixel_array, cohort["sa"][:, :, k, t].T)
        a = _shift(cohort["sa_affine"], k)
        np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), F @ a[:3, 3], atol=1e-6)
        iop = np.array(ds.ImageOrientationPatient, float)
        np.testing.assert_allclose(iop[:3], F @ a[:3, 0] / 1.8, atol=1e-9)
        np.testing.assert_allclose(iop[3:], F @ a[:3, 1] / 1.8, atol=1e-9)
        np.testing.assert_allclose(np.array(ds.PixelSpacing, float), [1.8, 1.8])
        assert float(ds.SliceThickness) == 8.0 and float(ds.SpacingBetweenSlices) == 10.0
        assert float(ds.WindowWidth) > 0
    assert seen_t == {(k, t) for k in range(Z) for t in range(T)}
    assert descriptions.count(INLINE_VF_DESCRIPTION) == 3
    # stored shuffled, not in series/frame order
    assert order != sorted(order)

    # long axis: pixels and 6 mm slices
    for name, data in _members(cohort["la_zip"]).items():
        if name == "manifest.csv":
            continue
        ds = pydicom.dcmread(io.BytesIO(data))
        view = "la_" + ds.SeriesDescription.rsplit("_", 1)[1].lower()
        px, _ = cohort["la"][view]
        np.testing.assert_array_equal(ds.pixel_array, px[:, :, int(ds.InstanceNumber) - 1].T)
        assert float(ds.SliceThickness) == 6.0


def test_manifest_matches_real_layout(cohort: dict) -> None:
    members = _members(cohort["sa_zip"])
    rows = list(csv.reader(io.StringIO(members["manifest.csv"].decode())))
    assert rows[0] == ["filename", "patientid", "studyid", "aet", "host", "date", "time", "series discription"]
    body = rows[1:]
    assert len(body) == len(members) - 1
    assert {r[0] for r in body} == set(members) - {"manifest.csv"}
    for r in body:
        ds = pydicom.dcmread(io.BytesIO(members[r[0]]), stop_before_pixels=True)
        assert r[1] == str(EID) and r[7] == ds.SeriesDescription and r[2] == ds.StudyInstanceUID


def test_same_inputs_give_byte_identical_zip(cohort: dict, tmp_path: Path) -> None:
    again = tmp_path / ukb_zip_name(EID, 20209)
    write_ukb_dicom_zip(again, EID, 20209, cohort["sa_planes"], seed=SEED, patient=cohort["patient"], add_inline_vf=True)
    assert again.read_bytes() == cohort["sa_zip"].read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind
    other = tmp_path / "other_seed.zip"
    write_ukb_dicom_zip(other, EID, 20209, cohort["sa_planes"], seed=SEED + 1, patient=cohort["patient"])
    assert other.read_bytes() != cohort["sa_zip"].read_bytes()


def test_sa_and_la_share_study(cohort: dict) -> None:
    def study(path: Path) -> set[str]:
        return {
            pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).StudyInstanceUID
            for n, d in _members(path).items()
            if n.endswith(".dcm")
        }

    assert study(cohort["sa_zip"]) == study(cohort["la_zip"]) and len(study(cohort["sa_zip"])) == 1


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    aff = np.diag([1.8, 1.8, 6.0, 1.0])
    ok = np.zeros((4, 4, 2), np.uint16)
    with pytest.raises(ValueError, match="0..4095"):
        write_ukb_dicom_zip(tmp_path / "a.zip", 1, 20208, [CinePlane("CINE_segmented_LAX_4Ch", ok + 5000, aff, 6, 20)], seed=0)
    sheared = aff.copy()
    sheared[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        write_ukb_dicom_zip(tmp_path / "a.zip", 1, 20208, [CinePlane("CINE_segmented_LAX_4Ch", ok, sheared, 6, 20)], seed=0)
    with pytest.raises(ValueError, match="field"):
        write_ukb_dicom_zip(tmp_path / "a.zip", 1, 20210, [CinePlane("CINE_segmented_LAX_4Ch", ok, aff, 6, 20)], seed=0)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ reader


def test_read_sa_round_trip(cohort: dict) -> None:
    vols = read_ukb_dicom_zip(cohort["sa_zip"])
    assert set(vols) == {"sa"}  # InlineVF skipped
    v = vols["sa"]
    assert v.pixels.dtype == np.int16 and v.pixels.shape == (X, Y, Z, T)
    np.testing.assert_array_equal(v.pixels, cohort["sa"].astype(np.int16))
    np.testing.assert_allclose(v.affine, cohort["sa_affine"], atol=1e-4)
    assert v.descriptions == tuple(f"CINE_segmented_SAX_b{k + 1}" for k in range(Z))
    assert v.frame_interval_ms == pytest.approx(20.5)
    assert v.trigger_times_ms.shape == (Z, T)
    assert v.slice_thickness_mm == 8.0


def test_read_la_round_trip(cohort: dict) -> None:
    vols = read_ukb_dicom_zip(cohort["la_zip"])
    assert set(vols) == {"la_2ch", "la_3ch", "la_4ch"}
    for key, (px, aff) in cohort["la"].items():
        v = vols[key]
        assert v.pixels.shape == (X, Y, 1, T)
        np.testing.assert_array_equal(v.pixels[:, :, 0, :], px.astype(np.int16))
        np.testing.assert_allclose(v.affine, aff, atol=1e-4)
        assert v.frame_interval_ms == pytest.approx(20.5)


def test_read_from_bytes(cohort: dict) -> None:
    vols = read_ukb_dicom_zip(cohort["la_zip"].read_bytes(), name="s3://bucket/x_20208_2_0.zip")
    assert set(vols) == {"la_2ch", "la_3ch", "la_4ch"}


def test_manifest_quirks_warn_but_read(cohort: dict, tmp_path: Path) -> None:
    members = _members(cohort["la_zip"])
    lines = members["manifest.csv"].decode().splitlines()
    # drop one row, add a row for a file that is not there, spell the header "properly"
    lines[0] = lines[0].replace("series discription", "series description")
    dropped = lines.pop(5).split(",")[0]
    # an unquoted comma inside the date field (seen in real manifests): the description is still the last field
    f = lines[3].split(",")
    lines[3] = ",".join(f[:5] + ["Aug 19", " 2015"] + f[6:])
    lines.append("9.9.9.dcm,1,2,3,4,5,6,CINE_segmented_LAX_9Ch")
    members["manifest.csv"] = ("\n".join(lines) + "\n").encode()
    bad = _rezip(cohort["la_zip"], tmp_path / "quirky_20208_2_0.zip", members)
    with pytest.warns(DicomZipWarning) as rec:
        vols = read_ukb_dicom_zip(bad)
    msgs = " ".join(str(w.message) for w in rec)
    assert "quirky_20208_2_0.zip" in msgs and "9.9.9.dcm" in msgs and dropped in msgs
    assert "differs" not in msgs
    assert set(vols) == {"la_2ch", "la_3ch", "la_4ch"}
    with pytest.raises(DicomZipError, match="quirky_20208_2_0.zip"):
        read_ukb_dicom_zip(bad, strict=True)

    del members["manifest.csv"]
    no_manifest = _rezip(cohort["la_zip"], tmp_path / "nomanifest_20208_2_0.zip", members)
    with pytest.warns(DicomZipWarning, match="no manifest"):
        assert set(read_ukb_dicom_zip(no_manifest)) == {"la_2ch", "la_3ch", "la_4ch"}


# ------------------------------------------------------------------------------------------------ errors


def test_error_not_a_zip_and_truncated(cohort: dict, tmp_path: Path) -> None:
    junk = tmp_path / "junk_20209_2_0.zip"
    junk.write_bytes(b"this is not a zip" * 10)
    with pytest.raises(CorruptZipError, match="junk_20209_2_0.zip"):
        read_ukb_dicom_zip(junk)
    data = cohort["sa_zip"].read_bytes()
    trunc = tmp_path / "trunc_20209_2_0.zip"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptZipError, match="trunc_20209_2_0.zip"):
        read_ukb_dicom_zip(trunc)
    with pytest.raises(CorruptZipError, match="missing_20209_2_0.zip"):
        read_ukb_dicom_zip(tmp_path / "missing_20209_2_0.zip")


def test_error_corrupt_member_data(cohort: dict, tmp_path: Path) -> None:
    data = bytearray(cohort["la_zip"].read_bytes())
    with zipfile.ZipFile(cohort["la_zip"]) as zf:
        info = zf.infolist()[3]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start + 10, start + 40):
        data[i] ^= 0xFF  # flip compressed bytes -> deflate error or CRC mismatch
    bad = tmp_path / "crc_20208_2_0.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptZipError) as e:
        read_ukb_dicom_zip(bad)
    assert "crc_20208_2_0.zip" in str(e.value) and info.filename in str(e.value)


def test_error_frame_removed(cohort: dict, tmp_path: Path) -> None:
    members = _members(cohort["sa_zip"])
    victim = next(
        n
        for n, d in members.items()
        if n.endswith(".dcm")
        and pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SeriesDescription == "CINE_segmented_SAX_b2"
    )
    del members[victim]
    bad = _rezip(cohort["sa_zip"], tmp_path / "gap_20209_2_0.zip", members)
    with pytest.warns(DicomZipWarning, match=victim), pytest.raises(SeriesError) as e:
        read_ukb_dicom_zip(bad)
    msg = str(e.value)
    assert "gap_20209_2_0.zip" in msg and "CINE_segmented_SAX_b2" in msg and "CardiacNumberOfImages" in msg
    assert victim in msg


@pytest.mark.parametrize("how", ["magic", "garbage"])
def test_error_corrupted_dicom_header(cohort: dict, tmp_path: Path, how: str) -> None:
    members = _members(cohort["sa_zip"])
    victim = sorted(n for n in members if n.endswith(".dcm"))[0]
    raw = bytearray(members[victim])
    if how == "magic":
        raw[128:132] = b"XXXX"
    else:
        raw[140:400] = b"\xff" * 260  # file meta group and start of the dataset
    members[victim] = bytes(raw)
    bad = _rezip(cohort["sa_zip"], tmp_path / f"hdr_{how}_20209_2_0.zip", members)
    with pytest.raises(DicomHeaderError) as e:
        read_ukb_dicom_zip(bad)
    assert f"hdr_{how}_20209_2_0.zip" in str(e.value) and victim in str(e.value)


def _rewrite(raw: bytes, edit) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(raw))
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_pixel_data_with_trailing_padding_reads_with_a_note(cohort: dict, tmp_path: Path) -> None:
    """Some writers pad PixelData beyond Rows x Columns (pydicom reads it): a note, the same pixels."""
    members = _members(cohort["la_zip"])
    victims = sorted(n for n in members if n.endswith(".dcm"))[:3]
    for n in victims:
        members[n] = _rewrite(members[n], lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\0" * 128))
    padded = _rezip(cohort["la_zip"], tmp_path / "pad_20208_2_0.zip", members)
    with pytest.warns(DicomZipWarning, match="128 bytes of trailing padding"):
        vols = read_ukb_dicom_zip(padded)
    for key, (px, _) in cohort["la"].items():
        np.testing.assert_array_equal(vols[key].pixels[:, :, 0, :], px.astype(np.int16))


def test_only_derived_frames_says_so(cohort: dict, tmp_path: Path) -> None:
    members = _members(cohort["la_zip"])
    for n in [n for n in members if n.endswith(".dcm")]:
        members[n] = _rewrite(members[n], lambda ds: setattr(ds, "ImageType", ["DERIVED", "PRIMARY", "M", "ND"]))
    bad = _rezip(cohort["la_zip"], tmp_path / "derived_20208_2_0.zip", members)
    with pytest.raises(DicomZipError, match=r"derived_20208_2_0.zip.*no cine series.*\d+ frame\(s\) skipped as "
                                            r"DERIVED"):
        read_ukb_dicom_zip(bad)


def test_error_no_dicom(tmp_path: Path) -> None:
    bad = tmp_path / "empty_20209_2_0.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("manifest.csv", "filename,patientid,studyid,aet,host,date,time,series discription\n")
    with pytest.raises(DicomZipError, match="empty_20209_2_0.zip.*no DICOM"):
        read_ukb_dicom_zip(bad)


def _sa_with(tmp_path: Path, name: str, affines: list[np.ndarray], shapes: list[tuple[int, int, int]] | None = None) -> Path:
    rng = np.random.default_rng(1)
    planes = []
    for k, a in enumerate(affines):
        shape = shapes[k] if shapes else (8, 6, 5)
        planes.append(CinePlane(f"CINE_segmented_SAX_b{k + 1}", rng.integers(0, 4096, shape, dtype=np.uint16), a, 8, 30))
    path = tmp_path / name
    write_ukb_dicom_zip(path, 1, 20209, planes, seed=0)
    return path


def test_error_sa_geometry(tmp_path: Path) -> None:
    base = _affine(np.eye(3), (1.5, 1.5, 10.0), np.zeros(3))
    even = [_shift(base, k) for k in range(4)]
    assert read_ukb_dicom_zip(_sa_with(tmp_path, "ok_20209_2_0.zip", even))["sa"].pixels.shape == (8, 6, 4, 5)

    uneven = [_shift(base, k) for k in (0, 1, 2, 3.6)]
    with pytest.raises(GeometryError, match="uneven_20209_2_0.zip.*unevenly spaced"):
        read_ukb_dicom_zip(_sa_with(tmp_path, "uneven_20209_2_0.zip", uneven))

    tilted = [a.copy() for a in even]
    c, s = np.cos(0.2), np.sin(0.2)
    tilted[2][:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ tilted[2][:3, :3]
    with pytest.raises(GeometryError, match="tilted_20209_2_0.zip.*not parallel"):
        read_ukb_dicom_zip(_sa_with(tmp_path, "tilted_20209_2_0.zip", tilted))

    with pytest.raises(SeriesError, match="size_20209_2_0.zip.*matrix sizes"):
        read_ukb_dicom_zip(_sa_with(tmp_path, "size_20209_2_0.zip", even, [(8, 6, 5)] * 3 + [(8, 7, 5)]))
    with pytest.raises(SeriesError, match="frames_20209_2_0.zip.*frame counts"):
        read_ukb_dicom_zip(_sa_with(tmp_path, "frames_20209_2_0.zip", even, [(8, 6, 5)] * 3 + [(8, 6, 6)]))


def test_error_missing_geometry_tag(cohort: dict, tmp_path: Path) -> None:
    members = _members(cohort["la_zip"])
    victim = sorted(n for n in members if n.endswith(".dcm"))[0]
    ds = pydicom.dcmread(io.BytesIO(members[victim]))
    del ds.ImagePositionPatient
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    members[victim] = buf.getvalue()
    bad = _rezip(cohort["la_zip"], tmp_path / "nogeo_20208_2_0.zip", members)
    with pytest.raises(GeometryError) as e:
        read_ukb_dicom_zip(bad)
    assert "nogeo_20208_2_0.zip" in str(e.value) and victim in str(e.value) and "ImagePositionPatient" in str(e.value)
