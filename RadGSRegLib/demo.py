"""The demo (``radgsreg demo``): the main job end to end on one case.

A case of one vertebra of the bundled lumbar CT or of a phantom
(:func:`~RadGSRegLib.cases.sample_case`) is written, read back as registration reads it
(without its ground truth), registered with :class:`~RadGSRegLib.register.RegisterConfig`'s
defaults, and pictured (:func:`~RadGSRegLib.preview.save_montage`: the X-rays, DRRs at the
initial and registered pose, edge overlay); the initial guess and the result are scored
against the truth (:func:`~RadGSRegLib.metrics.truth_errors`). The demo folder ``case/``,
``result/``, ``preview.png`` appears whole (marker kind "demo"), or not at all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """What :func:`run_demo` did.

    Attributes:
        out: the demo folder (``case/``, ``result/``, ``preview.png``).
        level / label: the vertebra registered and its label value.
        before / after: :func:`~RadGSRegLib.metrics.truth_errors` of the initial guess and of the
            result (``mtre_mm``, ``rot_err_deg``, ``trans_err_mm``, ``mpd_mm``).
        register_s: the registration's run time (``runtime_s["total"]``), seconds.
        warnings: the registration's warnings (as in ``result/result.json``).
        seconds: the whole demo after the output check, seconds.
    """

    out: Path
    level: str
    label: int
    before: dict
    after: dict
    register_s: float
    warnings: list
    seconds: float


def run_demo(out, *, level: str = "L3", phantom: bool = False, pixels: int = 488, rot_deg: float = 10.0,
             trans_mm: float = 20.0, seed: int = 0, overwrite: bool = False, option: str | None = None,
             log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None) -> DemoResult:
    """Run the demo into the folder ``out``.

    Args:
        out: the demo folder; checked before any work
            (:func:`~RadGSRegLib.io.outputs.check_output`, kind "demo"; ``overwrite`` replaces
            only an earlier demo folder); ``option`` names it in errors (e.g. "--out").
        level: the vertebra (:func:`~RadGSRegLib.cases.sample_level`); ``phantom``: a
            procedural spine (seeded ``seed``) instead of the bundled CT.
        pixels / rot_deg / trans_mm / seed: the detector's pixels per side, the true pose's
            offset ranges (± per axis) from the nominal one, and the seed of the case
            (:class:`~RadGSRegLib.cases.CaseGenConfig`; default simulation).
        log: the progress lines ("1/4 ..."), and the registration's log.
        warn: what is unusual about the CT (default: ``log("warning: ...")``).

    Raises:
        LevelError (a level the source lacks), OutputError (a refused ``out``) before the work.
    """
    from .cases import CaseGenConfig, load_sample, sample_case, sample_level
    from .metrics import truth_errors
    from .io import read_case, write_case, write_result
    from .io.atomic import atomic_dir
    from .io.outputs import check_output
    from .preview import save_montage
    from .register import RegisterConfig, run

    out = Path(out)
    warn = warn or (lambda w: log(f"warning: {w}"))
    level = sample_level(level, phantom=phantom)
    inputs = []
    if not phantom:
        from .sample_data import lumbar_ct

        sd = lumbar_ct()
        inputs = [sd.ct, sd.seg]
    check_output(out, "demo", overwrite=overwrite, inputs=inputs, option=option)
    t = time.perf_counter()
    if phantom:
        log("1/4 building a spine phantom (L1-L5, 1 mm) ...")
    else:
        log(f"1/4 loading the bundled lumbar CT ({sd.ct.name}, {sd.seg.name}) ...")
    sample = load_sample(level, phantom=phantom, seed=seed)
    for w in sample.warnings:
        warn(w)
    log(f"2/4 simulating AP + lateral X-rays ({pixels}x{pixels}) of {level} at a pose up to "
        f"±{rot_deg:g} deg / ±{trans_mm:g} mm from the nominal one ...")
    cfg = CaseGenConfig(pixels=pixels, seed=seed, rot_deg=rot_deg, trans_mm=trans_mm)
    case = sample_case(level, cfg, sample=sample)
    with atomic_dir(out, overwrite, kind="demo") as tmp:          # the whole demo folder appears at once
        write_case(case, tmp / "case")
        log("3/4 registering (without the case's ground truth) ...")
        truth = read_case(tmp / "case", ground_truth=True)
        result = run(replace(truth, ground_truth=None), RegisterConfig(), log=log)
        write_result(result, tmp / "result")
        log("4/4 writing the preview ...")
        save_montage(truth, tmp / "preview.png", T=result.T_ct_to_carm)
    return DemoResult(out=out, level=level, label=truth.vertebra_label,
                      before=truth_errors(truth, truth.initial_guess), after=truth_errors(truth, result.T_ct_to_carm),
                      register_s=result.runtime_s["total"], warnings=list(result.info["warnings"]),
                      seconds=time.perf_counter() - t)
