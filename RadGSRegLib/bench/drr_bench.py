"""``radgsreg bench drr``: our DRR backends against RTK's Joseph projector, same run.

Workload (issue 2): a 256x256 AP + lateral pair from a 128^3 volume (the phantom trunk
resampled), at a rotated pose. Each method runs in its own child process so that its
peak resident memory is its own; time is the median of ``repeat`` runs after one warm-up
(which includes numba's compile for the Joseph backend when its cache is cold).
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import numpy as np

from ..similarity import ncc
from ..workers import run_in_child

__all__ = ["run_drr_bench", "bench_volume"]


def bench_volume(n: int = 128):
    """(mu (n, n, n) 1/mm, affine) : the default phantom resampled to n^3 around the spine."""
    import SimpleITK as sitk

    from ..drr import hu_to_mu
    from ..phantom import PhantomConfig, make_phantom
    from ..volume import Volume

    ct, _ = make_phantom(PhantomConfig(spacing=(2.0, 2.0, 2.0), seed=0))
    extent = np.array(ct.size) * ct.spacing
    sp = extent / n
    ref = sitk.Image([n, n, n], sitk.sitkFloat32)
    ref.SetSpacing(tuple(sp))
    ref.SetOrigin(tuple(ct.origin - 0.5 * ct.spacing + 0.5 * sp))
    img = sitk.Resample(ct.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, -1000.0)
    vol = Volume.from_sitk(img)
    # centre the volume on the C-arm isocentre
    A = vol.affine.copy()
    A[:3, 3] -= vol.index_to_world(np.array([(n - 1) / 2] * 3))
    return hu_to_mu(vol.array), A


def _child(method: str, n: int, pixels: int, repeat: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from ..drr import DRR
    from ..geometry import biplanar_views, pose_to_matrix

    mu, A = bench_volume(n)
    views = list(biplanar_views(pixels=pixels).values())
    T = pose_to_matrix([8.0, -5.0, 12.0, 4.0, -6.0, 3.0])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if method == "rtk":
        from .rtk import rtk_joseph

        fn = lambda: rtk_joseph(mu, T @ A, views, threads=threads)  # noqa: E731
    else:
        drr = DRR(mu, A, backend=method)
        fn = lambda: drr.render(views, T).numpy()  # noqa: E731
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "peak_rss_mb": peak / 1024, "extra_rss_mb": (peak - base) / 1024, "image": out}


def run_drr_bench(*, n: int = 128, pixels: int = 256, repeat: int = 5, threads: int = 2,
                  methods=("joseph", "torch", "rtk"), json_path: Path | None = None, overwrite: bool = True,
                  log=print) -> dict:
    """Run the benchmark; print a table; return (and optionally write) the results.

    ``json_path`` is checked before the benchmark runs (kind "bench-drr") and written
    atomically with a ``"radgsreg"`` stamp; ``overwrite`` replaces only our own earlier file."""
    from ..io.outputs import check_output_file, write_json

    if json_path is not None:
        check_output_file(json_path, "bench-drr", overwrite=overwrite)
    rows = {}
    for m in methods:                      # each in a fresh process: its own peak memory
        rows[m] = run_in_child(_child, m, n, pixels, repeat, threads)
        log(f"  {m:<8} done: median {rows[m]['median_s'] * 1e3:.1f} ms")
    ref = rows.get("rtk")
    result = {"workload": f"2 views x {pixels}^2 from {n}^3", "threads": threads, "repeat": repeat, "methods": {}}
    log("")
    log(f"DRR benchmark: {result['workload']}, {threads} threads, median of {repeat}")
    log(f"{'method':<8} {'median ms':>10} {'first ms':>10} {'peak RSS MB':>12} {'vs RTK':>8} {'NCC vs RTK':>11} {'scale vs RTK':>13}")
    for m, r in rows.items():
        entry = {k: v for k, v in r.items() if k != "image"}
        if ref is not None:
            a, b = r["image"].ravel().astype(np.float64), ref["image"].ravel().astype(np.float64)
            entry["ratio_vs_rtk"] = r["median_s"] / ref["median_s"]
            entry["ncc_vs_rtk"] = ncc(a, b)
            entry["scale_vs_rtk"] = float(a.sum() / b.sum())
        result["methods"][m] = entry
        log(f"{m:<8} {r['median_s'] * 1e3:>10.1f} {r['first_s'] * 1e3:>10.1f} {r['peak_rss_mb']:>12.0f} "
            f"{entry.get('ratio_vs_rtk', float('nan')):>8.2f} {entry.get('ncc_vs_rtk', float('nan')):>11.6f} "
            f"{entry.get('scale_vs_rtk', float('nan')):>13.5f}")
    if json_path is not None:
        write_json(json_path, result, "bench-drr", overwrite=overwrite)
        log(f"wrote {json_path}")
    return result
