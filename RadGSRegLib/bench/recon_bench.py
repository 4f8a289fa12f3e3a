"""``radgsreg bench recon``: the reconstructions of several weight files, each scored on every
one's grid.

``metrics.md`` scores a reconstruction against the ground-truth volume on the reconstruction's
own grid (the cube RecM draws, in the C-arm frame, centred where the input pose puts the
vertebra). Weights with another cube (``roi_mm``) or voxel count therefore report on another
measure: a tighter cube holds less empty background around the vertebra, which lowers SSIM
and PSNR for the same reconstruction. This bench makes such weights comparable: on each case,
every weight file reconstructs as ``--init learned`` does (the pose search, then the network;
no refinement: ``bench register``'s "learned" method), and each reconstruction is resampled
(trilinear, zero outside its own cube: what it does not reconstruct counts as empty) onto
every weight file's grid and scored there against that grid's ground truth
(:func:`~RadGSRegLib.region.ground_truth_volume`, :func:`~RadGSRegLib.metrics.recon_metrics`).
The entry of a weight file on its own grid is ``metrics.md``'s number (the one ``bench
register`` reports); the others read across a column compare weight files on one measure.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

__all__ = ["run_recon_bench", "parse_model_args", "grid_share", "format_recon_table"]

#: the registration settings each weight file reconstructs with (``bench register``'s "learned")
LEARNED = {"init": "learned", "refine": "none", "robust": {"mode": "never"}}


def parse_model_args(items: list[str]) -> dict[str, str]:
    """``NAME=PATH`` (or a bare ``PATH``, or ``default``: the shipped weights) -> {name: path},
    in the order given. Raises ValueError for an empty or repeated name."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or "/" in name or "\\" in name or name.endswith(".pt"):     # a bare path (may hold a "=")
            name, path = item, item
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"{item!r}: expected NAME=PATH, a weight file, or 'default'")
        if name in out:
            raise ValueError(f"{item!r}: the name {name!r} is given twice")
        out[name] = path
    return out


def run_recon_bench(suites: list, models: dict[str, str], *, limit: int | None = None, threads: int = 1,
                    json_path: Path | None = None, overwrite: bool = True, log=print) -> dict:
    """Score the reconstructions of ``models`` ({name: weight file or "default"}) on every
    case of ``suites`` (the first ``limit`` of each; every case needs its ground truth: a
    case without one is an error), each on every
    model's grid (see the module docstring); torch and numba at ``threads`` threads (restored
    afterwards). Prints a table per suite, returns (and optionally writes, atomically; kind
    "bench-recon") the per-case and mean scores.

    Returns:
        {"threads", "method" (the registration settings used), "models": {name: {"path", "roi_mm",
        "voxel_mm"}}, "suites": {suite: {"cases": [{"case",
        "input_mtre_mm", "same_input", "scores": {recon model: {grid model: {"ssim_pct",
        "psnr_db"}}}, "vertebra_inside_pct": {grid model: %}}], "mean": {recon model: {grid
        model: {"ssim_pct", "psnr_db", "n"}}}, "vertebra_inside_pct": {grid model: mean %}}}}.
        ``vertebra_inside_pct``: :func:`grid_share` of the vertebra's voxels (up to 20 000) at the
        true pose.
        ``same_input``: every model started from the same pose (the search is deterministic, so
        it should); a grid that holds no vertebra (an input pose far off) scores NaN and is left
        out of the means (``n``).
    """
    from ..io.outputs import check_output_file

    if not models:
        raise ValueError("give at least one weight file")
    if json_path is not None:
        check_output_file(json_path, "bench-recon", overwrite=overwrite, inputs=list(suites))
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return _bench(suites, models, limit=limit, threads=threads, json_path=json_path, overwrite=overwrite, log=log)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def _bench(suites, models, *, limit, threads, json_path, overwrite, log) -> dict:
    from ..evaluate import case_dirs
    from ..io import read_case
    from ..learned.model import RadGSRegNet
    from ..geometry import apply
    from ..metrics import recon_metrics, target_points, truth_errors
    from ..region import ground_truth_volume
    from ..register import RegisterConfig, run
    from ..register.pipeline import load_networks
    from ..volume import resample_to_grid

    cfgs = {k: RegisterConfig.from_dict({**LEARNED, "model": p}) for k, p in models.items()}
    nets = {k: RadGSRegNet.load(c.model_path()) for k, c in cfgs.items()}
    _, metal_net = load_networks(next(iter(cfgs.values())), net=next(iter(nets.values())))
    result = {"threads": threads, "method": LEARNED, "suites": {},
              "models": {k: {"path": str(cfgs[k].model_path()), "roi_mm": float(n.cfg.roi_mm),
                             "voxel_mm": float(n.cfg.voxel_mm)} for k, n in nets.items()}}
    for suite in suites:
        suite = Path(suite)
        dirs = case_dirs(suite)[:limit]
        if not dirs:
            raise FileNotFoundError(f"{suite} holds no case folders (*/case.json)")
        rows = []
        for i, d in enumerate(dirs):
            truth = read_case(d, ground_truth=True)
            case = replace(truth, ground_truth=None)               # what the registration sees
            res = {k: run(case, cfgs[k], net=nets[k], metal_net=metal_net) for k in models}
            T_in = {k: np.asarray(r.info["learned"]["T_input"], dtype=float) for k, r in res.items()}
            first = next(iter(T_in.values()))
            scores = {k: {} for k in models}
            inside = {}
            pts = apply(truth.ground_truth, target_points(truth.seg, truth.vertebra_label, max_points=20000))
            for g, rg in res.items():                              # the grid of model g
                shape, affine = rg.recon.array.shape, rg.recon.affine
                inside[g] = grid_share(pts, shape, affine)
                gt = ground_truth_volume(truth.ct, truth.seg, truth.vertebra_label, truth.ground_truth, shape, affine)
                for k, rk in res.items():                          # model k's reconstruction on it
                    if np.ptp(gt.array) <= 0:                      # the grid holds no vertebra
                        scores[k][g] = {"ssim_pct": float("nan"), "psnr_db": float("nan")}
                        continue
                    a = rk.recon.array if k == g else resample_to_grid(rk.recon, shape, affine).array
                    scores[k][g] = recon_metrics(a, gt.array)
            row = {"case": d.name, "input_mtre_mm": truth_errors(truth, first)["mtre_mm"],
                   "same_input": all(np.allclose(T, first, atol=1e-6) for T in T_in.values()), "scores": scores,
                   "vertebra_inside_pct": inside}
            rows.append(row)
            own = ", ".join(f"{k} {scores[k][k]['ssim_pct']:.1f} %" for k in models)
            log(f"  [{suite.name}] {i + 1:>3}/{len(dirs)} {d.name}: input {row['input_mtre_mm']:.1f} mm; SSIM on "
                f"its own grid: {own}")
        mean = {k: {g: _mean([r["scores"][k][g] for r in rows]) for g in models} for k in models}
        held = {g: float(np.mean([r["vertebra_inside_pct"][g] for r in rows])) for g in models}
        result["suites"][suite.name] = {"cases": rows, "mean": mean, "vertebra_inside_pct": held}
    for line in format_recon_table(result):
        log(line)
    if json_path is not None:
        from ..io.outputs import write_json

        write_json(json_path, result, "bench-recon", overwrite=overwrite, inputs=list(suites), default=float)
        log(f"wrote {json_path}")
    return result


def grid_share(points: np.ndarray, shape, affine) -> float:
    """Share (%) of ``points`` ((N, 3) C-arm mm; the vertebra's voxel centres at the true
    pose) that lie in the grid of ``shape`` (K, J, I) and ``affine`` (voxel (i, j, k) -> C-arm
    mm), its voxels' outer faces included: how much of the vertebra a reconstruction on that
    grid can show."""
    ijk = (np.asarray(points, dtype=np.float64) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    size = np.asarray(shape, dtype=np.float64)[::-1]                  # (I, J, K)
    ok = ((ijk >= -0.5) & (ijk <= size - 0.5)).all(axis=1)
    return 100.0 * float(ok.mean())


def _mean(scores: list[dict]) -> dict:
    """Mean SSIM/PSNR over the cases whose grid held the vertebra (finite scores)."""
    s = np.array([x["ssim_pct"] for x in scores], dtype=float)
    p = np.array([x["psnr_db"] for x in scores], dtype=float)
    ok = np.isfinite(s) & np.isfinite(p)
    n = int(ok.sum())
    return {"ssim_pct": float(s[ok].mean()) if n else float("nan"),
            "psnr_db": float(p[ok].mean()) if n else float("nan"), "n": n}


def format_recon_table(result: dict) -> list[str]:
    """The table of :func:`run_recon_bench`'s result: per suite, a row per reconstructing
    weight file, a column per grid; mean SSIM % / PSNR dB; * marks a file on its own grid."""
    models = result["models"]
    names = list(models)
    head = {g: f"on {g}'s grid ({models[g]['roi_mm']:g} mm, {models[g]['voxel_mm']:g} mm voxels)" for g in names}
    w0 = max(len("reconstruction"), *(len(k) for k in names)) + 2
    lines = ["", "Reconstruction SSIM % / PSNR dB against the true vertebra volume (metrics.md), each weight "
                 "file's reconstruction scored on every file's grid; * its own grid"]
    for sname, s in result["suites"].items():
        n = len(s["cases"])
        same = sum(r["same_input"] for r in s["cases"])
        lines.append(f"{sname} ({n} cases" + ("" if same == n else f"; the input poses differed in {n - same}") + ")")
        lines.append(f"{'reconstruction':<{w0}}" + "".join(f"{head[g]:>{len(head[g]) + 2}}" for g in names))
        for k in names:
            cells = []
            for g in names:
                m = s["mean"][k][g]
                cell = f"{m['ssim_pct']:.1f} / {m['psnr_db']:.2f}" + (" *" if k == g else "  ")
                if m["n"] < n:
                    cell += f" (n={m['n']})"
                cells.append(f"{cell:>{len(head[g]) + 2}}")
            lines.append(f"{k:<{w0}}" + "".join(cells))
        held = s["vertebra_inside_pct"]
        lines.append(f"{'vertebra inside':<{w0}}" + "".join(f"{f'{held[g]:.1f} %':>{len(head[g]) + 2}}" for g in names)
                     + "   (share of its voxels at the true pose in the grid, mean over cases)")
    return lines
