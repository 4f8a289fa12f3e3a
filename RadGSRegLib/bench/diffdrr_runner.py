"""DiffDRR's render-and-compare registration, run inside DiffDRR's own environment.

DiffDRR (PyPI ``diffdrr``) cannot be imported beside the project's torch, so the peer runs
in a separate virtual environment (``RadGSRegLib/bench/diffdrr-requirements.txt``) as a
subprocess, this file run by its path::

    PEER_PYTHON diffdrr_runner.py register IN.npz OUT.json
    PEER_PYTHON diffdrr_runner.py render IN.npz OUT.npz

It imports only the standard library, NumPy, torch and diffdrr (never RadGSRegLib, which
the peer environment does not have). :mod:`RadGSRegLib.bench.diffdrr_peer` writes its input
and reads its output; the geometry (each view as a DiffDRR detector, the poses) is computed
there, in NumPy, and tested without DiffDRR.

Frames (mm):

* **world**: DiffDRR's world, the CT frame shifted so that its origin is the rotation centre
  (the vertebra's centroid); the volume's ``affine`` maps voxel ``(i, j, k)`` to it.
* **C-arm**: the case's C-arm frame. ``rig`` (4, 4) maps C-arm to world (the inverse of the
  pose, shifted); it is what is optimised.
* **camera** (one per view): DiffDRR's detector frame with its ``reorient`` the identity:
  the source at the origin, the detector plane at ``z = sdd``. ``<view>_camera`` (4, 4)
  maps it to the C-arm frame, so the view's DiffDRR pose (camera to world) is
  ``rig @ camera``.

Input (``.npz``): ``density`` (K, J, I) float32 attenuation (1/mm), ``affine`` (4, 4),
``rig`` (4, 4), ``config`` (a JSON string), per view ``<view>_camera`` (4, 4) and per
detector binning ``b`` ``<view>_b<b>_image`` (H, W) float32 (the X-ray as line integrals,
``[row, column]``) and ``<view>_b<b>_intrinsics`` (8,): ``sdd, height, width, delx, dely,
x0, y0, reverse_x_axis`` as :class:`diffdrr.drr.DRR` takes them. ``render`` also reads
``points`` (N, 3) world mm.

``register`` (DiffPose-style): the pose parameterised as DiffDRR's ``euler_angles``
(``config["convention"]``, radians) and translation (mm; ``x_world = R (x_carm + t)``, so a
rotation turns the C-arm about the world origin), Adam maximising the mean over the views of
DiffDRR's :class:`~diffdrr.metrics.MultiscaleNormalizedCrossCorrelation2d` between each
view's DRR and its X-ray, in stages (``config["stages"]``: detector binning, Gaussian blur
sigma in binned pixels applied to both images, iterations, learning rates; a StepLR decay
every ``lr_step`` iterations by ``lr_gamma``, as DiffPose). Writes JSON: the final ``rig``,
``registration_s`` (set-up of the DRR modules and every stage, timed here: the interpreter's
start, the imports and the file transfer excluded), per stage its seconds and NCC.

``render`` writes, per view, DiffDRR's DRR at ``rig`` (``<view>_drr`` (H, W)), its own
projection of ``points`` (``<view>_pixels`` (N, 2), DiffDRR's pixel coordinates: pixel
centres at +0.5) and its rays (``<view>_source`` (3,), ``<view>_targets`` (H, W, 3) world mm).
"""
from __future__ import annotations

import json
import math
import sys
import time
from types import SimpleNamespace

import numpy as np


def _subject(density: np.ndarray, affine: np.ndarray):
    """The part of a torchio Subject that :class:`diffdrr.drr.DRR` reads: the volume's
    affine, the density indexed ``[i, j, k]``, no mask, the identity ``reorient``."""
    import torch

    data = torch.from_numpy(np.ascontiguousarray(np.asarray(density, np.float32).transpose(2, 1, 0)))
    return SimpleNamespace(volume=SimpleNamespace(affine=np.asarray(affine, np.float64)),
                           density=SimpleNamespace(data=data[None]), mask=None, reorient=torch.eye(4))


def _drr(subject, intrinsics, renderer: str):
    from diffdrr.drr import DRR

    sdd, height, width, delx, dely, x0, y0, reverse = (float(x) for x in intrinsics)
    return DRR(subject, sdd=sdd, height=int(height), width=int(width), delx=delx, dely=dely, x0=x0, y0=y0,
               reverse_x_axis=bool(reverse), renderer=renderer)


def _blur(x, sigma: float):
    """(B, C, H, W) smoothed by a separable Gaussian of ``sigma`` pixels (edges replicated)."""
    if sigma <= 0:
        return x
    import torch
    import torch.nn.functional as F

    r = max(1, int(math.ceil(3 * sigma)))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _poses(rig, cameras: dict):
    """{view: DiffDRR pose (camera -> world)} for the rig (C-arm -> world) RigidTransform."""
    from diffdrr.pose import RigidTransform

    return {n: RigidTransform(c).compose(rig) for n, c in cameras.items()}     # rig @ camera


def register(data: dict, config: dict) -> dict:
    import torch
    from diffdrr.metrics import MultiscaleNormalizedCrossCorrelation2d
    from diffdrr.pose import RigidTransform, convert

    t0 = time.perf_counter()
    views = config["views"]
    subject = _subject(data["density"], data["affine"])
    cameras = {n: torch.as_tensor(data[f"{n}_camera"], dtype=torch.float32)[None] for n in views}
    ncc = MultiscaleNormalizedCrossCorrelation2d(list(config["patch_sizes"]), list(config["patch_weights"]))
    conv = config["convention"]
    rig0 = RigidTransform(torch.as_tensor(data["rig"], dtype=torch.float32)[None])
    rot, trans = rig0.convert("euler_angles", conv)
    rotation = torch.nn.Parameter(rot.detach().clone())
    translation = torch.nn.Parameter(trans.detach().clone())
    drrs, targets = {}, {}
    for st in config["stages"]:
        b, s = int(st["binning"]), float(st["sigma_px"])
        for n in views:
            if (n, b) not in drrs:
                drrs[n, b] = _drr(subject, data[f"{n}_b{b}_intrinsics"], config["renderer"])
            if (n, b, s) not in targets:
                img = torch.as_tensor(data[f"{n}_b{b}_image"], dtype=torch.float32)[None, None]
                targets[n, b, s] = _blur(img, s)
    setup = time.perf_counter() - t0
    stages = []
    for st in config["stages"]:
        ts = time.perf_counter()
        b, s = int(st["binning"]), float(st["sigma_px"])
        opt = torch.optim.Adam([{"params": [rotation], "lr": float(st["lr_rot"])},
                                {"params": [translation], "lr": float(st["lr_trans"])}], maximize=True)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(config["lr_step"]), gamma=float(config["lr_gamma"]))
        history = []
        for _ in range(int(st["iterations"])):
            opt.zero_grad()
            poses = _poses(convert(rotation, translation, parameterization="euler_angles", convention=conv), cameras)
            score = sum(ncc(_blur(drrs[n, b](poses[n]), s), targets[n, b, s]) for n in views) / len(views)
            score = score.sum()
            score.backward()
            opt.step()
            sched.step()
            history.append(float(score.detach()))
        stages.append({**st, "seconds": time.perf_counter() - ts, "ncc_first": history[0] if history else None,
                       "ncc_last": history[-1] if history else None})
    rig = convert(rotation.detach(), translation.detach(), parameterization="euler_angles", convention=conv)
    import diffdrr

    return {"rig": rig.matrix[0].double().numpy().tolist(), "registration_s": time.perf_counter() - t0,
            "setup_s": setup, "stages": stages, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffdrr": getattr(diffdrr, "__version__", "?")}


def render(data: dict, config: dict) -> dict:
    import torch
    from diffdrr.pose import RigidTransform

    subject = _subject(data["density"], data["affine"])
    rig = RigidTransform(torch.as_tensor(data["rig"], dtype=torch.float32)[None])
    b = int(config["render_binning"])
    points = torch.as_tensor(data["points"], dtype=torch.float32)[None]
    out = {}
    with torch.no_grad():
        for n in config["views"]:
            drr = _drr(subject, data[f"{n}_b{b}_intrinsics"], config["renderer"])
            pose = _poses(rig, {n: torch.as_tensor(data[f"{n}_camera"], dtype=torch.float32)[None]})[n]
            out[f"{n}_drr"] = drr(pose)[0, 0].numpy()
            out[f"{n}_pixels"] = drr.perspective_projection(pose, points.clone())[0].numpy()
            source, target = drr.detector(pose, None)
            out[f"{n}_source"] = source[0, 0].numpy()
            out[f"{n}_targets"] = target[0].reshape(drr.detector.height, drr.detector.width, 3).numpy()
    return out


def main(argv) -> int:
    if len(argv) != 4 or argv[1] not in ("register", "render"):
        print("usage: diffdrr_runner.py register|render IN.npz OUT", file=sys.stderr)
        return 2
    with np.load(argv[2], allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    config = json.loads(str(data.pop("config")))
    import torch

    torch.set_num_threads(int(config.get("threads", 1)))
    if argv[1] == "register":
        out = register(data, config)
        with open(argv[3], "w") as f:
            json.dump(out, f)
    else:
        np.savez(argv[3], **render(data, config))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
