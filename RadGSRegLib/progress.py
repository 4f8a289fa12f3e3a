"""Structured progress of a registration: events, their JSON-lines form, and the parser.

``radgsreg register --progress json`` writes one JSON object per line on standard output
(its human log goes to standard error), and the Slicer module reads those lines, never the
log text. One event::

    {"event": "progress", "stage": "refine2d", "fraction": 0.62, "message": "candidate 2/3, level 1/3"}

``event`` is "progress" (``stage`` one of :data:`STAGES`, ``fraction`` of the whole job in
[0, 1], never decreasing), "warning" (``message``), "done" (``fraction`` 1, ``message`` the
result folder) or "error" (``message``: the one-line reason). Fields may be added later;
readers ignore those they do not know.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable, Optional

__all__ = ["STAGES", "EVENTS", "ProgressEvent", "to_json_line", "parse_line", "Reporter"]

#: Stages of one registration in order, with the fraction of the job done when each starts
#: (from measured stage times of the default pipeline: search ~20 %, 2-D/3-D refinement ~75 %).
#: "metal" finds the metal in the X-rays (:mod:`RadGSRegLib.learned.metal`). "reconstruct" is the Gaussian fit that 3-D/3-D refinement needs without a network; "output"
#: the one that ``reconstruct=True`` asks for at the end.
STAGES = {"start": 0.0, "read": 0.01, "preprocessing": 0.03, "metal": 0.04, "search": 0.05, "learned": 0.25, "reconstruct": 0.27,
          "refine3d": 0.32, "refine2d": 0.35, "check": 0.88, "output": 0.9, "write": 0.98}
EVENTS = ("progress", "warning", "done", "error")


@dataclass(frozen=True)
class ProgressEvent:
    """One event of a running registration (see the module docstring)."""

    event: str
    stage: str = ""
    fraction: float = 0.0
    message: str = ""


def to_json_line(ev: ProgressEvent) -> str:
    """The event as one line of JSON (no newline)."""
    return json.dumps(asdict(ev), ensure_ascii=True)


def parse_line(line: str) -> Optional[ProgressEvent]:
    """The event a line holds, or None for a line that is not an event (blank, log text,
    JSON of another shape). Unknown extra fields are ignored."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("event") not in EVENTS:
        return None
    try:
        fraction = float(data.get("fraction", 0.0))
    except (TypeError, ValueError):
        return None
    return ProgressEvent(event=str(data["event"]), stage=str(data.get("stage", "")),
                         fraction=min(max(fraction, 0.0), 1.0), message=str(data.get("message", "")))


class Reporter:
    """Turns stage names into monotone :class:`ProgressEvent` s for a sink (a callable).

    ``stage(name, message, within=(i, n))`` reports stage ``name`` at its start fraction, or
    ``i / n`` of the way to the next stage's; fractions never go backwards.
    """

    def __init__(self, sink: Optional[Callable[[ProgressEvent], None]]):
        self.sink = sink
        self.fraction = 0.0

    def stage(self, name: str, message: str = "", within: tuple = (0, 1)) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown progress stage {name!r}; stages: {', '.join(STAGES)}")
        start = STAGES[name]
        later = [v for v in STAGES.values() if v > start]
        end = min(later) if later else 1.0
        i, n = within
        f = start + (end - start) * (i / max(n, 1))
        self.fraction = max(self.fraction, min(f, 1.0))
        if self.sink:
            self.sink(ProgressEvent("progress", name, round(self.fraction, 4), message))

    def warning(self, message: str) -> None:
        if self.sink:
            self.sink(ProgressEvent("warning", "", round(self.fraction, 4), message))
