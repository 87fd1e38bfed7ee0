"""The one output format bench/before_after.py reads from every benchmark."""

from __future__ import annotations


def report(name: str, value: float, unit: str) -> None:
    """Print `figure: NAME = VALUE UNIT` (NAME without spaces)."""
    print(f"figure: {name} = {value:.6g} {unit}", flush=True)
