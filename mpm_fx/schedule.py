"""The schedule: which encoder blocks to merge before. Imports nothing heavy (no torch), so
command lines check a schedule before they load a model."""

from __future__ import annotations

import operator

from mpm_fx.errors import ScheduleError

__all__ = ["PAPER_SCHEDULE", "normalize_schedule", "parse_schedule", "as_int"]

PAPER_SCHEDULE = (2, 5)


def as_int(value):
    """``value`` as an int if it is an integer of any kind but a bool, else None (block indices
    and counts: ``True`` is no index)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def normalize_schedule(schedule) -> tuple:
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise ScheduleError(f"schedule must be a sequence of block indices such as (2, 5), "
                            f"got {schedule!r}")
    blocks = []
    for entry in schedule:
        k = as_int(entry)
        if k is None:
            kind = "a bool" if isinstance(entry, bool) else "not an int"
            raise ScheduleError(f"schedule entry {entry!r} is {kind}: the schedule holds 0-based "
                                "encoder block indices, e.g. (2, 5)")
        if k < 0:
            raise ScheduleError(f"schedule entry {k} is negative: use 0-based block indices "
                                "counted from the first encoder block")
        if k in blocks:
            raise ScheduleError(f"block {k} appears twice in the schedule {tuple(schedule)}: "
                                "each block is merged before at most once")
        blocks.append(k)
    return tuple(sorted(blocks))


def parse_schedule(text: str) -> tuple:
    """'2,5' -> (2, 5), as ``normalize_schedule`` checks it; raises ScheduleError."""
    entries = [k.strip() for k in text.split(",") if k.strip()]
    blocks = []
    for k in entries:
        try:
            blocks.append(int(k))
        except ValueError:
            raise ScheduleError(f"schedule entry {k!r} in {text!r} is not an int: a schedule is "
                                "comma-separated 0-based block indices, e.g. 2,5") from None
    return normalize_schedule(blocks)
