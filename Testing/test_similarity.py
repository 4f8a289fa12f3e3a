"""similarity.py: every NCC against a plain reference."""
import numpy as np
import torch

from RadGSRegLib.similarity import (contrast_outliers, highpass, ncc, ncc_from_residuals, ncc_map, ncc_map_tiled,
                                   ncc_residuals, ncc_torch, tile_grid, zscore)


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


def test_ncc_map_with_a_template_mask_matches_a_loop_over_positions(rng):
    """The DRR's pixels whose rays leave the CT are left out: only pixels valid in both
    the image and the template count, and the overlap is a fraction of the valid template."""
    img = rng.normal(size=(20, 24))
    tpl = img[5:12, 8:17] + 0.1 * rng.normal(size=(7, 9))
    tpl[:2] = 50.0                                                         # what the template cannot explain
    tv = np.ones(tpl.shape, bool)
    tv[:2] = False
    valid = np.ones(img.shape, bool)
    valid[:, :3] = False
    m = ncc_map(img, tpl, valid, min_overlap=0.5, template_valid=tv)
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            win, ok = img[r:r + 7, c:c + 9], valid[r:r + 7, c:c + 9] & tv
            if ok.sum() < 0.5 * tv.sum():
                assert m[r, c] == -1.0
            else:
                assert np.isclose(m[r, c], _ncc_ref(win[ok], tpl[ok]), atol=1e-9), (r, c)
    assert np.unravel_index(np.argmax(m), m.shape) == (5, 8) and m[5, 8] > 0.99
    # what a mask leaves out does not count, even when it is not a number
    tpl[0, 0] = np.nan
    img_nan = img.copy()
    img_nan[:, 0] = np.nan
    assert np.allclose(ncc_map(img_nan, tpl, valid, template_valid=tv), m)


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


def test_tile_grid_covers_the_window_once():
    for shape, px in (((37, 50), 8.0), ((5, 7), 20.0), ((64, 64), 16.0)):
        cover = np.zeros(shape, int)
        for rs, cs in tile_grid(shape, px):
            cover[rs, cs] += 1
            assert rs.stop > rs.start and cs.stop > cs.start
        assert np.all(cover == 1)
    assert len(tile_grid((64, 64), 16.0)) == 16 and len(tile_grid((5, 7), 20.0)) == 1


def test_contrast_outliers_are_the_tiles_far_above_the_ordinary_ratio():
    ratio = np.array([1.0, 0.9, 1.1, 1.2, 0.8, 4.0, 6.0, np.inf])
    out = contrast_outliers(ratio, 2.5)
    assert out.tolist() == [False] * 5 + [True] * 3
    # robust to many outliers: the reference is the lower quartile
    assert contrast_outliers(np.r_[np.ones(4), 10 * np.ones(5)], 2.5).sum() == 5


def _tiled_ref(img, tpl, valid, tile_px, reject, tvalid=None):
    """A loop over positions and tiles of the plain NCC (the definition of ncc_map_tiled)."""
    h, w = tpl.shape
    tvalid = np.ones(tpl.shape, bool) if tvalid is None else tvalid
    out = np.zeros((img.shape[0] - h + 1, img.shape[1] - w + 1))
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            vals, wts, ratios = [], [], []
            for rs, cs in tile_grid((h, w), tile_px):
                t, tv = tpl[rs, cs], tvalid[rs, cs]
                win = img[r + rs.start:r + rs.stop, c + cs.start:c + cs.stop]
                ok = valid[r + rs.start:r + rs.stop, c + cs.start:c + cs.stop] & tv
                if tv.sum() < 8 or ok.sum() < 0.5 * tv.sum():      # too little overlap: the tile is not there
                    continue
                vals.append(_ncc_ref(win[ok], t[ok]))
                wts.append(t[tv].std())
                ratios.append(win[ok].std() / t[tv].std())
            if not vals:
                continue
            keep = np.array(ratios) <= reject * np.percentile(ratios, 25) if reject else np.ones(len(vals), bool)
            wts = np.array(wts) * keep
            out[r, c] = np.sum(np.array(vals) * wts) / wts.sum()
    return out


def test_tiled_ncc_map_matches_a_loop_over_positions_and_tiles(rng):
    img = rng.normal(size=(22, 26))
    tpl = img[6:18, 5:17] + 0.1 * rng.normal(size=(12, 12))
    valid = np.ones(img.shape, bool)
    valid[:, :4] = False                         # a field edge: some tiles lose their overlap
    for reject in (0.0, 2.5):
        m = ncc_map_tiled(img, tpl, valid, tile_px=4.0, reject=reject)
        assert np.allclose(m, _tiled_ref(img, tpl, valid, 4.0, reject), atol=1e-9)
        assert np.unravel_index(np.argmax(m), m.shape) == (6, 5)
    tv = np.ones(tpl.shape, bool)
    tv[:5, :7] = False                           # DRR pixels the CT does not cover: a whole tile and parts of others
    tpl_bad = tpl.copy()
    tpl_bad[~tv] = 40.0
    m = ncc_map_tiled(img, tpl_bad, valid, tile_px=4.0, reject=2.5, template_valid=tv)
    assert np.allclose(m, _tiled_ref(img, tpl_bad, valid, 4.0, 2.5, tv), atol=1e-9)
    assert np.unravel_index(np.argmax(m), m.shape) == (6, 5)
    # one tile, no rejection: the plain NCC map, wherever the overlap suffices
    plain = ncc_map(img, tpl, valid)
    one = ncc_map_tiled(img, tpl, valid, tile_px=100.0)
    assert np.allclose(one[plain > -1], plain[plain > -1]) and np.all(one[plain == -1] == 0)


def test_tiled_ncc_ignores_a_bright_bar_the_template_lacks(rng):
    """Metal in the X-ray only: bars of strong contrast across part of the image. At the true
    shift the plain NCC drops far below 1; the tiled map that leaves the outlier tiles out
    keeps the tiles without metal, near 1, and more than the tiled map without rejection."""
    img = highpass(rng.normal(size=(48, 48)), 0.7) * 0.3
    tpl = img[12:36, 10:34].copy()
    img[14:17, 8:40] += 3.0                      # a "K-wire" across the vertebra, absent from the template
    img[24:34, 30:33] += 3.0
    m_plain = ncc_map(img, tpl)
    m_keep_all = ncc_map_tiled(img, tpl, tile_px=6.0)
    m_tiled = ncc_map_tiled(img, tpl, tile_px=6.0, reject=2.5)
    assert np.unravel_index(np.argmax(m_tiled), m_tiled.shape) == (12, 10)
    assert m_plain[12, 10] < 0.5 and m_tiled[12, 10] > 0.95
    assert m_tiled[12, 10] > m_keep_all[12, 10] + 0.1


def test_noise_ceiling_is_the_best_ncc_the_noise_allows():
    """Smooth anatomy plus white noise of a known sigma: noise_sigma finds the sigma, and the
    ceiling matches sqrt(signal variance / total variance) of the compared (high-passed)
    window, which the noise-free image itself scores against the noisy one."""
    from scipy import ndimage

    from RadGSRegLib.similarity import highpass, ncc, noise_ceiling, noise_sigma

    rng = np.random.default_rng(3)
    clean = ndimage.gaussian_filter(rng.normal(0, 1, (120, 140)), 6.0)            # smooth "anatomy"
    clean /= clean.std()
    for sigma in (0.3, 0.8):
        noisy = clean + rng.normal(0, sigma, clean.shape)
        assert abs(noise_sigma(noisy) - sigma) < 0.1 * sigma
        hp_c, hp_n = highpass(clean, 8.0), highpass(noisy, 8.0)
        want = np.sqrt(hp_c.var() / (hp_c.var() + sigma ** 2))
        got = noise_ceiling(hp_n, sigma ** 2)
        assert abs(got - want) < 0.03, (sigma, got, want)
        assert abs(ncc(hp_c, hp_n) - got) < 0.03
    valid = np.ones(clean.shape, bool)
    valid[:, :70] = False
    noisy = clean + rng.normal(0, 0.3, clean.shape)
    noisy[~valid] = 1e3                                        # no signal there: must not count
    assert abs(noise_sigma(noisy, valid) - 0.3) < 0.03
    hp_c, hp_n = highpass(clean, 8.0, valid), highpass(noisy, 8.0, valid)
    want = np.sqrt(hp_c[valid].var() / (hp_c[valid].var() + 0.09))
    assert abs(noise_ceiling(hp_n, 0.09, valid) - want) < 0.03
    assert noise_ceiling(np.ones((30, 30)), 0.01) == 0.0      # flat: nothing to correlate


def test_ncc_residuals_jacobian_is_the_derivative_of_ncc_residuals():
    """The z-score's derivative (issue #21's analytic Jacobian): residuals equal
    :func:`ncc_residuals`, and each column matches central differences along a direction."""
    from RadGSRegLib.similarity import ncc_residuals, ncc_residuals_jacobian

    rng = np.random.default_rng(3)
    a, b, da = rng.normal(size=200), rng.normal(size=200), rng.normal(size=(3, 200))
    r, J = ncc_residuals_jacobian(a, da, b)
    assert np.allclose(r, ncc_residuals(a, b)) and J.shape == (200, 3)
    h = 1e-6
    for k in range(3):
        fd = (ncc_residuals(a + h * da[k], b) - ncc_residuals(a - h * da[k], b)) / (2 * h)
        assert np.allclose(J[:, k], fd, atol=1e-6)
