"""DiffDRR's render-and-compare registration (PyPI ``diffdrr`` 0.6.1) as a peer, DiffPose-style.

DiffDRR cannot be imported beside the project's torch (its torchvision breaks there), so it
runs in its own virtual environment, as a subprocess per case: :mod:`.diffdrr_runner`, run by
file path, imports only NumPy, torch and diffdrr. This side reads nothing but the case
(without its ground truth), writes the runner's input (.npz, in a private temporary folder),
runs it and reads back the pose. The peer environment::

    python3 -m venv .peers/diffdrr
    .peers/diffdrr/bin/pip install -r RadGSRegLib/bench/diffdrr-requirements.txt

is found by :func:`find_diffdrr_python`: ``--diffdrr-python PATH``, else the environment
variable ``RADGSREG_DIFFDRR_PYTHON``, else ``.peers/diffdrr/bin/python`` under the current
folder.

Geometry (NumPy, here, tested without DiffDRR; the runner's module docstring names the
frames):

- each of our views is DiffDRR's own detector (:func:`diffdrr_detector`): DiffDRR puts the
  source at its camera origin and pixel ``(row, col)`` at ``(delx * sx * (col - (W-1)/2) + x0,
  dely * ((H-1)/2 - row) + y0, sdd)`` (``sx`` = -1 with ``reverse_x_axis``, else +1;
  ``diffdrr/detector.py``, ``_initialize_carm`` and its calibration matrix). A view of ours
  maps onto it exactly: ``sdd`` is the source's distance from the detector plane, ``delx,
  dely`` the pixel spacing, ``(x0, y0)`` the detector centre in the camera frame (the
  principal point's offset), the camera's z axis from the source towards the plane, its y
  axis along ``-v`` (rows grow downwards) and its x axis along ``u`` or, with
  ``reverse_x_axis``, along ``-u``, whichever makes the camera frame right-handed (DiffDRR's
  poses are rotations; our standard views need ``reverse_x_axis=False``);
- DiffDRR's world is the CT frame with its origin moved to the vertebra's centroid (DiffDRR
  centres its volume on the world origin the same way, on the volume's centre), so that
  DiffDRR's ``euler_angles`` pose (``x_world = R (x_carm + t)``) turns the C-arm about the
  vertebra; the pose optimised is the C-arm's (``rig``, C-arm to world, :func:`rig_from_pose`),
  each view's DiffDRR pose is ``rig @ camera_to_carm``.

Registration (DiffPose-style, the best DiffDRR set-up of ``shared/docs/registration-lessons.md``;
:class:`DiffDRRConfig`): the CT as attenuation (:func:`RadGSRegLib.drr.hu_to_mu`, as our X-ray
simulation uses) in a slab around the vertebra along the spine, full axial extent; both X-rays
as line integrals, every pixel compared (as DiffPose does: no mask of any kind); Adam on
DiffDRR's multiscale NCC (whole image + 9 px patches, weights 0.5 / 0.5, DiffPose's) of both
views (their mean), three stages: 80 iterations on 8x-binned images blurred with sigma 3 px,
50 at sigma 1 px, 30 on 4x-binned images; DiffDRR's Siddon renderer; the pose after the last
step is the result. The learning rates are DiffPose's (7.5e-3 rad and 7.5 mm, StepLR 0.9 every 25
iterations) but for the first stage's rotation, doubled (1.5e-2 rad), and fall by stage (2.5e-3
rad and 2.5 mm, then 1e-3 rad and 1 mm). They were set on cases simulated for the purpose from
the sample CT (``simulate-cases --seed 777/778/779``, not a bench suite): with DiffPose's rates
7 of 8 starts (8-58 mm initial mTRE, 5-20 deg) ended at 0.3-1.1 mm, one with a 20 deg rotation
30 mm off; with the first stage's rotation rate doubled that one ended at 0.5 mm and the four
others tried again at 0.3-1.5 mm. Nothing else was tuned.

The slab is +-150 mm, not the lessons' +-70 mm: their detector saw less of the spine. Ours
(292.8 mm at 1124 mm, 182 mm at the isocentre) sees past the ends of a +-70 mm slab, and the
DRR's dark bands beyond them then dominate the NCC: on such a simulated case (L3, 8.4 mm
initial mTRE) the 8x-binned, blurred multiscale NCC at the true pose was 0.12 (-0.14 on the
AP view), no higher than at the initial pose, and the registration ended 35 mm off; with the
slab covering the field (+-110 mm or more) it is 0.99 at the true pose, falling off around
it, and the same case ends at 0.4 mm. Siddon's cost grows with the planes crossed, so the
larger slab costs little (the whole 3 mm sample CT: 335 planes per ray instead of 271).

Run time: ``runtime_s["total"]`` is the preparation here (slab, attenuation, binning,
geometry) plus the registration the runner times itself (its set-up and its stages); the
subprocess's interpreter start, its imports (~9 s) and the file transfer are excluded, and
recorded as ``runtime_s["subprocess_wall"]`` (the whole call).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import View, invert, translation
from ..io import Case, Result
from ..volume import Volume

__all__ = ["DiffDRRStage", "DiffDRRConfig", "DiffDRRDetector", "PeerNotFoundError", "diffdrr_detector",
           "rig_from_pose", "pose_from_rig", "find_diffdrr_python", "setup_commands", "prepare_inputs",
           "register_diffdrr", "render_diffdrr", "RUNNER", "REQUIREMENTS", "ENV_VAR"]

#: the runner, run by file path with the peer's python
RUNNER = Path(__file__).with_name("diffdrr_runner.py")
#: the peer environment's pinned packages (package data of RadGSRegLib.bench)
REQUIREMENTS = Path(__file__).with_name("diffdrr-requirements.txt")
#: the environment variable naming the peer's python
ENV_VAR = "RADGSREG_DIFFDRR_PYTHON"
#: the default peer environment, relative to the current folder
DEFAULT_VENV = Path(".peers") / "diffdrr"


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DiffDRRStage:
    """One Adam stage.

    Attributes:
        binning: detector binning (the X-ray block-averaged, the detector resized to match).
        sigma_px: Gaussian blur of X-ray and DRR alike, in binned pixels (0: none).
        iterations: Adam steps.
        lr_rot: learning rate of the Euler angles (rad).
        lr_trans: learning rate of the translation (mm).
    """

    binning: int
    sigma_px: float
    iterations: int
    lr_rot: float
    lr_trans: float


@dataclass(frozen=True)
class DiffDRRConfig:
    """The DiffDRR peer's settings (see the module docstring).

    Attributes:
        slab_mm: half-height (mm) of the CT slab around the vertebra, along the spine.
        stages: the Adam stages, in order.
        patch_sizes / patch_weights: DiffDRR's MultiscaleNormalizedCrossCorrelation2d (None:
            the whole image).
        lr_step / lr_gamma: the StepLR decay (every ``lr_step`` iterations, times ``lr_gamma``).
        convention: DiffDRR's Euler-angle convention of the pose.
        renderer: DiffDRR's renderer, "siddon" (its default) or "trilinear".
        timeout_s: the longest a case may take (the subprocess is ended after it).
    """

    slab_mm: float = 150.0
    stages: tuple = (DiffDRRStage(8, 3.0, 80, 1.5e-2, 7.5),
                     DiffDRRStage(8, 1.0, 50, 2.5e-3, 2.5),
                     DiffDRRStage(4, 0.0, 30, 1.0e-3, 1.0))
    patch_sizes: tuple = (None, 9)
    patch_weights: tuple = (0.5, 0.5)
    lr_step: int = 25
    lr_gamma: float = 0.9
    convention: str = "ZXY"
    renderer: str = "siddon"
    timeout_s: float = 1800.0

    def runner_config(self, views, threads: int) -> dict:
        """The runner's ``config`` (JSON form)."""
        return {"views": list(views), "stages": [asdict(s) for s in self.stages], "patch_sizes": list(self.patch_sizes),
                "patch_weights": list(self.patch_weights), "lr_step": self.lr_step, "lr_gamma": self.lr_gamma,
                "convention": self.convention, "renderer": self.renderer, "threads": int(threads)}


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class DiffDRRDetector:
    """A view of ours as DiffDRR's detector (``diffdrr.drr.DRR``'s intrinsic arguments) and
    the pose of its camera in the C-arm frame.

    Attributes:
        sdd: source-to-detector-plane distance (mm). height, width: rows, columns.
        delx, dely: pixel spacing along columns and rows (mm).
        x0, y0: the detector centre in the camera frame (mm): DiffDRR's principal point offsets.
        reverse_x_axis: DiffDRR's flag (columns run along the camera's -x).
        camera_to_carm: (4, 4) DiffDRR's camera frame (source at the origin, detector plane
            at z = sdd, ``reorient`` the identity) -> C-arm frame.
    """

    sdd: float
    height: int
    width: int
    delx: float
    dely: float
    x0: float
    y0: float
    reverse_x_axis: bool
    camera_to_carm: np.ndarray = field(repr=False)

    def intrinsics(self) -> np.ndarray:
        """(8,) ``sdd, height, width, delx, dely, x0, y0, reverse_x_axis`` (the runner's form)."""
        return np.array([self.sdd, self.height, self.width, self.delx, self.dely, self.x0, self.y0,
                         float(self.reverse_x_axis)])

    def camera_targets(self) -> np.ndarray:
        """(height, width, 3) the pixel centres in the camera frame (mm), as DiffDRR places
        them (``Detector._initialize_carm``, then its calibration matrix)."""
        col = np.arange(self.width) - (self.width - 1) / 2.0
        row = (self.height - 1) / 2.0 - np.arange(self.height)
        x = self.delx * (-col if self.reverse_x_axis else col) + self.x0
        y = self.dely * row + self.y0
        out = np.empty((self.height, self.width, 3))
        out[..., 0], out[..., 1], out[..., 2] = x[None, :], y[:, None], self.sdd
        return out

    def project(self, points_camera) -> np.ndarray:
        """(..., 3) camera-frame mm -> (..., 2) ``(column, row)`` pixels of this detector
        (our convention: pixel centres at integers; DiffDRR's ``perspective_projection``
        gives these + 0.5)."""
        p = np.asarray(points_camera, dtype=np.float64)
        x = p[..., 0] * self.sdd / p[..., 2]
        y = p[..., 1] * self.sdd / p[..., 2]
        col = (x - self.x0) / self.delx
        col = (-col if self.reverse_x_axis else col) + (self.width - 1) / 2.0
        row = (self.height - 1) / 2.0 - (y - self.y0) / self.dely
        return np.stack([col, row], axis=-1)


def diffdrr_detector(view: View) -> DiffDRRDetector:
    """The view as DiffDRR's detector (exact: see the module docstring)."""
    s = view.source
    c = view.detector_center
    n = view.normal if float(view.normal @ (c - s)) > 0 else -view.normal     # source -> detector plane
    e_y = -view.v
    reverse = bool(np.linalg.det(np.stack([view.u, e_y, n], axis=1)) < 0)
    e_x = -view.u if reverse else view.u
    R = np.stack([e_x, e_y, n], axis=1)                     # columns: the camera's axes in the C-arm frame
    cam = np.eye(4)
    cam[:3, :3], cam[:3, 3] = R, s
    d = R.T @ (c - s)
    (su, sv), (cols, rows) = view.pixel_spacing, view.size
    return DiffDRRDetector(sdd=float(d[2]), height=int(rows), width=int(cols), delx=float(su), dely=float(sv),
                           x0=float(d[0]), y0=float(d[1]), reverse_x_axis=reverse, camera_to_carm=cam)


def rig_from_pose(T_ct_to_carm, centre_ct) -> np.ndarray:
    """(4, 4) the C-arm -> DiffDRR world transform of a pose: the world is the CT frame with
    its origin at ``centre_ct`` (3,) CT mm."""
    return translation(-np.asarray(centre_ct, dtype=np.float64)) @ invert(np.asarray(T_ct_to_carm, dtype=np.float64))


def pose_from_rig(rig, centre_ct) -> np.ndarray:
    """(4, 4) ``T_ct_to_carm`` of a C-arm -> world transform (the inverse of :func:`rig_from_pose`)."""
    return invert(np.asarray(rig, dtype=np.float64)) @ translation(-np.asarray(centre_ct, dtype=np.float64))


# ------------------------------------------------------------------ the peer environment
class PeerNotFoundError(InputError):
    """No usable python of the DiffDRR peer environment; the message says how to make one."""


def setup_commands() -> list[str]:
    """The two commands that create the default peer environment (run in the current folder)."""
    req = REQUIREMENTS
    try:
        req = req.relative_to(Path.cwd())
    except ValueError:
        pass
    return [f"python3 -m venv {DEFAULT_VENV}", f"{DEFAULT_VENV / 'bin' / 'pip'} install -r {req}"]


def find_diffdrr_python(explicit=None, *, probe: bool = True) -> Path:
    """The DiffDRR peer's python: ``explicit`` (``--diffdrr-python``), else the environment
    variable ``RADGSREG_DIFFDRR_PYTHON``, else ``.peers/diffdrr/bin/python`` under the current
    folder. With ``probe``, checks (in about a second) that it finds torch and diffdrr.

    Raises:
        PeerNotFoundError: naming where it looked and giving the commands that make one.
    """
    if explicit is not None:
        path, where = Path(explicit), f"--diffdrr-python {explicit}"
    elif os.environ.get(ENV_VAR):
        path, where = Path(os.environ[ENV_VAR]), f"{ENV_VAR}={os.environ[ENV_VAR]}"
    else:
        path, where = Path.cwd() / DEFAULT_VENV / "bin" / "python", f"the default {DEFAULT_VENV / 'bin' / 'python'}"
    how = ("create it with: " + " && ".join(setup_commands()) + f" (or name another with --diffdrr-python PATH or "
           f"{ENV_VAR})")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PeerNotFoundError(f"the DiffDRR peer needs its own python environment; {where}: no python at {path}; "
                                + how)
    if probe:
        code = ("import importlib.util, sys; "
                "sys.exit(0 if all(importlib.util.find_spec(m) for m in ('numpy', 'torch', 'diffdrr')) else 3)")
        try:
            res = subprocess.run([str(path), "-I", "-c", code], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerNotFoundError(f"{where}: {path} does not run ({e}); " + how) from None
        if res.returncode != 0:
            raise PeerNotFoundError(f"{where}: {path} does not have numpy, torch and diffdrr; " + how)
    return path


# ------------------------------------------------------------------ the case -> the runner's input
def _centre(case: Case) -> np.ndarray:
    """(3,) CT mm: the vertebra's centroid (the CT's centre when the case has no label)."""
    if case.seg is not None and case.vertebra_label is not None:
        return case.seg.label_centroid(case.vertebra_label)
    return case.ct.index_to_world((np.asarray(case.ct.size) - 1) / 2.0)


def _view_inputs(out: dict, name: str, view: View, image, binnings) -> None:
    """Adds a view's camera and, per binning, its binned image and intrinsics to ``out``."""
    from ..xray import resize_view_image

    out[f"{name}_camera"] = diffdrr_detector(view).camera_to_carm
    for b in binnings:
        size = (max(1, view.size[0] // b), max(1, view.size[1] // b))
        img, v = resize_view_image(np.asarray(image, np.float32), view, size)
        out[f"{name}_b{b}_image"] = np.ascontiguousarray(img, dtype=np.float32)
        out[f"{name}_b{b}_intrinsics"] = diffdrr_detector(v).intrinsics()


def _volume_inputs(ct: Volume, centre) -> dict:
    from ..drr import hu_to_mu

    return {"density": hu_to_mu(ct.array), "affine": translation(-np.asarray(centre, dtype=np.float64)) @ ct.affine}


def prepare_inputs(case: Case, config: DiffDRRConfig = DiffDRRConfig(), *, threads: int = 1) -> tuple[dict, np.ndarray]:
    """The runner's input for a case (its ground truth is never read) and the world's
    centre (3,) CT mm: the attenuation of the CT slab around the vertebra (1/mm), its affine
    into the world, the initial rig (from ``case.initial_guess``, else the identity pose),
    each view's camera and, per binning of the stages, its X-ray as line integrals and
    its intrinsics, and the runner's config (JSON)."""
    from ..register.target import slab_around
    from ..xray import as_line_integral

    centre = _centre(case)
    out = _volume_inputs(slab_around(case.ct, centre, config.slab_mm), centre)
    T0 = case.initial_guess if case.initial_guess is not None else np.eye(4)
    out["rig"] = rig_from_pose(T0, centre)
    binnings = sorted({s.binning for s in config.stages})
    for name in ("ap", "lat"):
        _view_inputs(out, name, case.views[name], as_line_integral(case.xrays[name], case.image_kind), binnings)
    out["config"] = np.array(json.dumps(config.runner_config(("ap", "lat"), threads)))
    return out, centre


def _run(python: Path, mode: str, inputs: dict, timeout: float, threads: int, suffix: str):
    """Runs the runner on ``inputs`` in a private temporary folder; returns (its output
    path's content: a dict, wall seconds)."""
    with tempfile.TemporaryDirectory(prefix="radgsreg-diffdrr-") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / f"out{suffix}"
        np.savez(src, **inputs)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t = time.perf_counter()
        try:
            res = subprocess.run([str(python), "-I", str(RUNNER), mode, str(src), str(dst)], capture_output=True,
                                 text=True, timeout=timeout, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the DiffDRR runner took longer than {timeout:.0f} s") from None
        wall = time.perf_counter() - t
        if res.returncode != 0 or not dst.is_file():
            tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"the DiffDRR runner ({python} {RUNNER.name} {mode}) failed with exit code "
                               f"{res.returncode}:\n{tail}")
        if suffix == ".json":
            return json.loads(dst.read_text()), wall
        with np.load(dst) as z:
            return {k: z[k] for k in z.files}, wall


def register_diffdrr(case: Case, *, python=None, threads: int = 1, config: DiffDRRConfig = DiffDRRConfig()) -> Result:
    """DiffDRR registration of a case from its initial pose (see the module docstring), in
    the peer environment (``python``: :func:`find_diffdrr_python`'s choice when None), torch
    at ``threads`` threads. Returns a :class:`~RadGSRegLib.io.Result` like
    :func:`RadGSRegLib.register.run`: ``T_ct_to_carm`` (4, 4), ``runtime_s`` (``total``:
    preparation + the runner's own registration time; ``subprocess_wall``: the whole call),
    ``info`` (the stages' seconds and NCC, the peer's versions)."""
    python = Path(python) if python is not None else find_diffdrr_python()
    t0 = time.perf_counter()
    inputs, centre = prepare_inputs(case, config, threads=threads)
    prep = time.perf_counter() - t0
    out, wall = _run(python, "register", inputs, config.timeout_s, threads, ".json")
    runtime = {"preprocessing": prep, "diffdrr_setup": out["setup_s"]}
    for i, st in enumerate(out["stages"]):
        runtime[f"diffdrr_stage{i + 1}_{st['binning']}x"] = st["seconds"]
    runtime["total"] = prep + out["registration_s"]
    runtime["subprocess_wall"] = wall
    info = {"init": "none", "refine": "diffdrr", "stages": out["stages"], "warnings": [],
            "peer": {"python": str(python), "torch": out["torch"], "diffdrr": out["diffdrr"], "threads": out["threads"],
                     "convention": config.convention, "renderer": config.renderer}}
    return Result(T_ct_to_carm=pose_from_rig(np.asarray(out["rig"]), centre), runtime_s=runtime, info=info)


def render_diffdrr(ct: Volume, views: dict[str, View], T_ct_to_carm, *, python=None, points_ct=None,
                   renderer: str = "siddon") -> dict:
    """DiffDRR's own DRRs of ``ct`` (HU -> attenuation, 1/mm) at ``T_ct_to_carm`` through
    each view as its detector, for checking the geometry. Returns {view: {"drr": (rows, cols)
    line integrals, "pixels": (N, 2) DiffDRR's projection of ``points_ct`` (N, 3) CT mm in our
    pixel convention (column, row; centres at integers), "source": (3,) and "targets":
    (rows, cols, 3) DiffDRR's ray ends, C-arm mm}}."""
    python = Path(python) if python is not None else find_diffdrr_python()
    centre = ct.index_to_world((np.asarray(ct.size) - 1) / 2.0)
    inputs = _volume_inputs(ct, centre)
    rig = rig_from_pose(T_ct_to_carm, centre)
    inputs["rig"] = rig
    pts = np.zeros((1, 3)) if points_ct is None else np.asarray(points_ct, dtype=np.float64).reshape(-1, 3)
    inputs["points"] = pts - centre
    for name, v in views.items():
        inputs[f"{name}_camera"] = diffdrr_detector(v).camera_to_carm
        inputs[f"{name}_b1_intrinsics"] = diffdrr_detector(v).intrinsics()
    inputs["config"] = np.array(json.dumps({"views": list(views), "render_binning": 1, "renderer": renderer,
                                            "threads": 1}))
    out, _ = _run(python, "render", inputs, 600.0, 1, ".npz")
    to_carm = invert(rig)
    res = {}
    for name in views:
        tg = out[f"{name}_targets"].astype(np.float64)
        res[name] = {"drr": out[f"{name}_drr"], "pixels": out[f"{name}_pixels"].astype(np.float64) - 0.5,
                     "source": to_carm[:3, :3] @ out[f"{name}_source"] + to_carm[:3, 3],
                     "targets": tg @ to_carm[:3, :3].T + to_carm[:3, 3]}
    return res
