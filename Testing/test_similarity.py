"""similarity.py: every NCC against a plain reference."""
import numpy as np
import torch

from RadGSRegLib.similarity import highpass, ncc, ncc_from_residuals, ncc_map, ncc_residuals, ncc_torch, zscore


def _ncc_ref(a, b):
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_global_ncc_numpy_and_torch_match_the_definition(rng):
    a = rng.normal(size=(7, 9, 5))
    b = 0.5 * a + rng.normal(size=a.shape)
    assert np.isclose(ncc(a, b), _ncc_ref(a, b))
    assert np.isclose(ncc(a, 3 * a + 2), 1.0) and np.isclose(ncc(a, -a), -1.0)
    t = ncc_torch(torch.tensor(np.stack([a, -a])), torch.tensor(np.stack([b, b])))
    assert np.allclose(t.numpy(), [_ncc_ref(a, b), _ncc_ref(-a, b)])
    # the residual form the 2-D/3-D refinement minimises: 1 - NCC = |z(a) - z(b)|^2 / (2 N)
    assert np.isclose(1 - ncc(a, b), np.sum((zscore(a) - zscore(b)) ** 2) / (2 * a.size))
    assert np.isclose(ncc_from_residuals(ncc_residuals(a, b)), _ncc_ref(a, b))
    assert np.all(zscore(np.full(5, 3.0)) == 0)                           # constant: zeros, not NaN


def test_masked_ncc_map_matches_a_loop_over_positions(rng):
    img = rng.normal(size=(20, 24))
    tpl = img[5:12, 8:17] + 0.1 * rng.normal(size=(7, 9))
    valid = np.ones(img.shape, bool)
    valid[:, :3] = False                                                   # padding on the left
    m = ncc_map(img, tpl, valid, min_overlap=0.5)
    assert m.shape == (20 - 7 + 1, 24 - 9 + 1)
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            win, ok = img[r:r + 7, c:c + 9], valid[r:r + 7, c:c + 9]
            if ok.mean() < 0.5:
                assert m[r, c] == -1.0
            else:
                assert np.isclose(m[r, c], _ncc_ref(win[ok], tpl[ok]), atol=1e-9), (r, c)
    assert np.unravel_index(np.argmax(m), m.shape) == (5, 8)


def test_highpass_removes_smooth_background(rng):
    yy, xx = np.mgrid[:64, :64]
    edge = (xx > 32).astype(float)
    out = highpass(edge + 0.01 * yy + 0.02 * xx, 4.0)
    assert abs(out[10:54, 5:25].mean()) < 0.05 and np.ptp(out[32, 28:38]) > 0.5


def test_masked_highpass_ignores_what_lies_outside(rng):
    a = rng.normal(size=(40, 40)).cumsum(axis=1)
    yy, xx = np.mgrid[:40, :40]
    inside = (yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2
    b = np.where(inside, a, 1e3)                                        # the black outside an intensifier's field
    c = np.where(inside, a, -7.0)
    hb, hc = highpass(b, 3.0, inside), highpass(c, 3.0, inside)
    assert np.allclose(hb, hc) and np.all(hb[~inside] == 0)
    assert np.abs(hb[inside]).max() < 20                                # nothing of the 1e3 leaked in
    assert np.array_equal(highpass(a, 3.0, np.ones_like(inside)), highpass(a, 3.0))   # all valid: the plain filter
