"""Train / val / test assignment at conversion: a stable hash split per key, and a stratified split over groups
(a patient's scans together) that never moves what an earlier run placed."""

from __future__ import annotations

import hashlib

from core.vocab import SPLITS

def split_of(key: str, val_fraction: float = 0.1, test_fraction: float = 0.1, salt: str = "cmrfm-split-v1") -> str:
    """Stable split from a hash of the key alone: adding subjects never moves an existing one."""
    u = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


STRATIFIED_SALT = "cmrfm-strata-v1"


def stratified_group_splits(units: dict[str, dict[str, int]], counts: dict[str, dict[str, int]] | None = None,
                            fixed: dict[str, str] | None = None, val_fraction: float = 0.1,
                            test_fraction: float = 0.1, salt: str = STRATIFIED_SALT) -> dict[str, str]:
    """A split per *group* (e.g. a patient: all its scans in one split, no leakage) such that within every
    *stratum* (e.g. (modality, view)) the split counts follow the fractions as closely as the groups allow.

    units:  group -> {stratum: number of new items of that group}
    counts: stratum -> {split: items already in that split} (the dataset so far; not modified)
    fixed:  group -> split for groups that already have one: their new items follow it, whatever the balance
    Returns group -> split for every group of `units`.

    New groups are placed one at a time in the order of a salted hash of the group (a function of the group
    alone, not of the input order), each into the split with a positive fraction that minimises the squared
    deviation of its strata's counts from `fraction x stratum total`; ties go to `split_of(group)`, then train,
    val, test. Placing never moves what is placed: a larger archive converted later keeps every earlier group
    where it was (the conversion engine passes the manifest's groups as `fixed` and its counts as `counts`).
    """
    frac = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    c: dict[str, dict[str, int]] = {s: {p: int((counts or {}).get(s, {}).get(p, 0)) for p in SPLITS}
                                    for s in set(counts or {}) | {s for u in units.values() for s in u}}
    out: dict[str, str] = {}

    def add(group: str, split: str) -> None:
        out[group] = split
        for s, n in units[group].items():
            c[s][split] += int(n)

    for g in sorted(units):
        if fixed and g in fixed:
            add(g, fixed[g])
    order = sorted((g for g in units if g not in out),
                   key=lambda g: (hashlib.sha256(f"{salt}:{g}".encode()).digest(), g))
    for g in order:
        first = split_of(g, val_fraction, test_fraction, salt)
        cands = [p for p in (first, *SPLITS) if frac[p] > 0]
        cands = list(dict.fromkeys(cands)) or ["train"]
        best, best_cost = cands[0], None
        for p in cands:
            cost = 0.0
            for s, n in units[g].items():
                total = sum(c[s].values()) + n
                cost += sum((c[s][q] + (n if q == p else 0) - frac[q] * total) ** 2 for q in SPLITS)
            if best_cost is None or cost < best_cost - 1e-9:
                best, best_cost = p, cost
        add(g, best)
    return out
