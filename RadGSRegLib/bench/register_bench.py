"""``radgsreg bench register``: every method on the same cases, Table 1 columns.

For each suite (a folder of case folders) and each method, registration runs on the case
read *without* its ground truth; evaluation then reads the truth and reports, per
``shared/docs/metrics.md``: mTRE (mean, median, 95th percentile), SR, CR (with SR per 5 mm
bin of initial mTRE), rotation and translation errors, mPD, and run time per stage; SSIM
and PSNR of the reconstruction when a method makes one. Prints a table and writes JSON.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..io import read_case
from ..metrics import (capture_range, ground_truth_volume, recon_metrics, registration_errors, success_rate,
                       target_points)

__all__ = ["METHODS", "run_register_bench"]

#: method name -> RegisterConfig keyword arguments
METHODS = {
    "initial": {"refine": "none"},
    "search": {"refine": "search"},
    "ours-2d": {"refine": "2d"},
}


def _case_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob("*/case.json"))


def run_register_bench(suites: list[Path], methods: list[str], *, json_path: Path | None = None,
                       limit: int | None = None, log=print) -> dict:
    import torch

    from ..register import RegisterConfig, run

    torch.set_num_threads(1)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    result = {"device": "cpu", "threads": 1, "suites": {}}
    for suite in suites:
        cases = _case_dirs(suite)[:limit]
        if not cases:
            raise FileNotFoundError(f"{suite} holds no case folders (*/case.json)")
        per = {}
        for m in methods:
            rows = []
            for i, d in enumerate(cases):
                truth = read_case(d, ground_truth=True)              # read once; the truth is for evaluation
                case = replace(truth, ground_truth=None)             # what the method sees
                t = time.perf_counter()
                res = run(case, RegisterConfig(**METHODS[m]))
                wall = time.perf_counter() - t
                pts = target_points(truth.seg, truth.vertebra_label, max_points=2000)
                e0 = registration_errors(truth.initial_guess, truth.ground_truth, pts)["mtre_mm"]
                e = registration_errors(res.T_ct_to_carm, truth.ground_truth, pts, truth.views)
                row = {"case": d.name, "initial_mtre_mm": e0, **e, "runtime_s": res.runtime_s, "wall_s": wall,
                       "warnings": res.info.get("warnings", [])}
                if res.recon is not None:
                    gt = ground_truth_volume(truth.ct, truth.seg, truth.vertebra_label, truth.ground_truth,
                                             res.recon.array.shape, res.recon.affine)
                    row.update(recon_metrics(res.recon.array, gt.array))
                rows.append(row)
                log(f"  [{suite.name}] {m:<8} {i + 1:>3}/{len(cases)} {d.name}: {e0:6.1f} -> {e['mtre_mm']:7.2f} mm "
                    f"({wall:.1f} s){' DOUBTFUL' if row['warnings'] else ''}")
            fin = np.array([r["mtre_mm"] for r in rows])
            ini = np.array([r["initial_mtre_mm"] for r in rows])
            cr, bins = capture_range(ini, fin)
            flagged = np.array([bool(r["warnings"]) for r in rows])
            summary = {
                "n": len(rows), "mtre_mean": float(fin.mean()), "mtre_std": float(fin.std()),
                "mtre_median": float(np.median(fin)), "mtre_p95": float(np.percentile(fin, 95)),
                "sr_pct": 100 * success_rate(fin), "cr_mm": cr, "sr_per_bin": bins,
                "rot_err_deg_median": float(np.median([r["rot_err_deg"] for r in rows])),
                "trans_err_mm_median": float(np.median([r["trans_err_mm"] for r in rows])),
                "mpd_mm_median": float(np.median([r["mpd_mm"] for r in rows])),
                "rt_s_mean": float(np.mean([r["runtime_s"]["total"] for r in rows])),
                "flagged_pct": 100 * float(flagged.mean()),
                "failures_flagged_pct": 100 * float(flagged[fin >= 2].mean()) if np.any(fin >= 2) else float("nan"),
                "successes_flagged_pct": 100 * float(flagged[fin < 2].mean()) if np.any(fin < 2) else float("nan"),
            }
            if "ssim_pct" in rows[0]:
                summary["ssim_pct"] = float(np.mean([r["ssim_pct"] for r in rows]))
                summary["psnr_db"] = float(np.mean([r["psnr_db"] for r in rows]))
            per[m] = {"summary": summary, "cases": rows}
        result["suites"][suite.name] = per
    log("")
    log("Registration benchmark (CPU, 1 thread; RT excludes nothing to load: no model yet)")
    head = (f"{'suite':<14} {'method':<9} {'n':>4} {'SSIM %':>7} {'PSNR dB':>8} {'mTRE mean':>10} {'median':>7} "
            f"{'p95':>7} {'SR %':>6} {'CR mm':>6} {'RT s':>6} {'flagged fail/ok %':>18}")
    log(head)
    log("-" * len(head))
    for sname, per in result["suites"].items():
        for m, d in per.items():
            s = d["summary"]
            log(f"{sname:<14} {m:<9} {s['n']:>4} {s.get('ssim_pct', float('nan')):>7.1f} {s.get('psnr_db', float('nan')):>8.2f} "
                f"{s['mtre_mean']:>10.2f} {s['mtre_median']:>7.2f} {s['mtre_p95']:>7.2f} {s['sr_pct']:>6.1f} "
                f"{s['cr_mm']:>6.0f} {s['rt_s_mean']:>6.2f} {s['failures_flagged_pct']:>8.0f}/{s['successes_flagged_pct']:<8.0f}")
    for sname, per in result["suites"].items():
        for m, d in per.items():
            bins = ", ".join(f"{b['bin_mm'][0]:.0f}-{b['bin_mm'][1]:.0f}: {100 * b['sr']:.0f}% ({b['n']})"
                             for b in d["summary"]["sr_per_bin"] if b["n"])
            log(f"SR per initial-mTRE bin, {sname} {m}: {bins}")
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2, default=float))
        log(f"wrote {json_path}")
    return result
