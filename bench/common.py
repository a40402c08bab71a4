"""Shared by the benchmark scripts (run as `python bench/<name>.py`, so this directory is on sys.path)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def update_benchmarks(text: str, header: str) -> None:
    """Replace the section starting with `header` (up to the next '## ') or append it at the end."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    m = re.search(rf"^{re.escape(header)}.*?(?=^## |\Z)", doc, flags=re.S | re.M)
    if m:
        doc = doc[:m.start()] + text + ("\n" if m.end() < len(doc) else "") + doc[m.end():]
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)
    print(f"updated {path} ({header})")
