"""What the Slicer panel says and asks, without Qt: its settings as a
:class:`~RadGSRegLib.register.RegisterConfig`, and the summary of a result in words."""
from __future__ import annotations

import dataclasses

from .register.config import RegisterConfig

__all__ = ["config_from_panel", "result_summary"]


def config_from_panel(init: str, refine: str, device: str, reconstruct: bool, model_file=None):
    """The :class:`~RadGSRegLib.register.RegisterConfig` the panel's settings stand for:
    its defaults with these fields set. ``model_file`` empty or None means the shipped
    weights when ``init`` is "learned", and no network otherwise; a file given with
    ``init="auto"`` selects the learned method (as ``radgsreg register --model`` does). The
    panel always asks for the DRRs at the result, for its overlay."""
    model = str(model_file) if model_file and str(model_file) not in ("", ".") else None
    if init == "learned" and model is None:
        model = "default"
    return dataclasses.replace(RegisterConfig(), init=init, refine=refine, device=device,
                               reconstruct=bool(reconstruct), model=model, drrs=True)


def result_summary(result, level=None) -> str:
    """What the panel says after a registration: time, the similarity per view, and each
    warning in words."""
    info = result.info
    what = f" {level}" if level else ""
    stages = {"search": "pose search", "learned": "pose search + RadGS-Reg network", "none": "the initial pose"}
    refine = {"2d": "2-D/3-D refinement", "3d": "3-D/3-D refinement", "both": "3-D/3-D + 2-D/3-D refinement",
              "none": "no refinement"}
    lines = [f"Registered{what} in {result.runtime_s.get('total', 0.0):.1f} s "
             f"({stages.get(info.get('init'), info.get('init'))}, {refine.get(info.get('refine'), info.get('refine'))})."]
    views_ncc = info.get("final_ncc_views") or {}
    if views_ncc:
        per_view = ", ".join(f"{'AP' if k == 'ap' else 'lateral'} {v:.2f}" for k, v in views_ncc.items())
        tiled = info.get("final_ncc_similarity") == "tiled"
        lines.append(f"Similarity of DRR and X-ray around the vertebra ({'tiled NCC, metal left out' if tiled else 'NCC'}"
                     f", 1 = identical): {per_view}.")
        if tiled:
            lines.append("The X-rays hold what the CT does not (metal?): this result comes from a second attempt "
                         "that leaves those parts of the images out.")
    rec = info.get("metal") or {}
    metal = {k: v for k, v in (rec.get("fraction") or {}).items() if k not in rec.get("skipped", ())}
    if any(v >= 0.005 for v in metal.values()):
        lines.append("Metal found in the X-rays (" + ", ".join(f"{'AP' if k == 'ap' else 'lateral'} {v:.1%}"
                                                               for k, v in metal.items())
                     + " of the image) was left out of the comparison with the CT.")
    if info.get("doubtful"):
        m, floor = info.get("final_ncc", float("nan")), info.get("min_ncc", RegisterConfig().min_ncc)
        e, share = info.get("explained"), info.get("min_explained", RegisterConfig().min_explained)
        why = (f"the mean similarity {m:.2f} is below {floor:.2f}" if not m >= floor or e is None else
               f"the similarity is {e:.0%} of what the X-rays' noise allows (a right pose reaches about all of it; "
               f"below {share:.0%} is doubtful)")
        lines.append(f"DOUBTFUL: {why}. The CT may sit on a neighbouring vertebra or at a wrong "
                     "rotation: check the overlay before using this result.")
    if info.get("diverged"):
        lines.append("The 2-D/3-D refinement made the match worse and was rejected; the pose before it is kept.")
    for w in info.get("warnings", []):
        if not (w.startswith("doubtful result") or w.startswith("2-D/3-D refinement diverged")):
            lines.append(f"Warning: {w}.")
    return "\n".join(lines)
