"""Durations on the command line: `40ms`, `2s`, `5m`, `1h`, or a bare number in the option's own unit."""

from __future__ import annotations

import argparse

_SCALE_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(text: str, *, bare_unit: str) -> float:
    """Seconds in `text`; a number without a suffix is in `bare_unit` ('ms' or 's')."""
    assert bare_unit in _SCALE_S, bare_unit
    value = text.strip().lower()
    number, factor = value, _SCALE_S[bare_unit]
    for suffix in ("ms", "s", "m", "h"):  # "ms" before "s" and "m"
        if value.endswith(suffix):
            number, factor = value[: -len(suffix)], _SCALE_S[suffix]
            break
    try:
        return float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 40ms, 60s or 5m") from None
