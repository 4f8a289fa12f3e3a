
import numpy as np
import pytest
import torch

from RadGSRegLib.drr import DRR
from RadGSRegLib.gaussians import (RadiativeGaussians, projected_boxes, rasterize, rasterize_dense, render,
                                   voxelize, voxelize_dense, voxelize_model)
from RadGSRegLib.geometry import biplanar_views, pose_to_matrix
from RadGSRegLib.volume import Volume, affine_from


def _random_set(n=150, seed=0, scale=4.0):
    rng = np.random.default_rng(seed)
    g = RadiativeGaussians.random_in_box(n, [-30, -30, -30], [30, 30, 30], rng, scale=scale, density=0.01)
    with torch.no_grad():
        g._scale.add_(torch.from_numpy(rng.normal(0, 0.8, (n, 3))).float())   # anisotropic
        g._density.add_(torch.from_numpy(rng.normal(0, 0.5, n)).float())
    return g


def test_activations_keep_parameters_valid():
    g = _random_set()
    cov, prec = g.covariance().double(), g.precision().double()
    assert torch.allclose(cov @ prec, torch.eye(3, dtype=torch.float64).expand_as(cov), atol=1e-3)
    W = g.whitening()
    assert torch.allclose(W.transpose(1, 2) @ W, g.precision(), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * 50)
    lo, hi = g.scale_range
    assert torch.all(g.density >= 0) and torch.all(torch.isfinite(g.density)) and torch.all(g.scale >= lo) and torch.all(g.scale <= hi)
    assert torch.allclose(g.rotation.norm(dim=1), torch.ones(len(g)))
    assert torch.all(torch.isfinite(g.covariance())) and torch.all(torch.isfinite(g.precision()))


def test_projected_integral_matches_the_line_integral():
    # one anisotropic, rotated Gaussian; the pixel value is the integral along the pixel's ray
    g = RadiativeGaussians(torch.tensor([[5.0, -3.0, 8.0]]), torch.tensor([[2.0, 6.0, 3.5]]),
                           torch.nn.functional.normalize(torch.tensor([[0.3, -0.2, 0.5, 0.8]]), dim=-1),
                           torch.tensor([0.05]))
    view = biplanar_views(pixels=48)["ap"]
    img = render(g, [view], cutoff=6.0)[0].double()
    p, M, rho = (x.detach().double() for x in (g.position[0], g.precision()[0], g.density[0]))
    for col, row in [(24, 22), (30, 20), (20, 30), (27, 24)]:
        o, d = view.pixel_rays(np.array(col), np.array(row))
        t = torch.linspace(0.0, 1400.0, 280001, dtype=torch.float64)
        x = torch.as_tensor(o)[None] + t[:, None] * torch.as_tensor(d)[None]
        q = x - p
        vals = rho * torch.exp(-0.5 * torch.einsum("ti,ij,tj->t", q, M, q))
        ref = torch.trapezoid(vals, t)
        assert img[row, col].item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-9)


def test_rasterizer_agrees_with_dense_reference():
    g = _random_set()
    views = list(biplanar_views(pixels=40).values())
    with torch.no_grad():
        ref = rasterize_dense(g.density.double(), g.position.double(), g.precision().double(), views)
        wide = render(g, views, cutoff=6.0).double()
        std = render(g, views).double()
    assert (wide - ref).abs().max() < 1e-4 * ref.max()
    assert (std - ref).abs().max() < 0.02 * ref.max()       # 3-sigma truncation


def test_projected_boxes_hold_the_ellipsoid():
    g = _random_set(seed=3)
    view = biplanar_views(pixels=64)["lat"]
    with torch.no_grad():
        pos, cov = g.position.double(), g.covariance().double()
        u0, u1, v0, v1 = projected_boxes(pos, cov, view, 3.0)
        L = torch.linalg.cholesky(cov)
        z = torch.nn.functional.normalize(torch.randn(len(g), 400, 3, dtype=torch.float64), dim=-1) * 3.0
        pts = pos[:, None, :] + (L @ z.transpose(1, 2)).transpose(1, 2)
    uv = torch.from_numpy(view.project(pts.numpy()))
    inside_u = (uv[..., 0] >= 0) & (uv[..., 0] <= 63)
    ok = (uv[..., 0].floor() >= u0[:, None] - 1) & (uv[..., 0].ceil() <= u1[:, None] + 1)
    assert bool(ok[inside_u].all())
    ok_v = (uv[..., 1].floor() >= v0[:, None] - 1) & (uv[..., 1].ceil() <= v1[:, None] + 1)
    assert bool(ok_v[(uv[..., 1] >= 0) & (uv[..., 1] <= 63)].all())


def test_voxelizer_agrees_with_dense_reference_on_an_oblique_grid():
    g = _random_set(seed=1)
    A = affine_from([-39, -39, -45], [2.0, 2.0, 2.5], pose_to_matrix([10, 20, 30, 0, 0, 0])[:3, :3])
    with torch.no_grad():
        ref = voxelize_dense(g.density.double(), g.position.double(), g.precision().double(), (36, 40, 44), A)
        wide = voxelize_model(g, (36, 40, 44), A, cutoff=6.0).double()
        std = voxelize_model(g, (36, 40, 44), A).double()
    assert wide.shape == (36, 40, 44)
    assert (wide - ref).abs().max() < 1e-4 * ref.max()
    assert (std - ref).abs().max() < 0.02 * ref.max()


def test_rasterize_many_and_voxelize_many_equal_one_set_at_a_time():
    """The batched passes (every set's pairs grouped together, one image / grid each) give
    what one call per set gives, values and gradients, whatever the chunk size; sets of
    other sizes, views and grids (an oblique one) do not leak into each other."""
    from RadGSRegLib.gaussians import rasterize_many, voxelize_many

    sets = [_random_set(n, seed=s) for n, s in ((150, 4), (40, 5), (90, 6))]
    vs = biplanar_views(pixels=48)
    views = [[vs["ap"], vs["lat"]], [vs["lat"]], [vs["ap"].cropped(6, -4, 48, 48)]]
    grids = [affine_from([-40] * 3, [2.5] * 3), affine_from([-30, -35, -40], [2.0, 2.0, 2.5],
                                                             pose_to_matrix([10, 20, 30, 0, 0, 0])[:3, :3]),
             affine_from([-20] * 3, [1.5] * 3)]

    def tensors(g):
        return (g.density.double(), g.position.double(), g.covariance().double(), g.whitening().double(),
                g.precision().double())

    def grads(images):
        for g in sets:
            for p in g.parameters():
                p.grad = None
        torch.stack([(im * (1 + torch.arange(im.numel(), dtype=im.dtype).reshape(im.shape) % 7)).sum()
                     for im in images]).sum().backward()
        return [p.grad.clone() for g in sets for p in g.parameters()]

    one = [rasterize(*tensors(g)[:4], v) for g, v in zip(sets, views)]
    g_one = grads(one)
    for chunk in (None, 64):
        many = rasterize_many([(*tensors(g)[:4], v) for g, v in zip(sets, views)], chunk_pairs=chunk)
        assert [m.shape for m in many] == [o.shape for o in one]
        for m, o in zip(many, one):
            assert torch.allclose(m, o, rtol=1e-10, atol=1e-14)
        for a, b in zip(grads(many), g_one):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    shape = (20, 24, 28)
    vone = [voxelize(*[t for i, t in enumerate(tensors(g)) if i != 3], shape, A) for g, A in zip(sets, grids)]
    vg_one = grads(vone)
    for chunk in (None, 64):
        vmany = voxelize_many([(*[t for i, t in enumerate(tensors(g)) if i != 3], A) for g, A in zip(sets, grids)],
                              shape, chunk_pairs=chunk)
        assert vmany.shape == (3, *shape)
        for m, o in zip(vmany, vone):
            assert torch.allclose(m, o, rtol=1e-10, atol=1e-14)
        for a, b in zip(grads(list(vmany)), vg_one):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)


def test_rasterizer_and_drr_of_voxelized_volume_agree():
    g = _random_set(seed=2)
    views = list(biplanar_views(pixels=64).values())
    A = affine_from([-49.5] * 3, [1.0] * 3)
    with torch.no_grad():
        vol = voxelize_model(g, (100, 100, 100), A)
        img = render(g, views)
    drr = DRR(vol.numpy(), A).render(views).numpy()
    for i in range(2):
        assert np.corrcoef(drr[i].ravel(), img[i].numpy().ravel())[0, 1] >= 0.99
        assert drr[i].sum() / img[i].numpy().sum() == pytest.approx(1.0, abs=0.02)


def test_gradcheck_float64():
    torch.manual_seed(0)
    n = 4
    pos = (torch.rand(n, 3, dtype=torch.float64) - 0.5) * 20
    raw_scale = torch.rand(n, 3, dtype=torch.float64) * 2 + 2
    quat = torch.nn.functional.normalize(torch.randn(n, 4, dtype=torch.float64), dim=-1)
    rho = torch.rand(n, dtype=torch.float64) * 0.05 + 0.01
    views = [biplanar_views(pixels=12, detector_mm=60.0)["ap"]]
    import roma

    def f(rho, pos, scale, quat):
        R = roma.unitquat_to_rotmat(torch.nn.functional.normalize(quat, dim=-1))
        cov = (R * scale[:, None, :] ** 2) @ R.transpose(1, 2)
        W = R.transpose(1, 2) / scale[:, :, None]
        return rasterize(rho, pos, cov, W, views, cutoff=3.0)

    inputs = tuple(x.clone().requires_grad_(True) for x in (rho, pos, raw_scale, quat))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)

    A = torch.as_tensor(affine_from([-12] * 3, [2.0] * 3))

    def fv(rho, pos, scale, quat):
        R = roma.unitquat_to_rotmat(torch.nn.functional.normalize(quat, dim=-1))
        cov = (R * scale[:, None, :] ** 2) @ R.transpose(1, 2)
        prec = (R / scale[:, None, :] ** 2) @ R.transpose(1, 2)
        return voxelize(rho, pos, cov, prec, (10, 10, 10), A.numpy())

    assert torch.autograd.gradcheck(fv, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("ext", [".pt", ".npz"])
def test_save_load_round_trip(tmp_path, ext):
    g = _random_set()
    g.save(tmp_path / f"g{ext}")
    h = RadiativeGaussians.load(tmp_path / f"g{ext}")
    assert torch.allclose(g.position, h.position) and torch.allclose(g.scale, h.scale, rtol=1e-4)
    assert torch.allclose(g.density, h.density, rtol=1e-4) and torch.allclose(g.covariance(), h.covariance(), rtol=1e-3, atol=1e-4)
    if ext == ".npz":
        d = np.load(tmp_path / "g.npz")
        assert set(d.files) >= {"positions", "scales", "rotations_xyzw", "densities"}


def test_init_from_volume_reproduces_its_mass():
    arr = np.zeros((30, 30, 30), np.float32)
    arr[8:22, 10:20, 5:25] = 0.03
    vol = Volume(arr, affine_from([-29.0, -29.0, -29.0], [2.0, 2.0, 2.0]))
    g = RadiativeGaussians.from_volume(vol, 800, np.random.default_rng(0))
    assert len(g) == 800
    lo, hi = vol.index_to_world(np.array([5, 10, 8]) - 0.5), vol.index_to_world(np.array([24, 19, 21]) + 0.5)
    inside = ((g.position.detach().numpy() >= lo - 1e-3) & (g.position.detach().numpy() <= hi + 1e-3)).all(1)
    assert inside.all()
    mass = float(g.total_mass().detach())
    assert mass == pytest.approx(arr.sum() * 8.0, rel=0.05)
    with torch.no_grad():
        vox = voxelize_model(g, arr.shape, vol.affine)
    assert float(vox.sum()) * 8.0 == pytest.approx(arr.sum() * 8.0, rel=0.1)


def test_fitting_lowers_the_loss_and_approaches_the_volume():
    from RadGSRegLib.gaussians.fit import FitConfig, fit_gaussians
    from RadGSRegLib.geometry import c_arm_view
    from RadGSRegLib.metrics import recon_metrics

    # a small blob object, 8 views around it
    n, sp = 24, 2.0
    A = affine_from([-(n - 1) / 2 * sp] * 3, [sp] * 3)
    truth = _random_set(n=30, seed=5, scale=5.0)
    with torch.no_grad():
        gt = voxelize_model(truth, (n, n, n), A)
    views = [c_arm_view(a, pixels=32, pixel_spacing=4.0) for a in np.linspace(0, 360, 8, endpoint=False)]
    images = DRR(gt.numpy(), A).render(views)
    cfg = FitConfig(n_gaussians=300, max_gaussians=600, iterations=60, densify_every=20, tv_block=12, seed=1)
    res = fit_gaussians(images, views, (n, n, n), A, cfg)
    first = np.mean([h["loss"] for h in res.history[:2]])
    last = np.mean([h["loss"] for h in res.history[-2:]])
    assert last < 0.5 * first
    assert len(res.gaussians) > 300                        # densification added Gaussians
    with torch.no_grad():
        rec = voxelize_model(res.gaussians, (n, n, n), A).numpy()
    assert recon_metrics(rec, gt.numpy())["psnr_db"] > 15


def test_fit_gaussians_command_writes_a_placed_reconstruction(tmp_path):
    from RadGSRegLib.cli import main
    from RadGSRegLib.io import read_volume

    assert main(["sample-case", "--level", "L3", "--out", str(tmp_path / "c"), "--pixels", "64"]) == 0
    assert main(["fit-gaussians", str(tmp_path / "c"), "--out", str(tmp_path / "fit"), "--simulated",
                 "--iterations", "15", "--gaussians", "200", "--pixels", "32", "--grid-mm", "60", "--voxel-mm", "3"]) == 0
    rec = read_volume(tmp_path / "fit" / "recon.nrrd")
    assert rec.array.shape == (20, 20, 20)
    assert np.allclose(rec.spacing, 3.0) and np.allclose(rec.index_to_world(np.array([9.5, 9.5, 9.5])), 0, atol=1e-6)
    assert rec.array.max() > 0
    g = RadiativeGaussians.load(tmp_path / "fit" / "gaussians.npz")
    assert len(g) >= 200
    import json

    report = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert "psnr_db" in report["metrics_vs_ground_truth"] and report["config"]["iterations"] == 15


def test_fit_case_fits_scores_and_says_what_it_fits():
    """fit_case: the per-case fit of `radgsreg fit-gaussians` as a library call: DRRs of the
    vertebra at the truth (an orbit here) or the X-rays, scored when the case has a truth,
    seeded (the same config, the same fit)."""
    import dataclasses

    from RadGSRegLib.cases import CaseGenConfig, sample_case
    from RadGSRegLib.gaussians.fit import FitConfig, fit_case

    case = sample_case("L3", CaseGenConfig(pixels=64, rot_deg=5.0, trans_mm=5.0))     # the vertebra in the cube
    cfg = FitConfig(iterations=3, n_gaussians=100, max_gaussians=500, seed=1)
    lines, steps = [], []
    fit = fit_case(case, cfg, simulated=True, views=3, pixels=32, grid_mm=48.0, voxel_mm=3.0, log=lines.append,
                   progress=lambda step, rec: steps.append(step))
    assert lines == ["fitting 100 Gaussians to 3 DRRs of the vertebra alone at its true pose (validation of the "
                     "fitting), 32x32 pixels, 3 iterations, grid 16^3 at 3.0 mm"]
    assert steps == [0, 1, 2] and fit.recon.array.shape == (16, 16, 16)
    assert set(fit.report) == {"source", "config", "seconds", "n_gaussians", "history", "metrics_vs_ground_truth"}
    assert fit.report["n_gaussians"] == len(fit.result.gaussians) and fit.report["config"] == cfg.to_dict()
    assert np.isfinite(fit.report["metrics_vs_ground_truth"]["psnr_db"])
    again = fit_case(case, cfg, simulated=True, views=3, pixels=32, grid_mm=48.0, voxel_mm=3.0)
    assert again.report["history"] == fit.report["history"]
    # without a truth: the X-rays only, and no score
    blind = dataclasses.replace(case, ground_truth=None)
    xr = fit_case(blind, cfg, pixels=32, grid_mm=48.0, voxel_mm=3.0)
    assert xr.report["source"] == "the case's AP + lateral X-rays" and "metrics_vs_ground_truth" not in xr.report
    with pytest.raises(ValueError, match="ground truth and vertebra labels"):
        fit_case(blind, cfg, simulated=True, pixels=32, grid_mm=48.0, voxel_mm=3.0)
    with pytest.raises(ValueError, match="views=3"):
        fit_case(case, cfg, views=3, pixels=32)
    # the vertebra 150 mm from the isocentre: nothing of it in a 48 mm cube, a clear refusal (was a NaN loss)
    from RadGSRegLib.errors import InputError
    from RadGSRegLib.geometry import compose, translation

    far = dataclasses.replace(case, ground_truth=compose(translation([150.0, 0.0, 0.0]), case.ground_truth))
    with pytest.raises(InputError, match="outside the fitting cube.*--grid-mm"):
        fit_case(far, cfg, simulated=True, pixels=32, grid_mm=48.0, voxel_mm=3.0)
