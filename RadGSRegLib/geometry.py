"""C-arm geometry and rigid transforms.

Frames and units (see ``docs/frames.md`` and the case format):

* Millimetres everywhere; 3-D points are LPS-oriented.
* **C-arm frame**: the intraoperative frame ``geometry.json`` is written in. The standard
  biplanar set-up (:func:`biplanar_views`) puts the isocentre at the origin, with the C-arm
  axes along the patient's axes at the nominal pose: +x patient left, +y posterior,
  +z superior.
* **Detector pixels**: ``(column, row)`` = ``(i, j)``; pixel ``(i, j)`` has its centre at
  ``detector_origin + i*su*u + j*sv*v``. Image arrays are indexed ``[row, column]``.
* A rigid pose is a 4x4 homogeneous matrix acting on column vectors; ``T_a_to_b`` maps
  points of frame *a* into frame *b*: ``x_b = T_a_to_b @ x_a``.
* Poses cross every boundary of the library as 4x4 matrices. A pose *change* about a
  centre ``c`` (what a network or an optimiser outputs) is a **delta**: a 6-vector
  ``(rotation vector [rad], translation [mm])`` acting as ``x -> R (x - c) + c + t`` in the
  frame the pose maps into (:func:`delta_to_matrix`, :func:`matrix_to_delta`,
  :func:`apply_delta`; :func:`apply_delta_torch` is the differentiable batch twin, via
  roma). Optimisers may scale its components internally (3-D/3-D refinement).
* Euler angles ``(rx, ry, rz, tx, ty, tz)`` (degrees, fixed x then y then z axes,
  ``R = Rz @ Ry @ Rx``, translation mm; :func:`pose_to_matrix` / :func:`matrix_to_pose`)
  remain where something is defined *per axis*: the random offsets of the case generator
  (±N degrees per axis, the case format's contract), the pose search's hypothesis grid and
  the 2-D/3-D refinement's finite-difference steps (a single-axis Euler step is the same
  rotation as the rotation vector along that axis).

Everything here is NumPy float64 (geometry is exact bookkeeping, not a hot path), except
:func:`apply_delta_torch`, which imports torch when called.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np

__all__ = [
    "View", "biplanar_views", "c_arm_view",
    "euler_to_matrix", "matrix_to_euler", "pose_to_matrix", "matrix_to_pose",
    "translation", "compose", "invert", "is_rigid", "geodesic_deg", "mtre",
    "sample_offsets", "apply", "orthonormalized",
    "rotvec_to_matrix", "matrix_to_rotvec", "delta_to_matrix", "matrix_to_delta", "apply_delta",
    "apply_delta_torch",
]

_ORTHO_TOL = 1e-4


def _vec3(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.shape != (3,) or not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be 3 finite numbers, got {x!r}")
    return a


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.cross`` of two (3,) vectors, the same arithmetic without its overhead (a view
    is made for every window of every pose hypothesis)."""
    a0, a1, a2 = float(a[0]), float(a[1]), float(a[2])
    b0, b1, b2 = float(b[0]), float(b[1]), float(b[2])
    return np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


@dataclass(frozen=True)
class View:
    """One X-ray view of a cone-beam C-arm, in the C-arm frame (mm).

    Attributes:
        source: (3,) focal spot position.
        detector_origin: (3,) centre of pixel (column 0, row 0).
        u: (3,) unit vector along increasing column index.
        v: (3,) unit vector along increasing row index, orthogonal to ``u``.
        pixel_spacing: ``(su, sv)`` in mm along u and v.
        size: ``(columns, rows)``.
        name: a label ("ap", "lat", ...).
    """

    source: np.ndarray
    detector_origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    pixel_spacing: tuple[float, float]
    size: tuple[int, int]
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "source", _vec3(self.source, "source"))
        object.__setattr__(self, "detector_origin", _vec3(self.detector_origin, "detector_origin"))
        object.__setattr__(self, "u", _vec3(self.u, "detector_u"))
        object.__setattr__(self, "v", _vec3(self.v, "detector_v"))
        su, sv = (float(x) for x in self.pixel_spacing)
        cols, rows = (int(x) for x in self.size)
        object.__setattr__(self, "pixel_spacing", (su, sv))
        object.__setattr__(self, "size", (cols, rows))
        if abs(np.linalg.norm(self.u) - 1) > _ORTHO_TOL:
            raise ValueError(f"detector_u must be a unit vector, |u| = {np.linalg.norm(self.u):.6f}")
        if abs(np.linalg.norm(self.v) - 1) > _ORTHO_TOL:
            raise ValueError(f"detector_v must be a unit vector, |v| = {np.linalg.norm(self.v):.6f}")
        if abs(float(self.u @ self.v)) > _ORTHO_TOL:
            raise ValueError(f"detector_u and detector_v must be orthogonal, u.v = {self.u @ self.v:.6f}")
        if not (su > 0 and sv > 0 and math.isfinite(su) and math.isfinite(sv)):
            raise ValueError(f"pixel_spacing must be two positive numbers, got {self.pixel_spacing}")
        if cols < 1 or rows < 1:
            raise ValueError(f"size must be two positive integers, got {self.size}")
        if abs(self.source_to_detector) < 1e-6:
            raise ValueError("singular geometry: the source lies in the detector plane")

    # ----------------------------------------------------------------- derived
    @property
    def normal(self) -> np.ndarray:
        """(3,) unit detector normal ``u x v``."""
        n = _cross(self.u, self.v)
        return n / np.linalg.norm(n)

    @property
    def source_to_detector(self) -> float:
        """Signed distance (mm) from the source to the detector plane along ``-normal``."""
        return float(_cross(self.u, self.v) @ (self.source - self.detector_origin))

    @property
    def detector_center(self) -> np.ndarray:
        """(3,) the centre of the detector area (mm)."""
        (su, sv), (c, r) = self.pixel_spacing, self.size
        return self.detector_origin + 0.5 * (c - 1) * su * self.u + 0.5 * (r - 1) * sv * self.v

    @property
    def shape(self) -> tuple[int, int]:
        """Image array shape ``(rows, columns)``."""
        return (self.size[1], self.size[0])

    def projection_matrix(self) -> np.ndarray:
        """(3, 4) matrix P: C-arm mm (homogeneous) -> ``w*(column, row, 1)``.

        ``w`` is positive for points in front of the source (on the detector's side of the
        plane through the source parallel to the detector).
        """
        cached = self.__dict__.get("_projection")          # a view is immutable: made once (a copy out)
        if cached is not None:
            return cached.copy()
        s, o, u, v = self.source, self.detector_origin, self.u, self.v
        su, sv = self.pixel_spacing
        n = self.normal
        d = float(n @ (o - s))  # signed source->detector-plane distance along n
        # Intersection of the ray s + lam (x - s) with the plane: lam = d / n.(x - s).
        # a = u.(s - o) + lam u.(x - s)  ->  a * n.(x - s) = u.(s-o) n.(x-s) + d u.(x-s)
        rows = []
        for axis, sp in ((u, su), (v, sv)):
            c = float(axis @ (s - o))
            lin = c * n + d * axis
            rows.append(np.append(lin, -lin @ s) / sp)
        P = np.vstack(rows + [np.append(n, -n @ s)])
        if d < 0:  # make w positive in front of the source
            P = -P
        self.__dict__["_projection"] = P
        return P.copy()

    def project(self, points: np.ndarray) -> np.ndarray:
        """Project C-arm points to pixel coordinates.

        Args:
            points: (..., 3) C-arm mm.
        Returns:
            (..., 2) ``(column, row)`` in pixels (continuous; pixel centres are integers).
        """
        p = np.asarray(points, dtype=np.float64)
        P = self.projection_matrix()
        h = p @ P[:, :3].T + P[:, 3]
        return h[..., :2] / h[..., 2:3]

    def pixel_to_world(self, cols, rows) -> np.ndarray:
        """(..., 3) C-arm position (mm) of detector coordinates ``(column, row)`` (pixels)."""
        cols = np.asarray(cols, dtype=np.float64)[..., None]
        rows = np.asarray(rows, dtype=np.float64)[..., None]
        su, sv = self.pixel_spacing
        return self.detector_origin + cols * su * self.u + rows * sv * self.v

    def pixel_rays(self, cols=None, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """Rays from the source through detector pixels.

        Args:
            cols, rows: pixel coordinates (broadcastable); default every pixel centre on
                the ``(rows, columns)`` grid.
        Returns:
            ``(origin (3,), directions (..., 3))``: unit directions, C-arm frame.
        """
        if cols is None and rows is None:
            rows, cols = np.meshgrid(np.arange(self.size[1]), np.arange(self.size[0]), indexing="ij")
        d = self.pixel_to_world(cols, rows) - self.source
        return self.source.copy(), d / np.linalg.norm(d, axis=-1, keepdims=True)

    def resized(self, size: tuple[int, int] | int) -> "View":
        """The same detector area sampled with ``size = (columns, rows)`` pixels.

        The detector's physical extent (pixel edges) is kept, so the projection of every
        point is unchanged in mm: 976x976 at 0.3 mm -> 128x128 at 2.2875 mm.
        """
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        cols, rows = int(size[0]), int(size[1])
        (su, sv), (c0, r0) = self.pixel_spacing, self.size
        su2, sv2 = su * c0 / cols, sv * r0 / rows
        corner = self.detector_origin - 0.5 * su * self.u - 0.5 * sv * self.v
        origin = corner + 0.5 * su2 * self.u + 0.5 * sv2 * self.v
        return replace(self, detector_origin=origin, pixel_spacing=(su2, sv2), size=(cols, rows))

    def cropped(self, col0: int, row0: int, cols: int, rows: int) -> "View":
        """The sub-detector of ``cols`` x ``rows`` pixels starting at pixel (col0, row0);
        a pixel (c, r) of the crop is pixel (col0 + c, row0 + r) of this view."""
        su, sv = self.pixel_spacing
        origin = self.detector_origin + col0 * su * self.u + row0 * sv * self.v
        return replace(self, detector_origin=origin, size=(int(cols), int(rows)))

    def transformed(self, T: np.ndarray) -> "View":
        """This view moved by the rigid 4x4 ``T`` (e.g. into another frame)."""
        R, t = np.asarray(T)[:3, :3], np.asarray(T)[:3, 3]
        return replace(self, source=R @ self.source + t, detector_origin=R @ self.detector_origin + t,
                       u=R @ self.u, v=R @ self.v)

    def to_dict(self) -> dict:
        """Fields of ``geometry.json`` (without ``image``)."""
        return {
            "source": self.source.tolist(),
            "detector_origin": self.detector_origin.tolist(),
            "detector_u": self.u.tolist(),
            "detector_v": self.v.tolist(),
            "pixel_spacing": list(self.pixel_spacing),
            "size": list(self.size),
        }

    @classmethod
    def from_dict(cls, d: dict, name: str = "") -> "View":
        return cls(source=d["source"], detector_origin=d["detector_origin"], u=d["detector_u"],
                   v=d["detector_v"], pixel_spacing=tuple(d["pixel_spacing"]), size=tuple(d["size"]),
                   name=name)


def c_arm_view(angle_deg: float = 0.0, *, sdd: float = 1124.0, sid: float = 700.0,
               pixels: int | tuple[int, int] = 976, pixel_spacing: float | tuple[float, float] = 0.3,
               isocentre=(0.0, 0.0, 0.0), name: str = "") -> View:
    """A view of an isocentric C-arm rotated by ``angle_deg`` about the z (cranio-caudal) axis.

    At 0 deg it is the AP view of the case-format example: source at ``iso + (0, sid, 0)``
    (posterior side), detector plane ``sdd`` away at ``y = iso_y + sid - sdd``, columns
    along +x (patient left), rows along -z (head at the top). -90 deg gives the lateral
    view (source at +x, columns along -y, i.e. toward anterior).

    Args:
        angle_deg: gantry angle, degrees, right-handed about +z.
        sdd: source-to-detector distance, mm. sid: source-to-isocentre distance, mm.
        pixels: detector ``(columns, rows)`` (or one int). pixel_spacing: mm (or (su, sv)).
        isocentre: (3,) C-arm mm.
    """
    if not (0 < sid < sdd):
        raise ValueError(f"need 0 < sid < sdd, got sid={sid}, sdd={sdd}")
    cols, rows = (pixels, pixels) if np.isscalar(pixels) else pixels
    su, sv = (pixel_spacing, pixel_spacing) if np.isscalar(pixel_spacing) else pixel_spacing
    iso = _vec3(isocentre, "isocentre")
    R = euler_to_matrix((0.0, 0.0, angle_deg))
    src = np.array([0.0, sid, 0.0])
    centre = np.array([0.0, sid - sdd, 0.0])
    u, v = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
    origin = centre - 0.5 * (cols - 1) * su * u - 0.5 * (rows - 1) * sv * v
    return View(source=iso + R @ src, detector_origin=iso + R @ origin, u=R @ u, v=R @ v,
                pixel_spacing=(su, sv), size=(cols, rows), name=name)


#: the standard C-arm of :func:`biplanar_views` (the paper's 976² detector of 0.3 mm pixels)
STANDARD_SDD_MM = 1124.0
STANDARD_SID_MM = 700.0
STANDARD_PIXELS = 976
STANDARD_PIXEL_MM = 0.3


def biplanar_views(*, sdd: float = STANDARD_SDD_MM, sid: float = STANDARD_SID_MM,
                   pixels: int | tuple[int, int] = STANDARD_PIXELS,
                   detector_mm: float | tuple[float, float] = STANDARD_PIXELS * STANDARD_PIXEL_MM,
                   isocentre=(0.0, 0.0, 0.0)) -> dict[str, View]:
    """The standard AP + lateral pair: ``{"ap": c_arm_view(0), "lat": c_arm_view(-90)}``.

    Defaults follow the paper (976x976 detector, 1124 mm source-to-detector) with a 0.3 mm
    pixel pitch (292.8 mm detector) and the source 700 mm from the isocentre.
    """
    cols, rows = (pixels, pixels) if np.isscalar(pixels) else pixels
    w, h = (detector_mm, detector_mm) if np.isscalar(detector_mm) else detector_mm
    kw = dict(sdd=sdd, sid=sid, pixels=(cols, rows), pixel_spacing=(w / cols, h / rows), isocentre=isocentre)
    return {"ap": c_arm_view(0.0, name="ap", **kw), "lat": c_arm_view(-90.0, name="lat", **kw)}


# ---------------------------------------------------------------- rigid transforms
def euler_to_matrix(angles_deg) -> np.ndarray:
    """(3, 3) rotation ``Rz @ Ry @ Rx`` from ``(rx, ry, rz)`` in degrees (fixed axes x, y, z)."""
    rx, ry, rz = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def matrix_to_euler(R: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix`: ``(rx, ry, rz)`` degrees, ry in [-90, 90]."""
    R = np.asarray(R, dtype=np.float64)
    sy = -R[2, 0]
    ry = math.asin(max(-1.0, min(1.0, sy)))
    if abs(sy) < 1 - 1e-9:
        rx = math.atan2(R[2, 1], R[2, 2])
        rz = math.atan2(R[1, 0], R[0, 0])
    else:  # gimbal lock: put everything in rz
        rx = 0.0
        rz = math.atan2(-R[0, 1], R[1, 1])
    return np.rad2deg([rx, ry, rz])


def rotvec_to_matrix(rotvec) -> np.ndarray:
    """(3, 3) rotation by the rotation vector ``rotvec`` (3,) radians (Rodrigues)."""
    v = np.asarray(rotvec, dtype=np.float64).reshape(3)
    theta = float(np.linalg.norm(v))
    K = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
    if theta < 1e-12:
        return np.eye(3) + K
    return np.eye(3) + math.sin(theta) / theta * K + (1 - math.cos(theta)) / theta ** 2 * (K @ K)


def matrix_to_rotvec(R) -> np.ndarray:
    """Inverse of :func:`rotvec_to_matrix`: the rotation vector (3,) radians, angle in [0, pi]."""
    R = np.asarray(R, dtype=np.float64)[:3, :3]
    c = max(-1.0, min(1.0, (np.trace(R) - 1) / 2))
    theta = math.acos(c)
    w = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]])
    if theta < 1e-6:
        return w / 2
    if math.pi - theta < 1e-4:                               # near pi: the axis from R + I
        B = (R + np.eye(3)) / 2
        axis = B[int(np.argmax(np.diag(B)))]
        axis = axis / np.linalg.norm(axis)
        if np.dot(axis, w) < 0:
            axis = -axis
        return axis * theta
    return w * theta / (2 * math.sin(theta))


def delta_to_matrix(delta, center=None) -> np.ndarray:
    """(4, 4) of the delta ``(rotation vector [rad], translation [mm])`` about ``center``
    (3,) mm (default the origin): ``x -> R (x - c) + c + t``."""
    d = _six(delta, "a delta has 6 numbers (rotation vector rad, translation mm)")
    return _about(rotvec_to_matrix(d[:3]), d[3:], center)


def matrix_to_delta(D, center=None) -> np.ndarray:
    """Inverse of :func:`delta_to_matrix` (same ``center``): (6,) rotation vector rad, mm."""
    D = np.asarray(D, dtype=np.float64)
    return np.concatenate([matrix_to_rotvec(D[:3, :3]), _shift_about(D, center)])


def _six(vector, what: str) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64).reshape(-1)
    if v.shape != (6,):
        raise ValueError(f"{what}, got {v.shape}")
    return v


def _about(R: np.ndarray, t, center) -> np.ndarray:
    """(4, 4) ``x -> R (x - c) + c + t`` (``c = center``, default the origin)."""
    c = np.zeros(3) if center is None else _vec3(center, "center")
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = c - R @ c + np.asarray(t, dtype=np.float64)
    return T


def _shift_about(T: np.ndarray, center) -> np.ndarray:
    """The ``t`` of :func:`_about` for a rigid ``T`` and ``center``."""
    c = np.zeros(3) if center is None else _vec3(center, "center")
    return T[:3, 3] - c + T[:3, :3] @ c


def apply_delta(delta, T, center) -> np.ndarray:
    """``delta_to_matrix(delta, center) @ T``: the pose ``T`` (4, 4) changed by ``delta``
    about ``center`` (mm, in the frame ``T`` maps into)."""
    return compose(delta_to_matrix(delta, center), T)


def apply_delta_torch(delta, T, center):
    """:func:`apply_delta` on torch batches, differentiable (roma's rotation vectors).

    Args:
        delta: (B, 6) rotation vector rad, translation mm. T: (B, 4, 4). center: (B, 3) mm.
    Returns:
        (B, 4, 4) ``delta ∘ T``.
    """
    import roma
    import torch

    R = roma.rotvec_to_rotmat(delta[:, :3])
    out = T.clone()
    out[:, :3, :3] = R @ T[:, :3, :3]
    out[:, :3, 3] = torch.einsum("bij,bj->bi", R, T[:, :3, 3] - center) + center + delta[:, 3:]
    return out


def translation(t) -> np.ndarray:
    """(4, 4) pure translation by ``t`` (mm)."""
    T = np.eye(4)
    T[:3, 3] = _vec3(t, "translation")
    return T


def pose_to_matrix(pose, center=None) -> np.ndarray:
    """(4, 4) rigid transform from the 6-vector ``(rx, ry, rz [deg], tx, ty, tz [mm])``.

    ``x' = R (x - c) + c + t`` with ``c = center`` (default the origin).
    """
    p = _six(pose, "a pose vector has 6 numbers (rx, ry, rz, tx, ty, tz)")
    return _about(euler_to_matrix(p[:3]), p[3:], center)


def matrix_to_pose(T, center=None) -> np.ndarray:
    """Inverse of :func:`pose_to_matrix` (same ``center``)."""
    T = np.asarray(T, dtype=np.float64)
    return np.concatenate([matrix_to_euler(T[:3, :3]), _shift_about(T, center)])


def compose(*Ts) -> np.ndarray:
    """``compose(A, B, C) = A @ B @ C`` (C applied first)."""
    out = np.eye(4)
    for T in Ts:
        out = out @ np.asarray(T, dtype=np.float64)
    return out


def invert(T) -> np.ndarray:
    """Closed-form inverse of a rigid 4x4."""
    T = np.asarray(T, dtype=np.float64)
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def is_rigid(T, tol: float = 1e-5) -> bool:
    """True for a 4x4 with an orthonormal, right-handed rotation and last row (0, 0, 0, 1)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        return False
    R = T[:3, :3]
    return (np.allclose(R.T @ R, np.eye(3), atol=tol) and abs(np.linalg.det(R) - 1) < tol
            and np.allclose(T[3], [0, 0, 0, 1], atol=tol))


def orthonormalized(T) -> np.ndarray:
    """``T`` (4x4, float64 copy) with its rotation block replaced by the nearest orthonormal
    matrix (SVD ``U V^T``): removes the drift of float32 compositions."""
    out = np.array(T, dtype=np.float64)
    u, _, vt = np.linalg.svd(out[:3, :3])
    out[:3, :3] = u @ vt
    return out


def apply(T, points) -> np.ndarray:
    """Apply a 4x4 to (..., 3) points."""
    T = np.asarray(T, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) @ T[:3, :3].T + T[:3, 3]


def geodesic_deg(R1, R2) -> float:
    """Geodesic distance (degrees) between two rotations (3x3, or the 3x3 part of 4x4s)."""
    A = np.asarray(R1, dtype=np.float64)[:3, :3]
    B = np.asarray(R2, dtype=np.float64)[:3, :3]
    c = (np.trace(A.T @ B) - 1.0) / 2.0
    return float(np.rad2deg(math.acos(max(-1.0, min(1.0, c)))))


def mtre(T, G, points) -> float:
    """Mean target registration error (mm): mean over points x of ``|T x - G x|``.

    Args:
        T, G: (4, 4) estimate and ground truth (same source and target frames).
        points: (N, 3) target points in the source frame (mm).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        raise ValueError("mtre needs at least one target point")
    return float(np.linalg.norm(apply(T, pts) - apply(G, pts), axis=1).mean())


def sample_offsets(n: int, rng: np.random.Generator, *, rot_deg: float | Iterable[float] = 20.0,
                   trans_mm: float | Iterable[float] = 50.0, center=None) -> list[np.ndarray]:
    """Random rigid offsets: Euler angles uniform in ±rot_deg per axis, translations uniform
    in ±trans_mm per axis, rotating about ``center`` (mm; default origin).

    Returns:
        n (4, 4) matrices ``D``; a perturbed pose is ``D @ T_nominal``.
    """
    rot = np.broadcast_to(np.asarray(rot_deg, dtype=np.float64), (3,))
    tr = np.broadcast_to(np.asarray(trans_mm, dtype=np.float64), (3,))
    out = []
    for _ in range(int(n)):
        p = np.concatenate([rng.uniform(-rot, rot), rng.uniform(-tr, tr)])
        out.append(pose_to_matrix(p, center=center))
    return out
