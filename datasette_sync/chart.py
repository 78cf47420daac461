"""The overview's activity chart: edits per device over time, as plain HTML bars.

The time axis is cut into at most ``MAX_SLICES`` slices of a round length (1 s, 5 min, 1 h,
1 day, ...) starting on a round time, so every axis label is a distinct round time. Each bar
prints its count; edits that are versions of an unresolved conflict are marked. The chart is
HTML rather than a scaled SVG so its text stays readable at phone width.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from . import queries

SECOND, MINUTE, HOUR, DAY = 1000, 60_000, 3_600_000, 86_400_000
YEAR = 365 * DAY
STEPS = [
    SECOND, 2 * SECOND, 5 * SECOND, 10 * SECOND, 15 * SECOND, 30 * SECOND,
    MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE,
    HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR,
    DAY, 2 * DAY, 7 * DAY, 14 * DAY, 30 * DAY, 91 * DAY, YEAR,
]  # fmt: skip
MAX_SLICES = 12
MAX_DEVICES = 8  # more rows would push the rest of the page away: the others are summed up


def read(conn, hidden: frozenset[str]) -> dict[str, Any] | None:
    """The chart's data from the log (None when nothing was edited yet)."""
    span = queries.activity_span(conn, hidden)
    if span is None:
        return None
    origin, step, slices = choose_slices(*span)
    return {"first": span[0], "last": span[1], "origin": origin, "step": step, "slices": slices,
            **queries.activity(conn, origin, step, hidden)}  # fmt: skip


def choose_slices(first: int, last: int) -> tuple[int, int, int]:
    """(origin, step, slices): the shortest round step that covers first..last (milliseconds)
    in at most MAX_SLICES slices, padded so that the axis labels fall evenly (see ``axis``)."""
    for step in STEPS:
        origin = first // step * step
        slices = (last - origin) // step + 1
        if slices <= MAX_SLICES:
            break
    else:
        step = math.ceil((last - first + 1) / (MAX_SLICES * YEAR)) * YEAR
        origin = first // step * step
        slices = (last - origin) // step + 1
    return origin, step, padded(slices)


def padded(slices: int) -> int:
    # 4, 6, 8 or 12 slices, so the labelled edges (label_steps) fall evenly and end on the
    # last edge; never fewer than 4, or a burst of edits within a second is one wide block.
    return next(size for size in (4, 6, 8, MAX_SLICES) if slices <= size)


def label_steps(slices: int) -> tuple[int, int]:
    """(every, every on a phone): which slice edges get a time label."""
    return (1, 2) if slices <= 6 else (2, 4)


def build(data: dict[str, Any] | None, label: Callable[[str], str]) -> dict[str, Any] | None:
    """Everything the template draws; ``label`` names a device."""
    if not data:
        return None
    rows = [device_row(row, data, label) for row in data["rows"]]
    rows.sort(key=lambda row: (not row["local"], -row["total"]))
    shown, rest = rows[:MAX_DEVICES], rows[MAX_DEVICES:]
    peak = max(max(row["counts"].values()) for row in rows)
    for row in shown:
        row["bars"] = bars(row, data, peak)
    total = sum(row["total"] for row in rows)
    in_conflict = sum(row["in_conflict"] for row in rows)
    return {
        "rows": shown,
        "more_devices": len(rest),
        "more_edits": sum(row["total"] for row in rest),
        "slices": data["slices"],
        "axis": axis(data),
        "any_conflict": in_conflict > 0,
        "caption": caption(data, total, len(rows), in_conflict),
        "ticks": data["ticks"],
        "step": duration(data["step"]),
        "peak": peak,
    }


def device_row(row: dict[str, Any], data: dict[str, Any], label: Callable[[str], str]) -> dict[str, Any]:
    total = sum(row["counts"].values())
    in_conflict = sum(row["conflicts"].values())
    summary = plural(total, "edit") + (f", {in_conflict} in conflict" if in_conflict else "")
    return {**row, "label": label(row["device_id"]), "total": total, "in_conflict": in_conflict, "summary": summary}


def bars(row: dict[str, Any], data: dict[str, Any], peak: int) -> list[dict[str, Any]]:
    found = []
    for index in range(data["slices"]):
        count = row["counts"].get(index, 0)
        conflicts = row["conflicts"].get(index, 0)
        start = data["origin"] + index * data["step"]
        end = start + data["step"]
        title = f"{row['label']}: {plural(count, 'edit')} from {stamp(start, True)} to {stamp(end, True)} UTC"
        if conflicts:
            title += f", {conflicts} in an unresolved conflict"
        found.append(
            {
                "count": count,
                "shown": compact(count),
                "conflicts": conflicts,
                "height": round(count / peak, 3),
                "conflict_share": round(100 * conflicts / count, 1) if count else 0,
                "title": title,
            }
        )
    return found


def axis(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The labelled slice edges: position (0..1), text, and whether a phone shows it."""
    slices, step, origin = data["slices"], data["step"], data["origin"]
    every, every_phone = label_steps(slices)
    one_day = origin // DAY == (origin + slices * step - 1) // DAY
    ticks = []
    for edge in range(0, slices + 1, every):
        moment = origin + edge * step
        ticks.append(
            {
                "position": round(edge / slices, 4),
                "text": edge_label(moment, step, one_day),
                "phone": edge % every_phone == 0,
                "edge": "start" if edge == 0 else "end" if edge == slices else "",
            }
        )
    return ticks


def edge_label(moment: int, step: int, one_day: bool) -> str:
    """The shortest text that tells the slice edges apart (the caption gives the date of a
    chart within one day)."""
    when = time.gmtime(moment // 1000)
    if step >= YEAR:
        return time.strftime("%Y", when)
    if step >= DAY:
        return time.strftime("%Y-%m-%d", when) if step >= 30 * DAY else f"{time.strftime('%b', when)} {when.tm_mday}"
    clock = time.strftime("%H:%M:%S" if step < MINUTE else "%H:%M", when)
    if one_day:
        return clock
    # Over several days a time of day repeats: name the day too.
    day = f"{time.strftime('%b', when)} {when.tm_mday}"
    return day if moment % DAY == 0 else f"{day} {clock}"


def caption(data: dict[str, Any], total: int, devices: int, in_conflict: int) -> str:
    first, last = stamp(data["first"], full=True), stamp(data["last"], full=True)
    if first[:10] == last[:10]:
        last = last[11:]
    text = f"{plural(total, 'edit')} by {plural(devices, 'device')}, from {first} to {last} UTC"
    if in_conflict:
        text += f"; {in_conflict} of them in unresolved conflicts"
    return text + "."


def stamp(moment: int, full: bool = False) -> str:
    when = time.gmtime(moment // 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S" if full else "%H:%M:%S", when)


def duration(step: int) -> str:
    for size, unit in ((YEAR, "year"), (DAY, "day"), (HOUR, "hour"), (MINUTE, "minute"), (SECOND, "second")):
        if step >= size and step % size == 0:
            return plural(step // size, unit)
    return f"{step} ms"


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def compact(count: int) -> str:
    """A count short enough for a narrow bar: 999, 1.2k, 12k, 1.2M."""
    if count < 1000:
        return str(count)
    size, suffix = (1_000_000, "M") if count >= 999_500 else (1000, "k")
    value = count / size
    return (f"{value:.1f}".rstrip("0").rstrip(".") if value < 9.95 else f"{value:.0f}") + suffix
