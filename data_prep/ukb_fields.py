"""UK Biobank field catalogue: the tabular side of ViTa (Appendix D features, Appendix F disease labels).

One module, pure Python (no numpy/pandas), shared by the synthetic cohort writer
(``data_prep.synth.tabular``) and the real tabular conversion job, so that both agree on field ids,
instances, array counts, integer codings and the special negative codes.

UK Biobank export conventions reproduced here
--------------------------------------------
* Columns are named ``FIELD-INSTANCE.ARRAY`` (``column_name`` / ``parse_column``): ``4080-2.1`` is the
  second automated systolic reading at the imaging visit. ``eid`` (participant id) is the first column.
* Instances: 0 = initial assessment (2006-2010), 2 = first imaging visit (2014+, the cine CMR). Most
  touchscreen questions and physical measures exist at both; imaging-derived phenotypes, the resting
  ECG and the pulse-wave analysis only at 2; the online follow-up questionnaires are stored at 0.
  (Instance 1, the 2012-13 repeat visit, and 3, the repeat imaging visit, also exist in real exports;
  they are not catalogued because ViTa does not use them.)
* Arrays: repeated measurements (2 blood-pressure readings) or multi-select answers (6150, 6177,
  6153, 20004, 41270) fill arrays ``.0, .1, ...``; unused arrays are empty.
* Special negative codes (``SPECIAL_CODES``) are answers, not numbers: -1 "Do not know",
  -3 "Prefer not to answer", -10 "Less than one" (intakes, hours), -7 "None of the above", and in the
  online follow-ups -121 "Do not know" / -818 "Prefer not to answer". A field's ``special`` lists the
  codes it can carry; any other negative value in an unsigned field is invalid.
* Categorical answers are integers with a per-field coding (``UKBField.coding``).

Field ids are real UK Biobank ids as best known; ids, codings or array counts that are not certain are
marked ``UNSURE`` in comments and listed in ``UNSURE_FIELD_IDS`` (check them against the Showcase before
the first real conversion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Literal, Mapping

from data_prep.format import DISEASES

Kind = Literal["numerical", "binary", "categorical"]
DType = Literal["int", "float", "str", "date"]

INSTANCE_BASELINE = 0
INSTANCE_IMAGING = 2

# Special negative codes used by UK Biobank codings (meaning is generic; a field's coding may word it
# more specifically, e.g. -10 "Less than an hour a day" for field 1070).
SPECIAL_CODES: Mapping[int, str] = MappingProxyType({
    -1: "Do not know",
    -2: "Unable to walk",  # field 864 only
    -3: "Prefer not to answer",
    -6: "It varies",  # field 1618 only
    -7: "None of the above",
    -10: "Less than one",
    -121: "Do not know",  # online follow-up questionnaires
    -818: "Prefer not to answer",  # online follow-up questionnaires
})
# Codes that mean "no usable answer" (treat as missing); the others (-2, -6, -7, -10) are real answers
# (-10 ~ "less than one unit", commonly mapped to 0.5 for numerical fields).
MISSING_LIKE_CODES: frozenset[int] = frozenset({-1, -3, -121, -818})


@dataclass(frozen=True)
class UKBField:
    """One UK Biobank field at one instance.

    ``kind`` is the nature of the field (a count of days is ``numerical`` even though ViTa one-hot
    encodes it; see ``APPENDIX_D_FEATURES`` for the paper's treatment). ``arrays`` is the number of
    array columns of a real export (an upper bound: exports carry as many as the release needs).
    ``special`` lists the negative special codes the field may carry; for categorical fields they are
    also keys of ``coding``. ``signed`` marks real-valued fields whose genuine values may be negative.
    """

    field_id: int
    name: str
    kind: Kind
    instance: int
    arrays: int = 1
    unit: str = ""
    coding: Mapping[int, str] | None = field(default=None, hash=False)
    special: tuple[int, ...] = ()
    dtype: DType = "float"
    signed: bool = False

    def __post_init__(self) -> None:
        if self.coding is not None:
            object.__setattr__(self, "coding", MappingProxyType(dict(self.coding)))
            neg = {k for k in self.coding if k < 0}
            if not neg <= set(self.special):
                raise ValueError(f"field {self.field_id}: negative codes {sorted(neg)} missing from special")
        unknown = set(self.special) - set(SPECIAL_CODES)
        if unknown:
            raise ValueError(f"field {self.field_id}: unknown special codes {sorted(unknown)}")
        if self.arrays < 1 or self.instance < 0:
            raise ValueError(f"field {self.field_id}: bad instance/arrays")

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(column_name(self.field_id, self.instance, a) for a in range(self.arrays))

    def allows(self, value: int) -> bool:
        """Whether an integer value is valid for this field (coding / special codes)."""
        if value < 0 and not self.signed:
            return value in self.special
        if self.coding is not None:
            return value in self.coding
        return True


# ----------------------------------------------------------------------------------------------------
# Column names
# ----------------------------------------------------------------------------------------------------
_COLUMN_RE = re.compile(r"(0|[1-9][0-9]*)-(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")


def column_name(field_id: int, instance: int, array: int = 0) -> str:
    """``column_name(4080, 2, 1) == "4080-2.1"``."""
    for v in (field_id, instance, array):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"field/instance/array must be non-negative ints, got {(field_id, instance, array)!r}")
    return f"{field_id}-{instance}.{array}"


def parse_column(name: str) -> tuple[int, int, int]:
    """``"4080-2.1" -> (4080, 2, 1)``. Raises ValueError naming the column for anything else
    (``eid``, R-style ``f.4080.2.1``, pandas-mangled duplicates ``4080-2.1.1``, blanks, leading zeros)."""
    m = _COLUMN_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"malformed UK Biobank column name {name!r}: expected FIELD-INSTANCE.ARRAY, e.g. '4080-2.0'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


# ----------------------------------------------------------------------------------------------------
# Codings
# ----------------------------------------------------------------------------------------------------
def _special_of(coding: Mapping[int, str]) -> tuple[int, ...]:
    return tuple(sorted((k for k in coding if k < 0), reverse=True))


YES_NO = {1: "Yes", 0: "No", -1: "Do not know", -3: "Prefer not to answer"}  # coding 100349
SEX = {0: "Female", 1: "Male"}  # coding 9
NO_YES = {0: "No", 1: "Yes"}  # coding 7
ALCOHOL_FREQUENCY = {  # 1558, coding 100402
    1: "Daily or almost daily", 2: "Three or four times a week", 3: "Once or twice a week",
    4: "One to three times a month", 5: "Special occasions only", 6: "Never", -3: "Prefer not to answer"}
SMOKING_STATUS = {0: "Never", 1: "Previous", 2: "Current", -3: "Prefer not to answer"}  # 20116 / 20117, coding 90
CURRENT_TOBACCO = {1: "Yes, on most or all days", 2: "Only occasionally", 0: "No", -3: "Prefer not to answer"}
PAST_TOBACCO = {1: "Smoked on most or all days", 2: "Smoked occasionally", 3: "Just tried once or twice",
                4: "I have never smoked", -3: "Prefer not to answer"}
SMOKERS_IN_HOUSEHOLD = {1: "Yes, one household member smokes", 2: "Yes, more than one household member smokes",
                        0: "No", -3: "Prefer not to answer"}
MEAT_INTAKE = {0: "Never", 1: "Less than once a week", 2: "Once a week", 3: "2-4 times a week",
               4: "5-6 times a week", 5: "Once or more daily", -1: "Do not know", -3: "Prefer not to answer"}
INSOMNIA = {1: "Never/rarely", 2: "Sometimes", 3: "Usually", -3: "Prefer not to answer"}
OVERALL_HEALTH = {1: "Excellent", 2: "Good", 3: "Fair", 4: "Poor", -1: "Do not know", -3: "Prefer not to answer"}
ALCOHOL_WITH_MEALS = {1: "Yes", 0: "No", -6: "It varies", -1: "Do not know", -3: "Prefer not to answer"}
DRINK_FREQUENCY_ONLINE = {0: "Never", 1: "Monthly or less", 2: "2 to 4 times a month", 3: "2 to 3 times a week",
                          4: "4 or more times a week", -818: "Prefer not to answer"}  # 20414
SIX_UNITS_FREQUENCY = {1: "Never", 2: "Less than monthly", 3: "Monthly", 4: "Weekly", 5: "Daily or almost daily",
                       -818: "Prefer not to answer"}  # 20416
DRINKS_TYPICAL_DAY = {1: "One or two", 2: "Three or four", 3: "Five or six", 4: "Seven, eight or nine",
                      5: "Ten or more", -818: "Prefer not to answer"}  # 20403
EVER_DIABETES_ONLINE = {1: "Yes", 0: "No", -121: "Do not know", -818: "Prefer not to answer"}  # 120007 (UNSURE)
FALLS = {1: "No falls", 2: "Only one fall", 3: "More than one fall", -3: "Prefer not to answer"}
WEIGHT_CHANGE = {0: "No - weigh about the same", 2: "Yes - gained weight", 3: "Yes - lost weight",
                 -1: "Do not know", -3: "Prefer not to answer"}
WALKING_PACE = {1: "Slow pace", 2: "Steady average pace", 3: "Brisk pace", -7: "None of the above",
                -3: "Prefer not to answer"}
STAIR_CLIMBING = {0: "None", 1: "1-5 times a day", 2: "6-10 times a day", 3: "11-15 times a day",
                  4: "16-20 times a day", 5: "More than 20 times a day", -1: "Do not know",
                  -3: "Prefer not to answer"}  # UNSURE wording
ACTIVITY_FREQUENCY_4W = {1: "Once in the last 4 weeks", 2: "2-3 times in the last 4 weeks", 3: "Once a week",
                         4: "2-3 times a week", 5: "4-5 times a week", 6: "Every day", -1: "Do not know",
                         -3: "Prefer not to answer"}
ACTIVITY_DURATION = {1: "Less than 15 minutes", 2: "Between 15 and 30 minutes",
                     3: "Between 30 minutes and 1 hour", 4: "Between 1 and 1.5 hours",
                     5: "Between 1.5 and 2 hours", 6: "Between 2 and 3 hours", 7: "Over 3 hours",
                     -1: "Do not know", -3: "Prefer not to answer"}
VASCULAR_HEART_PROBLEMS = {1: "Heart attack", 2: "Angina", 3: "Stroke", 4: "High blood pressure",
                           -7: "None of the above", -3: "Prefer not to answer"}  # 6150, coding 100605
MEDICATION_MEN = {1: "Cholesterol lowering medication", 2: "Blood pressure medication", 3: "Insulin",
                  -7: "None of the above", -1: "Do not know", -3: "Prefer not to answer"}  # 6177, coding 100625
MEDICATION_WOMEN = {1: "Cholesterol lowering medication", 2: "Blood pressure medication", 3: "Insulin",
                    4: "Hormone replacement therapy", 5: "Oral contraceptive pill or minipill",
                    -7: "None of the above", -1: "Do not know", -3: "Prefer not to answer"}  # 6153, coding 100626
# Self-reported operations (20004, coding 5): only the cardiac codes are listed (partial coding, UNSURE
# whether ViTa's "Cardiac operations performed" counted more codes).
OPERATION_CODES = {1070: "coronary angioplasty (ptca) +/- stent", 1095: "coronary artery bypass grafts (cabg)",
                   1523: "triple heart bypass"}
CARDIAC_OPERATION_CODES: tuple[int, ...] = (1070, 1095, 1523)

# Numerical fields' special codes
_DK_PNA = (-1, -3)
_LT1_DK_PNA = (-10, -1, -3)


# ----------------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------------
_BOTH = (INSTANCE_BASELINE, INSTANCE_IMAGING)
_IMG = (INSTANCE_IMAGING,)
_BASE = (INSTANCE_BASELINE,)


def _f(instances: Iterable[int], field_id: int, name: str, kind: Kind, **kw) -> list[UKBField]:
    if kw.get("coding") is not None and "special" not in kw:
        kw["special"] = _special_of(kw["coding"])
    if "dtype" not in kw:
        kw["dtype"] = "int" if kind in ("binary", "categorical") else "float"
    return [UKBField(field_id, name, kind, i, **kw) for i in instances]


def _num(instances, field_id, name, unit="", **kw):
    return _f(instances, field_id, name, "numerical", unit=unit, **kw)


def _cat(instances, field_id, name, coding, **kw):
    return _f(instances, field_id, name, "categorical", coding=coding, **kw)


def _bin(instances, field_id, name, coding=YES_NO, **kw):
    return _f(instances, field_id, name, "binary", coding=coding, **kw)


ICD10_ARRAYS = 259  # UNSURE: the number of 41270 arrays differs between releases (~213-259)
OPERATION_ARRAYS = 32  # 20004 self-reported operation codes

_CATALOGUE: list[UKBField] = [
    # --- demographics -------------------------------------------------------------------------------
    *_bin(_BASE, 31, "Sex", coding=SEX),
    *_num(_BOTH, 21003, "Age when attended assessment centre", "years", dtype="int"),
    # --- anthropometry (physical measures at baseline and at the imaging visit) -----------------------
    *_num(_BOTH, 50, "Standing height", "cm"),
    *_num(_BOTH, 20015, "Sitting height", "cm"),
    *_num(_IMG, 12144, "Height", "cm"),  # imaging-visit height
    *_num(_BOTH, 21002, "Weight", "kg"),
    *_num(_BOTH, 21001, "Body mass index (BMI)", "kg/m2"),
    *_num(_BOTH, 48, "Waist circumference", "cm"),
    *_num(_BOTH, 49, "Hip circumference", "cm"),
    # body composition by impedance (Tanita BC418MA)
    *_num(_BOTH, 23099, "Body fat percentage", "percent"),
    *_num(_BOTH, 23100, "Whole body fat mass", "kg"),
    *_num(_BOTH, 23101, "Whole body fat-free mass", "kg"),
    *_num(_BOTH, 23102, "Whole body water mass", "kg"),
    *_num(_BOTH, 23105, "Basal metabolic rate", "kJ", dtype="int"),
    *_num(_BOTH, 23106, "Impedance of whole body", "ohms", dtype="int"),
    # DXA body composition (imaging visit)
    *_num(_IMG, 23283, "Total mass", "g", dtype="int"),  # UNSURE: unit (grams assumed)
    # --- blood pressure / pulse (two automated readings) --------------------------------------------
    *_num(_BOTH, 4080, "Systolic blood pressure, automated reading", "mmHg", arrays=2, dtype="int"),
    *_num(_BOTH, 4079, "Diastolic blood pressure, automated reading", "mmHg", arrays=2, dtype="int"),
    *_num(_BOTH, 102, "Pulse rate, automated reading", "bpm", arrays=2, dtype="int"),
    *_num(_BOTH, 21021, "Pulse wave Arterial Stiffness index", "m/s"),
    # --- pulse wave analysis (Vicorder, imaging visit) -- UNSURE: real exports may carry >1 array ----
    *_num(_IMG, 12673, "Heart rate during PWA", "bpm", dtype="int"),
    *_num(_IMG, 12674, "Systolic brachial blood pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12675, "Diastolic brachial blood pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12676, "Peripheral pulse pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12677, "Central systolic blood pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12678, "Central pulse pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12679, "Number of beats in waveform average for PWA", "beats", dtype="int"),
    *_num(_IMG, 12680, "Central augmentation pressure during PWA", "mmHg", dtype="int", signed=True),
    *_num(_IMG, 12681, "Augmentation index for PWA", "percent", dtype="int", signed=True),
    *_num(_IMG, 12682, "Cardiac output during PWA", "L/min"),
    *_num(_IMG, 12683, "End systolic pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12684, "End systolic pressure index during PWA", "percent", dtype="int"),  # UNSURE: unit
    *_num(_IMG, 12685, "Total peripheral resistance during PWA", "dyn*s/cm5", dtype="int"),  # UNSURE: unit
    *_num(_IMG, 12686, "Stroke volume during PWA", "mL", dtype="int"),
    *_num(_IMG, 12687, "Mean arterial pressure during PWA", "mmHg", dtype="int"),
    *_num(_IMG, 12702, "Cardiac index during PWA", "L/min/m2"),
    # --- ECG at rest (imaging visit) ------------------------------------------------------------------
    *_num(_IMG, 12336, "Ventricular rate", "bpm", dtype="int"),
    *_num(_IMG, 12338, "P duration", "ms", dtype="int"),
    *_num(_IMG, 12340, "QRS duration", "ms", dtype="int"),
    *_num(_IMG, 22330, "PQ interval", "ms", dtype="int"),
    *_num(_IMG, 22333, "RR interval", "ms", dtype="int"),
    *_num(_IMG, 22334, "PP interval", "ms", dtype="int"),
    # --- CMR: LV size and function, Siemens inline analysis (imaging visit) ---------------------------
    *_num(_IMG, 22420, "LV ejection fraction", "percent", dtype="int"),
    *_num(_IMG, 22421, "LV end diastolic volume", "mL", dtype="int"),
    *_num(_IMG, 22422, "LV end systolic volume", "mL", dtype="int"),
    *_num(_IMG, 22423, "LV stroke volume", "mL", dtype="int"),
    *_num(_IMG, 22424, "Cardiac output", "L/min"),
    *_num(_IMG, 22425, "Cardiac index", "L/min/m2"),
    *_num(_IMG, 22426, "Average heart rate", "bpm", dtype="int"),
    *_num(_IMG, 22427, "Body surface area", "m2"),
    # --- CMR imaging-derived phenotypes of Bai et al. 2020 (returned to UK Biobank) -------------------
    # UNSURE: the order 24100..24117 is from memory (LV, RV, LA, RA blocks as below).
    *_num(_IMG, 24100, "LV end diastolic volume (Bai)", "mL"),
    *_num(_IMG, 24101, "LV end systolic volume (Bai)", "mL"),
    *_num(_IMG, 24102, "LV stroke volume (Bai)", "mL"),
    *_num(_IMG, 24103, "LV ejection fraction (Bai)", "percent"),
    *_num(_IMG, 24104, "LV cardiac output (Bai)", "L/min"),
    *_num(_IMG, 24105, "LV myocardial mass (Bai)", "g"),
    *_num(_IMG, 24106, "RV end diastolic volume (Bai)", "mL"),
    *_num(_IMG, 24107, "RV end systolic volume (Bai)", "mL"),
    *_num(_IMG, 24108, "RV stroke volume (Bai)", "mL"),
    *_num(_IMG, 24109, "RV ejection fraction (Bai)", "percent"),
    *_num(_IMG, 24110, "LA maximum volume (Bai)", "mL"),
    *_num(_IMG, 24111, "LA minimum volume (Bai)", "mL"),
    *_num(_IMG, 24112, "LA stroke volume (Bai)", "mL"),
    *_num(_IMG, 24113, "LA ejection fraction (Bai)", "percent"),
    *_num(_IMG, 24114, "RA maximum volume (Bai)", "mL"),
    *_num(_IMG, 24115, "RA minimum volume (Bai)", "mL"),
    *_num(_IMG, 24116, "RA stroke volume (Bai)", "mL"),
    *_num(_IMG, 24117, "RA ejection fraction (Bai)", "percent"),
    # --- physical activity (touchscreen) --------------------------------------------------------------
    *_num(_BOTH, 864, "Number of days/week walked 10+ minutes", "days", dtype="int", special=(-1, -2, -3)),
    *_num(_BOTH, 874, "Duration of walks", "minutes/day", dtype="int", special=_DK_PNA),
    *_num(_BOTH, 884, "Number of days/week of moderate physical activity 10+ minutes", "days", dtype="int",
          special=_DK_PNA),
    *_num(_BOTH, 894, "Duration of moderate activity", "minutes/day", dtype="int", special=_DK_PNA),
    *_num(_BOTH, 904, "Number of days/week of vigorous physical activity 10+ minutes", "days", dtype="int",
          special=_DK_PNA),
    *_num(_BOTH, 914, "Duration of vigorous activity", "minutes/day", dtype="int", special=_DK_PNA),
    *_cat(_BOTH, 924, "Usual walking pace", WALKING_PACE),
    *_cat(_BOTH, 943, "Frequency of stair climbing in last 4 weeks", STAIR_CLIMBING),
    *_cat(_BOTH, 971, "Frequency of walking for pleasure in last 4 weeks", ACTIVITY_FREQUENCY_4W),
    *_cat(_BOTH, 981, "Duration walking for pleasure", ACTIVITY_DURATION),
    *_cat(_BOTH, 991, "Frequency of strenuous sports in last 4 weeks", ACTIVITY_FREQUENCY_4W),
    *_cat(_BOTH, 1001, "Duration of strenuous sports", ACTIVITY_DURATION),
    *_cat(_BOTH, 1011, "Frequency of light DIY in last 4 weeks", ACTIVITY_FREQUENCY_4W),
    *_cat(_BOTH, 1021, "Duration of light DIY", ACTIVITY_DURATION),
    *_cat(_BOTH, 2624, "Frequency of heavy DIY in last 4 weeks", ACTIVITY_FREQUENCY_4W),
    *_cat(_BOTH, 2634, "Duration of heavy DIY", ACTIVITY_DURATION),
    *_cat(_BOTH, 3637, "Frequency of other exercises in last 4 weeks", ACTIVITY_FREQUENCY_4W),
    *_cat(_BOTH, 3647, "Duration of other exercises", ACTIVITY_DURATION),
    # --- sedentary behaviour, sleep ------------------------------------------------------------------
    *_num(_BOTH, 1070, "Time spent watching television (TV)", "hours/day", dtype="int", special=_LT1_DK_PNA),
    *_num(_BOTH, 1080, "Time spent using computer", "hours/day", dtype="int", special=_LT1_DK_PNA),
    *_num(_BOTH, 1090, "Time spent driving", "hours/day", dtype="int", special=_LT1_DK_PNA),
    *_num(_BOTH, 1160, "Sleep duration", "hours/day", dtype="int", special=_DK_PNA),
    *_cat(_BOTH, 1200, "Sleeplessness / insomnia", INSOMNIA),
    # --- smoking ----------------------------------------------------------------------------------------
    *_cat(_BOTH, 1239, "Current tobacco smoking", CURRENT_TOBACCO),
    *_cat(_BOTH, 1249, "Past tobacco smoking", PAST_TOBACCO),
    *_cat(_BOTH, 1259, "Smoking/smokers in household", SMOKERS_IN_HOUSEHOLD),
    *_num(_BOTH, 1269, "Exposure to tobacco smoke at home", "hours/week", dtype="int", special=_DK_PNA),
    *_num(_BOTH, 1279, "Exposure to tobacco smoke outside home", "hours/week", dtype="int", special=_DK_PNA),
    *_cat(_BOTH, 20116, "Smoking status", SMOKING_STATUS),
    *_bin(_BOTH, 20160, "Ever smoked", coding=NO_YES),
    *_num(_BOTH, 20161, "Pack years of smoking", "pack-years"),
    *_num(_BOTH, 20162, "Pack years adult smoking as proportion of life span exposed to smoking", "ratio"),
    # --- alcohol ---------------------------------------------------------------------------------------
    *_cat(_BOTH, 1558, "Alcohol intake frequency.", ALCOHOL_FREQUENCY),
    *_cat(_BOTH, 1618, "Alcohol usually taken with meals", ALCOHOL_WITH_MEALS),
    *_cat(_BOTH, 20117, "Alcohol drinker status", SMOKING_STATUS),
    # online follow-up (alcohol use questionnaire), stored at instance 0
    *_cat(_BASE, 20403, "Amount of alcohol drunk on a typical drinking day", DRINKS_TYPICAL_DAY),
    *_cat(_BASE, 20414, "Frequency of drinking alcohol", DRINK_FREQUENCY_ONLINE),
    *_cat(_BASE, 20416, "Frequency of consuming six or more units of alcohol", SIX_UNITS_FREQUENCY),
    # --- diet -------------------------------------------------------------------------------------------
    *_num(_BOTH, 1289, "Cooked vegetable intake", "tablespoons/day", dtype="int", special=_LT1_DK_PNA),
    *_num(_BOTH, 1299, "Salad / raw vegetable intake", "tablespoons/day", dtype="int", special=_LT1_DK_PNA),
    *_cat(_BOTH, 1349, "Processed meat intake", MEAT_INTAKE),
    *_cat(_BOTH, 1369, "Beef intake", MEAT_INTAKE),
    *_cat(_BOTH, 1379, "Lamb/mutton intake", MEAT_INTAKE),
    *_cat(_BOTH, 1389, "Pork intake", MEAT_INTAKE),
    # --- psychosocial, general health -----------------------------------------------------------------
    *_bin(_BOTH, 1980, "Worrier / anxious feelings"),
    *_bin(_BOTH, 1990, "Tense / 'highly strung'"),
    *_cat(_BOTH, 2178, "Overall health rating", OVERALL_HEALTH),
    *_bin(_BOTH, 2188, "Long-standing illness, disability or infirmity"),
    *_cat(_BOTH, 2296, "Falls in the last year", FALLS),
    *_cat(_BOTH, 2306, "Weight change compared with 1 year ago", WEIGHT_CHANGE),
    *_bin(_BOTH, 4717, "Shortness of breath walking on level ground"),
    # --- medical history, medication ------------------------------------------------------------------
    *_bin(_BOTH, 2443, "Diabetes diagnosed by doctor"),
    *_bin(_BASE, 120007, "Ever had diabetes (Type I or Type II)", coding=EVER_DIABETES_ONLINE),  # UNSURE id
    *_cat(_BOTH, 6150, "Vascular/heart problems diagnosed by doctor", VASCULAR_HEART_PROBLEMS, arrays=4),
    *_cat(_BOTH, 6177, "Medication for cholesterol, blood pressure or diabetes", MEDICATION_MEN, arrays=3),
    *_cat(_BOTH, 6153, "Medication for cholesterol, blood pressure, diabetes, or take exogenous hormones",
          MEDICATION_WOMEN, arrays=4),
    *_bin(_BOTH, 3079, "Pace-maker"),  # UNSURE: instances / coding
    *_cat(_BOTH, 20004, "Operation code", OPERATION_CODES, arrays=OPERATION_ARRAYS),  # partial coding
    # --- hospital inpatient diagnoses (summary over all records, instance 0 only) ---------------------
    *_f(_BASE, 41270, "Diagnoses - ICD10", "categorical", arrays=ICD10_ARRAYS, dtype="str"),
]

FIELDS: tuple[UKBField, ...] = tuple(_CATALOGUE)
FIELD_BY_KEY: Mapping[tuple[int, int], UKBField] = MappingProxyType({(f.field_id, f.instance): f for f in FIELDS})
if len(FIELD_BY_KEY) != len(FIELDS):  # pragma: no cover - guarded by tests
    raise RuntimeError("duplicate (field, instance) in the UK Biobank catalogue")
FIELD_IDS: frozenset[int] = frozenset(f.field_id for f in FIELDS)

# Ids (or their coding / unit / array count) not verified against the Showcase; see comments above.
UNSURE_FIELD_IDS: frozenset[int] = frozenset({
    120007,  # "Ever had diabetes (Type I or Type II)" (online follow-up): id from a secondary source
    23283,  # DXA "Total mass": id confirmed by a field list, unit (g) assumed
    3079,  # Pace-maker: instances and coding assumed (yes/no/do not know/prefer not)
    943,  # stair-climbing coding wording
    12684, 12685,  # PWA units
    *range(24100, 24118),  # Bai IDP order
    41270,  # number of arrays differs between releases
    20004,  # only cardiac operation codes catalogued
})


def field_spec(field_id: int, instance: int) -> UKBField:
    """Catalogue entry for (field, instance); KeyError naming both if not catalogued."""
    try:
        return FIELD_BY_KEY[(field_id, instance)]
    except KeyError:
        raise KeyError(f"UK Biobank field {field_id} instance {instance} is not in the catalogue") from None


def lookup_column(name: str) -> UKBField | None:
    """Catalogue entry for a column name, or None if the column is well formed but not catalogued
    (or its array index exceeds the catalogue's). Malformed names raise ValueError (``parse_column``)."""
    fid, inst, arr = parse_column(name)
    spec = FIELD_BY_KEY.get((fid, inst))
    if spec is None or arr >= spec.arrays:
        return None
    return spec


# ----------------------------------------------------------------------------------------------------
# Disease labels (ViTa Appendix F): ICD-10 codes of field 41270, written without dots ("I25.1" -> "I251")
# ----------------------------------------------------------------------------------------------------
ICD10_FIELD = 41270
SELF_REPORT_FIELD = 6150
SELF_REPORT_HIGH_BP = 4

ICD10_DISEASES: Mapping[str, frozenset[str]] = MappingProxyType({
    "cad": frozenset({
        "I200", "I201", "I208", "I209", "I220", "I221", "I228", "I229", "I210", "I211", "I212", "I213",
        "I214", "I219", "I240", "I248", "I249", "I250", "I251", "I252", "I253", "I254", "I255", "I256",
        "I258", "I259"}),
    "stroke": frozenset({"I630", "I631", "I632", "I633", "I634", "I635", "I636", "I638", "I639"}),
    "hypertension": frozenset({
        "I10", "I110", "I119", "I120", "I129", "I130", "I131", "I132", "I139", "I150", "I151", "I152",
        "I158", "I159"}),
    "infarct": frozenset({"I210", "I211", "I212", "I213", "I214", "I219", "I252"}),
    "diabetes": frozenset(
        [f"E10{d}" for d in range(10)] + [f"E11{d}" for d in range(10)]
        + ["E121", "E123", "E125", "E128", "E129"]
        + [f"E13{d}" for d in range(10)] + [f"E14{d}" for d in range(10)]),
})
DISEASE_LABELS: tuple[str, ...] = DISEASES  # the one list, in data_prep.format
ALL_APPENDIX_F_CODES: frozenset[str] = frozenset().union(*ICD10_DISEASES.values())


def normalize_icd10(code: object) -> str | None:
    """``" i25.1 " -> "I251"``; None for empty cells (None, NaN, "")."""
    if code is None or (isinstance(code, float) and code != code):
        return None
    s = str(code).strip().upper().replace(".", "")
    return s or None


def disease_labels(icd_codes: Iterable[object], self_report_6150: Iterable[object]) -> dict[str, bool]:
    """Disease labels of one participant, keys ``DISEASE_LABELS``.

    * cad / stroke / hypertension / infarct / diabetes: True iff any of the participant's ICD-10 codes
      (field 41270, all arrays; dots and case are normalised) is in that disease's Appendix F list
      (``ICD10_DISEASES``; exact 4-character codes, plus the 3-character "I10").
    * high_blood_pressure (ViTa's downstream task "High blood pressure"): True iff the participant
      self-reported high blood pressure in the touchscreen question "Vascular/heart problems diagnosed
      by doctor" (field 6150 contains code 4) OR the hypertension label above is True.
      ``self_report_6150`` should be the union of the 6150 arrays of the instances to trust (the
      synthetic cohort's flag is the imaging-visit status; baseline answers are a subset of it).
      Special codes (-7 none of the above, -3 prefer not to answer) and empty cells count as "not 4".
    """
    codes = {c for c in (normalize_icd10(x) for x in icd_codes) if c is not None}
    reported: set[int] = set()
    for x in self_report_6150:
        if x is None or (isinstance(x, float) and x != x) or (isinstance(x, str) and not x.strip()):
            continue
        reported.add(int(float(x)))
    out = {name: bool(codes & ICD10_DISEASES[name]) for name in ("cad", "infarct", "hypertension", "diabetes", "stroke")}
    out["high_blood_pressure"] = out["hypertension"] or SELF_REPORT_HIGH_BP in reported
    return {name: out[name] for name in DISEASE_LABELS}


# ----------------------------------------------------------------------------------------------------
# ViTa Appendix D: the 117 tabular features -> where they come from
# ----------------------------------------------------------------------------------------------------
Reduce = Literal["value", "mean", "any_code", "count_codes"]


@dataclass(frozen=True)
class FeatureSource:
    """How the tabular conversion derives one Appendix D feature.

    * ``value``: array 0 of the first instance in ``instances`` whose cell is not empty.
    * ``mean``: mean of the non-empty arrays of the first instance in ``instances`` that has any
      (blood pressure / pulse: mean of the two automated readings).
    * ``any_code``: over all ``instances`` and all arrays of all ``fields``: 1 if any value is in
      ``codes``; else 0 if the question was answered (a code >= 0 or -7 "None of the above");
      else missing (only empty / -1 / -3). ``fields`` with several ids are alternatives that one
      participant answers one of (6177 men / 6153 women).
    * ``count_codes``: number of array values in ``codes`` over all ``instances`` (0 if none).

    Special codes in ``value``/``mean`` features are the conversion's business (MISSING_LIKE_CODES
    become missing; -10 "less than one" is a real small amount). Instances follow ViTa's reference
    implementation: the imaging visit (2) for measurements and touchscreen answers, 0 for sex and the
    online follow-up questionnaires, all instances for the "diagnosed by doctor" / medication flags.
    """

    kind: Kind  # the paper's treatment: numerical / binary / categorical
    fields: tuple[int, ...]
    instances: tuple[int, ...]
    reduce: Reduce = "value"
    codes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for fid in self.fields:
            if not any((fid, i) in FIELD_BY_KEY for i in self.instances):
                raise ValueError(f"feature source field {fid} has none of instances {self.instances} in the catalogue")
        if self.reduce in ("any_code", "count_codes") and not self.codes:
            raise ValueError(f"feature source {self.fields}: reduce={self.reduce} needs codes")


def _n(fid: int, reduce: Reduce = "value", instances=_IMG) -> FeatureSource:
    return FeatureSource("numerical", (fid,), instances, reduce)


def _b(fid: int, instances=_IMG) -> FeatureSource:
    return FeatureSource("binary", (fid,), instances)


def _bc(fields: tuple[int, ...], code: int) -> FeatureSource:
    return FeatureSource("binary", fields, _BOTH, "any_code", (code,))


def _c(fid: int, instances=_IMG) -> FeatureSource:
    return FeatureSource("categorical", (fid,), instances)


_MEDS = (6177, 6153)

# Feature names and order exactly as in ViTa Appendix D (67 numerical, 18 binary, 32 categorical).
APPENDIX_D_FEATURES: Mapping[str, FeatureSource] = MappingProxyType({
    # numerical
    "Pulse wave Arterial Stiffness index": _n(21021),
    "Systolic blood pressure (mean)": _n(4080, "mean"),
    "Diastolic blood pressure (mean)": _n(4079, "mean"),
    "Pulse rate (mean)": _n(102, "mean"),
    "Body fat percentage": _n(23099),
    "Whole body fat mass": _n(23100),
    "Whole body fat-free mass": _n(23101),
    "Whole body water mass": _n(23102),
    "Body mass index (BMI)": _n(21001),
    "Cooked vegetable intake": _n(1289),
    "Salad/raw vegetable intake": _n(1299),
    "Cardiac operations performed": FeatureSource("numerical", (20004,), _BOTH, "count_codes", CARDIAC_OPERATION_CODES),
    "Total mass": _n(23283),
    "Basal metabolic rate": _n(23105),
    "Impedance of whole body": _n(23106),
    "Waist circumference": _n(48),
    "Hip circumference": _n(49),
    "Standing height": _n(50),
    "Height": _n(12144),
    "Sitting height": _n(20015),
    "Weight": _n(21002),
    "Ventricular rate": _n(12336),
    "P duration": _n(12338),
    "QRS duration": _n(12340),
    "PQ interval": _n(22330),
    "RR interval": _n(22333),
    "PP interval": _n(22334),
    "Cardiac output": _n(22424),
    "Cardiac index": _n(22425),
    "Average heart rate": _n(22426),
    "Body surface area": _n(22427),
    "Duration of walks": _n(874),
    "Duration of moderate activity": _n(894),
    "Duration of vigorous activity": _n(914),
    "Time spent watching television (TV)": _n(1070),
    "Time spent using computer": _n(1080),
    "Time spent driving": _n(1090),
    "Heart rate during PWA": _n(12673),
    "Systolic brachial blood pressure during PWA": _n(12674),
    "Diastolic brachial blood pressure during PWA": _n(12675),
    "Peripheral pulse pressure during PWA": _n(12676),
    "Central systolic blood pressure during PWA": _n(12677),
    "Central pulse pressure during PWA": _n(12678),
    "Number of beats in waveform average for PWA": _n(12679),
    "Central augmentation pressure during PWA": _n(12680),
    "Augmentation index for PWA": _n(12681),
    "Cardiac output during PWA": _n(12682),
    "End systolic pressure during PWA": _n(12683),
    "End systolic pressure index during PWA": _n(12684),
    "Stroke volume during PWA": _n(12686),
    "Mean arterial pressure during PWA": _n(12687),
    "Cardiac index during PWA": _n(12702),
    "Sleep duration": _n(1160),
    "Exposure to tobacco smoke at home": _n(1269),
    "Exposure to tobacco smoke outside home": _n(1279),
    "Pack years of smoking": _n(20161),
    "Pack years adult smoking as proportion of life span exposed to smoking": _n(20162),
    "LVEDV (mL)": _n(24100),
    "LVESV (mL)": _n(24101),
    "LVSF (mL)": _n(24102),  # the paper's "SF" is the stroke volume
    "LVEF (%)": _n(24103),
    "LVCO (L/min)": _n(24104),
    "LVM (g)": _n(24105),
    "RVEDV (mL)": _n(24106),
    "RVESV (mL)": _n(24107),
    "RVSF (mL)": _n(24108),
    "RVEF (%)": _n(24109),
    # binary
    "Worrier/anxious feelings": _b(1980),
    "Shortness of breath walking on level ground": _b(4717),
    "Sex": _b(31, _BASE),
    "Diabetes diagnosis": _bc((2443,), 1),
    "Heart attack diagnosed by doctor": _bc((6150,), 1),
    "Angina diagnosed by doctor": _bc((6150,), 2),
    "Stroke diagnosed by doctor": _bc((6150,), 3),
    "High blood pressure diagnosed by doctor": _bc((6150,), 4),
    "Cholesterol lowering medication regularly taken": _bc(_MEDS, 1),
    "Blood pressure medication regularly taken": _bc(_MEDS, 2),
    "Insulin medication regularly taken": _bc(_MEDS, 3),
    "Hormone replacement therapy medication regularly taken": _bc((6153,), 4),
    "Oral contraceptive pill or minipill medication regularly taken": _bc((6153,), 5),
    "Pacer-maker": _b(3079),
    "Ever had diabetes (Type I or Type II)": _b(120007, _BASE),
    "Long-standing illness, disability or infirmity": _b(2188),
    "Tense/'highly strung'": _b(1990),
    "Ever smoked": _b(20160),
    # categorical
    "Sleeplessness/insomnia": _c(1200),
    "Frequency of heavy DIY in last 4 weeks": _c(2624),
    "Alcohol intake frequency": _c(1558),
    "Processed meat intake": _c(1349),
    "Beef intake": _c(1369),
    "Pork intake": _c(1389),
    "Lamb/mutton intake": _c(1379),
    "Overall health rating": _c(2178),
    "Alcohol usually taken with meals": _c(1618),
    "Alcohol drinker status": _c(20117),
    "Frequency of drinking alcohol": _c(20414, _BASE),
    "Frequency of consuming six or more units of alcohol": _c(20416, _BASE),
    "Amount of alcohol drunk on a typical drinking day": _c(20403, _BASE),
    "Falls in the last year": _c(2296),
    "Weight change compared with 1 year ago": _c(2306),
    "Number of days/week walked 10+ min": _c(864),
    "Number of days/week of moderate physical activity 10+ min": _c(884),
    "Number of days/week of vigorous physical activity 10+ min": _c(904),
    "Usual walking pace": _c(924),
    "Frequency of stair climbing in last 4 weeks": _c(943),
    "Frequency of walking for pleasure in last 4 weeks": _c(971),
    "Duration walking for pleasure": _c(981),
    "Frequency of strenuous sports in last 4 weeks": _c(991),
    "Duration of strenuous sports": _c(1001),
    "Duration of light DIY": _c(1021),
    "Duration of heavy DIY": _c(2634),
    "Frequency of other exercises in last 4 weeks": _c(3637),
    "Duration of other exercises": _c(3647),
    "Current tobacco smoking": _c(1239),
    "Past tobacco smoking": _c(1249),
    "Smoking/smokers in household": _c(1259),
    "Smoking status": _c(20116),
})
