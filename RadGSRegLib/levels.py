"""Vertebra level names and TotalSegmentator "total" label ids.

TotalSegmentator (the tool most users get vertebra labels from) numbers the vertebrae
25 sacrum, 26 S1, 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1, and its Slicer
extension names the segments ``vertebrae_L3`` etc. The phantom uses the same ids.
"""
from __future__ import annotations

__all__ = ["LEVELS", "TOTALSEG_IDS", "level_id", "level_name", "parse_levels"]

#: Level names from the top of the spine down.
LEVELS = tuple([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)] + ["S1"])

#: name -> TotalSegmentator "total" id
TOTALSEG_IDS = {**{f"C{i}": 51 - i for i in range(1, 8)},       # C1 50 ... C7 44
                **{f"T{i}": 44 - i for i in range(1, 13)},      # T1 43 ... T12 32
                **{f"L{i}": 32 - i for i in range(1, 6)},       # L1 31 ... L5 27
                "S1": 26, "sacrum": 25}
_BY_ID = {v: k for k, v in TOTALSEG_IDS.items()}


def level_id(name: str) -> int:
    """TotalSegmentator id of a level name ("L3" -> 29; also accepts "vertebrae_L3")."""
    key = name.strip()
    if key.lower().startswith("vertebrae_"):
        key = key[len("vertebrae_"):]
    key = key.upper() if key.lower() != "sacrum" else "sacrum"
    if key not in TOTALSEG_IDS:
        raise ValueError(f"unknown vertebra level {name!r}; expected a name like L3, T12, C7, S1")
    return TOTALSEG_IDS[key]


def level_name(label: int) -> str:
    """Level name of a TotalSegmentator id (29 -> "L3")."""
    if int(label) not in _BY_ID:
        raise ValueError(f"{label} is not a TotalSegmentator vertebra id (25..50)")
    return _BY_ID[int(label)]


def parse_levels(text: str) -> list[str]:
    """"L1,L2, l3" -> ["L1", "L2", "L3"] (validated)."""
    out = [t.strip() for t in str(text).split(",") if t.strip()]
    if not out:
        raise ValueError("no vertebra level given (e.g. --levels L1,L2)")
    return [level_name(level_id(t)) for t in out]
