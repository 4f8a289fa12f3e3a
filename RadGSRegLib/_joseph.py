"""Compiled (numba) kernel of the ``"joseph"`` DRR backend; see :mod:`RadGSRegLib.drr`.

Joseph's method: along each ray, one bilinear sample in every voxel slice perpendicular to
the ray's dominant axis, weighted by the ray length (mm) between two slices. Voxel values
sit at integer indices; outside the volume they are zero.

For speed the volume is kept as three zero-padded copies, each with one axis first
(:func:`padded_stacks`), so that the inner loop reads one slice of contiguous memory, needs
no bounds checks, and the rays are generated from the view's parameters inside the kernel.
"""
import numpy as np
from numba import njit, prange


def padded_stacks(vol: np.ndarray):
    """Three float32 copies of ``vol`` ([k, j, i]) laid out [a, b+1, c+1] with a zero
    border in b and c, for dominant axis a = i, j, k respectively (b < c in axis order)."""
    v = np.ascontiguousarray(vol, dtype=np.float32)
    s_i = np.transpose(v, (2, 1, 0))          # [i, j, k]  (b = j, c = k)
    s_j = np.transpose(v, (1, 2, 0))          # [j, i, k]  (b = i, c = k)
    s_k = np.transpose(v, (0, 2, 1))          # [k, i, j]  (b = i, c = j)
    padded = []
    for s in (s_i, s_j, s_k):
        p = np.zeros((s.shape[0], s.shape[1] + 2, s.shape[2] + 2), np.float32)
        p[:, 1:-1, 1:-1] = s
        padded.append(p)
    return tuple(padded)


@njit(cache=True, fastmath=True, inline="always")
def _ray_sum(stack, sa, da, sb, db, sc, dc):
    """Sum of bilinear samples of slices m of ``stack`` ([a, b+1, c+1], zero border) along
    the segment x(t) = s + t d, t in [0, 1], at t = (m - sa) / da."""
    na = stack.shape[0]
    nb = stack.shape[1] - 2
    nc = stack.shape[2] - 2
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
                return 0.0
        else:
            ma = (-1.0 - x0) / k
            mb = (n_ - x0) / k
            if ma > mb:
                ma, mb = mb, ma
            m0 = max(m0, int(np.floor(ma)) + 1)
            m1 = min(m1, int(np.ceil(mb)) - 1)
    acc = 0.0
    kb = db * inv
    kc = dc * inv
    b = sb + (m0 - sa) * kb + 1.0
    c = sc + (m0 - sa) * kc + 1.0
    for m in range(m0, m1 + 1):
        bb = min(max(b, 0.0), nb + 0.999999)
        cc = min(max(c, 0.0), nc + 0.999999)
        b0 = int(bb)
        c0 = int(cc)
        fb = bb - b0
        fc = cc - c0
        r0 = stack[m, b0]
        r1 = stack[m, b0 + 1]
        acc += (1.0 - fb) * ((1.0 - fc) * r0[c0] + fc * r0[c0 + 1]) + fb * ((1.0 - fc) * r1[c0] + fc * r1[c0 + 1])
        b += kb
        c += kc
    return acc


@njit(cache=True, parallel=True, fastmath=True)
def joseph_views(s_i, s_j, s_k, params, cols, rows, out):
    """Line integrals for V views.

    Args:
        s_i, s_j, s_k: :func:`padded_stacks` of the volume.
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
            d0 = P[1, 0] + col * P[2, 0] + r * P[3, 0] - P[0, 0]
            d1 = P[1, 1] + col * P[2, 1] + r * P[3, 1] - P[0, 1]
            d2 = P[1, 2] + col * P[2, 2] + r * P[3, 2] - P[0, 2]
            e0 = P[5, 0] + col * P[6, 0] + r * P[7, 0] - P[4, 0]
            e1 = P[5, 1] + col * P[6, 1] + r * P[7, 1] - P[4, 1]
            e2 = P[5, 2] + col * P[6, 2] + r * P[7, 2] - P[4, 2]
            length = np.sqrt(e0 * e0 + e1 * e1 + e2 * e2)
            a0, a1, a2 = abs(d0), abs(d1), abs(d2)
            if a0 >= a1 and a0 >= a2:
                acc = _ray_sum(s_i, P[0, 0], d0, P[0, 1], d1, P[0, 2], d2)
                da = a0
            elif a1 >= a2:
                acc = _ray_sum(s_j, P[0, 1], d1, P[0, 0], d0, P[0, 2], d2)
                da = a1
            else:
                acc = _ray_sum(s_k, P[0, 2], d2, P[0, 0], d0, P[0, 1], d1)
                da = a2
            out[v, r, col] = acc * length / da if da > 1e-12 else 0.0
