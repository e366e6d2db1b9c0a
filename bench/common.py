"""What the benchmarks share: the table they print and the `none`-able path options."""
from __future__ import annotations

from pathlib import Path


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def optional_path(value: str) -> Path | None:
    return None if value.lower() == "none" else Path(value)
