"""Where RadGSReg may write: one decision, made before any work, and the marks that make it.

Every command decides *before it computes anything* whether its output location may be
written (:func:`check_output` for a folder, :func:`check_output_file` for a PNG or JSON
file) and raises :class:`~RadGSRegLib.errors.OutputError` naming the option and path when
not. The rules:

* a path that exists is replaced only with ``overwrite`` (``--overwrite``); an empty
  folder counts as free;
* even with ``overwrite``, RadGSReg replaces only **its own previous output of the same
  kind** (and says so first, with or without ``overwrite``); a folder holding anything else ("holds files RadGSReg did not write (e.g.
  notes.txt)"), a folder of another kind, a file where a folder is wanted (and vice
  versa) are refused;
* an output never equals an input, lies inside one, or holds one (replacing it would
  delete the input); symbolic links are resolved first;
* the location must be writable: a temporary file is created and removed in the nearest
  existing folder, so a read-only location fails before the work, not after it.

How RadGSReg recognises its own output
--------------------------------------
*Folders* carry a marker file, ``.radgsreg.json`` = ``{"written_by": "RadGSReg", "kind":
K, "version": RadGSRegLib.__version__, "created": ISO 8601 UTC time}``, with ``K`` one
of :data:`FOLDER_KINDS`; :func:`~RadGSRegLib.io.atomic.atomic_dir` writes it last, into
the temporary folder, so it arrives with the complete folder. A folder is our previous
output of kind ``K`` when

* its marker says ``K`` and every entry is one kind ``K`` writes (:data:`LAYOUTS`: e.g. a
  result folder holds result.json, transform.h5, recon.nrrd, drr_ap/lat.nrrd); sub-folders are checked the same way (a suite's ``case_NNN``
  folders as case folders), or
* (legacy: written before markers existed) it has no marker, holds only entries kind
  ``K`` writes, and something in it proves that RadGSReg wrote it: our generator's
  record in case.json, our version in result.json, fit.json's source and config, a
  training config.json with every field as a run dumps it (see ``_provably_ours``). File names alone prove
  nothing (a hand-made case folder has the same names), and a legacy phantom folder
  (ct.nrrd + seg.nrrd) never counts as ours.

A marker alone is not enough: a file someone added to one of our folders (notes.txt in a
result folder) makes it foreign, so ``--overwrite`` never deletes it. Hidden leftovers of
our own interrupted writes (``.NAME.*`` beside a file or folder the kind writes) and
desktop litter (.DS_Store, Thumbs.db, desktop.ini) do not count.

*JSON files* (evaluation, benchmarks) carry a top-level key ``"radgsreg": {"kind": K,
"version": ..., "created": ...}`` (:func:`write_json`); legacy files are recognised by
their exact set of top-level keys. *PNG files* carry a tEXt chunk ``Software:
RadGSReg <version>`` and one ``RadGSReg`` holding the same JSON stamp
(:func:`write_png`); a legacy ``preview.png`` (no text chunk) counts as ours when it lies
in a case or demo folder of ours.
"""
from __future__ import annotations

import datetime
import fnmatch
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .. import __version__
from ..errors import OutputError
from .atomic import OutputExistsError, atomic_file

__all__ = ["MARKER", "FOLDER_KINDS", "FILE_KINDS", "LAYOUTS", "Layout", "stamp", "read_marker", "write_marker",
           "why_not_ours", "why_not_own_file", "check_output", "check_output_file", "write_json", "write_png",
           "check_writable",
           "OutputExistsError"]

#: the marker file in every folder RadGSReg writes
MARKER = ".radgsreg.json"


@dataclass(frozen=True)
class Layout:
    """What a kind of folder holds: file name patterns and sub-folder patterns (-> their kind)."""

    files: tuple[str, ...]
    dirs: dict = field(default_factory=dict)


_CASE_DIR = "case_[0-9][0-9][0-9]*"

#: the folder kinds and what each writes (the internal ones, "train-data" and
#: "tensorboard", only occur inside a training run)
LAYOUTS: dict[str, Layout] = {
    "case": Layout(("case.json", "ct.nrrd", "seg.nrrd", "xray_ap.nrrd", "xray_lat.nrrd", "geometry.json",
                    "preview.png")),
    "result": Layout(("result.json", "transform.h5", "recon.nrrd", "drr_ap.nrrd", "drr_lat.nrrd")),
    "fit": Layout(("gaussians.npz", "recon.nrrd", "fit.json")),
    "phantom": Layout(("ct.nrrd", "seg.nrrd")),
    "suite": Layout(("summary.json",), {_CASE_DIR: "case"}),
    "demo": Layout(("preview.png",), {"case": "case", "result": "result"}),
    "train": Layout(("config.json", "checkpoint.pt", "checkpoint.tmp", "log.jsonl", "model.pt"),
                    {"data": "train-data", "tensorboard": "tensorboard"}),
    "train-data": Layout(("samples-*.pt",)),
    "train-metal": Layout(("data.pt", "history.json", "metal_seg.pt")),
    "tensorboard": Layout(("events.out.tfevents.*",)),
}
#: the kinds a command may name in check_output / atomic_dir
FOLDER_KINDS = ("case", "result", "fit", "suite", "phantom", "demo", "train", "train-metal")
#: single-file kinds -> format
FILE_KINDS = {"evaluation": "json", "bench-drr": "json", "bench-register": "json", "bench-gaussians": "json",
              "bench-metal": "json", "bench-train": "json", "bench-recon": "json", "preview": "png", "batch": "json"}
#: top-level keys of each JSON kind as written before the "radgsreg" stamp existed
_LEGACY_JSON_KEYS = {
    "evaluation": {"cases", "results", "summary", "rows", "missing"},
    "bench-drr": {"workload", "threads", "repeat", "methods"},
    "bench-gaussians": {"threads", "repeat", "rows", "goals"},
    "bench-register": {"device", "threads", "model", "suites", "methods"},
}
_LITTER = {".DS_Store", "Thumbs.db", "desktop.ini"}


def stamp(kind: str) -> dict:
    """``{"written_by": "RadGSReg", "kind", "version", "created"}`` for a marker or a JSON stamp."""
    return {"written_by": "RadGSReg", "kind": kind, "version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ------------------------------------------------------------------ folders
def read_marker(folder) -> dict | None:
    """The folder's marker as a dict with a string "kind", or None (absent or unreadable)."""
    try:
        d = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("kind"), str) else None


def write_marker(folder, kind: str) -> Path:
    """Write (atomically) the marker of an existing folder, e.g. a training run folder that
    its writer fills in place. Atomic writers (:func:`~RadGSRegLib.io.atomic.atomic_dir`
    with ``kind``) write it themselves."""
    _known_kind(kind)
    path = Path(folder) / MARKER
    text = json.dumps(stamp(kind), indent=1)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text)
    return path


def _match(name: str, patterns) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def _our_leftover(name: str, layout: Layout) -> bool:
    """A hidden temp of our own atomic writers: ``.NAME.*`` for a NAME this kind writes."""
    return name.startswith(".") and any(fnmatch.fnmatchcase(name, f".{p}.*")
                                        for p in (*layout.files, *layout.dirs))


def _foreign(folder: Path, kind: str, rel: str) -> list[str]:
    """Relative paths under ``folder`` that kind ``kind`` does not write (with a note for
    sub-folders of the wrong kind)."""
    layout = LAYOUTS[kind]
    bad = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        n, r = e.name, rel + e.name
        if n == MARKER or n in _LITTER:
            continue
        if e.is_dir(follow_symlinks=False):
            pat = _match(n, layout.dirs)
            if pat is None:
                if not _our_leftover(n, layout):
                    bad.append(r + "/")
                continue
            sub = layout.dirs[pat]
            marker = read_marker(e.path)
            if marker is not None and marker["kind"] != sub:
                bad.append(f"{r}/ (a RadGSReg {marker['kind']} folder)")
                continue
            inner = _foreign(Path(e.path), sub, r + "/")
            if inner:
                bad.extend(inner)
            elif marker is None and not _provably_ours(Path(e.path), sub) and any(os.scandir(e.path)):
                bad.append(f"{r}/ (nothing in it shows RadGSReg wrote it)")
        elif e.is_file(follow_symlinks=False) and (_match(n, layout.files) or _our_leftover(n, layout)):
            continue
        else:
            bad.append(r + ("/" if e.is_dir() else ""))
    return bad


def _json_keys(path: Path) -> set:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def _provably_ours(folder: Path, kind: str) -> bool:
    """Is a folder without a marker (written before markers existed) provably ours? Only
    what our writers put in a file counts, never file names alone (a hand-made case folder
    has the same names): case.json with our generator's ``generator`` record, result.json
    with our ``version``, fit.json with ``source`` and ``config``, a suite's summary.json
    next to such cases, a demo's case/ and result/, a training run's config.json as a run
    dumps it (every field). A phantom folder (ct.nrrd, seg.nrrd) holds nothing that proves
    it: never. The parts of a training run (data/, tensorboard/) are judged by their files."""
    if kind in ("train-data", "tensorboard"):
        return True
    if kind == "case":
        return "generator" in _json_keys(folder / "case.json")
    if kind == "result":
        return "version" in _json_keys(folder / "result.json") and (folder / "transform.h5").is_file()
    if kind == "fit":
        return {"source", "config"} <= _json_keys(folder / "fit.json")
    if kind == "suite":
        cases = [d for d in folder.iterdir() if d.is_dir() and fnmatch.fnmatchcase(d.name, _CASE_DIR)]
        return bool(cases) and all(_provably_ours(d, "case") for d in cases)
    if kind == "demo":
        return _provably_ours(folder / "case", "case") and (folder / "result").is_dir()
    if kind == "train":                  # config.json as train dumps it: every field, e.g. these
        return _TRAIN_CONFIG_KEYS <= _json_keys(folder / "config.json")
    return False


#: fields of the config.json a training run writes (all of TrainConfig's), which a config
#: written by hand rarely has all of
_TRAIN_CONFIG_KEYS = {"stage", "out", "data_cache", "lambda_ssim", "input_rot_deg", "rec_epochs"}


def why_not_ours(folder, kind: str) -> str | None:
    """None when ``folder`` is RadGSReg's own previous output of ``kind`` (see the module
    docstring); else why not, as the end of a sentence ("holds files RadGSReg did not write
    (e.g. notes.txt)")."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is not None and marker["kind"] != kind:
        return f"is a RadGSReg {marker['kind']} folder, not a {kind} folder"
    bad = _foreign(folder, kind, "")
    if bad:
        return f"holds files RadGSReg did not write (e.g. {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})"
    if marker is None and not _provably_ours(folder, kind):
        return f"has no {MARKER} marker and nothing in it shows RadGSReg wrote it as a {kind} folder"
    return None


# ------------------------------------------------------------------ files
def why_not_own_file(path, kind: str) -> str | None:
    """None when the existing file ``path`` is RadGSReg's own ``kind`` file; else why not."""
    path = Path(path)
    fmt = FILE_KINDS[kind]
    if fmt == "json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return "was not written by RadGSReg (not a JSON file)"
        if isinstance(data, dict):
            st = data.get("radgsreg")
            if isinstance(st, dict) and isinstance(st.get("kind"), str):
                return None if st["kind"] == kind else f"is a RadGSReg {st['kind']} file, not {kind}"
            if set(data) == _LEGACY_JSON_KEYS.get(kind):
                return None
        return 'was not written by RadGSReg (it has no top-level "radgsreg" key)'
    # png
    try:
        from PIL import Image

        with Image.open(path) as im:
            fmt_ok = im.format == "PNG"
            text = dict(getattr(im, "text", {}) or {})
    except Exception:                      # noqa: BLE001 - not an image at all
        return "was not written by RadGSReg (not a PNG image)"
    if fmt_ok and str(text.get("Software", "")).startswith("RadGSReg"):
        try:
            k = json.loads(text.get("RadGSReg", "{}")).get("kind", kind)
        except (ValueError, AttributeError):
            k = kind
        return None if k == kind else f"is a RadGSReg {k} image, not {kind}"
    if fmt_ok and kind == "preview" and path.name == "preview.png" and \
            any(why_not_ours(path.parent, k) is None for k in ("case", "demo")):
        return None                        # legacy: CASE/preview.png (show), OUT/preview.png (demo) of earlier versions
    return "was not written by RadGSReg (no 'Software: RadGSReg' text in the PNG)"


# ------------------------------------------------------------------ paths
def _resolve(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(p))))


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normcase(str(a)) == os.path.normcase(str(b))


def _within(child: Path, parent: Path) -> bool:
    """``child`` lies strictly inside ``parent`` (both resolved)."""
    return any(_same(a, parent) for a in child.parents)


def _label(path, option) -> str:
    return f"{option} {path}" if option else str(path)


def _inputs(inputs) -> list[tuple[str, Path]]:
    return [(str(i), _resolve(i)) for i in (inputs or ()) if i is not None and str(i) != ""]


def check_writable(rp: Path, label: str, *, inside: bool = False) -> None:
    """Refuse when a folder above ``rp`` is a file, or the nearest existing one cannot be
    written (a temp file is created and removed there). ``inside``: files go into ``rp``
    itself (a training run folder), so an existing ``rp`` is the one probed; otherwise the
    folder is replaced from beside it (:func:`~RadGSRegLib.io.atomic.atomic_dir`)."""
    rp = Path(rp)
    candidates = ([rp] if inside else []) + list(rp.parents)
    anc = next((a for a in candidates if os.path.lexists(a)), None)
    if anc is None:                                          # pragma: no cover - the root always exists
        raise OutputError(f"{label}: no existing folder above it")
    if not anc.is_dir():
        raise OutputError(f"{label}: {anc} is a file, not a folder, so nothing can be written under it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".radgsreg-probe-", dir=anc)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f"{label}: cannot write in {anc} ({e.strerror or e}); choose a writable location") from None


def check_output(path, kind: str, *, overwrite: bool, inputs: Iterable = (), option: str | None = None) -> Path:
    """Decide, before any work, whether the output *folder* ``path`` of ``kind`` may be written.

    Args:
        path: the folder a command will write (whole, with :func:`atomic_dir`).
        kind: one of :data:`FOLDER_KINDS`.
        overwrite: ``--overwrite`` was given: an existing folder that is our own previous
            output of ``kind`` may be replaced (or, for "train", resumed).
        inputs: the files and folders the command reads (None entries are skipped); the output
            must not be one, lie inside one, or hold one.
        option: the option that named ``path`` (e.g. "--out"), for the messages.

    Returns ``Path(path)``. Raises :class:`OutputExistsError` (an OutputError and a
    FileExistsError) when it exists without ``overwrite``, :class:`OutputError` otherwise.
    """
    _known_kind(kind)
    if str(path).strip() == "":
        raise OutputError(f"{option or 'the output'} is empty; give a folder path")
    p = Path(path)
    rp = _resolve(p)
    label = _label(p, option)
    if rp.parent == rp:
        raise OutputError(f"{label} is a filesystem root; choose a folder to write")
    cwd = _resolve(Path.cwd())
    if _same(rp, cwd) or _within(cwd, rp):
        raise OutputError(f"{label} is (or holds) the current folder; replacing it would pull the folder from under "
                          "you: choose a new folder")
    if rp.is_dir() and rp.stat().st_dev != rp.parent.stat().st_dev:
        raise OutputError(f"{label} is a mount point; RadGSReg writes a new folder beside the old one and swaps "
                          "them, which a mount point does not allow: give a folder inside it")
    for name, ri in _inputs(inputs):
        if _same(rp, ri):
            raise OutputError(f"{label} is the input {name}; writing there would destroy it: choose another folder")
        if _within(rp, ri):
            raise OutputError(f"{label} lies inside the input {name}; RadGSReg does not write into its inputs: "
                              "choose a folder outside it")
        if _within(ri, rp):
            raise OutputError(f"{label} holds the input {name}; replacing the folder would delete it: "
                              "choose another folder")
    if os.path.lexists(rp):
        if not rp.is_dir():
            raise OutputError(f"{label} is a file, not a folder; choose a folder path")
        if any(os.scandir(rp)):
            why = why_not_ours(rp, kind)                    # said first: --overwrite would not help
            if why is not None:
                raise OutputError(f"{label} {why}; RadGSReg replaces only a {kind} folder it wrote itself, even "
                                  "with --overwrite: choose another folder (or empty this one)")
            if not overwrite:
                raise OutputExistsError(f"{label} exists; pass --overwrite to replace it")
    check_writable(rp, label)
    return p


def check_output_file(path, kind: str, *, overwrite: bool, inputs: Iterable = (), allow_in: Iterable = (),
                      option: str | None = None) -> Path:
    """Decide, before any work, whether the output *file* ``path`` of ``kind`` may be written.

    Args:
        path: the PNG or JSON file.
        kind: one of :data:`FILE_KINDS` ("evaluation", "bench-drr", "bench-register",
            "bench-gaussians", "preview").
        overwrite: an existing file that RadGSReg wrote as ``kind`` may be replaced; a file
            we did not write never is.
        inputs: files and folders the command reads: the output must not be one or lie inside one,
        allow_in: ... except directly in one of these folders (``show``'s default
            CASE/preview.png, ``evaluate``'s default RESULTS/evaluation.json).
        option: the option that named ``path`` (e.g. "--json"), for the messages.
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown file kind {kind!r}; choose from {sorted(FILE_KINDS)}")
    p = Path(path)
    rp = _resolve(p)
    label = _label(p, option)
    allowed = [_resolve(a) for a in (allow_in or ()) if a is not None]
    for name, ri in _inputs(inputs):
        if _same(rp, ri):
            raise OutputError(f"{label} is the input {name}; writing there would destroy it: choose another file")
        if _within(rp, ri) and not any(_same(rp.parent, a) for a in allowed):
            raise OutputError(f"{label} lies inside the input {name}; RadGSReg does not write into its inputs: "
                              "choose a file outside it")
    if os.path.lexists(rp):
        if rp.is_dir():
            raise OutputError(f"{label} is a folder, not a file; choose a file path")
        why = why_not_own_file(rp, kind)                    # said first: --overwrite would not help
        if why is not None:
            raise OutputError(f"{label} {why}; RadGSReg replaces only its own {kind} file, even with --overwrite: "
                              "choose another file")
        if not overwrite:
            raise OutputExistsError(f"{label} exists; pass --overwrite to replace it")
    check_writable(rp, label)
    return p


def _known_kind(kind: str) -> None:
    if kind not in FOLDER_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; choose from {FOLDER_KINDS}")


# ------------------------------------------------------------------ writers
def write_json(path, data: dict, kind: str, *, overwrite: bool = True, inputs: Iterable = (),
               allow_in: Iterable = (), default=None, indent: int = 2) -> Path:
    """Write ``{"radgsreg": stamp(kind), **data}`` atomically, after :func:`check_output_file`
    (``overwrite=True``: our own earlier ``kind`` file is replaced, any other file refused)."""
    check_output_file(path, kind, overwrite=overwrite, inputs=inputs, allow_in=allow_in)
    payload = {"radgsreg": stamp(kind), **{k: v for k, v in data.items() if k != "radgsreg"}}
    text = json.dumps(payload, indent=indent, default=default)    # fails here, before the disk is touched
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_png(image, path, kind: str = "preview", *, overwrite: bool = True, inputs: Iterable = (),
              allow_in: Iterable = ()) -> Path:
    """Write an (rows, cols[, 3]) uint8 array or a PIL image as a PNG atomically, with the
    text chunks ``Software: RadGSReg <version>`` and ``RadGSReg: <stamp JSON>``."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    check_output_file(path, kind, overwrite=overwrite, inputs=inputs, allow_in=allow_in)
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    info = PngInfo()
    info.add_text("Software", f"RadGSReg {__version__}")
    info.add_text("RadGSReg", json.dumps(stamp(kind)))
    with atomic_file(path, overwrite=True) as tmp:
        im.save(tmp, format="PNG", pnginfo=info)
    return Path(path)
