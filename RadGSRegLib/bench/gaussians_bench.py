"""``radgsreg bench gaussians``: rasterizer and voxelizer time and memory.

Workloads (issue 3): rasterizer, 2 views at 256^2, N = 4k and 20k Gaussians, random
rotations, in an 80 mm cube around the isocentre; voxelizer, 64^3 and 128^3 grids over that
cube. Two size mixes: sigma = 1.5 mm on every axis (what fitting a vertebra from many views
ends with: median fitted sigma 1.3 mm) and sigma uniform in 1-3 mm per axis (what a
two-view fit ends with: median 2.8 mm); work grows with sigma^2 (rasterizer) and sigma^3
(voxelizer). Forward and forward + backward, median of ``repeat`` runs after a warm-up,
each workload in its own child process so that its peak resident memory is its own. The
reference is a naive dense evaluation (every Gaussian at every pixel/voxel, in chunks of
Gaussians), timed once on the same machine in the same run.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from ..workers import run_in_child

__all__ = ["run_gaussians_bench"]


def _gaussians(n, sigma, seed=0):
    import torch

    from ..gaussians import RadiativeGaussians

    rng = np.random.default_rng(seed)
    g = RadiativeGaussians.random_in_box(n, [-40] * 3, [40] * 3, rng, scale=1.5, density=0.01)
    with torch.no_grad():
        sc = torch.from_numpy(rng.uniform(sigma[0], sigma[1], (n, 3))).float()
        lo, hi = g.scale_range
        frac = (sc - lo) / (hi - lo)
        g._scale.copy_(torch.log(frac / (1 - frac)))
    return g


def _child(kind, n, size, sigma, repeat, threads, dense) -> dict:
    import torch

    torch.set_num_threads(threads)
    from ..gaussians import rasterize, rasterize_dense, voxelize, voxelize_dense
    from ..geometry import biplanar_views
    from ..volume import affine_from

    g = _gaussians(n, sigma)
    if kind == "raster":
        views = list(biplanar_views(pixels=size).values())
        fwd = lambda: rasterize(g.density, g.position, g.covariance(), g.whitening(), views)  # noqa: E731

        def ref():
            with torch.no_grad():
                prec = g.precision()
                return sum(rasterize_dense(g.density[i:i + 64], g.position[i:i + 64], prec[i:i + 64], views)
                           for i in range(0, n, 64))
    else:
        sp = 80.0 / (size - 1)
        A = affine_from([-40.0] * 3, [sp] * 3)
        fwd = lambda: voxelize(g.density, g.position, g.covariance(), g.precision(), (size,) * 3, A)  # noqa: E731

        def ref():
            with torch.no_grad():
                prec = g.precision()
                return sum(voxelize_dense(g.density[i:i + 16], g.position[i:i + 16], prec[i:i + 16], (size,) * 3, A)
                           for i in range(0, n, 16))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"kind": kind, "n": n, "size": size, "sigma_mm": list(sigma)}
    with torch.no_grad():
        fwd()
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fwd()
            ts.append(time.perf_counter() - t)
    res["forward_ms"] = 1e3 * statistics.median(ts)
    ts = []
    for _ in range(max(1, repeat // 2)):
        g.zero_grad()
        t = time.perf_counter()
        fwd().sum().backward()
        ts.append(time.perf_counter() - t)
    res["forward_backward_ms"] = 1e3 * statistics.median(ts)
    res["peak_extra_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    if dense:
        t = time.perf_counter()
        ref()
        res["dense_forward_ms"] = 1e3 * (time.perf_counter() - t)
    return res


def run_gaussians_bench(*, threads: int = 1, repeat: int = 5, json_path: Path | None = None, overwrite: bool = True,
                        log=print) -> dict:
    """Run the benchmark; print a table; return (and optionally write) the results.

    ``json_path`` is checked before the benchmark runs (kind "bench-gaussians") and written
    atomically with a ``"radgsreg"`` stamp; ``overwrite`` replaces only our own earlier file."""
    from ..io.outputs import check_output_file, write_json

    if json_path is not None:
        check_output_file(json_path, "bench-gaussians", overwrite=overwrite)
    fixed, mixed = (1.5, 1.5), (1.0, 3.0)
    work = [("raster", 4000, 256, fixed, True), ("raster", 4000, 256, mixed, False),
            ("raster", 20000, 256, fixed, False), ("raster", 20000, 256, mixed, False),
            ("voxel", 4000, 64, fixed, True), ("voxel", 4000, 64, mixed, False),
            ("voxel", 4000, 128, fixed, False), ("voxel", 4000, 128, mixed, False),
            ("voxel", 20000, 64, fixed, False)]
    rows = []
    for kind, n, size, sigma, dense in work:
        rows.append(run_in_child(_child, kind, n, size, sigma, repeat, threads, dense))    # a fresh process each
        log(f"  {kind} N={n} size={size} sigma={sigma}: {rows[-1]['forward_ms']:.1f} ms")
    log("")
    log(f"Radiative Gaussians benchmark, {threads} thread(s), median of {repeat}")
    log(f"{'workload':<40} {'fwd ms':>8} {'fwd+bwd ms':>11} {'extra RSS MB':>13} {'dense ms':>10} {'dense/ours':>11}")
    for r in rows:
        what = (f"{'2x' + str(r['size']) + '^2' if r['kind'] == 'raster' else str(r['size']) + '^3'} N={r['n']} "
                f"sigma {r['sigma_mm'][0]:g}-{r['sigma_mm'][1]:g}")
        d = r.get("dense_forward_ms")
        log(f"{r['kind'] + ' ' + what:<40} {r['forward_ms']:>8.1f} {r['forward_backward_ms']:>11.1f} "
            f"{r['peak_extra_rss_mb']:>13.0f} {d if d is not None else float('nan'):>10.0f} "
            f"{(d / r['forward_ms']) if d else float('nan'):>11.1f}")
    result = {"threads": threads, "repeat": repeat, "rows": rows,
              "goals": {"raster_2x256_4k_forward_ms": 50, "voxel_64_4k_forward_ms": 50}}
    if json_path is not None:
        write_json(json_path, result, "bench-gaussians", overwrite=overwrite)
        log(f"wrote {json_path}")
    return result
