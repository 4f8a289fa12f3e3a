"""region.py: the one home of the reconstruction cube and the vertebra region."""
import numpy as np
import pytest
import torch

from RadGSRegLib.geometry import apply, compose, pose_to_matrix
from RadGSRegLib.region import (CROP_FACTOR, VertebraRegion, cube_affine, cube_affine_batch, ground_truth_volume,
                                resample_region, vertebra_region)
from RadGSRegLib.volume import Volume, resample_to_grid


def test_cube_is_centred_and_the_torch_batch_twin_agrees():
    c = np.array([3.0, -40.5, 17.25])
    shape, A = cube_affine(c, 96.0, 3.0)
    assert shape == (32, 32, 32)
    corners = np.array([[0, 0, 0, 1], [31, 31, 31, 1]], float) @ A.T
    assert np.allclose(corners[:, :3].mean(axis=0), c)                  # centred on c
    assert np.allclose(np.diag(A)[:3], 3.0)
    B = cube_affine_batch(torch.tensor(np.stack([c, -c])), 96.0, 32)
    assert B.shape == (2, 4, 4) and B.dtype == torch.float32
    assert np.allclose(B[0].numpy(), A, atol=1e-5)
    assert np.allclose(B[1].numpy(), cube_affine(-c, 96.0, 3.0)[1], atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        cube_affine(c, 0.0, 1.0)


def test_vertebra_region_holds_the_dilated_label_only(small_phantom):
    ct, seg = small_phantom
    reg = vertebra_region(ct, seg, 29, dilate_mm=4.0)
    assert reg.same_grid(ct) and reg.array.dtype == np.float32
    inside = reg.array > 0
    assert inside[seg.array == 29].mean() > 0.95                         # the vertebra's bone is in
    assert not inside[seg.array == 27].any()                             # two levels away is not
    vr = VertebraRegion.of(ct, seg, 29, side_mm=96.0, voxel_mm=3.0)
    assert vr.crop.array.shape == (40, 40, 40)                           # CROP_FACTOR x 96 mm at 3 mm
    assert CROP_FACTOR * 96.0 == 40 * 3.0
    centre = vr.crop.index_to_world(np.array([19.5, 19.5, 19.5]))
    assert np.allclose(centre, seg.label_centroid(29))
    assert np.isclose(vr.crop.array.sum() * 27.0, reg.array.sum() * np.prod(ct.spacing), rtol=0.05)
    with pytest.raises(ValueError, match="not in the label map"):
        VertebraRegion.of(ct, seg, 99, side_mm=96.0, voxel_mm=3.0)


def test_torch_placement_agrees_with_the_numpy_reference(small_phantom):
    """resample_region (torch, differentiable) vs ground_truth_volume (scipy) at one pose."""
    ct, seg = small_phantom
    vr = VertebraRegion.of(ct, seg, 29, side_mm=64.0, voxel_mm=4.0)
    G = compose(pose_to_matrix([5.0, -3.0, 8.0, 2.0, -4.0, 6.0]), np.eye(4))
    G[:3, 3] -= G[:3, :3] @ vr.centroid
    shape, A = cube_affine(apply(G, vr.centroid), 64.0, 4.0)
    ref = ground_truth_volume(ct, seg, 29, G, shape, A)
    crop_ref = resample_to_grid(vr.crop, shape, A, G)                    # the same placement, numpy
    out = resample_region(torch.as_tensor(vr.crop.array)[None, None], torch.as_tensor(vr.crop.affine)[None].float(),
                          torch.as_tensor(G)[None].float(), torch.as_tensor(A)[None].float(), shape[0])
    assert out.shape == (1, 1) + shape
    assert np.allclose(out[0, 0].numpy(), crop_ref.array, atol=2e-4)
    a, b = out[0, 0].numpy().ravel(), ref.array.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9                                 # the crop (4 mm) vs the CT grid
    assert isinstance(ref, Volume)
