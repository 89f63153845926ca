"""The last step of every benchmark: its JSON report under bench/results/ (or --out)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return out
