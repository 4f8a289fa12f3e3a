"""ITK's two-projection 2-D/3-D registration (PyPI ``itk-twoprojectionregistration``) as a peer.

That module (Wu 2010, built for radiotherapy set-up) has its own fixed geometry: the CT's
voxel corner at the origin (its direction and origin are ignored), a "gantry" rotation
about the volume's z axis per view, the source at ``scd`` from an isocentre, and the image
on the plane through the isocentre, perpendicular to the central ray. This wrapper maps a
case onto it exactly:

- for each of our views, a camera frame: the source at the origin, x along the detector's
  columns, y along its rows, looking down -z; the image is the X-ray resampled onto the
  isocentre plane (pixel size scaled by SID / SDD), columns mirrored when (u, v, -n) is
  left-handed;
- the ITK "volume displacement" transform ``Tr`` (Euler ZYX about the isocentre, in the
  volume frame) is solved from our pose so that both views' cameras agree, and back again;
- :func:`render_itk` projects through ITK's own Siddon-Jacobs ray caster, so a test can
  check that ITK and our DRR put the CT at the same pixels before any number is trusted.

Registration: Powell on ITK's two-image normalised correlation (the module's example
settings), coarse to fine over two detector sizes, on a CT slab around the vertebra.
Needs ``pip install itk-twoprojectionregistration`` (the ``bench`` extra).
"""
from __future__ import annotations

import time

import numpy as np

from ..geometry import View, euler_to_matrix, matrix_to_euler
from ..io import Case, Result
from ..volume import Volume
from ..xray import as_line_integral, resize_view_image

__all__ = ["ItkGeometry", "render_itk", "register_itk"]

_CAMROT = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])     # rotation of -90 deg about x


def _rigid(R, t) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def _rot_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class ItkGeometry:
    """Our case geometry expressed in ITK's two-projection set-up (see the module docstring).

    Args:
        views: {"ap", "lat"} -> View (C-arm frame, same source-isocentre distance).
        ct: the CT volume (axis-aligned direction up to flips, as scanners write them).
    """

    def __init__(self, views: dict[str, View], ct: Volume):
        self.views = views
        R = ct.direction
        if not np.allclose(np.abs(R), np.round(np.abs(R)), atol=1e-6) or np.linalg.det(R) < 0:
            raise ValueError("the ITK peer needs a CT whose direction is a proper rotation of the axes")
        sp = ct.spacing
        # ITK volume frame: voxel (i, j, k) spans [i sp, (i + 1) sp]; our CT frame: centre A (i, j, k)
        self.V_to_ct = _rigid(R, ct.origin - R @ (0.5 * sp))
        self.size_mm = np.asarray(ct.size) * sp
        iso = np.zeros(3)                                      # C-arm isocentre
        self.scd = float(np.linalg.norm(views["ap"].source - iso))
        self.cams, self.flip, self.angle = {}, {}, {}
        for name, v in views.items():
            n = v.normal if np.dot(v.normal, v.detector_center - v.source) > 0 else -v.normal
            u = v.u.copy()
            flip = np.linalg.det(np.stack([u, v.v, -n])) < 0
            if flip:
                u = -u
            Rc = np.stack([u, v.v, -n])                          # rows: camera axes in C-arm coordinates
            self.cams[name] = _rigid(Rc, -Rc @ v.source)         # C-arm -> camera
            self.flip[name] = bool(flip)
        # ITK camera of view at gantry angle a, for a volume-frame point x: CamRot(x + shift) after Rz(-a)
        # about c_V. Choose c_V as the volume centre and solve each view's gantry angle so that both
        # views share one volume transform Tr (C-arm <-> volume).
        self.c_V = self.size_mm / 2.0
        rel = self.cams["lat"] @ np.linalg.inv(self.cams["ap"])                  # camera_ap -> camera_lat
        best = None
        for a in (90.0, -90.0):
            rel_itk = self._itk_cam(a) @ np.linalg.inv(self._itk_cam(0.0))
            err = np.abs(rel_itk - rel).max()
            if best is None or err < best[0]:
                best = (err, a)
        if best[0] > 1e-6 * max(self.scd, 1.0):
            raise ValueError(f"these views are not a 90-degree isocentric pair ITK can model (mismatch {best[0]:.3g})")
        self.angle = {"ap": 0.0, "lat": best[1]}

    def _itk_cam(self, angle: float) -> np.ndarray:
        """Volume-frame (already displaced) -> ITK camera, for a gantry angle (deg)."""
        G = _rigid(_rot_z(-angle), self.c_V - _rot_z(-angle) @ self.c_V)
        S = _rigid(np.eye(3), np.array([-self.c_V[0], self.scd - self.c_V[1], -self.c_V[2]]))
        return _rigid(_CAMROT, np.zeros(3)) @ S @ G

    def tr_from_pose(self, T_ct_to_carm) -> np.ndarray:
        """ITK's volume displacement ``Tr`` (4x4, volume frame) for our pose."""
        return np.linalg.inv(self._itk_cam(0.0)) @ self.cams["ap"] @ T_ct_to_carm @ self.V_to_ct

    def pose_from_tr(self, Tr) -> np.ndarray:
        return np.linalg.inv(self.cams["ap"]) @ self._itk_cam(0.0) @ Tr @ np.linalg.inv(self.V_to_ct)

    def params(self, Tr) -> list[float]:
        """Euler3DTransform parameters (rx, ry, rz rad, tx, ty, tz) about ``c_V`` (ZYX order)."""
        R, t4 = Tr[:3, :3], Tr[:3, 3]
        ang = np.deg2rad(matrix_to_euler(R))
        t = t4 - self.c_V + R @ self.c_V
        return [*ang.tolist(), *t.tolist()]

    def tr_from_params(self, p) -> np.ndarray:
        R = euler_to_matrix(np.rad2deg(np.asarray(p[:3])))
        t = np.asarray(p[3:6]) + self.c_V - R @ self.c_V
        return _rigid(R, t)

    def image(self, name: str, image: np.ndarray, pixels: int):
        """An X-ray as ITK's fixed image (float, 3-D single slice on the isocentre plane)."""
        import itk

        img, v = resize_view_image(image, self.views[name], pixels)
        if self.flip[name]:
            img = img[:, ::-1]
        mag = abs(v.source_to_detector) / self.scd
        sx, sy = v.pixel_spacing[0] / mag, v.pixel_spacing[1] / mag
        # principal point: where the central ray (source -> isocentre) meets the detector
        pc, pr = v.project(np.zeros(3))
        if self.flip[name]:
            pc = v.size[0] - 1 - pc
        out = itk.image_from_array(np.ascontiguousarray(img[None].astype(np.float32)))
        out.SetSpacing([float(sx), float(sy), 1.0])
        out.SetOrigin([float(-sx * pc), float(-sy * pr), float(-self.scd)])
        return out


def _itk_volume(ct: Volume):
    """The CT as ITK's moving image: its voxel corner at the origin, direction ignored (the
    module's convention; :class:`ItkGeometry` accounts for it)."""
    import itk

    vol = itk.image_from_array(np.ascontiguousarray(ct.array.astype(np.float32)))
    vol.SetSpacing([float(s) for s in ct.spacing])
    vol.SetOrigin([0.0, 0.0, 0.0])
    return vol


def _interpolator(vol, geo: ItkGeometry, name: str, transform, threshold: float):
    import itk

    interp = itk.SiddonJacobsRayCastInterpolateImageFunction[type(vol), itk.D].New()
    interp.SetProjectionAngle(float(np.deg2rad(geo.angle[name])))
    interp.SetFocalPointToIsocenterDistance(geo.scd)
    interp.SetThreshold(float(threshold))
    interp.SetTransform(transform)
    interp.Initialize()
    return interp


def _transform(geo: ItkGeometry, Tr):
    import itk

    tf = itk.Euler3DTransform[itk.D].New()
    tf.SetComputeZYX(True)
    tf.SetCenter([float(c) for c in geo.c_V])
    p = itk.OptimizerParameters[itk.D](6)
    for i, x in enumerate(geo.params(Tr)):
        p[i] = float(x)
    tf.SetParameters(p)
    return tf


def render_itk(ct: Volume, views: dict[str, View], T_ct_to_carm, pixels: int, *, threshold_hu: float = -1000.0):
    """DRRs through ITK's own ray caster in our geometry: {name: (pixels, pixels)} in our
    views' pixel order (resized to ``pixels``). Line integrals of (HU - threshold) in mm."""
    import itk

    geo = ItkGeometry(views, ct)
    vol = _itk_volume(ct)
    tf = _transform(geo, geo.tr_from_pose(np.asarray(T_ct_to_carm, dtype=np.float64)))
    out = {}
    for name in ("ap", "lat"):
        fixed = geo.image(name, np.zeros(views[name].shape, np.float32), pixels)
        f = itk.ResampleImageFilter[type(vol), type(vol)].New()
        f.SetInput(vol)
        f.SetInterpolator(_interpolator(vol, geo, name, tf, threshold_hu))
        f.SetDefaultPixelValue(0)
        f.SetSize(fixed.GetLargestPossibleRegion().GetSize())
        f.SetOutputSpacing(fixed.GetSpacing())
        f.SetOutputOrigin(fixed.GetOrigin())
        f.Update()
        img = itk.array_from_image(f.GetOutput())[0]
        out[name] = img[:, ::-1].copy() if geo.flip[name] else img.copy()
    return out


def register_itk(case: Case, *, pixels=(64, 128), slab_mm: float = 110.0, threshold_hu: float = -1000.0,
                 iterations: int = 10) -> Result:
    """ITK two-projection registration of a case from its initial pose (see the module
    docstring). Returns a :class:`~RadGSRegLib.io.Result` like :func:`RadGSRegLib.register.run`."""
    import itk

    from ..register.target import slab_around

    t0 = time.perf_counter()
    centre = case.seg.label_centroid(case.vertebra_label)
    slab = slab_around(case.ct, centre, slab_mm)
    geo = ItkGeometry(case.views, slab)
    vol = _itk_volume(slab)
    Tr = geo.tr_from_pose(case.initial_guess)
    runtime = {"preprocessing": time.perf_counter() - t0}
    info = {"init": "none", "refine": "itk-two-projection", "levels": []}
    dtr = np.pi / 180.0
    for px in pixels:
        t = time.perf_counter()
        fixed = {n: geo.image(n, as_line_integral(case.xrays[n], case.image_kind), px) for n in ("ap", "lat")}
        tf = _transform(geo, Tr)
        reg = itk.TwoProjectionImageRegistrationMethod[type(vol), type(vol)].New()
        metric = itk.NormalizedCorrelationTwoImageToOneImageMetric[type(vol), type(vol)].New()
        metric.SubtractMeanOn()                        # off by default: then any two X-rays correlate ~1
        opt = itk.PowellOptimizer.New()
        opt.SetMaximize(False)
        opt.SetMaximumIteration(iterations)
        opt.SetMaximumLineIteration(4)
        opt.SetStepLength(4.0 if px == pixels[0] else 1.0)
        opt.SetStepTolerance(0.02)
        opt.SetValueTolerance(0.001)
        scales = itk.OptimizerParameters[itk.D](6)
        for i, s in enumerate([1 / dtr] * 3 + [1.0] * 3):
            scales[i] = s
        opt.SetScales(scales)
        reg.SetMetric(metric)
        reg.SetOptimizer(opt)
        reg.SetTransform(tf)
        reg.SetInterpolator1(_interpolator(vol, geo, "ap", tf, threshold_hu))
        reg.SetInterpolator2(_interpolator(vol, geo, "lat", tf, threshold_hu))
        reg.SetFixedImage1(fixed["ap"])
        reg.SetFixedImage2(fixed["lat"])
        reg.SetMovingImage(vol)
        reg.SetFixedImageRegion1(fixed["ap"].GetBufferedRegion())
        reg.SetFixedImageRegion2(fixed["lat"].GetBufferedRegion())
        reg.SetInitialTransformParameters(tf.GetParameters())
        reg.Update()
        p = reg.GetLastTransformParameters()
        Tr = geo.tr_from_params([p[i] for i in range(6)])
        info["levels"].append({"pixels": px, "metric": float(opt.GetValue()), "iterations": int(opt.GetCurrentIteration())})
        runtime[f"itk_{px}px"] = time.perf_counter() - t
    runtime["total"] = time.perf_counter() - t0
    info["warnings"] = []
    return Result(T_ct_to_carm=geo.pose_from_tr(Tr), runtime_s=runtime, info=info)
