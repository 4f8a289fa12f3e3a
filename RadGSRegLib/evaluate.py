"""Scoring registrations against ground truth: one row per case, one summary per method.

``radgsreg evaluate CASES --results RESULTS`` and ``radgsreg bench register`` both use
these, so a number means the same wherever it is printed (``shared/docs/metrics.md``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .io import Case, Result
from .metrics import capture_range, localization, mass_offset, recon_metrics, success_rate, truth_errors
from .region import ground_truth_volume

__all__ = ["case_row", "summarize", "learned_summary", "format_table", "evaluate_results", "case_dirs",
           "case_fingerprint", "result_matches_case"]


def case_dirs(root: Path) -> list[Path]:
    """The case folders (``*/case.json``) under ``root``, sorted; hidden ones (".NAME...",
    e.g. the temp folder of an interrupted write) are not cases."""
    return sorted(p.parent for p in Path(root).glob("*/case.json") if not p.parent.name.startswith("."))


def case_fingerprint(case_dir) -> str:
    """What identifies a case folder's registration problem: SHA-256 of its geometry.json,
    the two X-ray files it names (as :func:`~RadGSRegLib.io.read_geometry` resolves them) and
    the target in case.json (CT and label file names, ``vertebra_label``). ``radgsreg
    register`` records it in result.json (``case_fingerprint``); evaluation and ``show
    --result`` refuse a result whose fingerprint differs."""
    import hashlib
    import json

    from .io import read_geometry

    case_dir = Path(case_dir)
    c = json.loads((case_dir / "case.json").read_text())
    g_path = case_dir / c.get("geometry", "geometry.json")
    _views, images, _kind = read_geometry(g_path)
    h = hashlib.sha256(g_path.read_bytes())
    for name in ("ap", "lat"):
        h.update((case_dir / (images.get(name) or f"xray_{name}.nrrd")).read_bytes())
    h.update(json.dumps({k: c.get(k) for k in ("ct", "segmentation", "vertebra_label")}, sort_keys=True).encode())
    return h.hexdigest()


def result_matches_case(case_dir, res: Result) -> str | None:
    """Why ``res`` was not computed on the case in ``case_dir`` (None when it was, or when
    the result does not say): a different ``case_fingerprint``, or for results without one,
    a ``case`` folder of another name."""
    recorded = res.info.get("case_fingerprint")
    if recorded:
        return None if recorded == case_fingerprint(case_dir) else \
            "its case's geometry, X-rays or target vertebra differ from this case's (case_fingerprint in result.json)"
    case = res.info.get("case")
    if case and Path(str(case)).name != Path(case_dir).name:
        return f"result.json says it was computed for {case}"
    return None


def case_row(truth: Case, res: Result, name: str = "") -> dict:
    """Metrics of one result against its case's ground truth: initial and final mTRE,
    rotation / translation error, mPD, runtime per stage, warnings, the result's own check
    (``final_ncc_views``, ``ncc_ceiling_views`` and their ``explained`` share), metal record and pose, and PSNR/SSIM of the reconstruction when there
    is one, with ``true_offset_mm`` and ``recon_offset_mm`` (:func:`~RadGSRegLib.metrics.mass_offset`
    of the true vertebra volume and of the reconstruction on its grid, C-arm mm)."""
    if truth.ground_truth is None:
        raise InputError(f"case {name or '?'} has no ground_truth to evaluate against")
    e0 = truth_errors(truth, truth.initial_guess)["mtre_mm"] if truth.initial_guess is not None else float("nan")
    e = truth_errors(truth, res.T_ct_to_carm)
    row = {"case": name, "initial_mtre_mm": e0, **e, "runtime_s": dict(res.runtime_s),
           "warnings": list(res.info.get("warnings", [])), "robust": res.info.get("robust"),
           "final_ncc_views": res.info.get("final_ncc_views"), "ncc_ceiling_views": res.info.get("ncc_ceiling_views"),
           "explained": res.info.get("explained"), "metal": res.info.get("metal"),
           "profile": res.info.get("profile"), "rescue": res.info.get("rescue"), "research": res.info.get("research"),
           "level_check": res.info.get("level_check"),
           "restart": res.info.get("restart"),
           "T_ct_to_carm": np.asarray(res.T_ct_to_carm, dtype=float).tolist()}
    learned = res.info.get("learned")
    if isinstance(learned, dict) and "T_network" in learned:   # the network's own pose and its input's
        row["learned"] = {"input_mtre_mm": truth_errors(truth, np.asarray(learned["T_input"]))["mtre_mm"],
                          "network_mtre_mm": truth_errors(truth, np.asarray(learned["T_network"]))["mtre_mm"],
                          "kept": learned["gate"]["kept"],
                          "ncc_input": learned["gate"]["ncc_input"], "ncc_network": learned["gate"]["ncc_network"]}
    if res.recon is not None:
        gt = ground_truth_volume(truth.ct, truth.seg, truth.vertebra_label, truth.ground_truth,
                                 res.recon.array.shape, res.recon.affine)
        if np.ptp(gt.array) > 0:
            row.update(recon_metrics(res.recon.array, gt.array))
            # where the reconstruction puts the vertebra in its grid, and where it is (metrics.localization)
            row["true_offset_mm"] = mass_offset(gt.array, gt.affine).tolist()
            row["recon_offset_mm"] = mass_offset(res.recon.array, res.recon.affine).tolist()
        else:               # metrics.md compares on the reconstruction's grid: here it holds no vertebra
            row.update({"psnr_db": float("nan"), "ssim_pct": float("nan"),
                        "recon_note": "the reconstruction grid does not reach the true vertebra"})
    return row


def summarize(rows: list[dict]) -> dict:
    """Table 1 columns over cases: mTRE mean/std/median/p95, SR, CR (+ SR per 5 mm bin of
    initial mTRE), median rotation/translation error and mPD, mean RT, the doubtful flag's
    hits, and mean SSIM/PSNR when every row has a reconstruction, with how the reconstructions
    follow the vertebra within their grids (``recon_follow``, ``recon_offset_error_median_mm``,
    ``recon_follow_n``: :func:`~RadGSRegLib.metrics.localization` of the rows'
    ``true_offset_mm`` / ``recon_offset_mm``)."""
    fin = np.array([r["mtre_mm"] for r in rows])
    ini = np.array([r["initial_mtre_mm"] for r in rows])
    rt = np.array([r["runtime_s"].get("total", np.nan) for r in rows])
    cr, bins = capture_range(ini, fin)
    flagged = np.array([bool(r["warnings"]) and any("doubtful" in w or "diverged" in w for w in r["warnings"])
                        for r in rows])
    s = {"n": len(rows), "mtre_mean": float(fin.mean()), "mtre_std": float(fin.std()),
         "mtre_median": float(np.median(fin)), "mtre_p95": float(np.percentile(fin, 95)),
         "sr_pct": 100 * success_rate(fin), "cr_mm": cr, "sr_per_bin": bins,
         "rot_err_deg_median": float(np.median([r["rot_err_deg"] for r in rows])),
         "trans_err_mm_median": float(np.median([r["trans_err_mm"] for r in rows])),
         "mpd_mm_median": float(np.median([r["mpd_mm"] for r in rows])),
         "rt_s_mean": float(np.mean(rt)), "rt_s_median": float(np.median(rt)), "rt_s_p95": float(np.percentile(rt, 95)),
         "profile": _profile_summary(rows),
         "flagged_pct": 100 * float(flagged.mean()),
         "failures_flagged_pct": 100 * float(flagged[fin >= 2].mean()) if np.any(fin >= 2) else float("nan"),
         "successes_flagged_pct": 100 * float(flagged[fin < 2].mean()) if np.any(fin < 2) else float("nan")}
    if rows and all("learned" in r for r in rows):
        s["learned"] = learned_summary([r["learned"] for r in rows])
    if all("ssim_pct" in r for r in rows):
        ss = np.array([r["ssim_pct"] for r in rows])
        s["ssim_pct"] = float(np.nanmean(ss)) if np.isfinite(ss).any() else float("nan")
        s["psnr_db"] = float(np.nanmean([r["psnr_db"] for r in rows])) if np.isfinite(ss).any() else float("nan")
        s["recon_undefined"] = int((~np.isfinite(ss)).sum())      # grids that miss the vertebra: not averaged
        placed = [r for r in rows if "true_offset_mm" in r]
        if placed:                         # where the reconstruction puts the vertebra (metrics.localization)
            loc = localization([r["true_offset_mm"] for r in placed], [r["recon_offset_mm"] for r in placed])
            s.update({"recon_follow": loc["follow"], "recon_offset_error_median_mm": loc["offset_error_median_mm"],
                      "recon_follow_n": loc["n"]})
    return s


def learned_summary(rows: list[dict]) -> dict:
    """The RadGS-Reg network against its input (the pose search's best), before the gate:
    rows of ``{"input_mtre_mm", "network_mtre_mm", "kept"}`` (:func:`case_row`'s
    ``learned``). Returns the mean / median mTRE and SR (%) of each, and how often the gate
    kept the network's pose, and of those how often it was nearer the truth than its input
    (``kept_better``) or further (``kept_worse``); with ``true_volume_mtre_mm`` in every row
    (RegM fed the true volume, ``radgsreg bench register``) its mean / median / SR too, and so
    for ``from_truth_mtre_mm`` and ``from_truth_true_volume_mtre_mm`` (the network started at
    the true pose, with RecM's reconstruction / the true volume:
    :func:`~RadGSRegLib.bench.register_bench.network_from_truth`), ``from_random_mtre_mm`` and
    ``from_random_input_mtre_mm`` (the network from a random pose about the truth, and that
    pose: :func:`~RadGSRegLib.bench.register_bench.network_from_random`), with the
    reconstruction's placement there (``from_random_follow``,
    ``from_random_offset_error_median_mm``, ``from_random_follow_n``:
    :func:`~RadGSRegLib.metrics.localization` of the rows' ``from_random_true_offset_mm`` /
    ``from_random_recon_offset_mm``)."""
    a = np.array([r["input_mtre_mm"] for r in rows], dtype=float)
    b = np.array([r["network_mtre_mm"] for r in rows], dtype=float)
    kept = np.array([r["kept"] == "network" for r in rows])
    out = {"input_mtre_mean": float(a.mean()), "input_mtre_median": float(np.median(a)),
           "input_sr_pct": 100 * success_rate(a), "network_mtre_mean": float(b.mean()),
           "network_mtre_median": float(np.median(b)), "network_sr_pct": 100 * success_rate(b),
           "network_better": int((b < a).sum()), "kept_network": int(kept.sum()),
           "kept_better": int((kept & (b < a)).sum()), "kept_worse": int((kept & (b > a)).sum())}
    for key in ("true_volume", "from_truth", "from_truth_true_volume", "from_random", "from_random_input"):
        if rows and all(f"{key}_mtre_mm" in r for r in rows):
            c = np.array([r[f"{key}_mtre_mm"] for r in rows], dtype=float)
            out.update({f"{key}_mtre_mean": float(c.mean()), f"{key}_mtre_median": float(np.median(c)),
                        f"{key}_sr_pct": 100 * success_rate(c)})
    if rows and all("from_random_true_offset_mm" in r for r in rows):
        loc = localization([r["from_random_true_offset_mm"] for r in rows],
                           [r["from_random_recon_offset_mm"] for r in rows])
        out.update({"from_random_follow": loc["follow"], "from_random_offset_error_median_mm":
                    loc["offset_error_median_mm"], "from_random_follow_n": loc["n"]})
    return out


def _profile_summary(rows: list[dict]) -> dict:
    """Per profile key (stages, refinement levels, total; :func:`RadGSRegLib.register.run`'s
    ``info["profile"]``): mean, median and 95th percentile of its seconds over the cases
    (a case without the key counts 0 s) and the mean DRRs rendered and rays cast per case.
    Empty when no row has a profile."""
    profiles = [r.get("profile") or {} for r in rows]
    keys = list(dict.fromkeys(k for p in profiles for k in p))
    out = {}
    for k in keys:
        sec = np.array([p.get(k, {}).get("seconds", 0.0) for p in profiles])
        out[k] = {"s_mean": float(sec.mean()), "s_median": float(np.median(sec)), "s_p95": float(np.percentile(sec, 95)),
                  "renders_mean": float(np.mean([p.get(k, {}).get("renders", 0) for p in profiles])),
                  "rays_mean": float(np.mean([p.get(k, {}).get("rays", 0) for p in profiles]))}
    return out


def format_table(per_suite: dict[str, dict[str, dict]]) -> list[str]:
    """Lines of the Table-1 style table for {suite: {method: summary}}, then SR per bin."""
    head = (f"{'suite':<14} {'method':<16} {'n':>4} {'SSIM %':>7} {'PSNR dB':>8} {'mTRE mean':>10} {'median':>7} "
            f"{'p95':>7} {'SR %':>6} {'CR mm':>6} {'RT s':>6} {'RT p95':>6} {'flagged fail/ok %':>18}")
    lines = [head, "-" * len(head)]
    for sname, per in per_suite.items():
        for m, s in per.items():
            lines.append(f"{sname:<14} {m:<16} {s['n']:>4} {s.get('ssim_pct', float('nan')):>7.1f} "
                         f"{s.get('psnr_db', float('nan')):>8.2f} {s['mtre_mean']:>10.2f} {s['mtre_median']:>7.2f} "
                         f"{s['mtre_p95']:>7.2f} {s['sr_pct']:>6.1f} {s['cr_mm']:>6.0f} {s['rt_s_mean']:>6.2f} "
                         f"{s.get('rt_s_p95', float('nan')):>6.2f} "
                         f"{s['failures_flagged_pct']:>8.0f}/{s['successes_flagged_pct']:<8.0f}")
    for sname, per in per_suite.items():
        for m, s in per.items():
            bins = ", ".join(f"{b['bin_mm'][0]:.0f}-{b['bin_mm'][1]:.0f}: {100 * b['sr']:.0f}% ({b['n']})"
                             for b in s["sr_per_bin"] if b["n"])
            lines.append(f"SR per initial-mTRE bin, {sname} {m}: {bins}")
    for sname, per in per_suite.items():
        for m, s in per.items():
            if "recon_follow" in s:
                lines.append(f"Reconstruction placement, {sname} {m}: it follows the vertebra's offset from its grid's "
                             f"centre by {s['recon_follow']:.2f} (1: where the vertebra is; 0: at the centre, where "
                             f"the input pose puts it), centroids {s['recon_offset_error_median_mm']:.2f} mm apart "
                             f"(median; {s['recon_follow_n']} cases within 15 mm)")
    for sname, per in per_suite.items():
        for m, s in per.items():
            if s.get("learned"):
                g = s["learned"]
                lines.append(
                    f"RadGS-Reg network, {sname} {m}: its input (pose search) mTRE mean / median "
                    f"{g['input_mtre_mean']:.2f} / {g['input_mtre_median']:.2f} mm, SR {g['input_sr_pct']:.0f} %; "
                    f"the network's own pose {g['network_mtre_mean']:.2f} / {g['network_mtre_median']:.2f} mm, "
                    f"SR {g['network_sr_pct']:.0f} %, nearer than its input in {g['network_better']}/{s['n']}; "
                    f"the gate kept it in {g['kept_network']} ({g['kept_better']} nearer, {g['kept_worse']} further)"
                    + (f"; RegM fed the true volume instead of RecM's: {g['true_volume_mtre_mean']:.2f} / "
                       f"{g['true_volume_mtre_median']:.2f} mm, SR {g['true_volume_sr_pct']:.0f} %"
                       if "true_volume_mtre_mean" in g else "")
                    + (f"; started at the true pose it moves to {g['from_truth_mtre_mean']:.2f} / "
                       f"{g['from_truth_mtre_median']:.2f} mm (SR {g['from_truth_sr_pct']:.0f} %), fed the true "
                       f"volume there {g['from_truth_true_volume_mtre_mean']:.2f} / "
                       f"{g['from_truth_true_volume_mtre_median']:.2f} mm"
                       if "from_truth_mtre_mean" in g and "from_truth_true_volume_mtre_mean" in g else "")
                    + (f"; from random poses about the truth ({g['from_random_input_mtre_mean']:.2f} / "
                       f"{g['from_random_input_mtre_median']:.2f} mm) it reaches {g['from_random_mtre_mean']:.2f} / "
                       f"{g['from_random_mtre_median']:.2f} mm, its reconstruction following the vertebra by "
                       f"{g['from_random_follow']:.2f} ({g['from_random_offset_error_median_mm']:.2f} mm apart)"
                       if "from_random_mtre_mean" in g and "from_random_follow" in g else ""))
    for sname, per in per_suite.items():
        for m, s in per.items():
            prof = s.get("profile") or {}
            if prof:
                lines.append(f"Profile, {sname} {m} (s mean / median / p95; DRRs per case): " + "; ".join(
                    f"{k} {v['s_mean']:.2f}/{v['s_median']:.2f}/{v['s_p95']:.2f} s, {v['renders_mean']:.0f}"
                    for k, v in prof.items()))
    return lines


def evaluate_results(cases: Path, results: Path, *, json_path: Path | None = None, overwrite: bool = True,
                     log=print) -> dict:
    """Score every result folder in ``results`` whose name matches a case folder in ``cases``.

    ``json_path`` is checked before any scoring (kind "evaluation"; it may lie directly in
    ``results``, nowhere else inside ``cases`` or ``results``) and written atomically with a
    ``"radgsreg"`` stamp; with ``overwrite`` (default) our own earlier evaluation file there
    is replaced, any other file never is."""
    from .io import read_case, read_result
    from .io.outputs import check_output_file, write_json

    if json_path is not None:
        check_output_file(json_path, "evaluation", overwrite=overwrite, inputs=[cases, results], allow_in=[results])
    rows, missing = [], []
    for d in case_dirs(cases):
        r = Path(results) / d.name
        if not (r / "result.json").is_file():
            missing.append(d.name)
            continue
        truth, res = read_case(d, ground_truth=True), read_result(r)
        why = result_matches_case(d, res)
        if why:
            raise InputError(f"{r} is the result of another case, not {d}: {why}")
        rows.append(case_row(truth, res, d.name))
    if not rows:
        raise FileNotFoundError(f"no result folder in {results} matches a case folder in {cases}")
    summary = summarize(rows)
    for line in format_table({Path(cases).name: {Path(results).name: summary}}):
        log(line)
    if missing:
        log(f"{len(missing)} case(s) without a result: {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}")
    out = {"cases": str(cases), "results": str(results), "summary": summary, "rows": rows, "missing": missing}
    if json_path is not None:
        write_json(json_path, out, "evaluation", overwrite=overwrite, inputs=[cases, results], allow_in=[results],
                   default=float)
        log(f"wrote {json_path}")
    return out
