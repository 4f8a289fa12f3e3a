"""Compiled (numba) kernel of the ``"joseph"`` DRR backend; see :mod:`RadGSRegLib.drr`.

Joseph's method: along each ray, one bilinear sample in every voxel slice perpendicular to
the ray's dominant axis, weighted by the ray length (mm) between two slices. Voxel values
sit at integer indices; outside the volume they are zero.

For speed the volume is kept as three zero-padded copies, each with one axis last
(:func:`padded_stack`, made only for the axes the rays need), so that a ray's consecutive
samples read neighbouring memory (2-3x faster on a 1 mm CT than slices first), the inner
loop needs no bounds checks, and the rays are generated from the view's parameters inside
the kernel. :func:`joseph_views_jacobian` adds each DRR's derivatives with respect to a rigid
motion of the volume in the same pass (issue #21).
"""
import numpy as np
from numba import njit, prange


#: per dominant axis a = i, j, k: the order of ``vol``'s axes ([k, j, i]) in its copy [b, c, a]
_ORDER = ((1, 0, 2), (2, 0, 1), (2, 1, 0))


def padded_stack(vol: np.ndarray, axis: int, factor: int = 1) -> np.ndarray:
    """A float32 copy of ``vol`` ([k, j, i]) for rays whose dominant axis is ``axis``
    (0, 1, 2: a = i, j, k), laid out [b+2, c+2, a] with a zero border in b and c (b < c in
    axis order): the dominant axis last, so that a ray's consecutive samples (one per slice
    a, at nearly the same b and c) read neighbouring memory.

    ``factor`` > 1: the slices along a averaged in blocks of ``factor`` (the last block
    filled with zeros, the air outside the volume), so that a ray samples every ``factor``-th
    slice's worth: slice m' sits at a = factor m' + (factor - 1) / 2 (:func:`along_ray`);
    b and c keep their full resolution, which is what sets the image's detail."""
    v = np.asarray(vol, dtype=np.float32)
    if factor > 1 and axis != 0:          # not vol's last axis: block means in vol's own layout (whole rows)
        ax, n = 2 - axis, v.shape[2 - axis]
        acc = np.zeros(v.shape[:ax] + (-(-n // factor),) + v.shape[ax + 1:], np.float32)
        for d in range(factor):
            part = v[(slice(None),) * ax + (slice(d, n, factor),)]
            acc[(slice(None),) * ax + (slice(0, part.shape[ax]),)] += part
        v, factor = acc * np.float32(1.0 / factor), 1
    s = np.transpose(v, _ORDER[axis])
    if factor == 1:                                  # a plain copy: NumPy's is fastest
        p = np.zeros((s.shape[0] + 2, s.shape[1] + 2, s.shape[2]), np.float32)
        p[1:-1, 1:-1, :] = s
        return p
    p = np.empty((s.shape[0] + 2, s.shape[1] + 2, -(-s.shape[2] // factor)), np.float32)
    _pack(s, factor, p)                              # along vol's last axis: the means and the copy in one pass
    return p


@njit(cache=True, parallel=True)
def _pack(s, factor, p):
    """``p`` [b+2, c+2, a'] = zero border around the means of ``s`` [b, c, a] over blocks of
    ``factor`` along a (the last block's missing slices count as zeros)."""
    nb, nc, na = s.shape
    inv = np.float32(1.0 / factor)
    p[0] = 0.0
    p[nb + 1] = 0.0
    for b in prange(nb):
        p[b + 1, 0] = 0.0
        p[b + 1, nc + 1] = 0.0
        for c in range(nc):
            for m in range(p.shape[2]):
                acc = np.float32(0.0)
                for d in range(factor):
                    a = m * factor + d
                    if a < na:
                        acc += s[b, c, a]
                p[b + 1, c + 1, m] = acc * inv


def along_ray(factors) -> np.ndarray:
    """(2, 3) float64 for the kernels: per dominant axis a, the scale and the offset of its
    stack's slice index: slice m' = (a - offset) / scale (:func:`padded_stack`'s ``factor``)."""
    f = np.asarray(factors, dtype=np.float64)
    return np.stack([f, (f - 1.0) / 2.0])


@njit(cache=True, fastmath=True, inline="always")
def _slices(stack, sa, da, sb, db, sc, dc):
    """The slices m (m0 to m1; none when m0 > m1) of ``stack`` ([b+2, c+2, a], zero border)
    that the segment x(t) = s + t d, t in [0, 1], crosses where b is in (-1, nb) and c in
    (-1, nc), the support of the bilinear samples."""
    na = stack.shape[2]
    nb = stack.shape[0] - 2
    nc = stack.shape[1] - 2
    inv = 1.0 / da
    # m range: t in [0, 1] ...
    lo = sa if da > 0 else sa + da
    hi = sa + da if da > 0 else sa
    m0 = max(0, int(np.ceil(lo)))
    m1 = min(na - 1, int(np.floor(hi)))
    # ... and b in (-1, nb), c in (-1, nc): linear in m
    for s_, d_, n_ in ((sb, db, nb), (sc, dc, nc)):
        k = d_ * inv                     # change of the coordinate per slice
        x0 = s_ - sa * k                 # its value at m = 0
        if abs(k) < 1e-12:
            if x0 <= -1.0 or x0 >= n_:
                return 0, -1
        else:
            ma = (-1.0 - x0) / k
            mb = (n_ - x0) / k
            if ma > mb:
                ma, mb = mb, ma
            m0 = max(m0, int(np.floor(ma)) + 1)
            m1 = min(m1, int(np.ceil(mb)) - 1)
    return m0, m1


@njit(cache=True, fastmath=True, inline="always")
def _flat(stack):
    """``stack`` (C-contiguous [b+2, c+2, a]) as one flat array and its strides along b and c:
    a sample's four neighbours from one (unsigned) index, without the per-axis wrap-around
    checks of a 3-D index (the same values; 1.2-1.8x faster)."""
    return stack.reshape(-1), stack.shape[1] * stack.shape[2], stack.shape[2]


@njit(cache=True, fastmath=True, inline="always")
def _ray(P, col, r):
    """Pixel (``col``, ``r``)'s ray from view parameters ``P`` (:func:`joseph_views`):
    its direction (pixel minus source) in voxels and its length in mm."""
    d0 = P[1, 0] + col * P[2, 0] + r * P[3, 0] - P[0, 0]
    d1 = P[1, 1] + col * P[2, 1] + r * P[3, 1] - P[0, 1]
    d2 = P[1, 2] + col * P[2, 2] + r * P[3, 2] - P[0, 2]
    e0 = P[5, 0] + col * P[6, 0] + r * P[7, 0] - P[4, 0]
    e1 = P[5, 1] + col * P[6, 1] + r * P[7, 1] - P[4, 1]
    e2 = P[5, 2] + col * P[6, 2] + r * P[7, 2] - P[4, 2]
    return d0, d1, d2, np.sqrt(e0 * e0 + e1 * e1 + e2 * e2)


@njit(cache=True, fastmath=True, inline="always")
def _ray_sum(stack, sa, da, sb, db, sc, dc):
    """Sum of bilinear samples of slices m of ``stack`` ([b+2, c+2, a], zero border) along
    the segment x(t) = s + t d, t in [0, 1], at t = (m - sa) / da."""
    nb = stack.shape[0] - 2
    nc = stack.shape[1] - 2
    inv = 1.0 / da
    m0, m1 = _slices(stack, sa, da, sb, db, sc, dc)
    acc = 0.0
    kb = db * inv
    kc = dc * inv
    b = sb + (m0 - sa) * kb + 1.0
    c = sc + (m0 - sa) * kc + 1.0
    flat, s0, s1 = _flat(stack)
    u0, u1 = np.uint64(s0), np.uint64(s1)
    for m in range(m0, m1 + 1):
        bb = min(max(b, 0.0), nb + 0.999999)
        cc = min(max(c, 0.0), nc + 0.999999)
        b0 = int(bb)
        c0 = int(cc)
        fb = bb - b0
        fc = cc - c0
        i = np.uint64(b0 * s0 + c0 * s1 + m)           # [b0, c0, m]: one index, no wrap-around checks
        acc += ((1.0 - fb) * ((1.0 - fc) * flat[i] + fc * flat[i + u1])
                + fb * ((1.0 - fc) * flat[i + u0] + fc * flat[i + u0 + u1]))
        b += kb
        c += kc
    return acc


@njit(cache=True, parallel=True, fastmath=True)
def joseph_views(s_i, s_j, s_k, axes, params, cols, rows, out):
    """Line integrals for V views.

    Args:
        s_i, s_j, s_k: :func:`padded_stack` of the volume for each dominant axis (one no ray
            takes may be any C-contiguous float32 stand-in; :func:`_flat` reads them flat).
        axes: (2, 3) float64, :func:`along_ray` of the stacks' factors (all 1: every slice).
        params: (V, 8, 3) float64 per view: source, pixel (0, 0) centre, column step, row
            step in voxel coordinates (i, j, k), then the same four in mm.
        cols, rows: detector size. out: (V, rows, cols) float32, written.
    """
    V = params.shape[0]
    for vr in prange(V * rows):
        v = vr // rows
        r = vr % rows
        P = params[v]
        for col in range(cols):
            d0, d1, d2, length = _ray(P, col, r)
            a0, a1, a2 = abs(d0), abs(d1), abs(d2)
            if a0 >= a1 and a0 >= a2:
                acc = _ray_sum(s_i, (P[0, 0] - axes[1, 0]) / axes[0, 0], d0 / axes[0, 0], P[0, 1], d1, P[0, 2], d2)
                da = a0 / axes[0, 0]
            elif a1 >= a2:
                acc = _ray_sum(s_j, (P[0, 1] - axes[1, 1]) / axes[0, 1], d1 / axes[0, 1], P[0, 0], d0, P[0, 2], d2)
                da = a1 / axes[0, 1]
            else:
                acc = _ray_sum(s_k, (P[0, 2] - axes[1, 2]) / axes[0, 2], d2 / axes[0, 2], P[0, 0], d0, P[0, 1], d1)
                da = a2 / axes[0, 2]
            out[v, r, col] = acc * length / da if da > 1e-12 else 0.0


@njit(cache=True, fastmath=True, inline="always")
def _ray_sum_grad(stack, sa, da, sb, db, sc, dc):
    """:func:`_ray_sum` and the in-slice derivatives of its samples: returns (sum, Σ g_b,
    Σ g_b t, Σ g_c, Σ g_c t) where g_b, g_c are the bilinear sample's derivatives along b
    and c (per voxel) and t = (m - sa) / da the sample's place on the segment."""
    nb = stack.shape[0] - 2
    nc = stack.shape[1] - 2
    inv = 1.0 / da
    m0, m1 = _slices(stack, sa, da, sb, db, sc, dc)
    acc = 0.0
    gb0 = 0.0
    gb1 = 0.0
    gc0 = 0.0
    gc1 = 0.0
    kb = db * inv
    kc = dc * inv
    b = sb + (m0 - sa) * kb + 1.0
    c = sc + (m0 - sa) * kc + 1.0
    t = (m0 - sa) * inv
    flat, s0, s1 = _flat(stack)
    u0, u1 = np.uint64(s0), np.uint64(s1)
    for m in range(m0, m1 + 1):
        bb = min(max(b, 0.0), nb + 0.999999)
        cc = min(max(c, 0.0), nc + 0.999999)
        b0 = int(bb)
        c0 = int(cc)
        fb = bb - b0
        fc = cc - c0
        i = np.uint64(b0 * s0 + c0 * s1 + m)
        v00 = flat[i]
        v01 = flat[i + u1]
        v10 = flat[i + u0]
        v11 = flat[i + u0 + u1]
        acc += (1.0 - fb) * ((1.0 - fc) * v00 + fc * v01) + fb * ((1.0 - fc) * v10 + fc * v11)
        gb = (1.0 - fc) * (v10 - v00) + fc * (v11 - v01)
        gc = (1.0 - fb) * (v01 - v00) + fb * (v11 - v10)
        gb0 += gb
        gb1 += gb * t
        gc0 += gc
        gc1 += gc * t
        b += kb
        c += kc
        t += inv
    return acc, gb0, gb1, gc0, gc1


@njit(cache=True, parallel=True, fastmath=True)
def joseph_views_jacobian(s_i, s_j, s_k, axes, params, motion, cols, rows, out, dout):
    """Line integrals for V views and their derivatives with respect to K motions of the
    volume (the exact derivative of Joseph's sum, the m-range's ends aside).

    Args:
        s_i, s_j, s_k, axes, params, cols, rows, out: as :func:`joseph_views`.
        motion: (V, K, 4, 3) float64: per motion k, the velocity (voxels per unit of the
            motion, in voxel coordinates i, j, k) of the ray's source, and of its direction
            (pixel minus source) at pixel (0, 0), per column and per row (a rigid motion
            moves both linearly over the detector).
        dout: (V, K, rows, cols) float32, written: d(line integral) / d(motion k).
    """
    V = params.shape[0]
    K = motion.shape[1]
    for vr in prange(V * rows):
        v = vr // rows
        r = vr % rows
        P = params[v]
        Q = motion[v]
        for col in range(cols):
            d0, d1, d2, length = _ray(P, col, r)
            a0, a1, a2 = abs(d0), abs(d1), abs(d2)
            if a0 >= a1 and a0 >= a2:
                ia, ib, ic, da, db, dc = 0, 1, 2, d0 / axes[0, 0], d1, d2
                acc, gb0, gb1, gc0, gc1 = _ray_sum_grad(s_i, (P[0, 0] - axes[1, 0]) / axes[0, 0], da, P[0, 1], d1,
                                                        P[0, 2], d2)
            elif a1 >= a2:
                ia, ib, ic, da, db, dc = 1, 0, 2, d1 / axes[0, 1], d0, d2
                acc, gb0, gb1, gc0, gc1 = _ray_sum_grad(s_j, (P[0, 1] - axes[1, 1]) / axes[0, 1], da, P[0, 0], d0,
                                                        P[0, 2], d2)
            else:
                ia, ib, ic, da, db, dc = 2, 0, 1, d2 / axes[0, 2], d0, d1
                acc, gb0, gb1, gc0, gc1 = _ray_sum_grad(s_k, (P[0, 2] - axes[1, 2]) / axes[0, 2], da, P[0, 0], d0,
                                                        P[0, 1], d1)
            fa = axes[0, ia]                     # the a coordinate's scale in the stack: its velocities too
            if abs(da) <= 1e-12:
                out[v, r, col] = 0.0
                for k in range(K):
                    dout[v, k, r, col] = 0.0
                continue
            w = length / abs(da)
            val = acc * w
            out[v, r, col] = val
            kb = db / da
            kc = dc / da
            for k in range(K):
                # velocity of the source and of the direction of this ray under motion k
                vs_a, vs_b, vs_c = Q[k, 0, ia] / fa, Q[k, 0, ib], Q[k, 0, ic]
                vd_a = (Q[k, 1, ia] + col * Q[k, 2, ia] + r * Q[k, 3, ia]) / fa
                vd_b = Q[k, 1, ib] + col * Q[k, 2, ib] + r * Q[k, 3, ib]
                vd_c = Q[k, 1, ic] + col * Q[k, 2, ic] + r * Q[k, 3, ic]
                # the sample in slice m moves along b by (v_b - v_a kb) at t_m (v = vs + t vd)
                dsum = ((vs_b - vs_a * kb) * gb0 + (vd_b - vd_a * kb) * gb1
                        + (vs_c - vs_a * kc) * gc0 + (vd_c - vd_a * kc) * gc1)
                dout[v, k, r, col] = dsum * w - val * vd_a / da
    return None
