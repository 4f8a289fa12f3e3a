"""Vertebra level names and TotalSegmentator "total" label ids.

TotalSegmentator (the tool most users get vertebra labels from) numbers the vertebrae
25 sacrum, 26 S1, 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1, and its Slicer
extension names the segments ``vertebrae_L3`` etc. The phantom uses the same ids.
"""
from __future__ import annotations

__all__ = ["LEVELS", "TOTALSEG_IDS", "level_id", "level_name", "parse_levels", "resolve_level", "describe_labels",
           "LevelError", "level_of_segment_name", "named_segment"]

import re

from .errors import InputError

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


_SEGMENT_NAME = re.compile(r"(?:vertebrae?[\s_-]*)?([a-z]+[0-9]*)(?:[\s_-]*vertebrae?)?")
_GENERIC_NAME = re.compile(r"(?:segment|label)[\s_-]*[0-9]+", re.IGNORECASE)


_REGION_NAME = re.compile(r"(cervical|thoracic|lumbar|sacral)[\s_-]*vertebrae?[\s_-]*([0-9]{1,2})")
_REGIONS = {"cervical": "C", "thoracic": "T", "lumbar": "L", "sacral": "S"}
_VERTEBRAL = re.compile(r"vert|sacr|lumb|thorac|cervic|(^|[^a-z])[ctls][0-9]{1,2}($|[^0-9])")


def level_of_segment_name(name: str) -> str | None:
    """The level a segment's name stands for ("vertebrae_L3", "L3 vertebra", "l3", "lumbar
    vertebra 3" -> "L3"; "sacrum" -> "sacrum"), or None for names that are not a level
    ("Segment_29", "liver")."""
    text = str(name).strip().lower()
    m = _REGION_NAME.fullmatch(text)
    if m:
        key = _REGIONS[m.group(1)] + str(int(m.group(2)))
    else:
        m = _SEGMENT_NAME.fullmatch(text)
        if not m:
            return None
        key = "sacrum" if m.group(1) == "sacrum" else m.group(1).upper()
    return key if key in TOTALSEG_IDS else None


def _names_another_structure(name: str, level: str) -> bool:
    """Does a segment's own name say it is not ``level``: another level ("vertebrae_L4"), or a
    structure that is no vertebra at all ("liver")? Generic names ("Segment_29") and vertebral
    names we cannot parse ("vertebral body, third lumbar") do not."""
    if _GENERIC_NAME.fullmatch(str(name).strip()):
        return False
    parsed = level_of_segment_name(name)
    if parsed is not None:
        return parsed != level
    return not _VERTEBRAL.search(str(name).strip().lower())


def named_segment(text: str, names: dict[int, str] | None) -> int | None:
    """The label value of the segment ``text`` names: a segment whose name is ``text``
    (any case), else one named for the same level ("L3" finds "vertebrae_L3" or "L3
    vertebra"); None when no segment matches."""
    text = str(text).strip()
    for v, n in (names or {}).items():
        if str(n).strip().lower() == text.lower():
            return int(v)
    wanted = level_of_segment_name(text)
    if wanted:
        for v, n in (names or {}).items():
            if level_of_segment_name(n) == wanted:
                return int(v)
    return None


class LevelError(InputError):
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
                  allow_cut: bool = False, positional: bool = False) -> int:
    """The label value of a vertebra level in a label map.

    Args:
        level: a level name ("L3", "vertebrae_L3", "T12"), or an explicit label value (int or
            digits) for label maps whose numbering is not TotalSegmentator's.
        labelmap: a :class:`~RadGSRegLib.volume.Volume` of integer labels.
        names: segment names by label value (Slicer segmentations); a name match
            (``vertebrae_L3`` or ``L3``) wins over TotalSegmentator numbering.
        source: how to name the segmentation in error messages (e.g. its file).
        allow_cut: accept a level whose voxels touch the edge of the scan.
        positional: the label values are segment positions, not the segments' own values
            (:attr:`~RadGSRegLib.io.segmentation.Segmentation.positional`): a level given as
            a label value or a TotalSegmentator name is refused; segment names still work.
    Raises:
        LevelError: unknown name, level absent, or cut by the scan's edge.
    """
    import numpy as np

    present = np.unique(labelmap.array)
    numeric = isinstance(level, (int, np.integer)) or str(level).strip().isdigit()
    if positional and numeric:
        raise LevelError(f"{source} has segments that share a label value (several layers), so a label value "
                         f"cannot name one; choose the vertebra by its segment name: "
                         f"{', '.join(str(n) for n in (names or {}).values())}")
    if numeric:
        value, what = int(level), f"label {int(level)}"
    else:
        text = str(level).strip()
        value = named_segment(text, names)
        if value is not None:
            what = f"segment {names[value]!r}"
        if value is None and positional:
            raise LevelError(f"no segment of {source} is named for {text!r}, and its label values are positions, "
                             f"not TotalSegmentator ids; segments: {', '.join(str(n) for n in (names or {}).values())}")
        if value is None:
            try:
                value = level_id(text)
            except ValueError as e:
                raise LevelError(str(e)) from None
            what = f"level {level_name(value)} (TotalSegmentator id {value})"
            # a segment that names itself as something else is not this level
            own = names.get(value) if names else None
            if own is not None and _names_another_structure(own, level_name(value)):
                raise LevelError(f"{what}: in {source} label {value} is the segment {own!r}, not this level; "
                                 f"labels present: {describe_labels(present, names)}")
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
