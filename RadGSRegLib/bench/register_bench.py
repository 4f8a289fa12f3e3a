"""``radgsreg bench register``: every method on the same cases, Table 1 columns.

For each suite (a folder of case folders) and each method, registration runs on the case
read *without* its ground truth; evaluation (:mod:`RadGSRegLib.evaluate`) then reads the
truth and reports, per ``shared/docs/metrics.md``: mTRE (mean, median, 95th percentile),
SR, CR (with SR per 5 mm bin of initial mTRE), rotation and translation errors, mPD, run
time (model loading excluded), and SSIM/PSNR of the reconstruction when a method makes
one. Prints a table and writes JSON.

The peers (``itk``, ``diffdrr``) run on the same cases in the same run. Where a peer and a
method of ours both ran on a suite, the run-time ratio peer / ours is reported per suite
(:func:`rt_ratios`; ``result["suites"][suite]["ratios"]``, and a line after the table):
the peer's mean RT over ours, and the median of the per-case ratios. Our RT is
:func:`RadGSRegLib.register.run`'s ``runtime_s["total"]``; ITK's is timed by its wrapper, in
process; DiffDRR's (a subprocess in its own environment, :mod:`.diffdrr_peer`) is measured
inside its runner, without the interpreter's start, its imports or the file transfer.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..evaluate import case_dirs, case_row, format_table, summarize
from ..io import read_case

__all__ = ["METHODS", "PEERS", "run_register_bench", "rt_ratios", "format_ratios", "network_from_truth",
           "network_from_random", "RANDOM_START"]

#: method name -> (RegisterConfig fields (JSON form), what it is). The restarts of a doubtful
#: result (``refine2d.restart_deg``) belong to every method of ours with the 2-D/3-D
#: refinement, not to the intensity-only baseline. The tiled second attempt
#: (``robust`` "auto", the default) belongs to the methods with the 2-D/3-D refinement
#: (ours-2d, learned-2d, learned-both); the others run with the plain similarity only. The
#: metal mask (``metal`` "mask", the default) belongs to every method of ours; the
#: intensity-only baseline compares every pixel, as DiffPose does.
METHODS = {
    "initial": ({"init": "none", "refine": "none", "robust": {"mode": "never"}, "metal": {"mode": "never"}},
                "the case's initial guess"),
    "intensity-2d": ({"init": "none", "refine": "2d", "robust": {"mode": "never"}, "metal": {"mode": "never"},
                      "refine2d": {"restart_deg": 0.0}},
                     "DiffPose-style render-and-compare from the initial guess (no search, plain NCC, every pixel, "
                     "no restarts)"),
    "search": ({"init": "search", "refine": "none", "robust": {"mode": "never"}}, "pose search alone"),
    "ours-2d": ({"init": "search", "refine": "2d"},
                "pose search + 2-D/3-D refinement (a doubtful result: again with the tiled similarity)"),
    "ours-2d-plain": ({"init": "search", "refine": "2d", "robust": {"mode": "never"}},
                      "pose search + 2-D/3-D refinement, plain NCC only (no second attempt)"),
    "ours-2d-nometal": ({"init": "search", "refine": "2d", "metal": {"mode": "never"}},
                        "ours-2d without the metal mask (every pixel compared)"),
    "gaussfit-3d": ({"init": "search", "refine": "3d", "robust": {"mode": "never"}},
                    "per-case Gaussian fit of the two X-rays + 3-D/3-D NCC registration"),
    "learned": ({"init": "learned", "refine": "none", "robust": {"mode": "never"}},
                "RadGS-Reg network (after the pose search)"),
    "learned-3d": ({"init": "learned", "refine": "3d", "robust": {"mode": "never"}}, "RadGS-Reg + 3-D/3-D refinement"),
    "learned-2d": ({"init": "learned", "refine": "2d"}, "RadGS-Reg + 2-D/3-D refinement"),
    "learned-both": ({"init": "learned", "refine": "both"}, "RadGS-Reg + 3-D/3-D + 2-D/3-D refinement"),
    "itk": (None, "ITK two-projection registration (itk-twoprojectionregistration), a peer"),
    "diffdrr": (None, "DiffDRR render-and-compare, DiffPose-style (Adam on multiscale NCC, 3 stages), a peer run in "
                      "its own environment; RT measured inside its runner"),
}
#: the methods that are not ours: their RT is compared with ours (:func:`rt_ratios`)
PEERS = ("itk", "diffdrr")


def run_register_bench(suites: list[Path], methods: list[str], *, json_path: Path | None = None,
                       limit: int | None = None, model: str | None = None, overwrite: bool = True, log=print,
                       threads: int = 1, diffdrr_python=None) -> dict:
    """Run ``methods`` on every case of ``suites`` with torch and numba at ``threads`` threads
    each (restored afterwards; the DiffDRR peer's torch too); returns (and optionally writes)
    the per-case rows, the summaries and, per suite, the peers' RT ratios (:func:`rt_ratios`).

    ``json_path`` is checked before anything runs (kind "bench-register"; not inside a
    suite) and written atomically with a ``"radgsreg"`` stamp; ``overwrite`` replaces only
    our own earlier file. With "diffdrr" among the methods, its python
    (:func:`~RadGSRegLib.bench.diffdrr_peer.find_diffdrr_python`: ``diffdrr_python``, else
    ``RADGSREG_DIFFDRR_PYTHON``, else ``.peers/diffdrr/bin/python``) is found before any
    case runs, or a :class:`~RadGSRegLib.bench.diffdrr_peer.PeerNotFoundError` says how to
    make one."""
    from ..io.outputs import check_output_file

    if json_path is not None:
        check_output_file(json_path, "bench-register", overwrite=overwrite, inputs=list(suites))
    if "diffdrr" in methods:
        from .diffdrr_peer import find_diffdrr_python

        diffdrr_python = find_diffdrr_python(diffdrr_python)
    import numba
    import torch

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))   # the compiled projector is parallel too
    try:
        return _bench(suites, methods, json_path=json_path, limit=limit, model=model, overwrite=overwrite, log=log,
                      threads=threads, diffdrr_python=diffdrr_python)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def _bench(suites, methods, *, json_path, limit, model, overwrite, log, threads, diffdrr_python) -> dict:
    from ..register import RegisterConfig, run

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    learned = any(m.startswith("learned") for m in methods)
    if learned and not model:
        raise ValueError("the learned methods need --model (a weight file, or 'default')")
    default_metal = RegisterConfig().metal
    mask = any(METHODS[m][0].get("metal", {}).get("mode", default_metal.mode) == "mask"
               for m in methods if METHODS[m][0])
    # the networks of the union of the methods, loaded once for every case (register.pipeline.load_networks)
    from ..register.pipeline import load_networks

    union = RegisterConfig(init="learned" if learned else "search", model=model if learned else None,
                           metal={"mode": "mask" if mask else "never"})
    net, metal_net = load_networks(union)
    result = {"device": "cpu", "threads": threads, "model": str(model) if model else None, "suites": {},
              "methods": {m: METHODS[m][1] for m in methods}}
    for suite in suites:
        cases = case_dirs(suite)[:limit]
        if not cases:
            raise FileNotFoundError(f"{suite} holds no case folders (*/case.json)")
        rows = {m: [] for m in methods}
        for i, d in enumerate(cases):
            truth = read_case(d, ground_truth=True)              # read once per case; the truth is for evaluation
            case = replace(truth, ground_truth=None)             # what the methods see
            floor = None                                         # the network from the truth: once per case
            for m in methods:
                t = time.perf_counter()
                if m == "itk":
                    from .itk_peer import register_itk

                    res = register_itk(case)
                elif m == "diffdrr":
                    from .diffdrr_peer import register_diffdrr

                    res = register_diffdrr(case, python=diffdrr_python, threads=threads)
                else:
                    kw = dict(METHODS[m][0])
                    if kw["init"] == "learned":
                        kw["model"] = model
                    res = run(case, RegisterConfig.from_dict(kw), net=net, metal_net=metal_net)
                wall = time.perf_counter() - t
                row = case_row(truth, res, d.name)
                row["wall_s"] = wall
                if "learned" in row and res.recon is not None:
                    row["learned"]["true_volume_mtre_mm"] = _regm_on_true_volume(
                        net, truth, np.asarray(res.info["learned"]["T_input"], dtype=float), res.recon)
                    if floor is None:           # one preparation of the network's inputs for both
                        cfg = RegisterConfig.from_dict(kw)
                        view = _network_view(net, truth, cfg, metal_net)
                        floor = network_from_truth(net, truth, cfg, view=view)
                        floor.update(network_from_random(net, truth, cfg, np.random.default_rng([21, i]), view=view))
                    row["learned"].update(floor)
                rows[m].append(row)
                ncc = row.get("final_ncc_views") or {}
                log(f"  [{suite.name}] {m:<12} {i + 1:>3}/{len(cases)} {d.name}: {row['initial_mtre_mm']:6.1f} -> "
                    f"{row['mtre_mm']:7.2f} mm ({wall:.1f} s"
                    + (f"; RT {row['runtime_s']['total']:.1f} s" if m in PEERS else "") + ")"
                    + (f", NCC {sum(ncc.values()) / len(ncc):.3f}" if ncc else "")
                    + (" FLAGGED" if any("doubtful" in w or "diverged" in w for w in row["warnings"])
                       else " (warning)" if row["warnings"] else ""))
        per = {m: {"summary": summarize(r), "cases": r} for m, r in rows.items()}
        per["ratios"] = rt_ratios(rows)
        result["suites"][suite.name] = per
    log("")
    log(f"Registration benchmark (CPU, {threads} thread{'s' if threads > 1 else ''}; RT excludes model loading{'; model ' + str(model) if model else ''})")
    for line in format_table({s: {m: d["summary"] for m, d in per.items() if m != "ratios"}
                              for s, per in result["suites"].items()}):
        log(line)
    for line in format_ratios({s: per["ratios"] for s, per in result["suites"].items()}):
        log(line)
    if json_path is not None:
        from ..io.outputs import write_json

        write_json(json_path, result, "bench-register", overwrite=overwrite, inputs=list(suites), default=float)
        log(f"wrote {json_path}")
    return result


def _regm_on_true_volume(net, truth, T_in: np.ndarray, recon, *, region=None, device="cpu") -> float:
    """mTRE (mm) of RegM's pose from ``T_in`` (4, 4) when fed the true vertebra volume on the
    grid of ``recon`` (the network's reconstruction from ``T_in``) instead of it
    (:func:`~RadGSRegLib.learned.infer.register_volume`): what RegM does with a perfect
    reconstruction, so the network's error splits into RecM's and RegM's share."""
    from ..learned.infer import register_volume
    from ..metrics import truth_errors
    from ..region import ground_truth_volume

    gt = ground_truth_volume(truth.ct, truth.seg, truth.vertebra_label, truth.ground_truth, recon.array.shape,
                             recon.affine)
    return truth_errors(truth, register_volume(net, truth, T_in, gt, device=device, region=region))["mtre_mm"]


def _network_view(net, truth, cfg, metal_net=None):
    """``(case, images, valid, region)``: the case as the methods see it (no ground truth),
    its X-rays prepared for the network exactly as the pipeline prepares them for ``cfg``
    (target, metal mask with ``metal_net``) and its vertebra region on the network's grid."""
    from ..learned.infer import network_region
    from ..register.pipeline import mask_metal, network_inputs
    from ..register.target import make_target

    case = replace(truth, ground_truth=None)
    tgt = make_target(case, slab_mm=cfg.slab_mm, coarse_mm=cfg.coarse_mm)
    mask_metal(tgt, cfg.metal, net=metal_net)
    images, valid = network_inputs(tgt, net.cfg.input_pixels)
    return case, images, valid, network_region(net, case)


def network_from_truth(net, truth, cfg, *, metal_net=None, view=None) -> dict:
    """How far the RadGS-Reg network moves a pose that is already right, on one case.

    The network runs from the true pose (``truth.ground_truth``) on the X-rays as the pipeline
    prepares them for ``cfg`` (a :class:`~RadGSRegLib.register.RegisterConfig`: its target,
    and its metal mask when ``cfg.metal.mode`` masks, with ``metal_net`` if loaded), once with
    RecM's reconstruction and once with RegM fed the true vertebra volume on that grid. A
    network that moves a right pose far is not one to trust near the truth, and the gap
    between the two says how much of that is RecM's.

    ``view``: those inputs already prepared (:func:`_network_view`), else made here.

    Returns ``{"from_truth_mtre_mm", "from_truth_true_volume_mtre_mm"}`` (mTRE, mm).
    """
    from ..learned.infer import predict
    from ..metrics import truth_errors

    G = np.asarray(truth.ground_truth, dtype=float)
    case, images, valid, vr = view or _network_view(net, truth, cfg, metal_net)
    pred = predict(net, case, G, images=images, valid=valid, device=cfg.device, region=vr)
    return {"from_truth_mtre_mm": truth_errors(truth, pred.T_ct_to_carm)["mtre_mm"],
            "from_truth_true_volume_mtre_mm": _regm_on_true_volume(net, truth, G, pred.recon, region=pred.region,
                                                                   device=cfg.device)}


#: the random input poses of :func:`network_from_random`: uniform per axis about the vertebra
#: (the training's ``perturb_pose``), the size of the pose search's errors on the real suite
RANDOM_START = {"rot_deg": 5.0, "trans_mm": 5.0}


def network_from_random(net, truth, cfg, rng: np.random.Generator, *, metal_net=None, view=None) -> dict:
    """The RadGS-Reg network on one case from a random input pose about the truth
    (:data:`RANDOM_START`, drawn from ``rng``), instead of the pose search's.

    The search's remaining error is not random: it lies where the X-rays match the CT's DRRs
    about as well as at the truth. From a random pose of the same size the network shows
    what it does where the X-rays do show the error: if its reconstruction follows the
    vertebra from random poses and not from the search's, the search's errors are ones the
    X-rays hide; if from neither, RecM does not see the vertebra in these X-rays (e.g.
    anatomy unlike its training's). Inputs prepared (or passed as ``view``) as in
    :func:`network_from_truth`.

    Returns ``{"from_random_input_mtre_mm", "from_random_mtre_mm"}`` (mm) and, for
    :func:`~RadGSRegLib.metrics.localization`, ``from_random_true_offset_mm`` /
    ``from_random_recon_offset_mm`` ((3,) mm: :func:`~RadGSRegLib.metrics.mass_offset` of the
    true volume and of the reconstruction on the reconstruction's grid).
    """
    from ..learned.infer import predict
    from ..metrics import mass_offset, truth_errors
    from ..region import ground_truth_volume
    from ..training.data import perturb_pose

    G = np.asarray(truth.ground_truth, dtype=float)
    case, images, valid, vr = view or _network_view(net, truth, cfg, metal_net)
    T_in, _ = perturb_pose(G, vr.centroid, rng, **RANDOM_START)
    pred = predict(net, case, T_in, images=images, valid=valid, device=cfg.device, region=vr)
    gt = ground_truth_volume(truth.ct, truth.seg, truth.vertebra_label, G, pred.recon.array.shape, pred.recon.affine)
    return {"from_random_input_mtre_mm": truth_errors(truth, T_in)["mtre_mm"],
            "from_random_mtre_mm": truth_errors(truth, pred.T_ct_to_carm)["mtre_mm"],
            "from_random_true_offset_mm": mass_offset(gt.array, gt.affine).tolist(),
            "from_random_recon_offset_mm": mass_offset(pred.recon.array, pred.recon.affine).tolist()}


def rt_ratios(rows: dict[str, list[dict]]) -> dict:
    """Run-time ratios peer / ours on one suite: {peer: {our method: {"rt_mean_ratio": the
    peer's mean RT over ours, "rt_median_case_ratio": the median over cases of the per-case
    ratios, "peer_rt_s_mean", "ours_rt_s_mean" (s), "n"}}} for every peer of :data:`PEERS`
    and every method of ours in ``rows`` ({method: per-case rows in the same case order,
    each with ``runtime_s["total"]``}) but "initial" (which does no work). Empty when no
    peer or no method of ours ran."""
    rt = {m: np.array([r["runtime_s"].get("total", np.nan) for r in rs], dtype=float) for m, rs in rows.items()}
    out = {}
    for peer in (m for m in rows if m in PEERS):
        for ours in (m for m in rows if m not in PEERS and m != "initial"):
            a, b = rt[peer], rt[ours]
            if len(a) != len(b) or not len(a):
                raise ValueError(f"{peer} and {ours} ran on different cases ({len(a)} and {len(b)} rows)")
            out.setdefault(peer, {})[ours] = {
                "rt_mean_ratio": float(a.mean() / b.mean()), "rt_median_case_ratio": float(np.median(a / b)),
                "peer_rt_s_mean": float(a.mean()), "ours_rt_s_mean": float(b.mean()), "n": int(len(a))}
    return out


def format_ratios(per_suite: dict[str, dict]) -> list[str]:
    """Lines for {suite: :func:`rt_ratios`}: "ours is n x faster than the peer", and the note
    on how each peer's RT was measured."""
    lines = []
    for sname, ratios in per_suite.items():
        for peer, per in ratios.items():
            for ours, r in per.items():
                lines.append(f"RT ratio, {sname}: {peer} / {ours} = {r['rt_mean_ratio']:.1f}x (mean RT "
                             f"{r['peer_rt_s_mean']:.2f} s / {r['ours_rt_s_mean']:.2f} s; median per-case ratio "
                             f"{r['rt_median_case_ratio']:.1f}x; n = {r['n']}): {ours} is " + (
                                 f"{r['rt_mean_ratio']:.1f}x faster than {_PEER_NAMES[peer]}" if r["rt_mean_ratio"] >= 1
                                 else f"{1 / r['rt_mean_ratio']:.1f}x slower than {_PEER_NAMES[peer]}"))
    ran = {p for ratios in per_suite.values() for p in ratios}
    if "diffdrr" in ran:
        lines.append("DiffDRR's RT: measured inside its runner (preparation + its registration), without the "
                     "subprocess's interpreter start, imports and file transfer (per case: runtime_s.subprocess_wall)")
    return lines


_PEER_NAMES = {"itk": "ITK", "diffdrr": "DiffDRR"}
