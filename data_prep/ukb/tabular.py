"""UK Biobank tabular CSV -> ViTa Stage II feature vectors (+ missingness mask) and disease labels.

A library (numpy + pandas + pyyaml; no ray, no torch) that the conversion job calls::

    spec = load_feature_spec("configs/data_prep/ukb_features.yaml")
    df, report = read_ukb_csv(csv_path, spec)                  # report -> manifest / quarantine
    raw = extract_features(df, spec)                           # (N, F) float64, NaN = missing
    stats = fit_stats(raw, spec, train_mask, df.index)         # training split only
    values, missing = encode(raw, spec, stats)                 # (N, F) float32, (N, F) bool
    labels, names = disease_table(df, spec)                    # (N, D) int8: 1 / 0 / -1 unknown
    schema = feature_schema(spec)                              # manifest + tabular encoder embeddings

The feature spec (``configs/data_prep/ukb_features.yaml``) is the user-editable source of truth; it was
generated once from ``ukb_fields.APPENDIX_D_FEATURES`` + the catalogue by ``default_feature_spec`` /
``feature_spec_yaml`` (``python -m data_prep.ukb.tabular PATH`` rewrites it). The YAML header documents every
key; the rules in short:

* A cell is *missing* when it is empty, not a finite number (reported by ``read_ukb_csv``) or one of the
  spec's ``missing_codes`` (UK Biobank's "do not know" / "prefer not to answer": -1, -3, -121, -818).
* ``reduce: value``: array 0 of the first instance (in the listed order) whose cell is valid after
  cleaning; ``mean``: mean of the valid arrays of the first instance that has any (blood pressure: the two
  automated readings); ``any_code`` (binary): 1 if any array of any listed field/instance holds one of
  ``match``, else 0 if any of those cells holds a valid answer (a code >= 0 or a real special answer such
  as -7 "none of the above"), else missing; ``count_codes`` (numerical): number of *distinct* ``match``
  codes over all listed instances/arrays (0 if none; distinct, because the baseline and imaging-visit
  answers repeat the same operations).
* numerical: ``special_values`` maps real-answer codes to numbers (-10 "less than one" -> 0.5); any other
  negative value of an unsigned field is missing (counted as invalid unless it is a missing code).
* categorical / binary (``value``): ``codes`` is the ordered list of valid codes; code ``codes[k]`` ->
  index ``k`` (contiguous 0..K-1, binary K = 2 with ``codes: [no, yes]``). Other values are missing
  (counted as invalid unless they are missing codes).

Normalisation (ViTa Sec. 4.1): numerical features are z-scored with the training split's mean / std
(population std over the present training values; a degenerate std < ``std_floor`` is replaced by 1, so
such a feature is only centred) and missing entries are imputed with the training mean, i.e. 0 after
z-scoring ("Missing entries are imputed with the mean feature value"); categorical / binary features
keep their integer index (stored as float32 in the same vector) and missing entries take the training
mode. The missingness mask is kept, so the tabular encoder can use a learned "missing" token instead.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from core.config import ConfigError, InputFileError, _UniqueKeyLoader, packaged_config
from core.format import normalise_tabular
from data_prep.ukb import fields as U

KINDS = ("numerical", "binary", "categorical")
REDUCES = ("value", "mean", "any_code", "count_codes")
SPEC_FORMAT_VERSION = 1
STATS_FORMAT = "cmrfm-tabular-stats"
STATS_SCHEMA_VERSION = 1
DEFAULT_SPEC_PATH = packaged_config("data_prep/ukb_features.yaml")  # the project's, from any directory
DEFAULT_SELF_REPORT_INSTANCES = (U.INSTANCE_BASELINE, U.INSTANCE_IMAGING)

# Catalogue fields that are integers without a coding but that ViTa treats as categorical.
_DAYS_PER_WEEK = tuple(range(8))
_UNCODED_CATEGORIES: Mapping[int, tuple[int, ...]] = {864: _DAYS_PER_WEEK, 884: _DAYS_PER_WEEK, 904: _DAYS_PER_WEEK}
LESS_THAN_ONE_VALUE = 0.5  # numerical value of -10 "less than one" (hours / tablespoons)


class FeatureSpecError(ConfigError):
    """Invalid feature spec; the message names the file and the feature."""


# ----------------------------------------------------------------------------------------------------
# Spec dataclasses
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """One tabular feature (one token of the tabular encoder).

    ``codes``: categorical / binary ``value`` features: the valid codes in index order.
    ``match``: ``any_code`` / ``count_codes``: the codes looked for.
    ``special_values``: numerical: (code, value) pairs for real-answer special codes, e.g. ((-10, 0.5),).
    ``signed``: numerical: negative values are genuine (no special-code handling).
    """

    name: str
    kind: str
    fields: tuple[int, ...]
    instances: tuple[int, ...]
    reduce: str = "value"
    codes: tuple[int, ...] = ()
    match: tuple[int, ...] = ()
    signed: bool = False
    special_values: tuple[tuple[int, float], ...] = ()
    unit: str = ""

    @property
    def num_categories(self) -> int:
        """K for categorical (len(codes)), 2 for binary, 0 for numerical."""
        if self.kind == "numerical":
            return 0
        return 2 if self.kind == "binary" else len(self.codes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "fields": list(self.fields),
                             "instances": list(self.instances), "reduce": self.reduce}
        if self.codes:
            d["codes"] = list(self.codes)
        if self.match:
            d["match"] = list(self.match)
        if self.signed:
            d["signed"] = True
        if self.special_values:
            d["special_values"] = {int(k): float(v) for k, v in self.special_values}
        if self.unit:
            d["unit"] = self.unit
        return d


@dataclass(frozen=True)
class DiseaseSpec:
    """One disease label. ``icd10`` names a code list of ``ukb_fields.ICD10_DISEASES`` (the single source
    of the Appendix F codes); ``self_report_*`` (high_blood_pressure only): field 6150 code 4 at these
    instances also makes the label positive (``ukb_fields.disease_labels``)."""

    name: str
    icd10: str
    self_report_field: int | None = None
    self_report_code: int | None = None
    self_report_instances: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "icd10": self.icd10}
        if self.self_report_field is not None:
            d["self_report"] = {"field": self.self_report_field, "code": self.self_report_code,
                                "instances": list(self.self_report_instances)}
        return d


@dataclass(frozen=True)
class TabularSpec:
    features: tuple[FeatureSpec, ...]
    missing_codes: tuple[int, ...] = tuple(sorted(U.MISSING_LIKE_CODES, reverse=True))
    diseases: tuple[DiseaseSpec, ...] = ()
    source: str = field(default="<memory>", compare=False)

    def __len__(self) -> int:
        return len(self.features)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def index(self, name: str) -> int:
        for i, f in enumerate(self.features):
            if f.name == name:
                return i
        raise KeyError(f"no feature {name!r} in {self.source}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": SPEC_FORMAT_VERSION, "missing_codes": list(self.missing_codes),
                "features": [f.to_dict() for f in self.features],
                "diseases": [d.to_dict() for d in self.diseases]}

    def feature_hash(self) -> str:
        """sha256 of the features + missing codes (what the statistics depend on; not the diseases)."""
        payload = {"missing_codes": list(self.missing_codes), "features": [f.to_dict() for f in self.features]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def field_instances(self) -> set[tuple[int, int]]:
        """(field, instance) pairs the features and disease labels read."""
        pairs = {(fid, inst) for f in self.features for fid in f.fields for inst in f.instances}
        for d in self.diseases:
            if d.self_report_field is not None:
                pairs |= {(d.self_report_field, i) for i in d.self_report_instances}
        return pairs


# ----------------------------------------------------------------------------------------------------
# Loading / validating the spec
# ----------------------------------------------------------------------------------------------------
_FEATURE_KEYS = ("name", "kind", "fields", "instances", "reduce", "codes", "match", "signed", "special_values",
                 "unit")
_TOP_KEYS = ("version", "missing_codes", "features", "diseases")


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _int_list(v: Any, what: str, err, *, min_value: int | None = None, allow_empty: bool = False) -> tuple[int, ...]:
    if _int(v) is not None:
        v = [v]
    if not isinstance(v, (list, tuple)) or any(_int(x) is None for x in v):
        err(f"{what} must be an integer or a list of integers, got {v!r}")
    if not v and not allow_empty:
        err(f"{what} is empty")
    if min_value is not None and any(x < min_value for x in v):
        err(f"{what} must be >= {min_value}, got {list(v)}")
    if len(set(v)) != len(v):
        err(f"{what} has duplicates: {list(v)}")
    return tuple(v)


def _parse_feature(entry: Any, i: int, source: str) -> FeatureSpec:
    label = f"feature #{i}"
    if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        label = f"feature #{i} {entry['name']!r}"

    def err(msg: str):
        raise FeatureSpecError(f"{source}: {label}: {msg}")

    if not isinstance(entry, Mapping):
        err(f"expected a mapping, got {entry!r}")
    unknown = [k for k in entry if k not in _FEATURE_KEYS]
    if unknown:
        err(f"unknown key(s) {unknown}; valid keys: {', '.join(_FEATURE_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        err(f"'name' must be a non-empty string, got {name!r}")
    kind = entry.get("kind")
    if kind not in KINDS:
        err(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if "fields" not in entry:
        err("missing 'fields'")
    fields = _int_list(entry["fields"], "'fields'", err, min_value=1)
    instances = _int_list(entry.get("instances", [U.INSTANCE_IMAGING]), "'instances'", err, min_value=0)
    reduce = entry.get("reduce", "value")
    if reduce not in REDUCES:
        err(f"unknown reduce {reduce!r} (expected one of {', '.join(REDUCES)})")
    codes = _int_list(entry.get("codes", []), "'codes'", err, allow_empty=True)
    match = _int_list(entry.get("match", []), "'match'", err, allow_empty=True)
    signed = entry.get("signed", False)
    if not isinstance(signed, bool):
        err(f"'signed' must be true/false, got {signed!r}")
    sv = entry.get("special_values", {}) or {}
    if not isinstance(sv, Mapping) or any(_int(k) is None for k in sv) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in sv.values()):
        err(f"'special_values' must map integer codes to finite numbers, got {sv!r}")
    special_values = tuple(sorted((int(k), float(v)) for k, v in sv.items()))
    unit = entry.get("unit", "")
    if not isinstance(unit, str):
        err(f"'unit' must be a string, got {unit!r}")

    if reduce in ("value", "mean") and len(fields) != 1:
        err(f"reduce {reduce!r} reads exactly one field, got fields {list(fields)}")
    if reduce in ("any_code", "count_codes") and not match:
        err(f"reduce {reduce!r} needs 'match' (the codes looked for)")
    if reduce in ("value", "mean") and match:
        err(f"'match' is only for any_code / count_codes, not reduce {reduce!r}")
    if kind == "numerical":
        if reduce == "any_code":
            err("a numerical feature cannot use reduce 'any_code' (that yields a binary flag)")
        if codes:
            err("'codes' is for categorical / binary features; numerical features use 'special_values'")
    else:
        if special_values or signed:
            err("'special_values' / 'signed' are for numerical features only")
        if kind == "categorical":
            if reduce != "value":
                err(f"a categorical feature needs reduce 'value', got {reduce!r}")
            if not codes:
                err("a categorical feature needs 'codes' (the ordered list of valid codes)")
        else:  # binary
            if reduce == "value":
                codes = codes or (0, 1)
                if len(codes) != 2:
                    err(f"a binary feature needs exactly 2 codes [no, yes], got {list(codes)}")
            elif reduce == "any_code":
                if codes:
                    err("a binary any_code feature takes 'match', not 'codes'")
            else:
                err(f"a binary feature needs reduce 'value' or 'any_code', got {reduce!r}")
    return FeatureSpec(name=name, kind=kind, fields=fields, instances=instances, reduce=reduce, codes=codes,
                       match=match, signed=signed, special_values=special_values, unit=unit)


# Which catalogue code list / rule each disease label uses (ukb_fields.disease_labels is the implementation).
_DISEASE_ICD10 = {"cad": "cad", "infarct": "infarct", "hypertension": "hypertension",
                  "high_blood_pressure": "hypertension", "diabetes": "diabetes", "stroke": "stroke"}


def _parse_disease(entry: Any, i: int, source: str) -> DiseaseSpec:
    label = f"disease #{i}"
    if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
        label = f"disease #{i} {entry['name']!r}"

    def err(msg: str):
        raise FeatureSpecError(f"{source}: {label}: {msg}")

    if not isinstance(entry, Mapping):
        err(f"expected a mapping, got {entry!r}")
    unknown = [k for k in entry if k not in ("name", "icd10", "self_report")]
    if unknown:
        err(f"unknown key(s) {unknown}; valid keys: name, icd10, self_report")
    name = entry.get("name")
    if name not in _DISEASE_ICD10:
        err(f"unknown disease {name!r} (supported: {', '.join(U.DISEASE_LABELS)}; "
            "the labels are computed by ukb_fields.disease_labels)")
    icd10 = entry.get("icd10")
    if icd10 != _DISEASE_ICD10[name]:
        err(f"'icd10' must name the catalogue code list {_DISEASE_ICD10[name]!r} "
            f"(ukb_fields.ICD10_DISEASES), got {icd10!r}")
    sr = entry.get("self_report")
    if name == "high_blood_pressure":
        if not isinstance(sr, Mapping) or set(sr) - {"field", "code", "instances"}:
            err("needs 'self_report: {field: 6150, code: 4, instances: [0, 2]}'")
        if sr.get("field") != U.SELF_REPORT_FIELD or sr.get("code") != U.SELF_REPORT_HIGH_BP:
            err(f"self_report must be field {U.SELF_REPORT_FIELD} code {U.SELF_REPORT_HIGH_BP}, got {dict(sr)}")
        inst = _int_list(sr.get("instances", list(DEFAULT_SELF_REPORT_INSTANCES)), "self_report 'instances'", err,
                         min_value=0)
        return DiseaseSpec(name, icd10, U.SELF_REPORT_FIELD, U.SELF_REPORT_HIGH_BP, inst)
    if sr is not None:
        err("'self_report' is only used by high_blood_pressure")
    return DiseaseSpec(name, icd10)


def spec_from_dict(data: Any, source: str = "<dict>") -> TabularSpec:
    """Validate a spec mapping (the YAML's content); errors name ``source`` and the feature."""
    if not isinstance(data, Mapping):
        raise FeatureSpecError(f"{source}: expected a mapping with 'features', got {type(data).__name__}")
    unknown = [k for k in data if k not in _TOP_KEYS]
    if unknown:
        raise FeatureSpecError(f"{source}: unknown top-level key(s) {unknown}; valid keys: {', '.join(_TOP_KEYS)}")
    version = data.get("version", SPEC_FORMAT_VERSION)
    if version != SPEC_FORMAT_VERSION:
        raise FeatureSpecError(f"{source}: unsupported spec version {version!r} (expected {SPEC_FORMAT_VERSION})")

    def top_err(msg: str):
        raise FeatureSpecError(f"{source}: {msg}")

    missing_codes = _int_list(data.get("missing_codes", sorted(U.MISSING_LIKE_CODES, reverse=True)),
                              "'missing_codes'", top_err, allow_empty=True)
    if any(c >= 0 for c in missing_codes):
        top_err(f"'missing_codes' must be negative special codes, got {list(missing_codes)}")
    entries = data.get("features")
    if not isinstance(entries, list) or not entries:
        top_err("'features' must be a non-empty list")
    features = tuple(_parse_feature(e, i, source) for i, e in enumerate(entries))
    seen: dict[str, int] = {}
    for i, f in enumerate(features):
        if f.name in seen:
            raise FeatureSpecError(f"{source}: feature #{i} {f.name!r}: duplicate name (also feature #{seen[f.name]})")
        seen[f.name] = i
        clash = set(f.codes) & set(missing_codes)
        if clash:
            raise FeatureSpecError(f"{source}: feature #{i} {f.name!r}: codes {sorted(clash)} are missing_codes")
    dentries = data.get("diseases", []) or []
    if not isinstance(dentries, list):
        top_err("'diseases' must be a list")
    diseases = tuple(_parse_disease(e, i, source) for i, e in enumerate(dentries))
    names = [d.name for d in diseases]
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise FeatureSpecError(f"{source}: disease {dup!r}: duplicate name")
    return TabularSpec(features=features, missing_codes=missing_codes, diseases=diseases, source=source)


def load_feature_spec(path: str | Path = DEFAULT_SPEC_PATH) -> TabularSpec:
    """Load and validate the YAML feature spec (FeatureSpecError naming the file and the feature)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)
    except OSError as e:
        raise FeatureSpecError(f"cannot read feature spec {path}: {e}") from e
    except yaml.YAMLError as e:
        raise FeatureSpecError(f"cannot parse feature spec {path}: {e}") from e
    return spec_from_dict(data, str(path))


# ----------------------------------------------------------------------------------------------------
# The default spec (ViTa Appendix D) and its YAML rendering
# ----------------------------------------------------------------------------------------------------
def _catalogue_field(fid: int, instances: Sequence[int]) -> U.UKBField:
    for inst in instances:
        if (fid, inst) in U.FIELD_BY_KEY:
            return U.FIELD_BY_KEY[(fid, inst)]
    raise KeyError(f"field {fid} not catalogued at instances {tuple(instances)}")


def _category_codes(fld: U.UKBField) -> tuple[int, ...]:
    """Valid codes of a categorical field: non-negative codes ascending, then the real-answer special codes
    (-2 unable to walk, -6 it varies, -7 none of the above, ...); missing-like codes are excluded."""
    if fld.coding is not None:
        keys = list(fld.coding)
    elif fld.field_id in _UNCODED_CATEGORIES:
        keys = list(_UNCODED_CATEGORIES[fld.field_id]) + list(fld.special)
    else:
        raise KeyError(f"categorical field {fld.field_id} has no coding in the catalogue")
    pos = sorted(k for k in keys if k >= 0)
    real_special = sorted((k for k in keys if k < 0 and k not in U.MISSING_LIKE_CODES), reverse=True)
    return tuple(pos + real_special)


def default_feature_spec() -> TabularSpec:
    """The ViTa Appendix D spec derived from ``ukb_fields.APPENDIX_D_FEATURES`` and the catalogue."""
    feats = []
    for name, src in U.APPENDIX_D_FEATURES.items():
        fld = _catalogue_field(src.fields[0], src.instances)
        kw: dict[str, Any] = dict(name=name, kind=src.kind, fields=tuple(src.fields), instances=tuple(src.instances),
                                  reduce=src.reduce)
        if src.reduce in ("any_code", "count_codes"):
            kw["match"] = tuple(src.codes)
        if src.kind == "numerical":
            kw["unit"] = fld.unit if src.reduce != "count_codes" else "count"
            kw["signed"] = fld.signed
            if -10 in fld.special:
                kw["special_values"] = ((-10, LESS_THAN_ONE_VALUE),)
        elif src.kind == "categorical":
            kw["codes"] = _category_codes(fld)
        elif src.reduce == "value":  # binary answer: index 0 = No / Female, 1 = Yes / Male
            if fld.coding is None or not {0, 1} <= set(fld.coding):
                raise KeyError(f"binary feature {name!r}: field {fld.field_id} has no 0/1 coding")
            kw["codes"] = (0, 1)
        feats.append(FeatureSpec(**kw))
    diseases = []
    for d in U.DISEASE_LABELS:
        if d == "high_blood_pressure":
            diseases.append(DiseaseSpec(d, _DISEASE_ICD10[d], U.SELF_REPORT_FIELD, U.SELF_REPORT_HIGH_BP,
                                        DEFAULT_SELF_REPORT_INSTANCES))
        else:
            diseases.append(DiseaseSpec(d, _DISEASE_ICD10[d]))
    return TabularSpec(features=tuple(feats), diseases=tuple(diseases), source="<default_feature_spec>")


_YAML_HEADER = """\
# UK Biobank tabular features for ViTa Stage II (paper Appendix D: 67 numerical, 18 binary, 32 categorical)
# and the disease labels (Appendix F). Read by data_prep.ukb.tabular.load_feature_spec; one feature = one token of
# the tabular encoder, in this order. This file is the user-editable source of truth: delete, reorder or add
# features freely (the statistics version changes with the spec). It was generated from
# data_prep/ukb/fields.py (APPENDIX_D_FEATURES + the field catalogue) by `python -m data_prep.ukb.tabular PATH`;
# tests/test_tabular.py pins this default, so keep custom variants in their own file.
#
# Keys of a feature:
#   name        unique display name
#   kind        numerical | binary | categorical (numerical -> linear embedding; binary / categorical ->
#               lookup embedding over the indices 0..K-1)
#   fields      UK Biobank field id(s); several only for any_code / count_codes (e.g. 6177 men / 6153 women)
#   instances   0 = baseline assessment, 2 = imaging visit (the cine CMR). value / mean use the FIRST listed
#               instance that has a valid value; any_code / count_codes look at all of them
#   reduce      value       array 0 of the field
#               mean        mean of the valid arrays (blood pressure / pulse: two automated readings)
#               any_code    binary: 1 if any array of any field/instance holds a code in `match`; else 0 if
#                           any holds a valid answer (>= 0 or a real special code such as -7 "none of the
#                           above"); else missing
#               count_codes numerical: number of distinct `match` codes over all instances/arrays (0 if none)
#   codes       categorical / binary `value`: the valid codes in index order (codes[k] -> index k);
#               binary is [no, yes]. Any other value (and every missing code) is missing
#   match       any_code / count_codes: the codes looked for
#   special_values  numerical: real-answer special codes -> value ({-10: 0.5}: -10 "less than one")
#   signed      numerical: negative values are genuine (PWA augmentation); otherwise a negative value that is
#               not in special_values is missing
#   unit        informative only
# missing_codes: codes that mean "no usable answer" everywhere (-1 / -121 do not know, -3 / -818 prefer not
#   to answer); empty cells and non-numeric junk are missing too.
#
# Normalisation (fit on the training split only, data_prep.ukb.tabular.fit_stats): numerical -> z-score, missing
# imputed with the training mean (0 after z-scoring); categorical / binary -> index, missing imputed with the
# training mode. The missingness mask is stored next to the values.
version: 1
missing_codes: [{missing}]
features:
"""

_DISEASE_HEADER = """\
# Disease labels, in this order (UKBSample.diseases; data_prep.ukb.tabular.disease_table). The ICD-10 code lists
# are NOT repeated here: `icd10` names a list of data_prep.ukb.fields.ICD10_DISEASES (Appendix F, pinned to the
# paper by tests/test_synth_tabular.py) matched exactly against every array of field 41270 (instance 0,
# "Diagnoses - ICD10", dots removed). high_blood_pressure = the hypertension ICD-10 list OR the touchscreen
# self-report "Vascular/heart problems diagnosed by doctor" (6150) containing 4 at any listed instance.
# Unknown (-1) rule: the ICD-10 labels are -1 for subjects without a single 41270 entry (no hospital record:
# "only subjects with valid diagnostic entries" are used for disease classification); high_blood_pressure is
# 1 on any positive evidence, else 0 if 6150 holds a valid answer (>= 0 or -7) at a listed instance, else -1.
# Entries may be removed or reordered; the supported names are those of ukb_fields.DISEASE_LABELS.
diseases:
"""


_BARE = re.compile(r"[a-z][a-z0-9_]*")
_YAML_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _flow(v: Any) -> str:
    if isinstance(v, str):
        return v if (_BARE.fullmatch(v) and v not in _YAML_RESERVED) else json.dumps(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_flow(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def feature_spec_yaml(spec: TabularSpec) -> str:
    """The spec as commented YAML (one flow mapping per feature, catalogue names / code labels as comments)."""
    lines = [_YAML_HEADER.replace("{missing}", ", ".join(str(c) for c in spec.missing_codes)).rstrip("\n")]
    kind_prev = None
    for f in spec.features:
        if f.kind != kind_prev:
            n = sum(g.kind == f.kind for g in spec.features)
            title = f"  # --- {f.kind} ({n}) "
            lines.append(title + "-" * (110 - len(title)))
            kind_prev = f.kind
        d = f.to_dict()
        lines.append("  - " + _flow(d))
        notes = []
        for fid in f.fields:
            try:
                fld = _catalogue_field(fid, f.instances)
            except KeyError:
                continue
            notes.append(f"{fid}: {fld.name}" + (" (UNSURE)" if fid in U.UNSURE_FIELD_IDS else ""))
        if f.codes:
            fld = next((_catalogue_field(fid, f.instances) for fid in f.fields
                        if any((fid, i) in U.FIELD_BY_KEY for i in f.instances)), None)
            if fld is not None and fld.coding is not None:
                notes.append("codes: " + "; ".join(f"{c} {fld.coding.get(c, '?')}" for c in f.codes))
        for note in notes:
            lines.append(f"    # {note}")
    lines.append("")
    lines.append(_DISEASE_HEADER.rstrip("\n"))
    for d in spec.diseases:
        lines.append("  - " + _flow(d.to_dict()))
    return "\n".join(lines) + "\n"


def write_default_spec(path: str | Path = DEFAULT_SPEC_PATH) -> Path:
    from core.fsutil import atomic_write_text

    path = Path(path)
    text = feature_spec_yaml(default_feature_spec())
    if spec_from_dict(yaml.safe_load(text), str(path)) != default_feature_spec():  # pragma: no cover
        raise RuntimeError("feature spec YAML does not round-trip")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


# ----------------------------------------------------------------------------------------------------
# Reading the export
# ----------------------------------------------------------------------------------------------------
@dataclass
class CsvReport:
    """What ``read_ukb_csv`` found wrong or ignored (for the manifest / quarantine).

    * ``duplicated_columns``: header -> number of copies (the first copy in file order is kept; a
      pandas-mangled ``X.1`` header written back to disk counts as a copy of ``X``).
    * ``conflicting_cells``: header -> number of rows where a later copy disagrees with the first
      (only columns with disagreements; only loaded columns are compared).
    * ``unknown_columns``: well-formed ``FIELD-INSTANCE.ARRAY`` columns that are neither catalogued nor
      used by the spec (not loaded). ``junk_columns``: malformed headers (``f.eid``, ...), not loaded.
    * ``duplicate_eids``: eids on more than one row: ALL their rows are dropped (errors, not merged).
    * ``bad_eid_lines``: 1-based file line numbers whose eid is not an integer (dropped).
    * ``withdrawn_eids``: negative eids (UK Biobank's withdrawn participants), dropped.
    * ``bad_cells``: column -> number of non-empty cells that are not finite numbers (set missing).
    """

    path: str
    n_rows: int = 0
    n_subjects: int = 0
    n_columns: int = 0
    duplicated_columns: dict[str, int] = field(default_factory=dict)
    conflicting_cells: dict[str, int] = field(default_factory=dict)
    unknown_columns: list[str] = field(default_factory=list)
    junk_columns: list[str] = field(default_factory=list)
    duplicate_eids: list[int] = field(default_factory=list)
    bad_eid_lines: list[int] = field(default_factory=list)
    withdrawn_eids: list[int] = field(default_factory=list)
    bad_cells: dict[str, int] = field(default_factory=dict)

    @property
    def n_conflicting_cells(self) -> int:
        return sum(self.conflicting_cells.values())

    @property
    def n_bad_cells(self) -> int:
        return sum(self.bad_cells.values())

    def errors(self) -> list[str]:
        """Row-level problems that removed subjects (for the quarantine list)."""
        out = [f"eid {e}: on more than one row of {self.path}; all its rows dropped" for e in self.duplicate_eids]
        out += [f"{self.path}:{ln}: eid is not an integer; row dropped" for ln in self.bad_eid_lines]
        return out

    def warnings(self) -> list[str]:
        out = []
        for c, k in self.conflicting_cells.items():
            out.append(f"column {c!r}: {self.duplicated_columns.get(c, 2)} copies disagree in {k} rows; "
                       "first copy kept")
        for c, k in self.bad_cells.items():
            out.append(f"column {c!r}: {k} non-numeric cells set missing")
        if self.withdrawn_eids:
            out.append(f"{len(self.withdrawn_eids)} withdrawn (negative) eids dropped")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "n_rows": self.n_rows, "n_subjects": self.n_subjects,
                "n_columns": self.n_columns, "duplicated_columns": dict(self.duplicated_columns),
                "conflicting_cells": dict(self.conflicting_cells), "n_conflicting_cells": self.n_conflicting_cells,
                "unknown_columns": list(self.unknown_columns), "junk_columns": list(self.junk_columns),
                "duplicate_eids": list(self.duplicate_eids), "bad_eid_lines": list(self.bad_eid_lines),
                "withdrawn_eids": list(self.withdrawn_eids), "bad_cells": dict(self.bad_cells),
                "n_bad_cells": self.n_bad_cells}


_MANGLED_RE = re.compile(r"(.+)\.([1-9][0-9]*)")
_EID_RE = re.compile(r"-?[0-9]{1,18}")  # fits int64


def _wanted_pairs(spec: TabularSpec | None) -> set[tuple[int, int]]:
    pairs = set(U.FIELD_BY_KEY)
    pairs |= {(U.SELF_REPORT_FIELD, i) for i in DEFAULT_SELF_REPORT_INSTANCES}
    if spec is not None:
        pairs |= spec.field_instances()
    return pairs


def _is_text_column(name: str) -> bool:
    fid, inst, _ = U.parse_column(name)
    f = U.FIELD_BY_KEY.get((fid, inst))
    return f is not None and f.dtype in ("str", "date")


def _to_numeric(s: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Stripped strings -> float64 (NaN for empty / junk) and the mask of junk (non-empty, not finite)."""
    s = s.fillna("").astype(str).str.strip()
    empty = (s == "").to_numpy()
    num = np.array(pd.to_numeric(s.where(~empty), errors="coerce"), dtype=np.float64)  # a writable copy
    bad = ~empty & ~np.isfinite(num)
    num[bad] = np.nan
    return num, bad


def _to_text(s: pd.Series) -> np.ndarray:
    s = s.fillna("").astype(str).str.strip()
    out = np.array(s, dtype=object)
    out[(s == "").to_numpy()] = None
    return out


def read_ukb_csv(path: str | Path, spec: TabularSpec | None = None, *,
                 conflict: Literal["first", "missing"] = "first",
                 chunksize: int = 50_000) -> tuple[pd.DataFrame, CsvReport]:
    """Read a UK Biobank (ukbconv) CSV into a frame indexed by ``eid`` (int64, sorted ascending).

    Loaded columns: every catalogued ``FIELD-INSTANCE.ARRAY`` column (any array index) plus the
    (field, instance) pairs the spec uses; numeric columns as float64 (NaN = missing), the text ones
    (41270 ICD-10 codes, dates) as strings (pandas' string dtype under pandas >= 3, object before;
    missing = NaN / None). Everything else is reported, not loaded.
    Duplicated headers: the first copy in file order is kept (``conflict="missing"`` instead blanks the
    cells where copies disagree); disagreements are counted per column. The header is read by the csv
    module, so pandas never renames duplicates; ``X.1``-style headers already in the file are recognised
    as copies of ``X``. Rows are read in chunks of ``chunksize`` (a real export has ~500k rows).
    """
    path = Path(path)
    if conflict not in ("first", "missing"):
        raise ValueError(f"conflict must be 'first' or 'missing', got {conflict!r}")
    report = CsvReport(path=str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), None)
    except OSError as e:
        raise InputFileError(f"{path}: cannot read the UK Biobank CSV ({e.strerror or e})") from e
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputFileError(f"{path}: not a UTF-8 text CSV ({type(e).__name__}: {e})") from e
    if not header:
        raise InputFileError(f"{path}: empty file (no header)")
    header = [h.strip() for h in header]
    report.n_columns = len(header)
    if "eid" not in header:
        raise InputFileError(f"{path}: no 'eid' column in the header (first columns: {header[:5]})")
    wanted = _wanted_pairs(spec)

    first: dict[str, int] = {}  # header -> position of its first copy
    copies: dict[str, list[int]] = {}  # header -> positions of the later copies
    keep: list[str] = []  # loaded data columns (first copies), in file order
    for j, name in enumerate(header):
        if name in first:
            copies.setdefault(name, []).append(j)
            continue
        if name == "eid":
            first[name] = j
            continue
        try:
            fid, inst, _ = U.parse_column(name)
        except ValueError:
            m = _MANGLED_RE.fullmatch(name)
            if m and m.group(1) in first:
                copies.setdefault(m.group(1), []).append(j)
            else:
                report.junk_columns.append(name)
            continue
        first[name] = j
        if (fid, inst) in wanted:
            keep.append(name)
        else:
            report.unknown_columns.append(name)
    report.duplicated_columns = {c: 1 + len(p) for c, p in copies.items()}
    loaded = {"eid", *keep}
    positions = sorted({first[c] for c in loaded} | {p for c in loaded for p in copies.get(c, [])})
    text_cols = {c for c in keep if _is_text_column(c)}

    parts: dict[str, list[np.ndarray]] = {c: [] for c in ["eid", *keep]}
    bad_counts: dict[str, int] = {}
    conflicts: dict[str, int] = {}
    n_rows = 0
    try:
        reader = pd.read_csv(path, header=None, skiprows=1, usecols=positions, dtype=str, keep_default_na=False,
                             na_filter=False, chunksize=max(1, int(chunksize)), encoding="utf-8",
                             skip_blank_lines=True)
        with reader:
            for chunk in reader:
                n_rows += len(chunk)
                for c in ["eid", *keep]:
                    col = chunk[first[c]]
                    if c == "eid" or c in text_cols:
                        val = _to_text(col)
                        others = [_to_text(chunk[p]) for p in copies.get(c, [])]
                        same = [(o == val) | (pd.isna(o) & pd.isna(val)) for o in others]
                    else:
                        val, bad = _to_numeric(col)
                        if bad.any():
                            bad_counts[c] = bad_counts.get(c, 0) + int(bad.sum())
                        others = [_to_numeric(chunk[p])[0] for p in copies.get(c, [])]
                        same = [(o == val) | (np.isnan(o) & np.isnan(val)) for o in others]
                    if same:
                        disagree = ~np.logical_and.reduce(same)
                        if disagree.any():
                            conflicts[c] = conflicts.get(c, 0) + int(disagree.sum())
                            if conflict == "missing" and c != "eid":
                                val = val.copy()
                                val[disagree] = None if val.dtype == object else np.nan
                    parts[c].append(val)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot parse the CSV: {e}") from e
    report.n_rows = n_rows
    report.bad_cells = {c: bad_counts[c] for c in keep if c in bad_counts}
    report.conflicting_cells = {c: conflicts[c] for c in ["eid", *keep] if c in conflicts}

    def cat(c: str) -> np.ndarray:
        if parts[c]:
            return np.concatenate(parts[c])
        return np.empty(0, dtype=object if (c == "eid" or c in text_cols) else np.float64)

    eid_text = cat("eid")
    eids = np.zeros(len(eid_text), dtype=np.int64)
    ok = np.zeros(len(eid_text), dtype=bool)
    for i, t in enumerate(eid_text):
        if t is not None and _EID_RE.fullmatch(t):
            eids[i], ok[i] = int(t), True
        else:
            report.bad_eid_lines.append(i + 2)  # 1-based, after the header line
    report.withdrawn_eids = sorted(int(e) for e in eids[ok & (eids < 0)])
    ok &= eids >= 0
    uniq, counts = np.unique(eids[ok], return_counts=True)
    dup = uniq[counts > 1]
    report.duplicate_eids = [int(e) for e in dup]
    ok &= ~np.isin(eids, dup)

    order = np.flatnonzero(ok)
    order = order[np.argsort(eids[order], kind="stable")]
    data = {c: cat(c)[order] for c in keep}
    df = pd.DataFrame(data, index=pd.Index(eids[order], name="eid", dtype=np.int64), columns=keep)
    report.n_subjects = len(df)
    return df, report


# ----------------------------------------------------------------------------------------------------
# Raw feature extraction
# ----------------------------------------------------------------------------------------------------
@dataclass
class ExtractReport:
    """``absent``: feature -> the ``FIELD-INSTANCE`` keys it reads that have no column in the frame;
    ``invalid``: feature -> number of cells with values that are neither valid nor a missing code
    (an uncoded category, a negative value in an unsigned field), treated as missing."""

    absent: dict[str, list[str]] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"absent": {k: list(v) for k, v in self.absent.items()}, "invalid": dict(self.invalid)}


def _column_map(columns: Iterable[str]) -> dict[tuple[int, int], list[tuple[int, str]]]:
    out: dict[tuple[int, int], list[tuple[int, str]]] = {}
    for c in columns:
        try:
            fid, inst, arr = U.parse_column(str(c))
        except ValueError:
            continue
        out.setdefault((fid, inst), []).append((arr, str(c)))
    for v in out.values():
        v.sort()
    return out


def _block(df: pd.DataFrame, cols: list[tuple[int, str]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, A) float64 values of the array columns (column a = array index a; NaN where no column)."""
    if not cols:
        return np.full((n, 0), np.nan), np.zeros(0, dtype=np.int64)
    arrays = np.array([a for a, _ in cols])
    vals = np.full((n, int(arrays.max()) + 1), np.nan)
    for a, c in cols:
        vals[:, a] = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
    return vals, arrays


def _clean_numerical(x: np.ndarray, f: FeatureSpec, missing: np.ndarray) -> tuple[np.ndarray, int]:
    out = x.copy()
    sv = dict(f.special_values)
    special = np.isin(x, list(sv)) if sv else np.zeros(x.shape, bool)
    for code, value in sv.items():
        out[x == code] = value
    if f.signed:
        return out, 0
    neg = (x < 0) & ~special
    invalid = int((neg & ~np.isin(x, missing)).sum())
    out[neg] = np.nan
    return out, invalid


def _clean_codes(x: np.ndarray, f: FeatureSpec, missing: np.ndarray) -> tuple[np.ndarray, int]:
    out = np.full(x.shape, np.nan)
    for k, code in enumerate(f.codes):
        out[x == code] = k
    invalid = int((np.isfinite(x) & np.isnan(out) & ~np.isin(x, missing)).sum())
    return out, invalid


def _first_valid(per_instance: list[np.ndarray], n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    for v in per_instance:
        take = np.isnan(out) & ~np.isnan(v)
        out[take] = v[take]
    return out


def extract_features_with_report(df: pd.DataFrame, spec: TabularSpec) -> tuple[np.ndarray, ExtractReport]:
    """``extract_features`` plus what was absent / invalid (see ``ExtractReport``)."""
    n = len(df)
    cmap = _column_map(df.columns)
    missing = np.asarray(spec.missing_codes, dtype=np.float64)
    real_special = np.asarray([c for c in U.SPECIAL_CODES if c not in spec.missing_codes], dtype=np.float64)
    raw = np.full((n, len(spec.features)), np.nan)
    report = ExtractReport()
    for j, f in enumerate(spec.features):
        absent = [f"{fid}-{inst}" for fid in f.fields for inst in f.instances if (fid, inst) not in cmap]
        # a field exists at only some instances in UK Biobank: report it absent only if it is absent at all
        present_fields = {fid for fid in f.fields for inst in f.instances if (fid, inst) in cmap}
        absent = [a for a in absent if int(a.split("-")[0]) not in present_fields]
        if absent:
            report.absent[f.name] = absent
        invalid = 0
        if f.reduce in ("value", "mean"):
            per_inst = []
            for inst in f.instances:
                vals, _ = _block(df, cmap.get((f.fields[0], inst), []), n)
                if f.reduce == "value":
                    vals = vals[:, :1] if vals.shape[1] else np.full((n, 1), np.nan)
                if f.kind == "numerical":
                    vals, bad = _clean_numerical(vals, f, missing)
                else:
                    vals, bad = _clean_codes(vals, f, missing)
                invalid += bad
                if f.reduce == "mean":
                    with np.errstate(invalid="ignore"):
                        cnt = (~np.isnan(vals)).sum(axis=1)
                        v = np.where(cnt > 0, np.nansum(vals, axis=1) / np.maximum(cnt, 1), np.nan)
                else:
                    v = vals[:, 0]
                per_inst.append(v)
            raw[:, j] = _first_valid(per_inst, n)
        else:
            match = np.asarray(f.match, dtype=np.float64)
            found = np.zeros((n, len(f.match)), dtype=bool)
            answered = np.zeros(n, dtype=bool)
            for fid in f.fields:
                for inst in f.instances:
                    vals, _ = _block(df, cmap.get((fid, inst), []), n)
                    if not vals.shape[1]:
                        continue
                    for k, code in enumerate(match):
                        found[:, k] |= (vals == code).any(axis=1)
                    # a valid answer: a code >= 0 or a real special answer (-7 none of the above, ...)
                    ok = np.isfinite(vals) & ~np.isin(vals, missing)
                    ok_answer = ok & ((vals >= 0) | np.isin(vals, real_special))
                    invalid += int((ok & ~ok_answer).sum())
                    answered |= ok_answer.any(axis=1)
            if f.reduce == "any_code":
                raw[:, j] = np.where(found.any(axis=1), 1.0, np.where(answered, 0.0, np.nan))
            else:  # count_codes
                raw[:, j] = found.sum(axis=1).astype(np.float64)
        if invalid:
            report.invalid[f.name] = invalid
    return raw, report


def extract_features(df: pd.DataFrame, spec: TabularSpec) -> np.ndarray:
    """(N, F) float64 raw features in spec order: numerical values in their units, categorical / binary
    features as contiguous indices 0..K-1 (as floats), NaN = missing. Rows follow ``df`` (``read_ukb_csv``)."""
    return extract_features_with_report(df, spec)[0]


# ----------------------------------------------------------------------------------------------------
# Statistics (training split only) and encoding
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TabularStats:
    """Per-feature normalisation statistics fitted on the training split.

    numerical: ``mean`` / ``std`` (population std of the present training values; a std below
    ``std_floor`` is stored as 1.0, i.e. the feature is only centred; no training value at all -> 0 / 1);
    categorical / binary: ``mode`` (index; ties -> the smaller index; 0 without training values) and
    ``category_counts``. ``version``: sha256 prefix of (the spec's feature hash, the sorted training eids,
    their raw values), so it changes whenever the statistics could.
    """

    version: str
    spec_hash: str
    n_train: int
    names: tuple[str, ...]
    kinds: tuple[str, ...]
    mean: tuple[float | None, ...]
    std: tuple[float | None, ...]
    mode: tuple[int | None, ...]
    n_present: tuple[int, ...]
    category_counts: tuple[tuple[int, ...], ...]
    std_floor: float = 1e-6

    def to_dict(self) -> dict[str, Any]:
        feats = []
        for i, name in enumerate(self.names):
            d: dict[str, Any] = {"name": name, "kind": self.kinds[i], "n_present": self.n_present[i]}
            if self.kinds[i] == "numerical":
                d["mean"], d["std"] = self.mean[i], self.std[i]
            else:
                d["mode"], d["category_counts"] = self.mode[i], list(self.category_counts[i])
            feats.append(d)
        return {"format": STATS_FORMAT, "schema": STATS_SCHEMA_VERSION, "version": self.version,
                "spec_hash": self.spec_hash, "n_train": self.n_train, "std_floor": self.std_floor, "features": feats}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TabularStats":
        if not isinstance(d, Mapping) or d.get("format") != STATS_FORMAT or d.get("schema") != STATS_SCHEMA_VERSION:
            raise ValueError(f"not a {STATS_FORMAT} v{STATS_SCHEMA_VERSION} mapping")
        feats = d["features"]
        kinds = tuple(f["kind"] for f in feats)
        if any(k not in KINDS for k in kinds):
            raise ValueError(f"bad feature kinds in statistics: {sorted(set(kinds) - set(KINDS))}")
        num = [k == "numerical" for k in kinds]
        return cls(
            version=str(d["version"]), spec_hash=str(d["spec_hash"]), n_train=int(d["n_train"]),
            names=tuple(str(f["name"]) for f in feats), kinds=kinds,
            mean=tuple(float(f["mean"]) if m else None for f, m in zip(feats, num)),
            std=tuple(float(f["std"]) if m else None for f, m in zip(feats, num)),
            mode=tuple(None if m else int(f["mode"]) for f, m in zip(feats, num)),
            n_present=tuple(int(f["n_present"]) for f in feats),
            category_counts=tuple(() if m else tuple(int(c) for c in f["category_counts"]) for f, m in zip(feats, num)),
            std_floor=float(d.get("std_floor", 1e-6)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TabularStats":
        return cls.from_dict(json.loads(text))


def _check_raw(raw: np.ndarray, spec: TabularSpec) -> np.ndarray:
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[1] != len(spec.features):
        raise ValueError(f"raw features must be (N, {len(spec.features)}) for {spec.source}, got {raw.shape}")
    if np.isinf(raw).any():
        raise ValueError("raw features contain infinite values (missing must be NaN)")
    for j, f in enumerate(spec.features):
        if f.kind != "numerical":
            col = raw[:, j]
            v = col[~np.isnan(col)]
            if v.size and (np.any(v != np.round(v)) or v.min() < 0 or v.max() >= f.num_categories):
                raise ValueError(f"feature {f.name!r}: categorical indices outside 0..{f.num_categories - 1}")
    return raw


def fit_stats(raw: np.ndarray, spec: TabularSpec, train_mask: np.ndarray, eids: Sequence[int],
              std_floor: float = 1e-6) -> TabularStats:
    """Fit normalisation statistics on the rows of ``raw`` where ``train_mask`` is True.

    ``eids`` (aligned with the rows, e.g. ``df.index``) identify the training subjects for the version hash.
    """
    raw = _check_raw(raw, spec)
    train_mask = np.asarray(train_mask, dtype=bool)
    eids = np.asarray(eids, dtype=np.int64)
    if train_mask.shape != (raw.shape[0],) or eids.shape != (raw.shape[0],):
        raise ValueError(f"train_mask {train_mask.shape} and eids {eids.shape} must be ({raw.shape[0]},)")
    tr = raw[train_mask]
    tr_eids = eids[train_mask]
    if len(np.unique(tr_eids)) != len(tr_eids):
        raise ValueError("duplicate eids among the training rows")
    means, stds, modes, present, counts = [], [], [], [], []
    for j, f in enumerate(spec.features):
        v = tr[:, j][~np.isnan(tr[:, j])]
        present.append(int(v.size))
        if f.kind == "numerical":
            m = float(v.mean()) if v.size else 0.0
            s = float(v.std()) if v.size else 1.0
            means.append(m)
            stds.append(s if s >= std_floor else 1.0)
            modes.append(None)
            counts.append(())
        else:
            c = np.bincount(v.astype(np.int64), minlength=f.num_categories)[: f.num_categories]
            means.append(None)
            stds.append(None)
            modes.append(int(np.argmax(c)) if v.size else 0)
            counts.append(tuple(int(x) for x in c))
    order = np.argsort(tr_eids, kind="stable")
    h = hashlib.sha256()
    h.update(json.dumps({"stats_schema": STATS_SCHEMA_VERSION, "spec": spec.feature_hash(),
                         "std_floor": std_floor}).encode())
    h.update(np.ascontiguousarray(tr_eids[order]).astype("<i8").tobytes())
    canon = np.where(np.isnan(tr[order]), np.nan, tr[order])  # one NaN bit pattern
    h.update(np.ascontiguousarray(canon).astype("<f8").tobytes())
    return TabularStats(version=h.hexdigest()[:16], spec_hash=spec.feature_hash(), n_train=int(train_mask.sum()),
                        names=spec.names, kinds=tuple(f.kind for f in spec.features), mean=tuple(means),
                        std=tuple(stds), mode=tuple(modes), n_present=tuple(present), category_counts=tuple(counts),
                        std_floor=std_floor)


def encode(raw: np.ndarray, spec: TabularSpec, stats: TabularStats) -> tuple[np.ndarray, np.ndarray]:
    """(values float32 (N, F), missing bool (N, F)): numerical z-scored with the training statistics and
    missing -> 0 (= the training mean); categorical / binary indices, missing -> the training mode."""
    raw = _check_raw(raw, spec)
    if stats.spec_hash != spec.feature_hash() or stats.names != spec.names:
        raise ValueError(f"statistics {stats.version} were fitted for another feature spec than {spec.source}")
    return normalise_tabular(raw, stats.to_dict())  # the one implementation, shared with the loaders


def feature_schema(spec: TabularSpec) -> list[dict[str, Any]]:
    """Per feature (in vector order): index, name, kind, fields, instances, reduce, num_categories
    (0 numerical, 2 binary, K categorical), codes (index -> UK Biobank code), match, unit."""
    out = []
    for j, f in enumerate(spec.features):
        out.append({"index": j, "name": f.name, "kind": f.kind, "fields": list(f.fields),
                    "instances": list(f.instances), "reduce": f.reduce, "num_categories": f.num_categories,
                    "codes": list(f.codes) if f.kind != "numerical" and f.reduce == "value" else [],
                    "match": list(f.match), "unit": f.unit})
    return out


# ----------------------------------------------------------------------------------------------------
# Disease labels
# ----------------------------------------------------------------------------------------------------
def disease_table(df: pd.DataFrame, spec: TabularSpec | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """(labels int8 (N, D), names): 1 / 0, or -1 where the subject has no valid diagnostic information.

    Labels come from ``ukb_fields.disease_labels`` with the union of every ``41270-*`` column (ICD-10
    codes) and the 6150 self-report answers of the spec's instances (default 0 and 2). Unknown (-1) rule:
    * cad / infarct / hypertension / diabetes / stroke: -1 iff the subject has no 41270 entry at all (no
      hospital record; the paper uses only subjects with valid diagnostic entries);
    * high_blood_pressure: 1 on any positive evidence (hypertension ICD-10 code or 6150 == 4); else 0 if
      6150 holds a valid answer (a code >= 0 or -7 "none of the above") at one of the instances; else -1.
    Names / order: the spec's ``diseases`` (default ``ukb_fields.DISEASE_LABELS``).
    """
    if spec is not None and spec.diseases:
        diseases = spec.diseases
        missing_codes = set(spec.missing_codes)
    else:
        diseases = default_feature_spec().diseases
        missing_codes = set(U.MISSING_LIKE_CODES)
    names = tuple(d.name for d in diseases)
    sr_inst = next((d.self_report_instances for d in diseases if d.self_report_field is not None),
                   DEFAULT_SELF_REPORT_INSTANCES)
    cmap = _column_map(df.columns)
    icd_cols = [c for (fid, _), cols in sorted(cmap.items()) if fid == U.ICD10_FIELD for _, c in cols]
    sr_cols = [c for inst in sr_inst for _, c in cmap.get((U.SELF_REPORT_FIELD, inst), [])]
    n = len(df)
    icd = df[icd_cols].to_numpy(dtype=object) if icd_cols else np.empty((n, 0), dtype=object)
    sr = (np.column_stack([pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) for c in sr_cols])
          if sr_cols else np.empty((n, 0)))
    real_special = [c for c in U.SPECIAL_CODES if c not in missing_codes]
    sr_valid = (np.isfinite(sr) & ((sr >= 0) | np.isin(sr, real_special))).any(axis=1)
    out = np.full((n, len(names)), -1, dtype=np.int8)
    for i in range(n):
        codes = [c for c in icd[i] if not pd.isna(c) and U.normalize_icd10(c) is not None]
        reported = [x for x in sr[i] if np.isfinite(x)]
        lab = U.disease_labels(codes, reported)
        for k, name in enumerate(names):
            if name == "high_blood_pressure":
                out[i, k] = 1 if lab[name] else (0 if sr_valid[i] else -1)
            elif codes:
                out[i, k] = int(lab[name])
    return out, names


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.ukb.tabular [PATH]``: (re)write the default Appendix D spec YAML."""
    args = sys.argv[1:] if argv is None else argv
    path = write_default_spec(args[0] if args else DEFAULT_SPEC_PATH)
    spec = load_feature_spec(path)
    kinds = {k: sum(f.kind == k for f in spec.features) for k in KINDS}
    print(f"wrote {path}: {len(spec)} features {kinds}, {len(spec.diseases)} diseases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
