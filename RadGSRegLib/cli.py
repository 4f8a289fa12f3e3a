"""The ``radgsreg`` command: argument parsing and printing only; the work is in the library.

Run ``radgsreg --help`` or ``radgsreg COMMAND --help``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .register.config import DEVICES, INITS, REFINES, RegisterConfig

__all__ = ["main", "build_parser", "register_config"]

_EPILOG = """\
examples:
  radgsreg demo --out demo_out                       # a demo case, its picture, and a summary
  radgsreg phantom --out ph --seed 3                 # a procedural spine CT (ct.nrrd, seg.nrrd)
  radgsreg simulate-cases --phantom --levels L1,L2,L3 --n 20 --out cases
  radgsreg simulate-cases --ct ct.nii.gz --seg seg.nii.gz --levels L3 --n 5 --out cases
  radgsreg register cases/case_000 --out res0        # T_ct_to_carm -> res0/result.json, transform.h5
  radgsreg register cases/case_000 --out res1 --model default    # with the shipped RadGS-Reg network
  radgsreg evaluate cases --results results          # mTRE/SR/CR/RT (+ SSIM/PSNR) of result folders
  radgsreg train --config Resources/Models/configs/stage1_tiny.json --out runs/s1
  radgsreg show cases/case_000 --result res0         # writes cases/case_000/preview.png
  radgsreg fit-gaussians cases/case_000 --out fit    # radiative Gaussians fitted to the two X-rays
  radgsreg bench drr                                 # our DRR vs RTK's Joseph projector
  radgsreg bench gaussians                           # rasterizer / voxelizer speed

Frames: millimetres, LPS; a pose is T_ct_to_carm (x_carm = T x_ct). The case folder
format is documented in docs/case-format.md.
"""


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Fixed-width table. cols: (key, header, format)."""
    head = "  ".join(f"{h:>{max(len(h), 8)}}" for _, h, _ in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append("  ".join(f"{format(r[k], f):>{max(len(h), 8)}}" for k, h, f in cols))
    return "\n".join(lines)


def _progress(desc: str):
    from tqdm import tqdm

    return lambda it: tqdm(it, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)


def _sim_config(args):
    from .simulate import XraySimConfig

    if args.ideal:
        return XraySimConfig.ideal(output=args.image_kind)
    return XraySimConfig(beam_hardening=not args.no_beam_hardening,
                         photons_per_mm2=None if args.dose == 0 else args.dose,
                         scatter_to_primary=args.scatter, blur_sigma_mm=args.blur, output=args.image_kind)


def _add_sim_args(p):
    g = p.add_argument_group("X-ray simulation (defaults: one lumbar fluoroscopy shot)")
    g.add_argument("--image-kind", choices=["line_integral", "intensity"], default="line_integral",
                   help="what the X-ray files hold: -ln(I/I0) (bone bright) or detector intensity (bone dark)")
    g.add_argument("--dose", type=float, default=3000.0, metavar="PHOTONS_PER_MM2",
                   help="photons per mm² behind the patient that the exposure control aims at (centre of the "
                        "detector); 0 turns quantum noise off (default 3000)")
    g.add_argument("--scatter", type=float, default=0.3, metavar="SPR", help="scatter-to-primary ratio (default 0.3)")
    g.add_argument("--blur", type=float, default=0.4, metavar="MM", help="detector blur sigma in mm (default 0.4)")
    g.add_argument("--no-beam-hardening", action="store_true", help="monochromatic line integrals")
    g.add_argument("--ideal", action="store_true", help="no physics at all: plain DRR line integrals")


def _add_geometry_args(p):
    g = p.add_argument_group("C-arm and poses")
    g.add_argument("--pixels", type=int, default=976, help="detector pixels per side (default 976, as in the paper)")
    g.add_argument("--detector-mm", type=float, default=292.8, help="detector side in mm (default 292.8)")
    g.add_argument("--sdd", type=float, default=1124.0, help="source-to-detector distance, mm (default 1124)")
    g.add_argument("--sid", type=float, default=700.0, help="source-to-isocentre distance, mm (default 700)")
    g.add_argument("--rot-deg", type=float, default=20.0, help="true-pose rotation offset range, ± deg per axis (default 20)")
    g.add_argument("--trans-mm", type=float, default=50.0, help="true-pose translation offset range, ± mm per axis (default 50)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same cases")


def build_parser() -> argparse.ArgumentParser:
    defaults = RegisterConfig()               # the one source of the registration defaults
    ap = argparse.ArgumentParser(
        prog="radgsreg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Register a spine CT to two intraoperative X-rays (AP + lateral) at one vertebra, "
                    "and the tools around it: phantoms, realistic X-ray simulation, case folders, benchmarks.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"radgsreg {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job end to end on a demo case (the README's first command)",
                       description="Takes the bundled real lumbar CT (or a phantom), simulates an AP + lateral pair "
                                   "at a random pose around the nominal one, writes the case folder, registers it "
                                   "(OUT/result), writes a preview PNG with the result's DRR edges on the X-rays, "
                                   "and prints the error before and after.")
    p.add_argument("--phantom", action="store_true", help="use a procedural phantom instead of the real CT")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--level", default="L3", help="vertebra level (default L3)")
    p.add_argument("--pixels", type=int, default=488, help="detector pixels per side (default 488, half of 976)")
    p.add_argument("--rot-deg", type=float, default=10.0, help="true-pose rotation offset range, ± deg (default 10)")
    p.add_argument("--trans-mm", type=float, default=20.0, help="true-pose translation offset range, ± mm (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("phantom", help="write a procedural spine CT and its vertebra labels",
                       description="Writes OUT/ct.nrrd (HU) and OUT/seg.nrrd (TotalSegmentator ids: L1=31 ... L5=27).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-level", default="L1", help="highest vertebra (default L1)")
    p.add_argument("--n-vertebrae", type=int, default=5)
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default 1 1 1)")
    p.add_argument("--table", action="store_true", help="add a table under the back")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("simulate-cases", help="generate registration cases (case folders)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="For each case: a vertebra level (cycled over --levels), the nominal pose "
                                   "(vertebra centred at the isocentre, axes aligned) as initial_guess, a true pose "
                                   "sampled around it, and AP + lateral X-rays rendered at the true pose.\n"
                                   "Source: a CT with its vertebra label map (--ct/--seg, TotalSegmentator ids), "
                                   "or --phantom (a new random phantom per case).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ct", type=Path, help="CT file (NRRD, NIfTI) or DICOM-series folder, in HU")
    src.add_argument("--phantom", action="store_true", help="use procedural phantoms (seed + case index)")
    p.add_argument("--seg", type=Path, help="vertebra label map on the CT grid (with --ct)")
    p.add_argument("--levels", default="L1,L2,L3,L4,L5",
                   help="comma-separated levels, e.g. L1,L2 (TotalSegmentator ids or segment names vertebrae_L1...), "
                        "or explicit label values, e.g. 12,13, for other numberings (default L1..L5)")
    p.add_argument("--n", type=int, default=20, help="number of cases (default 20)")
    p.add_argument("--out", type=Path, required=True, help="output folder; cases go to OUT/case_000 ...")
    p.add_argument("--phantom-spacing", type=float, default=1.0, help="phantom voxel size in mm (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace existing case folders")
    _add_geometry_args(p)
    _add_sim_args(p)

    p = sub.add_parser("sample-case", help="write a case folder from the bundled real lumbar CT",
                       description="A case from the bundled lumbar CT (TotalSegmentator 2.18.0 test data, 3 mm, "
                                   "L1-L5 and S1 complete): nominal pose as initial_guess, a seeded true pose, "
                                   "realistic AP + lateral X-rays.")
    p.add_argument("--level", default="L3", help="vertebra level: L1..L5 or S1 (default L3)")
    p.add_argument("--out", type=Path, required=True, help="the case folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing case folder")
    _add_geometry_args(p)
    _add_sim_args(p)

    p = sub.add_parser("show", help="write a PNG montage of a case (X-rays, DRRs, overlay)",
                       description="Rows: AP, lateral. Columns: the X-ray; the DRR at the initial pose; the DRR at "
                                   "the true pose (or --result's pose); red/green edges of both on the X-ray.")
    p.add_argument("case", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default CASE/preview.png)")
    p.add_argument("--result", type=Path, help="a result folder whose pose to show instead of the ground truth")
    p.add_argument("--size", type=int, default=320, help="panel size in pixels (default 320)")

    p = sub.add_parser("register", help="register a case: CT vertebra -> the two X-rays (writes a result folder)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Finds T_ct_to_carm for a case folder and writes OUT/result.json and "
                                   "OUT/transform.h5 (docs/case-format.md), plus OUT/recon.nrrd when there is a "
                                   "reconstruction. Never reads the case's ground truth.\n"
                                   "Stages: an initial pose (--init: the case's guess; a pose search over rotation "
                                   "hypotheses with template-matched translation; or the search followed by the "
                                   "RadGS-Reg network, which reconstructs the vertebra from the two X-rays and "
                                   "registers the CT to it), then refinement (--refine: 3-D/3-D NCC between the CT "
                                   "vertebra and the reconstruction, and/or coarse-to-fine 2-D/3-D Levenberg-"
                                   "Marquardt on the windowed NCC of DRRs and X-rays). A 2-D/3-D result worse than "
                                   "its start is rejected (and said so); a low final NCC is flagged 'doubtful' in "
                                   "result.json's warnings.",
                       epilog="examples:\n"
                              "  radgsreg register cases/case_000 --out res0                  # search + 2-D/3-D\n"
                              "  radgsreg register cases/case_000 --out res1 --model default  # + shipped network\n"
                              "  radgsreg register cases/case_000 --out res2 --model runs/stage3/model.pt --refine both")
    p.add_argument("case", type=Path)
    p.add_argument("--out", type=Path, required=True, help="result folder to write")
    p.add_argument("--config", type=Path, metavar="JSON",
                   help="registration settings (RegisterConfig fields, e.g. {\"refine\": \"2d\", \"min_ncc\": 0.8}); "
                        "the options below override it; unset fields keep their defaults")
    p.add_argument("--init", choices=INITS, default=None,
                   help=f"initial pose: the case's guess, pose search, or search + network (default "
                        f"{defaults.init}: learned with --model, else search)")
    p.add_argument("--refine", choices=REFINES, default=None,
                   help=f"refinement after the initial pose (default {defaults.refine}; 3d without --model fits "
                        "Gaussians first, about a minute)")
    p.add_argument("--model", help="RadGS-Reg weights (.pt), or 'default' for Resources/Models/radgsreg_stage1.pt")
    p.add_argument("--device", choices=DEVICES, default=None,
                   help=f"device for the network (default {defaults.device})")
    p.add_argument("--reconstruct", action="store_true", default=None,
                   help="also write the reconstruction (OUT/recon.nrrd): the network's, or without --model a "
                        "per-case Gaussian fit (about a minute on a CPU)")
    p.add_argument("--drrs", action="store_true", default=None,
                   help="also write DRRs of the CT at the result (OUT/drr_ap.nrrd, drr_lat.nrrd) for an overlay")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    p.add_argument("--progress", choices=["text", "json"], default="text",
                   help="text (default): a human log on stdout; json: one JSON event per line on stdout "
                        "(stage, fraction, message; see RadGSRegLib/progress.py) and the human log on stderr")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("train", help="train the RadGS-Reg network (stage 1, 2 or 3)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Module-aware training (RecM alone, RegM alone, then both: paper Eq. 2-4) on "
                                   "one data stage: 1 simulated X-rays of phantoms and any CTs with vertebra labels; "
                                   "2 real X-ray cases with known poses; 3 the target patient's own CT (before "
                                   "surgery). Settings come from a JSON config (keys of learned.config.TrainConfig; "
                                   "Resources/Models/configs/ has the shipped ones) and the options below. OUT gets "
                                   "config.json, checkpoint.pt (every epoch), log.jsonl, and model.pt at the end; "
                                   "running the same command again resumes.",
                       epilog="examples:\n"
                              "  radgsreg train --config Resources/Models/configs/stage1_tiny.json --out runs/s1\n"
                              "  radgsreg train --config Resources/Models/configs/stage3_tiny.json --out runs/s3 \\\n"
                              "      --init Resources/Models/radgsreg_stage1.pt \\\n"
                              "      --ct Resources/SampleData/example_ct.nii.gz:Resources/SampleData/totalseg.nii.gz")
    p.add_argument("--config", type=Path, help="JSON training config (default: the dataclass defaults)")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumed if it holds the same run)")
    p.add_argument("--stage", type=int, choices=[1, 2, 3])
    p.add_argument("--init", help="weights to start from (stages 2-3: e.g. the shipped stage-1 model)")
    p.add_argument("--ct", action="append", default=None, metavar="CT:LABELS",
                   help="a CT and its vertebra label map (repeatable; stage 1 adds them to the phantoms, stage 3 "
                        "trains on them)")
    p.add_argument("--cases", action="append", default=None, metavar="DIR",
                   help="stage 2: case folders with ground_truth (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cal", action="store_true", help="train without counterfactual attention (ablation)")

    p = sub.add_parser("evaluate", help="score result folders against their cases' ground truth (Table 1 columns)",
                       description="For each case folder in CASES with a matching result folder in RESULTS (same "
                                   "name), computes mTRE, rotation/translation error, mPD, and SSIM/PSNR of the "
                                   "reconstruction when the result has one (metrics.md), then SR, CR and run time; "
                                   "prints a table and writes JSON.")
    p.add_argument("cases", type=Path, help="folder of case folders (with ground_truth)")
    p.add_argument("--results", type=Path, required=True, help="folder of result folders named like the cases")
    p.add_argument("--json", type=Path, help="write the metrics here (default RESULTS/evaluation.json)")

    p = sub.add_parser("fit-gaussians", help="fit radiative Gaussians to a case's projections (optimisation baseline)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fits Gaussians by gradient descent (L1 + 0.2 (1 - SSIM) + 0.05 TV, with "
                                   "densification and pruning) on a cube around the isocentre, and writes "
                                   "OUT/gaussians.npz, OUT/recon.nrrd (C-arm frame) and OUT/fit.json.\n"
                                   "By default it fits the case's own AP + lateral X-rays (whole anatomy on every ray). "
                                   "--simulated validates the fitting itself: it renders DRRs of the case's vertebra "
                                   "alone (CT x dilated label, at the true pose), --views of them (2: the case's AP + "
                                   "lateral geometry; more: a full orbit), and fits those. When the case has a ground "
                                   "truth, the reconstruction is scored against it (PSNR, SSIM; metrics.md).")
    p.add_argument("case", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--views", type=int, default=2, help="number of views (default 2: AP + lateral)")
    p.add_argument("--simulated", action="store_true",
                   help="fit DRRs of the case's vertebra alone at its true pose instead of the X-rays (validation; "
                        "needs ground truth; with --views 2 they use the case's AP + lateral geometry, with more a "
                        "full orbit)")
    p.add_argument("--iterations", type=int, default=800)
    p.add_argument("--gaussians", type=int, default=3000, help="initial number of Gaussians (default 3000)")
    p.add_argument("--pixels", type=int, default=128, help="working detector size (default 128)")
    p.add_argument("--grid-mm", type=float, default=96.0, help="side of the reconstruction cube, mm (default 96)")
    p.add_argument("--voxel-mm", type=float, default=1.5, help="voxel size of recon.nrrd, mm (default 1.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    b = bsub.add_parser("drr", help="DRR speed and agreement: ours vs RTK's Joseph projector")
    b.add_argument("--size", type=int, default=128, help="volume size per side (default 128)")
    b.add_argument("--pixels", type=int, default=256, help="detector pixels per side (default 256)")
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--threads", type=int, default=2, help="CPU threads for every method (default 2)")
    b.add_argument("--json", type=Path, default=Path("bench_out/drr.json"))
    b = bsub.add_parser("register", help="every registration method on the same case suites: Table 1 columns",
                        description="Runs each method on each suite (a folder of case folders, e.g. from "
                                    "simulate-cases), reads the ground truth only to evaluate, prints mTRE (mean, "
                                    "median, p95), SR, CR, RT and SR per initial-mTRE bin, and writes JSON.")
    b.add_argument("--cases", type=Path, nargs="+", required=True, help="one or more suite folders")
    b.add_argument("--methods", default="initial,ours-2d",
                   help="comma-separated: initial, intensity-2d, search, ours-2d, gaussfit-3d, learned, learned-3d, "
                        "learned-2d, learned-both, itk (default initial,ours-2d)")
    b.add_argument("--model", help="weights for the learned methods (.pt, or 'default')")
    b.add_argument("--limit", type=int, help="only the first N cases of each suite")
    b.add_argument("--json", type=Path, default=Path("bench_out/register.json"))
    b = bsub.add_parser("gaussians", help="rasterizer and voxelizer speed and memory, vs a naive dense evaluation")
    b.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: fastest on 2 shared cores)")
    b.add_argument("--repeat", type=int, default=5)
    b.add_argument("--json", type=Path, default=Path("bench_out/gaussians.json"))
    return ap


# ------------------------------------------------------------------ commands
def _cmd_phantom(args):
    from .io import write_volume
    from .phantom import PhantomConfig, make_phantom

    cfg = PhantomConfig(top_level=args.top_level, n_vertebrae=args.n_vertebrae, spacing=tuple(args.spacing),
                        table=args.table, seed=args.seed)
    t = time.perf_counter()
    ct, seg = make_phantom(cfg)
    write_volume(ct, args.out / "ct.nrrd", overwrite=args.overwrite)
    write_volume(seg, args.out / "seg.nrrd", overwrite=args.overwrite)
    print(f"phantom {ct.size} voxels at {tuple(cfg.spacing)} mm, levels {', '.join(cfg.levels)} "
          f"({time.perf_counter() - t:.1f} s) -> {args.out}/ct.nrrd, seg.nrrd")


def _load_ct_seg(ct_path, seg_path, levels):
    """CT, label map and {level: label value}; refuses absent or cut levels and off-grid labels."""
    from .io import CaseFormatError, read_segmentation, read_volume
    from .levels import resolve_level

    ct = read_volume(ct_path, field="--ct")
    seg = read_segmentation(seg_path, field="--seg")
    if not seg.labelmap.same_grid(ct):
        raise CaseFormatError(seg_path, "--seg", f"not on the CT grid (labels {seg.labelmap.size} voxels, CT {ct.size}, "
                              "origin/spacing/direction must match); resample the label map onto the CT first")
    labels = {lv: resolve_level(lv, seg.labelmap, seg.names, source=str(seg_path), positional=seg.positional)
              for lv in levels}
    return ct, seg.labelmap, labels


def _cmd_simulate(args):
    from .cases import CaseGenConfig, generate_cases
    from .phantom import PhantomConfig, make_phantom

    levels = _parse_levels(args.levels)
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    cfg = CaseGenConfig(rot_deg=args.rot_deg, trans_mm=args.trans_mm, pixels=args.pixels,
                        detector_mm=args.detector_mm, sdd=args.sdd, sid=args.sid, sim=_sim_config(args), seed=args.seed)
    if args.phantom:
        if args.seg is not None:
            raise SystemExit("--seg goes with --ct, not --phantom")

        def sources(i):
            pc = PhantomConfig(seed=args.seed * 100003 + i, spacing=(args.phantom_spacing,) * 3)
            missing = [lv for lv in levels if lv not in pc.levels]
            if missing:
                raise SystemExit(f"the phantom spans {', '.join(pc.levels)}; not {', '.join(missing)}")
            ct, seg = make_phantom(pc)
            return ct, seg, f"phantom seed {pc.seed}"
    else:
        if args.seg is None:
            raise SystemExit("--ct needs --seg (the vertebra label map on the CT grid)")
        ct, seg, labels = _load_ct_seg(args.ct, args.seg, levels)
        src_name = str(args.ct)

        def sources(i):
            return ct, seg, src_name

    t = time.perf_counter()
    rows = generate_cases(sources, levels, args.n, args.out, cfg, labels=None if args.phantom else labels,
                          overwrite=args.overwrite, progress=_progress("simulating"))
    print(_table(rows, [("case", "case", "s"), ("level", "level", "s"), ("rot_offset_deg", "rot deg", ".1f"),
                        ("trans_offset_mm", "trans mm", ".1f"), ("initial_mtre_mm", "init mTRE mm", ".1f"),
                        ("seconds", "seconds", ".1f")]))
    import numpy as np

    m = np.array([r["initial_mtre_mm"] for r in rows])
    print(f"{len(rows)} cases in {time.perf_counter() - t:.0f} s -> {args.out}; initial mTRE mean {m.mean():.1f} mm, "
          f"median {np.median(m):.1f} mm, range {m.min():.1f}-{m.max():.1f} mm")
    (Path(args.out) / "summary.json").write_text(json.dumps(rows, indent=2))


def _parse_levels(text) -> list[str]:
    """Level names ("L1,L2") or explicit label values ("29,30") from the command line."""
    from .levels import parse_levels

    tokens = [t.strip() for t in str(text).split(",") if t.strip()]
    if tokens and all(t.isdigit() for t in tokens):
        return tokens
    return parse_levels(text)


def _cmd_sample_case(args):
    import numpy as np

    from .cases import CaseGenConfig, make_case
    from .io import write_case
    from .sample_data import lumbar_ct

    sd = lumbar_ct()
    level = _parse_levels(args.level)
    if len(level) != 1:
        raise SystemExit("--level takes one level, e.g. --level L3")
    ct, seg, labels = _load_ct_seg(sd.ct, sd.seg, level)
    cfg = CaseGenConfig(rot_deg=args.rot_deg, trans_mm=args.trans_mm, pixels=args.pixels, detector_mm=args.detector_mm,
                        sdd=args.sdd, sid=args.sid, sim=_sim_config(args), seed=args.seed)
    case = make_case(ct, seg, level[0], cfg, np.random.default_rng(args.seed), label=labels[level[0]],
                     source="RadGSReg lumbar sample CT (TotalSegmentator 2.18.0 test data)")
    write_case(case, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} ({level[0]}, label {labels[level[0]]}, {case.image_kind}, "
          f"{cfg.pixels}x{cfg.pixels} pixels); true pose offset {case.extra['generator']['offset_rot_deg']:.1f} deg, "
          f"{case.extra['generator']['offset_trans_mm']:.1f} mm")


def _cmd_show(args):
    from .io import read_case, read_result
    from .preview import save_montage

    case = read_case(args.case, ground_truth=True) if _has_gt(args.case) else read_case(args.case)
    T = read_result(args.result).T_ct_to_carm if args.result else None
    out = args.out or Path(args.case) / "preview.png"
    save_montage(case, out, size=args.size, T=T)
    print(f"wrote {out}")


def _has_gt(path) -> bool:
    try:
        return json.loads((Path(path) / "case.json").read_text()).get("ground_truth") is not None
    except (OSError, json.JSONDecodeError):
        return False


def _cmd_demo(args):
    from dataclasses import replace

    import numpy as np

    from .cases import CaseGenConfig, make_case
    from .io import read_case, write_case, write_result
    from .metrics import registration_errors, target_points
    from .preview import save_montage
    from .register import RegisterConfig, run

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    t = time.perf_counter()
    if args.phantom:
        from .phantom import PhantomConfig, make_phantom

        print("1/4 building a spine phantom (L1-L5, 1 mm) ...", flush=True)
        ct, seg = make_phantom(PhantomConfig(seed=args.seed))
        labels, source = {}, f"phantom seed {args.seed}"
        level = _parse_levels(args.level)[0]
    else:
        from .sample_data import lumbar_ct

        sd = lumbar_ct()
        print(f"1/4 loading the bundled lumbar CT ({sd.ct.name}, {sd.seg.name}) ...", flush=True)
        level = _parse_levels(args.level)[0]
        ct, seg, labels = _load_ct_seg(sd.ct, sd.seg, [level])
        source = "RadGSReg lumbar sample CT (TotalSegmentator 2.18.0 test data)"
    print(f"2/4 simulating AP + lateral X-rays ({args.pixels}x{args.pixels}) of {level} at a pose up to "
          f"±{args.rot_deg:g} deg / ±{args.trans_mm:g} mm from the nominal one ...", flush=True)
    cfg = CaseGenConfig(pixels=args.pixels, seed=args.seed, rot_deg=args.rot_deg, trans_mm=args.trans_mm)
    case = make_case(ct, seg, level, cfg, np.random.default_rng(args.seed), label=labels.get(level), source=source)
    write_case(case, out / "case", overwrite=args.overwrite)
    print("3/4 registering (without the case's ground truth) ...", flush=True)
    truth = read_case(out / "case", ground_truth=True)
    result = run(replace(truth, ground_truth=None), RegisterConfig(), log=print)
    write_result(result, out / "result", overwrite=args.overwrite)
    print("4/4 writing the preview ...", flush=True)
    save_montage(truth, out / "preview.png", T=result.T_ct_to_carm)
    pts = target_points(truth.seg, truth.vertebra_label, max_points=2000)
    e0 = registration_errors(truth.initial_guess, truth.ground_truth, pts, truth.views)
    e1 = registration_errors(result.T_ct_to_carm, truth.ground_truth, pts, truth.views)
    print(f"case: {out / 'case'} ({level}, label {truth.vertebra_label}); result: {out / 'result'}; "
          f"picture: {out / 'preview.png'}")
    print(f"initial guess: mTRE {e0['mtre_mm']:.1f} mm (rotation {e0['rot_err_deg']:.1f} deg, translation "
          f"{e0['trans_err_mm']:.1f} mm)")
    print(f"registered:    mTRE {e1['mtre_mm']:.2f} mm (rotation {e1['rot_err_deg']:.2f} deg, translation "
          f"{e1['trans_err_mm']:.2f} mm) in {result.runtime_s['total']:.1f} s"
          + ("" if not result.info["warnings"] else f"; warning: {'; '.join(result.info['warnings'])}"))
    print(f"done in {time.perf_counter() - t:.0f} s")


def _cmd_bench(args):
    if args.bench == "drr":
        from .bench.drr_bench import run_drr_bench

        run_drr_bench(n=args.size, pixels=args.pixels, repeat=args.repeat, threads=args.threads, json_path=args.json)
    elif args.bench == "register":
        from .bench.register_bench import run_register_bench

        run_register_bench(list(args.cases), [m.strip() for m in args.methods.split(",") if m.strip()],
                           json_path=args.json, limit=args.limit, model=args.model)
    elif args.bench == "gaussians":
        from .bench.gaussians_bench import run_gaussians_bench

        run_gaussians_bench(threads=args.threads, repeat=args.repeat, json_path=args.json)
    else:
        raise SystemExit("choose a benchmark: radgsreg bench drr | gaussians | register")


def register_config(args) -> RegisterConfig:
    """The registration settings of ``radgsreg register``: RegisterConfig's defaults, then
    ``--config``, then the options given on the command line."""
    import dataclasses

    from .register import read_config

    cfg = read_config(args.config) if args.config else RegisterConfig()
    given = {k: getattr(args, k) for k in ("init", "refine", "model", "device", "reconstruct", "drrs")
             if getattr(args, k) is not None}
    return dataclasses.replace(cfg, **given)


def _cmd_register(args):
    from .progress import ProgressEvent, Reporter, to_json_line

    json_mode = args.progress == "json"
    out = sys.stderr if json_mode else sys.stdout

    def log(line):
        print(line, file=out, flush=True)

    def emit(ev: ProgressEvent):
        if json_mode:
            print(to_json_line(ev), flush=True)

    report = Reporter(emit)
    try:
        report.stage("start", "starting")
        import torch

        from .io import read_case, write_result
        from .register import run

        torch.set_num_threads(args.threads)
        cfg = register_config(args)
        if Path(args.out).exists() and not args.overwrite:
            raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it")
        report.stage("read", f"reading {args.case}")
        case = read_case(args.case)                    # never the ground truth
        log(f"registering {args.case} ({case.vertebra_name or case.vertebra_label}), init={cfg.init_mode}, "
            f"refine={cfg.refine}{f', model {cfg.model_path()}' if cfg.init_mode == 'learned' else ''}")
        res = run(case, cfg, log=log, progress=emit)
        res.info.update({"case": str(args.case), "device": cfg.device, "threads": args.threads,
                         "model": str(cfg.model_path()) if cfg.init_mode == "learned" else None})
        report.stage("write", f"writing {args.out}")
        write_result(res, args.out, overwrite=args.overwrite)
    except BaseException as e:
        emit(ProgressEvent("error", "", report.fraction, _one_line(e)))
        raise
    for w in res.info["warnings"]:
        log(f"warning: {w}")
    log(f"T_ct_to_carm written to {args.out}/result.json and transform.h5 in {res.runtime_s['total']:.1f} s "
        f"({', '.join(f'{k} {v:.2f} s' for k, v in res.runtime_s.items() if k != 'total')})")
    emit(ProgressEvent("done", "", 1.0, str(args.out)))


def _one_line(e: BaseException) -> str:
    """An exception as one line for a user: its message, or its type when it has none."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _cmd_train(args):
    from .learned.config import TrainConfig, load_train_config
    from .learned.train import train

    over = {"out": str(args.out), "stage": args.stage, "init": args.init, "device": args.device,
            "threads": args.threads, "seed": args.seed}
    if args.ct:
        over["ct_dirs"] = args.ct
    if args.cases:
        over["case_dirs"] = args.cases
    if args.config:
        cfg = load_train_config(args.config, **over)
    else:
        cfg = TrainConfig(**{k: v for k, v in over.items() if v is not None})
    if args.no_cal:
        cfg.model.cal = False
    try:
        train(cfg)
    except ValueError as e:
        raise SystemExit(f"radgsreg train: error: {e}") from None


def _cmd_evaluate(args):
    from .evaluate import evaluate_results

    evaluate_results(args.cases, args.results, json_path=args.json or Path(args.results) / "evaluation.json")


def _cmd_fit_gaussians(args):
    import numpy as np
    import torch
    from tqdm import tqdm

    from .drr import DRR
    from .gaussians import to_volume, voxelize_model
    from .gaussians.fit import FitConfig, fit_case_xrays, fit_gaussians, recon_grid
    from .geometry import c_arm_view
    from .io import read_case, write_volume
    from .io.atomic import atomic_dir
    from .metrics import ground_truth_volume, recon_metrics

    if args.views < 2:
        raise SystemExit("--views must be at least 2")
    if args.views > 2 and not args.simulated:
        raise SystemExit("a case has two X-rays; more --views need --simulated")
    case = read_case(args.case, ground_truth=_has_gt(args.case))
    shape, affine = recon_grid(args.grid_mm, args.voxel_mm)
    n = shape[0]
    gt = None
    if case.ground_truth is not None and case.seg is not None:
        gt = ground_truth_volume(case.ct, case.seg, case.vertebra_label, case.ground_truth, shape, affine)
    if args.simulated:
        if gt is None:
            raise SystemExit("--simulated renders the case's vertebra at its true pose: the case needs ground truth and labels")
        ref = case.views["ap"]
        if args.views == 2:
            views = [case.views[k].resized(args.pixels) for k in ("ap", "lat")]
        else:
            views = [c_arm_view(a, sdd=abs(ref.source_to_detector), sid=float(np.linalg.norm(ref.source)),
                                pixels=args.pixels, pixel_spacing=ref.pixel_spacing[0] * ref.size[0] / args.pixels)
                     for a in np.linspace(0.0, 360.0, args.views, endpoint=False)]
        images = DRR(gt.array, gt.affine).render(views)
        source = f"{args.views} DRRs of the vertebra alone at its true pose (validation of the fitting)"
    else:
        source = "the case's AP + lateral X-rays"
    torch.manual_seed(args.seed)
    cfg = FitConfig(iterations=args.iterations, n_gaussians=args.gaussians, max_gaussians=5 * args.gaussians,
                    views_per_step=4, seed=args.seed)
    print(f"fitting {args.gaussians} Gaussians to {source}, {args.pixels}x{args.pixels} pixels, "
          f"{args.iterations} iterations, grid {n}^3 at {args.voxel_mm} mm", flush=True)
    bar = tqdm(total=args.iterations, file=sys.stderr, unit="it", dynamic_ncols=True)

    def progress(step, rec):
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{rec['loss']:.4f}", n=rec["n"])

    if args.simulated:
        res = fit_gaussians(images, views, shape, affine, cfg, progress=progress)
        with torch.no_grad():
            recon = to_volume(voxelize_model(res.gaussians, shape, affine), affine)
    else:
        res, recon = fit_case_xrays(case, cfg, pixels=args.pixels, grid_mm=args.grid_mm, voxel_mm=args.voxel_mm,
                                    progress=progress)
    bar.close()
    report = {"source": source, "config": cfg.to_dict(), "seconds": res.seconds, "n_gaussians": len(res.gaussians),
              "history": res.history}
    if gt is not None:
        report["metrics_vs_ground_truth"] = recon_metrics(recon.array, gt.array)
    with atomic_dir(args.out, args.overwrite) as tmp:
        res.gaussians.save(tmp / "gaussians.npz")
        write_volume(recon, tmp / "recon.nrrd")
        (tmp / "fit.json").write_text(json.dumps(report, indent=2, default=float))
    msg = f"{len(res.gaussians)} Gaussians in {res.seconds:.0f} s -> {args.out}/gaussians.npz, recon.nrrd, fit.json"
    if gt is not None:
        m = report["metrics_vs_ground_truth"]
        msg += f"; against the true vertebra volume: PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim_pct']:.1f} %"
    print(msg)


_COMMANDS = {"demo": _cmd_demo, "phantom": _cmd_phantom, "simulate-cases": _cmd_simulate, "show": _cmd_show,
             "sample-case": _cmd_sample_case, "fit-gaussians": _cmd_fit_gaussians, "register": _cmd_register,
             "train": _cmd_train, "evaluate": _cmd_evaluate, "bench": _cmd_bench}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .io import CaseFormatError
    from .levels import LevelError
    from .register import ConfigError

    try:
        _COMMANDS[args.command](args)
    except (CaseFormatError, ConfigError, FileExistsError, FileNotFoundError, LevelError) as e:
        print(f"radgsreg {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
