"""The registration case folder and the result folder (``shared/docs/case-format.md``).

Readers validate every field once, here, and raise :class:`CaseFormatError` naming the file
and field. Writers refuse to overwrite an existing folder unless ``overwrite=True``, replace
only a folder RadGSReg wrote as the same kind (:func:`~RadGSRegLib.io.outputs.check_output`),
and write atomically (a temp folder, marked ``.radgsreg.json``, renamed into place).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..geometry import View, is_rigid
from ..volume import Volume
from .atomic import atomic_dir, atomic_file
from .errors import CaseFormatError
from .images import read_label_map, read_volume, read_xray, write_volume, write_xray
from .transforms import read_transform, write_transform

__all__ = ["Case", "Result", "read_case", "write_case", "read_geometry", "write_geometry",
           "write_result", "read_result", "IMAGE_KINDS", "VIEW_NAMES"]

IMAGE_KINDS = ("line_integral", "intensity")
VIEW_NAMES = ("ap", "lat")


@dataclass
class Case:
    """One vertebra-level CT <-> biplanar X-ray registration problem, in memory.

    Attributes:
        ct: CT in HU, CT frame. seg: label map on the CT grid, or None.
        vertebra_label / vertebra_name: the target level (None: the whole CT).
        views: {"ap": View, "lat": View} in the C-arm frame.
        xrays: {"ap": (rows, cols) float32, "lat": ...}.
        image_kind: "line_integral" (bone bright) or "intensity" (bone dark).
        initial_guess: (4, 4) ``T_ct_to_carm`` to start from, or None.
        ground_truth: (4, 4) ``T_ct_to_carm``, only when read with ``ground_truth=True`` (or
            ``"if-present"`` and the case has one).
        extra: other keys of case.json, kept as they are (e.g. generator provenance).
        warnings: what :func:`read_case` found implausible but possible
            (:func:`RadGSRegLib.checks.check_case`), in words; not written.
        checked: the plausibility checks ran (``warnings`` are their result), so that
            :func:`RadGSRegLib.register.run` does not run them again.
    """

    ct: Volume
    views: dict[str, View]
    xrays: dict[str, np.ndarray]
    image_kind: str = "line_integral"
    seg: Volume | None = None
    vertebra_label: int | None = None
    vertebra_name: str | None = None
    initial_guess: np.ndarray | None = None
    ground_truth: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    path: Path | None = None
    warnings: list = field(default_factory=list)
    checked: bool = False


@dataclass
class Result:
    """What ``register`` returns and writes: the pose and what came with it."""

    T_ct_to_carm: np.ndarray
    runtime_s: dict = field(default_factory=dict)
    recon: Volume | None = None
    info: dict = field(default_factory=dict)
    #: DRRs of the CT at ``T_ct_to_carm``, {"ap", "lat"}: line integrals ``[row, column]`` on
    #: each X-ray's pixel grid (``RegisterConfig.drrs``), for an X-ray/DRR overlay
    drrs: dict | None = None


# ------------------------------------------------------------------ helpers
def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CaseFormatError(path, None, "file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CaseFormatError(path, None, f"not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise CaseFormatError(path, None, "expected a JSON object at the top level")
    return data


def _numbers(file, fld, value, shape) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CaseFormatError(file, fld, f"expected numbers of shape {shape}, got {value!r}") from None
    if a.shape != tuple(shape):
        raise CaseFormatError(file, fld, f"expected shape {tuple(shape)}, got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise CaseFormatError(file, fld, "contains NaN or infinite values")
    return a


def _pose(file, fld, value) -> np.ndarray:
    if not isinstance(value, dict) or "T_ct_to_carm" not in value:
        raise CaseFormatError(file, fld, 'expected {"T_ct_to_carm": 4x4 matrix}')
    T = _numbers(file, f"{fld}.T_ct_to_carm", value["T_ct_to_carm"], (4, 4))
    if not is_rigid(T, tol=1e-4):
        raise CaseFormatError(file, f"{fld}.T_ct_to_carm", "not a rigid transform (orthonormal rotation, last row 0 0 0 1)")
    return T


def _view(file, name: str, d) -> tuple[View, str | None]:
    fld = f"views.{name}"
    if not isinstance(d, dict):
        raise CaseFormatError(file, fld, "expected an object")
    for key in ("source", "detector_origin", "detector_u", "detector_v", "pixel_spacing", "size"):
        if key not in d:
            raise CaseFormatError(file, f"{fld}.{key}", "missing")
    vals = {k: _numbers(file, f"{fld}.{k}", d[k], (3,)) for k in ("source", "detector_origin", "detector_u", "detector_v")}
    for k in ("detector_u", "detector_v"):
        if abs(np.linalg.norm(vals[k]) - 1) > 1e-4:
            raise CaseFormatError(file, f"{fld}.{k}", f"must be a unit vector (its length is {np.linalg.norm(vals[k]):.6g})")
    if abs(vals["detector_u"] @ vals["detector_v"]) > 1e-4:
        raise CaseFormatError(file, f"{fld}.detector_v", "must be orthogonal to detector_u")
    sp = _numbers(file, f"{fld}.pixel_spacing", d["pixel_spacing"], (2,))
    if np.any(sp <= 0):
        raise CaseFormatError(file, f"{fld}.pixel_spacing", f"must be positive, got {sp.tolist()}")
    size = _numbers(file, f"{fld}.size", d["size"], (2,))
    if np.any(size < 1) or np.any(size != np.round(size)):
        raise CaseFormatError(file, f"{fld}.size", f"must be two positive integers [columns, rows], got {d['size']}")
    try:
        view = View(vals["source"], vals["detector_origin"], vals["detector_u"], vals["detector_v"],
                    tuple(sp), tuple(int(x) for x in size), name=name)
    except ValueError as e:
        raise CaseFormatError(file, fld, f"singular or invalid geometry: {e}") from None
    if "projection_matrix" in d:
        P = _numbers(file, f"{fld}.projection_matrix", d["projection_matrix"], (3, 4))
        Q = view.projection_matrix()
        if not np.allclose(P / np.linalg.norm(P), Q / np.linalg.norm(Q), atol=1e-6) and \
           not np.allclose(P / np.linalg.norm(P), -Q / np.linalg.norm(Q), atol=1e-6):
            raise CaseFormatError(file, f"{fld}.projection_matrix", "disagrees with the source/detector fields")
    image = d.get("image")
    if image is not None and not isinstance(image, str):
        raise CaseFormatError(file, f"{fld}.image", "expected a file name")
    return view, image


def read_geometry(path) -> tuple[dict[str, View], dict[str, str | None], str]:
    """Read ``geometry.json``: ({name: View}, {name: image file or None}, image_kind)."""
    path = Path(path)
    g = _load_json(path)
    kind = g.get("image_kind", "line_integral")
    if kind not in IMAGE_KINDS:
        raise CaseFormatError(path, "image_kind", f"must be one of {IMAGE_KINDS}, got {kind!r}")
    views_d = g.get("views")
    if not isinstance(views_d, dict):
        raise CaseFormatError(path, "views", 'missing; expected {"ap": {...}, "lat": {...}}')
    views, images = {}, {}
    for name in VIEW_NAMES:
        if name not in views_d:
            raise CaseFormatError(path, f"views.{name}", f"missing (views present: {sorted(views_d)})")
        views[name], images[name] = _view(path, name, views_d[name])
    return views, images, kind


def write_geometry(views: dict[str, View], path, *, image_kind: str = "line_integral",
                   images: dict[str, str] | None = None) -> None:
    """Write ``geometry.json`` (with each view's projection matrix, for external tools).

    Atomically (a temp file renamed onto ``path``); an existing file is replaced."""
    if image_kind not in IMAGE_KINDS:
        raise ValueError(f"image_kind must be one of {IMAGE_KINDS}, got {image_kind!r}")
    out = {"image_kind": image_kind, "views": {}}
    for name, v in views.items():
        d = {"image": (images or {}).get(name, f"xray_{name}.nrrd")}
        d.update(v.to_dict())
        d["projection_matrix"] = v.projection_matrix().tolist()
        out["views"][name] = d
    text = json.dumps(out, indent=2)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text)


# ------------------------------------------------------------------ case
def read_case(path, *, ground_truth: bool | str = False, check: bool = True) -> Case:
    """Read and validate a case folder: every field well formed and, with ``check``, every
    input physically plausible (:mod:`RadGSRegLib.checks`: the C-arm, the CT in Hounsfield
    units, the X-rays and their kind). What cannot be right raises
    :class:`~RadGSRegLib.io.CaseFormatError` naming the file and field; what is only unusual
    is kept in ``Case.warnings``.

    Args:
        path: the folder (or its case.json).
        ground_truth: whether to read case.json's ``ground_truth`` into ``Case.ground_truth``:
            ``False`` (default) leaves it out, whatever the file holds: registration never asks
            for it; ``True`` requires it (evaluation, training: a case without one is a
            CaseFormatError); ``"if-present"`` reads it when the case has one and leaves
            ``None`` otherwise (tools that show or score the truth when there is one: ``show``,
            ``fit-gaussians``). A ground truth that is there is validated in both modes.
        check: run the plausibility checks (off only for tests of the format itself).
    """
    from .. import checks
    if not (isinstance(ground_truth, bool) or ground_truth == "if-present"):
        raise ValueError(f"ground_truth must be False, True or 'if-present', not {ground_truth!r}")
    path = Path(path)
    if path.is_file() and path.name == "case.json":
        path = path.parent
    if not path.is_dir():
        raise CaseFormatError(path, None, "case folder not found")
    cj = path / "case.json"
    c = _load_json(cj)

    ct_name = c.get("ct")
    if not isinstance(ct_name, str):
        raise CaseFormatError(cj, "ct", "missing; expected the CT file name (e.g. \"ct.nrrd\")")
    ct = read_volume(path / ct_name, field="ct")
    warnings = []
    if check:
        warnings += _plausible(lambda: checks.check_ct(ct), {"ct": path / ct_name})

    seg, label, name = None, None, c.get("vertebra_name")
    has_seg, has_label = c.get("segmentation") is not None, c.get("vertebra_label") is not None
    if has_seg != has_label:
        raise CaseFormatError(cj, "segmentation" if has_label else "vertebra_label",
                              "'segmentation' and 'vertebra_label' go together: give both or neither")
    if has_seg:
        if not isinstance(c["segmentation"], str):
            raise CaseFormatError(cj, "segmentation", "expected a file name")
        label = c["vertebra_label"]
        if not isinstance(label, int) or isinstance(label, bool):
            raise CaseFormatError(cj, "vertebra_label", f"expected an integer label, got {label!r}")
        seg = read_label_map(path / c["segmentation"], field="segmentation")
        if not seg.same_grid(ct):
            raise CaseFormatError(path / c["segmentation"], "segmentation",
                                  f"not on the CT grid (seg size {seg.size}, CT size {ct.size}; origin/spacing/direction must match)")
        present = np.unique(seg.array)
        if label not in present:
            raise CaseFormatError(cj, "vertebra_label", f"label {label} is absent from {c['segmentation']} "
                                  f"(labels present: {[int(x) for x in present if x != 0]})")

    g_name = c.get("geometry", "geometry.json")
    if not isinstance(g_name, str):
        raise CaseFormatError(cj, "geometry", "expected a file name")
    views, images, kind = read_geometry(path / g_name)
    if check:
        warnings += _plausible(lambda: [w for vn, v in views.items() for w in checks.check_view(v, vn)]
                               + checks.check_pair(views), {"views": path / g_name})
    xrays = {}
    for vn, view in views.items():
        img_name = images[vn] or f"xray_{vn}.nrrd"
        img = read_xray(path / img_name, field=f"views.{vn}.image")
        if img.shape != view.shape:
            raise CaseFormatError(path / img_name, f"views.{vn}.size",
                                  f"image is {img.shape[1]} columns x {img.shape[0]} rows, geometry says {view.size[0]} x {view.size[1]}")
        if check:
            warnings += _plausible(lambda: checks.check_xray(img, kind, f"views.{vn}.image"),
                                   {f"views.{vn}.image": path / img_name})
        xrays[vn] = img

    init = _pose(cj, "initial_guess", c["initial_guess"]) if c.get("initial_guess") is not None else None
    gt = None
    if ground_truth is True and c.get("ground_truth") is None:
        raise CaseFormatError(cj, "ground_truth", "missing (this case has no known answer)")
    if ground_truth and c.get("ground_truth") is not None:
        gt = _pose(cj, "ground_truth", c["ground_truth"])
    known = {"ct", "segmentation", "vertebra_label", "vertebra_name", "geometry", "initial_guess", "ground_truth"}
    extra = {k: v for k, v in c.items() if k not in known}
    case = Case(ct=ct, views=views, xrays=xrays, image_kind=kind, seg=seg, vertebra_label=label,
                vertebra_name=name, initial_guess=init, ground_truth=gt, extra=extra, path=path)
    if check:
        files = {"ct": path / ct_name, "views": path / g_name, "segmentation": cj, "vertebra_label": cj,
                 "initial_guess": cj, **{f"views.{vn}.image": path / (images[vn] or f"xray_{vn}.nrrd")
                                         for vn in views}}
        more = _plausible(lambda: checks.check_consistency(case, warnings), files)   # the parts: checked above
        case.warnings = list(dict.fromkeys(warnings + more))          # each once, in order
        case.checked = True
    return case


def _plausible(run, files: dict) -> list:
    """Run a plausibility check; its refusal becomes a CaseFormatError naming the file that
    holds the field (the longest matching prefix of ``files``)."""
    from ..checks import PlausibilityError

    try:
        return run()
    except PlausibilityError as e:
        key = max((k for k in files if e.field == k or e.field.startswith(k + ".") or e.field.startswith(k + "[")),
                  key=len, default=None)
        raise CaseFormatError(files[key] if key else "the case", e.field, e.detail) from None


def write_case(case: Case, path, *, overwrite: bool = False, ct_dtype: str = "int16", inputs=()) -> Path:
    """Write a case folder atomically (ct.nrrd, seg.nrrd, xray_ap/lat.nrrd, geometry.json, case.json,
    and the marker .radgsreg.json of kind "case").

    ``ct_dtype="int16"`` (default) stores the CT as whole Hounsfield units, as scanners do
    (a quarter of the float32 size); ``"float32"`` keeps it exactly. ``overwrite`` replaces
    only a case folder RadGSReg wrote; ``inputs`` (files and folders read to make the case)
    must not be, hold or contain ``path`` (:func:`~RadGSRegLib.io.outputs.check_output`).
    """
    if ct_dtype not in ("int16", "float32"):
        raise ValueError(f"ct_dtype must be 'int16' or 'float32', not {ct_dtype!r}")
    path = Path(path)
    if set(case.views) != set(VIEW_NAMES) or set(case.xrays) != set(VIEW_NAMES):
        raise ValueError(f"a case needs views and X-rays named {VIEW_NAMES}")
    for vn, v in case.views.items():
        if case.xrays[vn].shape != v.shape:
            raise ValueError(f"X-ray '{vn}' has shape {case.xrays[vn].shape}, its view expects {v.shape}")
    with atomic_dir(path, overwrite, kind="case", inputs=inputs) as tmp:
        ct_arr = case.ct.array
        if ct_dtype == "int16":
            ct_arr = np.clip(np.rint(ct_arr), -32768, 32767).astype(np.int16)
        write_volume(Volume(ct_arr.astype(ct_dtype, copy=False), case.ct.affine), tmp / "ct.nrrd")
        c = {"ct": "ct.nrrd"}
        if case.seg is not None:
            write_volume(Volume(case.seg.array.astype(np.int16 if case.seg.array.max() < 32767 else np.int32),
                                case.seg.affine), tmp / "seg.nrrd")
            c["segmentation"] = "seg.nrrd"
            c["vertebra_label"] = int(case.vertebra_label)
        if case.vertebra_name:
            c["vertebra_name"] = case.vertebra_name
        c["geometry"] = "geometry.json"
        for vn, v in case.views.items():
            write_xray(case.xrays[vn], tmp / f"xray_{vn}.nrrd", pixel_spacing=v.pixel_spacing)
        write_geometry(case.views, tmp / "geometry.json", image_kind=case.image_kind)
        if case.initial_guess is not None:
            c["initial_guess"] = {"T_ct_to_carm": np.asarray(case.initial_guess).tolist()}
        if case.ground_truth is not None:
            c["ground_truth"] = {"T_ct_to_carm": np.asarray(case.ground_truth).tolist()}
        c.update(case.extra)
        (tmp / "case.json").write_text(json.dumps(c, indent=2))
    return path


# ------------------------------------------------------------------ result
def write_result(result: Result, path, *, overwrite: bool = False, inputs=()) -> Path:
    """Write the result folder: result.json, transform.h5, recon.nrrd, drr_ap.nrrd and
    drr_lat.nrrd (the last three when the result has them), and the marker
    .radgsreg.json of kind "result". ``overwrite`` replaces only a result folder RadGSReg
    wrote; ``inputs`` are protected as in :func:`~RadGSRegLib.io.outputs.check_output`."""
    from .. import __version__

    path = Path(path)
    T = np.asarray(result.T_ct_to_carm, dtype=np.float64)
    if not is_rigid(T):
        raise ValueError("result.T_ct_to_carm must be a rigid 4x4 matrix")
    with atomic_dir(path, overwrite, kind="result", inputs=inputs) as tmp:
        write_transform(T, tmp / "transform.h5")
        if result.recon is not None:
            write_volume(result.recon, tmp / "recon.nrrd")
        for name, image in (result.drrs or {}).items():
            write_xray(image, tmp / f"drr_{name}.nrrd")
        out = {"T_ct_to_carm": T.tolist(),
               "runtime_s": {k: float(v) for k, v in result.runtime_s.items()},
               "version": __version__}
        out.update(result.info)
        (tmp / "result.json").write_text(json.dumps(out, indent=2, default=_json_default))
    return path


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_result(path) -> Result:
    """Read a result folder; checks that result.json and transform.h5 agree."""
    path = Path(path)
    rj = path / "result.json"
    r = _load_json(rj)
    if "T_ct_to_carm" not in r:
        raise CaseFormatError(rj, "T_ct_to_carm", "missing")
    T = _numbers(rj, "T_ct_to_carm", r["T_ct_to_carm"], (4, 4))
    if not is_rigid(T, tol=1e-4):
        raise CaseFormatError(rj, "T_ct_to_carm", "not a rigid transform")
    if (path / "transform.h5").exists():
        T2 = read_transform(path / "transform.h5", field="transform")
        if not np.allclose(T, T2, atol=1e-4):
            raise CaseFormatError(path / "transform.h5", None, "disagrees with result.json's T_ct_to_carm")
    recon = read_volume(path / "recon.nrrd", field="recon") if (path / "recon.nrrd").exists() else None
    drrs = {name: read_xray(path / f"drr_{name}.nrrd", field=f"drr_{name}")
            for name in ("ap", "lat") if (path / f"drr_{name}.nrrd").exists()} or None
    info = {k: v for k, v in r.items() if k not in ("T_ct_to_carm", "runtime_s")}
    runtime = r.get("runtime_s", {})
    if not isinstance(runtime, dict) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in runtime.values()):
        raise CaseFormatError(rj, "runtime_s", "expected {stage: seconds}")
    return Result(T_ct_to_carm=T, runtime_s=runtime, recon=recon, info=info, drrs=drrs)
