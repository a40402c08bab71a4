"""The UK Biobank tabular feature spec: which fields make which Stage II feature, and the disease labels.

``configs/data_prep/ukb_features.yaml`` is the user-editable source of truth, read by the project's config
system (``core.config``: unknown keys, wrong types and bad values fail at start-up naming the file, the entry
and the feature), with each entry's own rules checked by its dataclass (``FeatureSpec.__post_init__``...).
It was generated once from ``fields.APPENDIX_D_FEATURES`` + the catalogue by ``default_feature_spec`` /
``feature_spec_yaml``; ``python -m data_prep.ukb.feature_spec PATH`` rewrites it. The YAML header documents
every key; the rules in short:

* A cell is *missing* when it is empty, not a finite number (reported by ``csv_export.read_ukb_csv``) or one
  of the spec's ``missing_codes`` (UK Biobank's "do not know" / "prefer not to answer": -1, -3, -121, -818).
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

The rest of the tabular pipeline: ``csv_export`` (reading the export), ``features`` (extraction, statistics,
encoding), ``diseases`` (labels).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from core.config import ConfigError, config_from_dict, load_config, packaged_config
from core.fsutil import atomic_write_text
from data_prep.ukb import fields as U

KINDS = ("numerical", "binary", "categorical")
REDUCES = ("value", "mean", "any_code", "count_codes")
SPEC_FORMAT_VERSION = 1
DEFAULT_SPEC_PATH = packaged_config("data_prep/ukb_features.yaml")  # the project's, from any directory
DEFAULT_SELF_REPORT_INSTANCES = (U.INSTANCE_BASELINE, U.INSTANCE_IMAGING)
DEFAULT_MISSING_CODES = tuple(sorted(U.MISSING_LIKE_CODES, reverse=True))

# Catalogue fields that are integers without a coding but that ViTa treats as categorical.
_DAYS_PER_WEEK = tuple(range(8))
_UNCODED_CATEGORIES: Mapping[int, tuple[int, ...]] = {864: _DAYS_PER_WEEK, 884: _DAYS_PER_WEEK, 904: _DAYS_PER_WEEK}
LESS_THAN_ONE_VALUE = 0.5  # numerical value of -10 "less than one" (hours / tablespoons)

# Which catalogue code list / rule each disease label uses (fields.disease_labels is the implementation).
_DISEASE_ICD10 = {"cad": "cad", "infarct": "infarct", "hypertension": "hypertension",
                  "high_blood_pressure": "hypertension", "diabetes": "diabetes", "stroke": "stroke"}


class FeatureSpecError(ConfigError):
    """Invalid feature spec; the message names the file and the feature."""


def _ids(value: int | tuple[int, ...], what: str, *, min_value: int | None = None,
         allow_empty: bool = True) -> tuple[int, ...]:
    """A field id list as written (one integer or a list), checked: non-empty if required, >= min_value, no
    duplicates."""
    ids = (value,) if isinstance(value, int) else tuple(value)
    if not ids and not allow_empty:
        raise ValueError(f"{what} is empty")
    if min_value is not None and any(x < min_value for x in ids):
        raise ValueError(f"{what} must be >= {min_value}, got {list(ids)}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} has duplicates: {list(ids)}")
    return ids


# ----------------------------------------------------------------------------------------------------
# The spec: dataclasses read by the config system, each checking its own rules
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """One tabular feature (one token of the tabular encoder).

    ``codes``: categorical / binary ``value`` features: the valid codes in index order.
    ``match``: ``any_code`` / ``count_codes``: the codes looked for.
    ``special_values``: numerical: {code: value} for real-answer special codes, e.g. {-10: 0.5}.
    ``signed``: numerical: negative values are genuine (no special-code handling).
    """

    name: str
    kind: Literal["numerical", "binary", "categorical"]
    fields: int | tuple[int, ...]
    instances: int | tuple[int, ...] = (U.INSTANCE_IMAGING,)
    reduce: Literal["value", "mean", "any_code", "count_codes"] = "value"
    codes: tuple[int, ...] = ()
    match: tuple[int, ...] = ()
    signed: bool = False
    special_values: dict[int, float] = field(default_factory=dict, hash=False)
    unit: str = ""

    def __post_init__(self) -> None:
        def err(msg: str) -> None:
            raise ValueError(f"feature {self.name!r}: {msg}")

        if not self.name.strip():
            err("'name' is empty")
        try:
            fields = _ids(self.fields, "'fields'", min_value=1, allow_empty=False)
            instances = _ids(self.instances, "'instances'", min_value=0, allow_empty=False)
            codes, match = _ids(self.codes, "'codes'"), _ids(self.match, "'match'")
        except ValueError as e:
            err(str(e))
        if any(not math.isfinite(v) for v in self.special_values.values()):
            err(f"'special_values' must map integer codes to finite numbers, got {self.special_values!r}")
        kind, reduce = self.kind, self.reduce
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
        elif self.special_values or self.signed:
            err("'special_values' / 'signed' are for numerical features only")
        elif kind == "categorical":
            if reduce != "value":
                err(f"a categorical feature needs reduce 'value', got {reduce!r}")
            if not codes:
                err("a categorical feature needs 'codes' (the ordered list of valid codes)")
        elif reduce == "value":  # binary
            codes = codes or (0, 1)
            if len(codes) != 2:
                err(f"a binary feature needs exactly 2 codes [no, yes], got {list(codes)}")
        elif reduce == "any_code":
            if codes:
                err("a binary any_code feature takes 'match', not 'codes'")
        else:
            err(f"a binary feature needs reduce 'value' or 'any_code', got {reduce!r}")
        # stored normalised: id tuples, special values in code order
        for name, value in (("fields", fields), ("instances", instances), ("codes", codes), ("match", match),
                            ("special_values", dict(sorted(self.special_values.items())))):
            object.__setattr__(self, name, value)

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
            d["special_values"] = {int(k): float(v) for k, v in self.special_values.items()}
        if self.unit:
            d["unit"] = self.unit
        return d


@dataclass(frozen=True)
class SelfReport:
    """A touchscreen self-report that also makes a disease label positive: ``field`` holding ``code`` at any
    of ``instances`` (high_blood_pressure: 6150 "Vascular/heart problems diagnosed by doctor" code 4)."""

    field: int
    code: int
    instances: tuple[int, ...] = DEFAULT_SELF_REPORT_INSTANCES

    def __post_init__(self) -> None:
        if (self.field, self.code) != (U.SELF_REPORT_FIELD, U.SELF_REPORT_HIGH_BP):
            raise ValueError(f"self_report must be field {U.SELF_REPORT_FIELD} code {U.SELF_REPORT_HIGH_BP}, "
                             f"got field {self.field} code {self.code}")
        object.__setattr__(self, "instances", _ids(self.instances, "self_report 'instances'", min_value=0,
                                                   allow_empty=False))


@dataclass(frozen=True)
class DiseaseSpec:
    """One disease label. ``icd10`` names a code list of ``fields.ICD10_DISEASES`` (the single source of the
    Appendix F codes); ``self_report`` (high_blood_pressure only): see ``SelfReport``
    (``fields.disease_labels``)."""

    name: str
    icd10: str
    self_report: SelfReport | None = None

    def __post_init__(self) -> None:
        if self.name not in _DISEASE_ICD10:
            raise ValueError(f"unknown disease {self.name!r} (supported: {', '.join(U.DISEASE_LABELS)}; the "
                             "labels are computed by fields.disease_labels)")
        if self.icd10 != _DISEASE_ICD10[self.name]:
            raise ValueError(f"disease {self.name!r}: 'icd10' must name the catalogue code list "
                             f"{_DISEASE_ICD10[self.name]!r} (fields.ICD10_DISEASES), got {self.icd10!r}")
        if self.name == "high_blood_pressure" and self.self_report is None:
            raise ValueError(f"disease {self.name!r} needs 'self_report: {{field: {U.SELF_REPORT_FIELD}, code: "
                             f"{U.SELF_REPORT_HIGH_BP}, instances: [0, 2]}}'")
        if self.name != "high_blood_pressure" and self.self_report is not None:
            raise ValueError(f"disease {self.name!r}: 'self_report' is only used by high_blood_pressure")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "icd10": self.icd10}
        if self.self_report is not None:
            d["self_report"] = {"field": self.self_report.field, "code": self.self_report.code,
                                "instances": list(self.self_report.instances)}
        return d


@dataclass(frozen=True)
class TabularSpec:
    """The whole spec file: ``features`` (one token each, in this order), ``missing_codes``, ``diseases``."""

    features: tuple[FeatureSpec, ...]
    missing_codes: tuple[int, ...] = DEFAULT_MISSING_CODES
    diseases: tuple[DiseaseSpec, ...] = ()
    version: Literal[1] = SPEC_FORMAT_VERSION
    source: str = field(default="<memory>", init=False, compare=False, repr=False)  # where it was read from

    def __post_init__(self) -> None:
        _ids(self.missing_codes, "'missing_codes'")
        if any(c >= 0 for c in self.missing_codes):
            raise ValueError(f"'missing_codes' must be negative special codes, got {list(self.missing_codes)}")
        if not self.features:
            raise ValueError("'features' must be a non-empty list")
        seen: dict[str, int] = {}
        for i, f in enumerate(self.features):
            if f.name in seen:
                raise ValueError(f"feature #{i} {f.name!r}: duplicate name (also feature #{seen[f.name]})")
            seen[f.name] = i
            clash = set(f.codes) & set(self.missing_codes)
            if clash:
                raise ValueError(f"feature #{i} {f.name!r}: codes {sorted(clash)} are missing_codes")
        names = [d.name for d in self.diseases]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise ValueError(f"disease {dup!r}: duplicate name")

    def named(self, source: str) -> "TabularSpec":
        """This spec, recording where it was read from (error messages, statistics mismatches)."""
        object.__setattr__(self, "source", source)
        return self

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

    @property
    def self_report_instances(self) -> tuple[int, ...]:
        """The instances whose self-report answers the disease labels read."""
        return next((d.self_report.instances for d in self.diseases if d.self_report is not None),
                    DEFAULT_SELF_REPORT_INSTANCES)

    def field_instances(self) -> set[tuple[int, int]]:
        """(field, instance) pairs the features and disease labels read."""
        pairs = {(fid, inst) for f in self.features for fid in f.fields for inst in f.instances}
        for d in self.diseases:
            if d.self_report is not None:
                pairs |= {(d.self_report.field, i) for i in d.self_report.instances}
        return pairs


def spec_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> TabularSpec:
    """Validate a spec mapping (the YAML's content); errors name ``source`` and the feature."""
    try:
        return config_from_dict(TabularSpec, data, source).named(source)
    except ConfigError as e:
        raise FeatureSpecError(str(e)) from e


def load_feature_spec(path: str | Path = DEFAULT_SPEC_PATH) -> TabularSpec:
    """Load and validate the YAML feature spec (FeatureSpecError naming the file and the feature)."""
    try:
        return load_config(TabularSpec, path).named(str(path))
    except ConfigError as e:
        raise FeatureSpecError(str(e)) from e


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
    """The ViTa Appendix D spec derived from ``fields.APPENDIX_D_FEATURES`` and the catalogue."""
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
                kw["special_values"] = {-10: LESS_THAN_ONE_VALUE}
        elif src.kind == "categorical":
            kw["codes"] = _category_codes(fld)
        elif src.reduce == "value":  # binary answer: index 0 = No / Female, 1 = Yes / Male
            if fld.coding is None or not {0, 1} <= set(fld.coding):
                raise KeyError(f"binary feature {name!r}: field {fld.field_id} has no 0/1 coding")
            kw["codes"] = (0, 1)
        feats.append(FeatureSpec(**kw))
    self_report = SelfReport(U.SELF_REPORT_FIELD, U.SELF_REPORT_HIGH_BP, DEFAULT_SELF_REPORT_INSTANCES)
    diseases = tuple(DiseaseSpec(d, _DISEASE_ICD10[d], self_report if d == "high_blood_pressure" else None)
                     for d in U.DISEASE_LABELS)
    return TabularSpec(features=tuple(feats), diseases=diseases).named("<default_feature_spec>")



_YAML_HEADER = """\
# UK Biobank tabular features for ViTa Stage II (paper Appendix D: 67 numerical, 18 binary, 32 categorical)
# and the disease labels (Appendix F). Read by data_prep.ukb.feature_spec.load_feature_spec; one feature = one token of
# the tabular encoder, in this order. This file is the user-editable source of truth: delete, reorder or add
# features freely (the statistics version changes with the spec). It was generated from
# data_prep/ukb/fields.py (APPENDIX_D_FEATURES + the field catalogue) by `python -m data_prep.ukb.feature_spec PATH`;
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
# Normalisation (fit on the training split only, data_prep.ukb.features.fit_stats): numerical -> z-score, missing
# imputed with the training mean (0 after z-scoring); categorical / binary -> index, missing imputed with the
# training mode. The missingness mask is stored next to the values.
version: 1
missing_codes: [{missing}]
features:
"""

_DISEASE_HEADER = """\
# Disease labels, in this order (UKBSample.diseases; data_prep.ukb.diseases.disease_table). The ICD-10 code lists
# are NOT repeated here: `icd10` names a list of data_prep.ukb.fields.ICD10_DISEASES (Appendix F, pinned to the
# paper by tests/test_synth_tabular.py) matched exactly against every array of field 41270 (instance 0,
# "Diagnoses - ICD10", dots removed). high_blood_pressure = the hypertension ICD-10 list OR the touchscreen
# self-report "Vascular/heart problems diagnosed by doctor" (6150) containing 4 at any listed instance.
# Unknown (-1) rule: the ICD-10 labels are -1 for subjects without a single 41270 entry (no hospital record:
# "only subjects with valid diagnostic entries" are used for disease classification); high_blood_pressure is
# 1 on any positive evidence, else 0 if 6150 holds a valid answer (>= 0 or -7) at a listed instance, else -1.
# Entries may be removed or reordered; the supported names are those of fields.DISEASE_LABELS.
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
    path = Path(path)
    text = feature_spec_yaml(default_feature_spec())
    if spec_from_dict(yaml.safe_load(text), str(path)) != default_feature_spec():  # pragma: no cover
        raise RuntimeError("feature spec YAML does not round-trip")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m data_prep.ukb.feature_spec [PATH]``: (re)write the default Appendix D spec YAML."""
    args = sys.argv[1:] if argv is None else argv
    path = write_default_spec(args[0] if args else DEFAULT_SPEC_PATH)
    spec = load_feature_spec(path)
    kinds = {k: sum(f.kind == k for f in spec.features) for k in KINDS}
    print(f"wrote {path}: {len(spec)} features {kinds}, {len(spec.diseases)} diseases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
