"""Vertebra level names and TotalSegmentator "total" label ids.

TotalSegmentator (the tool most users get vertebra labels from) numbers the vertebrae
25 sacrum, 26 S1, 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1, and its Slicer
extension names the segments ``vertebrae_L3`` etc. The phantom uses the same ids.
"""
from __future__ import annotations

__all__ = ["LEVELS", "TOTALSEG_IDS", "level_id", "level_name", "parse_levels", "resolve_level", "describe_labels",
           "LevelError"]

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


class LevelError(ValueError):
    """A requested vertebra level that cannot be used (absent, cut by the scan's edge, unknown)."""


def describe_labels(labels, names: dict[int, str] | None = None) -> str:
    """"L1 (31), L2 (30), 7" for the given label values, using segment names when known."""
    out = []
    for v in sorted(int(x) for x in labels if int(x) != 0):
        if names and v in names:
            out.append(f"{names[v]} ({v})")
        elif v in _BY_ID:
            out.append(f"{_BY_ID[v]} ({v})")
        else:
            out.append(str(v))
    return ", ".join(out) if out else "none"


def _side(direction) -> str:
    """Anatomical name of the scan edge lying along an LPS direction."""
    import numpy as np

    ax = int(np.argmax(np.abs(direction)))
    pos = direction[ax] > 0
    return [("left side", "right side"), ("back", "front"), ("top", "bottom")][ax][0 if pos else 1]


def resolve_level(level, labelmap, names: dict[int, str] | None = None, *, source: str = "the segmentation",
                  allow_cut: bool = False) -> int:
    """The label value of a vertebra level in a label map.

    Args:
        level: a level name ("L3", "vertebrae_L3", "T12"), or an explicit label value (int or
            digits) for label maps whose numbering is not TotalSegmentator's.
        labelmap: a :class:`~RadGSRegLib.volume.Volume` of integer labels.
        names: segment names by label value (Slicer segmentations); a name match
            (``vertebrae_L3`` or ``L3``) wins over TotalSegmentator numbering.
        source: how to name the segmentation in error messages (e.g. its file).
        allow_cut: accept a level whose voxels touch the edge of the scan.
    Raises:
        LevelError: unknown name, level absent, or cut by the scan's edge.
    """
    import numpy as np

    present = np.unique(labelmap.array)
    if isinstance(level, (int, np.integer)) or str(level).strip().isdigit():
        value, what = int(level), f"label {int(level)}"
    else:
        text = str(level).strip()
        value = None
        if names:
            want = {text.lower(), f"vertebrae_{text}".lower()}
            for v, n in names.items():
                if str(n).lower() in want:
                    value = int(v)
            what = f"level {text}"
        if value is None:
            try:
                value = level_id(text)
            except ValueError as e:
                raise LevelError(str(e)) from None
            what = f"level {level_name(value)} (TotalSegmentator id {value})"
    if value not in present or value == 0:
        raise LevelError(f"{what} is absent from {source}; labels present: {describe_labels(present, names)}")
    if not allow_cut:
        kji = np.argwhere(labelmap.array == value)
        shape = np.array(labelmap.array.shape)
        cut = []
        for a in range(3):                                    # array axis a = volume axis 2 - a
            d = labelmap.affine[:3, 2 - a]
            for at_max, hit in ((False, kji[:, a].min() == 0), (True, kji[:, a].max() == shape[a] - 1)):
                if hit:
                    cut.append(_side(d if at_max else -d))
        if cut:
            complete = []
            for v in present:
                if v == 0:
                    continue
                idx = np.argwhere(labelmap.array == v)
                if idx.min() > 0 and np.all(idx.max(axis=0) < shape - 1):
                    complete.append(v)
            raise LevelError(f"{what} is cut by the edge of the scan in {source} (its voxels reach the "
                             f"{' and '.join(cut)} of the scan); complete levels: {describe_labels(complete, names)}")
    return value
