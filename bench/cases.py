"""The benchmark suite's cases: which spec files, and which of their attention statements a run selects.

Its own module so that the runner (`bench.run`) and the report (`bench.report`, which re-reads a saved
run's specs) both use it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

SUITE = Path(__file__).parent / "suite"


def suite_files() -> list[Path]:
    return sorted(SUITE.glob("*.mask"))


def selected(only: str | None, case: str) -> bool:
    """`--only a,b`: a case runs when its 'file:mask' contains any of the comma-separated texts."""
    return not only or any(part and part in case for part in only.split(","))


def suite_cases(files, only: str | None = None):
    """(path, spec, attention statement) of every case of the suite files that `only` selects."""
    from maskdsl.lang.parser import load

    for path in files:
        spec = load(path)
        for att in spec.attentions:
            if selected(only, f"{Path(path).stem}:{att.mask}"):
                yield path, spec, att
