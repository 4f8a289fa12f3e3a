"""The metal segmentation network scored on case suites: how much of the metal it finds
(against the exact footprint the simulator records) and how much of a clean X-ray it marks.

For each case of each suite (cases with a ground truth, e.g. from ``simulate-cases``), both
X-rays go through :func:`~RadGSRegLib.learned.metal.segment_metal` without dilation (what the
network itself marks) inside their signal pixels; the truth is the case's metal line integral
(:func:`~RadGSRegLib.instruments.case_metal_line_integrals`) above ``label_threshold`` inside
the same pixels. Pooled over a suite's images: precision, recall, Dice (cases with metal),
the share of each X-ray marked (all cases), the seconds per X-ray.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["run_metal_bench"]


def run_metal_bench(suites: list, *, model=None, limit: int | None = None, json_path: Path | None = None,
                    label_threshold: float = 0.1, overwrite: bool = True, log=print) -> dict:
    """Score the metal network (``model``: a weight file; None: the shipped one) on every case
    of ``suites`` (the first ``limit`` of each); prints a table, returns (and optionally
    writes, atomically; kind "bench-metal") the per-suite numbers."""
    from ..evaluate import case_dirs
    from ..instruments import case_metal_line_integrals
    from ..io import read_case
    from ..io.outputs import check_output_file, write_json
    from ..learned.metal import MetalNet, segment_metal
    from ..register.config import MetalConfig
    from ..xray import as_line_integral, signal_mask

    if json_path is not None:
        check_output_file(json_path, "bench-metal", overwrite=overwrite, inputs=list(suites))
    path = Path(model) if model else MetalConfig().model_path()
    net = MetalNet.load(path)
    out = {"model": str(path), "label_threshold": label_threshold, "suites": {}}
    for suite in suites:
        suite = Path(suite)
        tp = fp = fn = 0
        marked, seconds = [], []
        dirs = case_dirs(suite)[:limit]
        for d in dirs:
            case = read_case(d, ground_truth=True)
            truth = case_metal_line_integrals(case)
            for name in ("ap", "lat"):
                img = as_line_integral(case.xrays[name], case.image_kind)
                valid = signal_mask(img)
                t = time.perf_counter()
                m = segment_metal(net, img, case.views[name], None if valid.all() else valid, dilate_mm=0.0)
                seconds.append(time.perf_counter() - t)
                y = (truth[name] > label_threshold) & valid
                tp, fp, fn = tp + int((m & y).sum()), fp + int((m & ~y).sum()), fn + int((~m & y).sum())
                marked.append(float(m.sum() / max(int(valid.sum()), 1)))
        has_metal = tp + fn > 0
        row = {"cases": len(dirs), "metal": has_metal,
               "precision": tp / max(tp + fp, 1) if has_metal else None,
               "recall": tp / max(tp + fn, 1) if has_metal else None,
               "dice": 2 * tp / max(2 * tp + fp + fn, 1) if has_metal else None,
               "marked_pct": 100 * float(np.mean(marked)) if marked else float("nan"),
               "seconds_per_xray": float(np.mean(seconds)) if seconds else float("nan")}
        out["suites"][suite.name] = row
        log(f"  {suite.name}: {len(dirs)} cases done")
    log("")
    log(f"Metal segmentation ({path.name}; truth: metal line integral > {label_threshold} inside the field)")
    log(f"{'suite':<22}{'cases':>6}{'precision':>11}{'recall':>8}{'Dice':>7}{'marked %':>10}{'s/X-ray':>9}")
    for name, r in out["suites"].items():
        f = (lambda v: f"{v:.3f}" if v is not None else "-")
        log(f"{name:<22}{r['cases']:>6}{f(r['precision']):>11}{f(r['recall']):>8}{f(r['dice']):>7}"
            f"{r['marked_pct']:>10.2f}{r['seconds_per_xray']:>9.2f}")
    if json_path is not None:
        write_json(json_path, out, "bench-metal", overwrite=overwrite, inputs=list(suites), default=float)
        log(f"wrote {json_path}")
    return out
