"""The label vocabularies every package shares: planes, segmentation structures, phenotypes, diseases, k-space
modalities and views. Each tuple's order is the integer label stored on disk, so lists are append-only."""

from __future__ import annotations

SPLITS = ("train", "val", "test")

# --- UK Biobank cine -------------------------------------------------------------------------------------------
LA_VIEWS = ("la_2ch", "la_3ch", "la_4ch")
# one label space over all planes: the SA labels, then the LA labels remapped after them
LABELS = ("background", "LV", "MYO", "RV", "LA", "RA")
SOURCE_LABEL_MAPS = {  # ukbb_cardiac label -> unified label, per plane kind
    "sa": {1: 1, 2: 2, 3: 3},
    "la_2ch": {1: 4},
    "la_4ch": {1: 4, 2: 5},
}
# cine short-axis segmentation datasets as published -> unified label (ACDC: 1 RV, 2 MYO, 3 LV; M&Ms: 1 LV, 2 MYO,
# 3 RV): the two conventions disagree on LV and RV
SAX_LABEL_MAPS = {"acdc": {1: LABELS.index("RV"), 2: LABELS.index("MYO"), 3: LABELS.index("LV")},
                  "mnms": {1: LABELS.index("LV"), 2: LABELS.index("MYO"), 3: LABELS.index("RV")}}
SAX_STRUCTURES = ("LV", "MYO", "RV")
DISEASES = ("cad", "infarct", "hypertension", "high_blood_pressure", "diabetes", "stroke")
PHENOTYPES = ("LVEDV", "LVESV", "LVSV", "LVEF", "LVCO", "LVM", "RVEDV", "RVESV", "RVSV", "RVEF",
              "LAVmax", "LAVmin", "LASV", "LAEF", "RAVmax", "RAVmin", "RASV", "RAEF")


# --- k-space sequences: classification labels (index = the integer label stored; append only) ---------------------
MODALITIES: tuple[str, ...] = ("cine", "t1map", "t2map", "lge", "blackblood")
VIEWS: tuple[str, ...] = ("sax", "2ch", "3ch", "4ch", "lvot")


def plane_names(sa_planes: int) -> tuple[str, ...]:
    """Plane order of the image stack: SA slices base to apex, then the long-axis views."""
    return tuple(f"sa_{i}" for i in range(sa_planes)) + LA_VIEWS
