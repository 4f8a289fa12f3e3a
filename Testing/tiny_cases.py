"""A tiny but plausible case in memory (16 x 17 x 18 voxels of 3 mm, 40 x 32 pixel X-rays of
noise), for the tests of the case format and of output handling."""
import numpy as np

from RadGSRegLib import io
from RadGSRegLib.geometry import biplanar_views, pose_to_matrix
from RadGSRegLib.volume import Volume, affine_from


def tiny_case(rng=None, *, extra=None) -> io.Case:
    rng = rng if rng is not None else np.random.default_rng(0)
    ct = Volume(rng.uniform(-1000, 1000, (16, 17, 18)).astype(np.float32),
                affine_from([-20, -25, -15], [3.0, 3.0, 3.0], np.diag([-1.0, -1.0, 1.0])))
    seg = np.zeros((16, 17, 18), np.int16)
    seg[5:10, 6:11, 7:12] = 29
    views = biplanar_views(pixels=(40, 32), detector_mm=(120.0, 96.0))
    xrays = {k: rng.uniform(0, 5, v.shape).astype(np.float32) for k, v in views.items()}
    return io.Case(ct=ct, seg=Volume(seg, ct.affine), vertebra_label=29, vertebra_name="L3", views=views,
                   xrays=xrays, initial_guess=pose_to_matrix([0, 0, 0, 1, 2, 3]),
                   ground_truth=pose_to_matrix([5, 0, -3, 4, 5, 6]), extra=dict(extra or {}))
