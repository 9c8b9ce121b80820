"""The tail every markdown-report bench shares: print the report, write it to --out if given."""

from __future__ import annotations

import pathlib


def emit(lines: list[str], out: str = "") -> int:
    report = "\n".join(lines)
    print(report)
    if out:
        pathlib.Path(out).write_text(report)
    return 0
