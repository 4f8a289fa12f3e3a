"""The ``radgsreg`` command: argument parsing and printing only; the work is in the library.

Run ``radgsreg --help`` or ``radgsreg COMMAND --help``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from .errors import InputError, UsageError, one_line
from .register.config import DEVICES, INITS, METAL_MODES, REFINES, ROBUST_MODES, RegisterConfig

__all__ = ["main", "build_parser", "register_config"]

_EPILOG = """\
examples:
  radgsreg demo --out demo_out                       # a demo case, its picture, and a summary
  radgsreg phantom --out ph --seed 3                 # a procedural spine CT (ct.nrrd, seg.nrrd)
  radgsreg phantom --out th --top-level T8 --n-vertebrae 6 --ribs   # thoracic, with ribs
  radgsreg phantom --out lsp --top-level L3 --n-vertebrae 3 --sacrum  # L3-L5, S1 as a sacrum, hips
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
  radgsreg bench recon --cases S --models a.pt b.pt  # reconstructions on each other's grid
  radgsreg bench train --device cuda                 # training speed of a configuration

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


# ------------------------------------------------------------------ option values
# argparse calls these with the text of an option; a ValueError/ArgumentTypeError becomes
# "argument --pixels: must be an integer >= 1, not '0'" and exit code 2.
def _integer(minimum: int):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, not {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number(minimum: float, *, strict: bool = False, maximum: float | None = None):
    def parse(text):
        import math

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum) \
                or (maximum is not None and value > maximum):
            bound = f"{'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"must be a number {bound}, not {text!r}")
        return value
    parse.__name__ = "number"
    return parse


_COUNT = _integer(1)
_POSITIVE = _number(0.0, strict=True)
_NONNEGATIVE = _number(0.0)


def _add_bench_json(parser, kind: str) -> None:
    """A bench's --json option: bench_out/KIND.json by default, its help saying so."""
    default = Path("bench_out") / f"{kind}.json"
    parser.add_argument("--json", type=Path, default=default,
                        help=f"write the results here (default {default}); a file an earlier radgsreg bench {kind} "
                             f"wrote is replaced, any other file is refused")


def _sim_config(args):
    from .simulate import XraySimConfig

    if args.ideal:
        return replace(XraySimConfig.ideal(output=args.image_kind), field_diameter_mm=args.field_mm)
    return XraySimConfig(beam_hardening=not args.no_beam_hardening,
                         photons_per_mm2=None if args.dose == 0 else args.dose,
                         scatter_to_primary=args.scatter, blur_sigma_mm=args.blur, field_diameter_mm=args.field_mm,
                         output=args.image_kind)


def _add_sim_args(p):
    g = p.add_argument_group("X-ray simulation (defaults: one lumbar fluoroscopy shot)")
    g.add_argument("--image-kind", choices=["line_integral", "intensity"], default="line_integral",
                   help="what the X-ray files hold: -ln(I/I0) (bone bright) or detector intensity (bone dark)")
    g.add_argument("--dose", type=_NONNEGATIVE, default=3000.0, metavar="PHOTONS_PER_MM2",
                   help="photons per mm² behind the patient that the exposure control aims at (centre of the "
                        "detector); 0 turns quantum noise off (default 3000)")
    g.add_argument("--scatter", type=_NONNEGATIVE, default=0.3, metavar="SPR", help="scatter-to-primary ratio (default 0.3)")
    g.add_argument("--blur", type=_NONNEGATIVE, default=0.4, metavar="MM", help="detector blur sigma in mm (default 0.4)")
    g.add_argument("--no-beam-hardening", action="store_true", help="monochromatic line integrals")
    g.add_argument("--ideal", action="store_true", help="no physics at all: plain DRR line integrals")
    g = p.add_argument_group("operating-room effects (default: none)")
    g.add_argument("--field-mm", type=_POSITIVE, default=None, metavar="MM",
                   help="a circular field of this diameter (mm at the detector, centred), black outside, as an "
                        "image intensifier gives (e.g. 230 for a 9-inch intensifier)")
    g.add_argument("--joint-deg", type=_number(0.0, maximum=30.0), default=0.0, metavar="DEG",
                   help="a bending spine: each intervertebral joint turns by up to ± DEG per axis between the CT "
                        "and the X-rays, accumulating away from the target vertebra, which stays exactly at its "
                        "true pose (recorded in case.json's generator.articulation); e.g. 2")
    g.add_argument("--joint-mm", type=_NONNEGATIVE, default=0.0, metavar="MM",
                   help="... and shifts by up to ± MM per axis (e.g. 1)")
    g.add_argument("--screws", choices=["none", "neighbours", "target", "both"], default="none",
                   help="titanium pedicle screws (two per vertebra, absent from the CT) in the target's neighbours, "
                        "the target or both (recorded in case.json's generator.instruments)")
    g.add_argument("--kwires", type=int, choices=[0, 1, 2], default=0, help="steel K-wires leaving the target's pedicles")
    g.add_argument("--retractors", type=int, choices=[0, 1, 2], default=0,
                   help="steel retractor blades beside the spinous processes")
    g.add_argument("--beyond-ct-mm", type=_number(0.0, maximum=500.0), default=None, metavar="MM",
                   help="the patient continues MM beyond each cranio-caudal end of the CT (its end slices "
                        "repeated), as on a real patient whose X-ray field is longer than the scan: anatomy the CT "
                        "lacks (default: CaseGenConfig's, 150); 0: the body ends with the scan, air beyond, like a "
                        "DRR of the CT alone")


def _add_geometry_args(p):
    g = p.add_argument_group("C-arm and poses")
    g.add_argument("--pixels", type=_integer(16), default=976, help="detector pixels per side (default 976, as in the paper)")
    g.add_argument("--detector-mm", type=_POSITIVE, default=292.8, help="detector side in mm (default 292.8)")
    g.add_argument("--sdd", type=_POSITIVE, default=1124.0, help="source-to-detector distance, mm (default 1124)")
    g.add_argument("--sid", type=_POSITIVE, default=700.0, help="source-to-isocentre distance, mm (default 700)")
    g.add_argument("--rot-deg", type=_number(0.0, maximum=180.0), default=20.0, help="true-pose rotation offset range, ± deg per axis (default 20)")
    g.add_argument("--trans-mm", type=_NONNEGATIVE, default=50.0, help="true-pose translation offset range, ± mm per axis (default 50)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same cases")


def build_parser() -> argparse.ArgumentParser:
    defaults = RegisterConfig()               # the one source of the registration defaults
    ap = argparse.ArgumentParser(
        prog="radgsreg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Register a spine CT to two intraoperative X-rays (AP + lateral) at one vertebra, "
                    "and the tools around it: phantoms, realistic X-ray simulation, case folders, benchmarks.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"radgsreg {__version__}")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job end to end on a demo case (the README's first command)",
                       description="Takes the bundled real lumbar CT (or a phantom), simulates an AP + lateral pair "
                                   "at a random pose around the nominal one, writes the case folder, registers it "
                                   "(OUT/result), writes a preview PNG with the result's DRR edges on the X-rays, "
                                   "and prints the error before and after.")
    p.add_argument("--phantom", action="store_true", help="use a procedural phantom instead of the real CT")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default demo_out)")
    p.add_argument("--level", default="L3", help="vertebra level (default L3)")
    p.add_argument("--pixels", type=_integer(16), default=488, help="detector pixels per side (default 488, half of 976)")
    p.add_argument("--rot-deg", type=_number(0.0, maximum=180.0), default=10.0,
                   help="true-pose rotation offset range, ± deg (default 10)")
    p.add_argument("--trans-mm", type=_NONNEGATIVE, default=20.0, help="true-pose translation offset range, ± mm (default 20)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the pose, the X-rays and, with --phantom, the phantom (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("phantom", help="write a procedural spine CT and its vertebra labels",
                       description="Writes OUT/ct.nrrd (HU) and OUT/seg.nrrd (TotalSegmentator ids: L1=31 ... L5=27; "
                                   "with --ribs also rib_left_k = 91+k, rib_right_k = 103+k; with --sacrum also sacrum = 25, "
                                   "hip_left = 77, hip_right = 78).")
    p.add_argument("--out", type=Path, required=True, help="folder to write (ct.nrrd, seg.nrrd)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the shapes and textures (default 0); same seed, same phantom")
    p.add_argument("--top-level", default="L1", help="highest vertebra (default L1)")
    p.add_argument("--n-vertebrae", type=_COUNT, default=5, help="how many vertebrae, down from --top-level (default 5)")
    p.add_argument("--spacing", type=_POSITIVE, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                   help="voxel size in mm (default 1 1 1)")
    p.add_argument("--table", action="store_true", help="add a table under the back")
    p.add_argument("--ribs", action="store_true",
                   help="give every thoracic vertebra (T1-T12, e.g. --top-level T8) its pair of ribs, labelled with "
                        "TotalSegmentator's rib ids; the rest of the phantom stays as without")
    p.add_argument("--sacrum", action="store_true",
                   help="when the column reaches S1 (e.g. --top-level L3 --n-vertebrae 3, S1 below as context), "
                        "build a sacrum there (S1 segment = 26, the rest sacrum = 25) and the hip bones (77, 78); "
                        "the grid reaches down past the sacrum's tip, the vertebrae above keep their shapes")
    p.add_argument("--size", type=_POSITIVE, default=1.0,
                   help="scale of the vertebrae and discs (default 1; e.g. 1.2 for a large adult's lumbar spine)")
    p.add_argument("--bone-density", type=_POSITIVE, default=1.0,
                   help="scale of every bone's HU (default 1, dense young bone; e.g. 0.5 for an older patient's "
                        "porous bone, which stands out far less in an X-ray)")
    p.add_argument("--overwrite", action="store_true", help="replace a phantom folder written earlier by radgsreg phantom")

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
    p.add_argument("--n", type=_COUNT, default=20, help="number of cases (default 20)")
    p.add_argument("--out", type=Path, required=True, help="output folder; cases go to OUT/case_000 ...")
    p.add_argument("--phantom-spacing", type=_POSITIVE, default=1.0, help="phantom voxel size in mm (default 1)")
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
    p.add_argument("case", type=Path, help="case folder (with case.json)")
    p.add_argument("--out", type=Path, help="PNG path (default CASE/preview.png)")
    p.add_argument("--result", type=Path, help="a result folder whose pose to show instead of the ground truth")
    p.add_argument("--size", type=_integer(16), default=320, help="panel size in pixels (default 320)")
    p.add_argument("--overwrite", action="store_true", help="replace a preview PNG written earlier by radgsreg show")

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
                                   "result.json's warnings. Metal in the X-rays (screws, K-wires, retractors: not in "
                                   "the CT) is found first and left out of every comparison (--metal). A doubtful "
                                   "result is registered once more with a tiled similarity that leaves out what the "
                                   "CT cannot explain, and the better of the two is kept (--robust).",
                       epilog="examples:\n"
                              "  radgsreg register cases/case_000 --out res0                  # search + 2-D/3-D\n"
                              "  radgsreg register cases/case_000 --out res1 --model default  # + shipped network\n"
                              "  radgsreg register cases/case_000 --out res2 --model runs/stage3/model.pt --refine both")
    p.add_argument("case", type=Path, help="case folder (with case.json; shared/docs/case-format.md)")
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
    p.add_argument("--robust", choices=ROBUST_MODES, default=None,
                   help=f"the tiled, outlier-rejecting similarity for X-rays with metal the CT does not have: auto "
                        f"(a second attempt with it when the first result is doubtful), always, never (default "
                        f"{defaults.robust.mode})")
    p.add_argument("--metal", choices=METAL_MODES, default=None,
                   help=f"mask: find metal in the X-rays (screws, K-wires, retractors; a small network, "
                        f"Resources/Models/metal_seg.md) and leave it out of every comparison with the CT; never: "
                        f"compare every pixel (default {defaults.metal.mode})")
    p.add_argument("--metal-model", metavar="PT", default=None,
                   help="the metal network's weights (default: the shipped ones; radgsreg train-metal makes them)")
    p.add_argument("--reconstruct", action="store_true", default=None,
                   help="also write the reconstruction (OUT/recon.nrrd): the network's, or without --model a "
                        "per-case Gaussian fit (about a minute on a CPU)")
    p.add_argument("--drrs", action="store_true", default=None,
                   help="also write DRRs of the CT at the result (OUT/drr_ap.nrrd, drr_lat.nrrd) for an overlay")
    p.add_argument("--threads", type=_COUNT, default=1, help="CPU threads for torch (default 1)")
    p.add_argument("--progress", choices=["text", "json"], default="text",
                   help="text (default): a human log on stdout; json: one JSON event per line on stdout "
                        "(stage, fraction, message; see RadGSRegLib/progress.py) and the human log on stderr")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a result folder written earlier by radgsreg register or register-batch")

    p = sub.add_parser("register-batch", help="register every case folder under a folder (resumable; local workers)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Registers every case folder under CASES (folders with a case.json) into "
                                   "OUT/<case name>/ (the result folder 'register' writes), on --workers local "
                                   "processes. Resumable: a case whose result folder already holds its result is "
                                   "kept, not redone; a result of another case is never overwritten. A case that "
                                   "fails is recorded and the batch goes on. Writes OUT/batch.json (every case: "
                                   "registered, kept or failed, with its error) and, when the cases carry their "
                                   "ground truth, OUT/evaluation.json (as 'evaluate').",
                       epilog="examples:\n"
                              "  radgsreg register-batch suites/real50 --out res/real50 --workers 2\n"
                              "  radgsreg register-batch suites/real50 --out res/real50    # again: only what is missing\n"
                              "  radgsreg register-batch cases --out res --config cfg.json --model default\n"
                              "  radgsreg register-batch /shared/cases --out /shared/res --ray auto --workers 16")
    p.add_argument("cases", type=Path, metavar="CASES", help="a folder of case folders (e.g. made by simulate-cases)")
    p.add_argument("--out", type=Path, required=True, help="results folder (one result folder per case, batch.json)")
    p.add_argument("--config", type=Path, metavar="JSON", help="registration settings (RegisterConfig fields), as "
                                                                "for 'register'")
    p.add_argument("--model", help="RadGS-Reg weights (.pt), or 'default': the search + network path")
    p.add_argument("--workers", type=_COUNT, default=1,
                   help="local worker processes (default 1); each loads the networks once")
    p.add_argument("--threads", type=_COUNT, default=None,
                   help="torch/numba threads per worker (default: the CPU cores divided among the workers; 1 on Ray)")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run the workers as Ray actors: 'local' (a Ray instance started here), 'auto' (the cluster "
                        "this machine belongs to) or an address (host:port, ray://host:port); the case and result "
                        "folders must be visible to every node; needs pip install -e '.[ray]'")

    p = sub.add_parser("train", help="train the RadGS-Reg network (stage 1, 2 or 3)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Module-aware training (RecM alone, RegM alone, then both: paper Eq. 2-4) on "
                                   "one data stage: 1 simulated X-rays of phantoms and any CTs with vertebra labels; "
                                   "2 real X-ray cases with known poses; 3 the target patient's own CT (before "
                                   "surgery). Settings come from a JSON config (keys of training.config.TrainConfig; "
                                   "Resources/Models/configs/ has the shipped ones) and the options below. OUT gets "
                                   "config.json, checkpoint.pt (every epoch), log.jsonl, and model.pt at the end; "
                                   "running the same command again resumes.",
                       epilog="examples:\n"
                              "  radgsreg train --config Resources/Models/configs/stage1_tiny.json --out runs/s1\n"
                              "  radgsreg train --config Resources/Models/configs/stage3_tiny.json --out runs/s3 \\\n"
                              "      --init default --ct sample      # the shipped weights, the bundled lumbar CT")
    p.add_argument("--config", type=Path, help="JSON training config (default: the dataclass defaults)")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumed if it holds the same run)")
    p.add_argument("--stage", type=int, choices=[1, 2, 3], help="data stage (default: the config's, else 1)")
    p.add_argument("--init", help="weights to start from (stages 2-3): a .pt file, or 'default' for the shipped "
                                  "stage-1 weights")
    p.add_argument("--ct", action="append", default=None, metavar="CT:LABELS",
                   help="a CT and its vertebra label map, a folder holding both, or 'sample' for the bundled "
                        "lumbar CT (repeatable; stage 1 adds them to the phantoms, stage 3 trains on them)")
    p.add_argument("--cases", action="append", default=None, metavar="DIR",
                   help="stage 2: case folders with ground_truth (repeatable)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where to train (default: the config's, else cpu)")
    p.add_argument("--threads", type=_COUNT, help="CPU threads for torch (default: the config's, else 1)")
    p.add_argument("--data-workers", type=_COUNT,
                   help="processes simulating the samples, at most the config's data_shards (its independent "
                        "sample streams; the samples do not depend on N). Default: the config's data_workers, else 1")
    p.add_argument("--data-cache", type=Path, metavar="DIR",
                   help="folder of the simulated samples (default: the config's data_cache, else OUT/data). The "
                        "file name carries the data settings, so runs with the same ones share it and a later run "
                        "reads the samples instead of simulating them again (e.g. the CAL ablation, --no-cal, of a "
                        "run); "
                        "a started run resumes only with the folder it started with")
    p.add_argument("--seed", type=_integer(0),
                   help="random seed of everything random in the run: samples, batch order, RegM's input poses, "
                        "new weights (default: the config's, else 0)")
    p.add_argument("--no-cal", action="store_true", help="train without counterfactual attention (ablation)")

    p = sub.add_parser("train-metal", help="train the metal segmentation network (screws, K-wires, retractors)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Simulates X-rays with and without instruments (phantoms and the bundled lumbar "
                                   "CT, every effect drawn per case: articulation, round field, dose, scatter, body "
                                   "beyond the scan), labels the metal exactly from the simulation, and trains a "
                                   "small 2-D U-Net on random crops (Dice + BCE). OUT gets data.pt (the simulated "
                                   "images, reused by a later run with the same data settings), history.json "
                                   "(validation Dice, precision, recall and the share of clean images marked, over "
                                   "training time) and metal_seg.pt (use it with radgsreg register --metal-model; "
                                   "the shipped one is Resources/Models/metal_seg.pt, see metal_seg.md). Defaults: "
                                   "training.metal.MetalTrainConfig (240 + 24 cases, 2000 steps: about 40 min here).",
                       epilog="examples:\n"
                              "  radgsreg train-metal --out runs/metal\n"
                              "  radgsreg train-metal --out runs/metal_small --cases 40 --steps 200 --no-sample-ct")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--cases", type=_COUNT, default=None, help="simulated training cases (two X-rays each; default 240)")
    p.add_argument("--val-cases", type=_COUNT, default=None, help="validation cases (default 24)")
    p.add_argument("--steps", type=_COUNT, default=None, help="training steps (default 2000)")
    p.add_argument("--phantoms", type=_integer(0), default=None,
                   help="procedural phantoms to simulate (~35 s each to build; default 2)")
    p.add_argument("--no-sample-ct", action="store_true", help="leave out the bundled lumbar CT (phantoms only)")
    p.add_argument("--seed", type=_integer(0), default=None, help="random seed of the cases and the weights (default 7)")
    p.add_argument("--threads", type=_COUNT, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/metal_seg.pt")

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
    p.add_argument("case", type=Path, help="case folder (with case.json)")
    p.add_argument("--out", type=Path, required=True, help="folder to write (gaussians.npz, recon.nrrd, fit.json)")
    p.add_argument("--views", type=_integer(2), default=2, help="number of views (default 2: AP + lateral)")
    p.add_argument("--simulated", action="store_true",
                   help="fit DRRs of the case's vertebra alone at its true pose instead of the X-rays (validation; "
                        "needs ground truth; with --views 2 they use the case's AP + lateral geometry, with more a "
                        "full orbit)")
    p.add_argument("--iterations", type=_COUNT, default=800, help="fitting steps (default 800)")
    p.add_argument("--gaussians", type=_COUNT, default=3000, help="initial number of Gaussians (default 3000)")
    p.add_argument("--pixels", type=_integer(16), default=128, help="working detector size (default 128)")
    p.add_argument("--grid-mm", type=_POSITIVE, default=96.0, help="side of the reconstruction cube, mm (default 96)")
    p.add_argument("--voxel-mm", type=_POSITIVE, default=1.5, help="voxel size of recon.nrrd, mm (default 1.5)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the initial Gaussians, of the views and TV block drawn each step and of "
                        "the densification (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder written earlier by radgsreg fit-gaussians")

    p = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH")
    b = bsub.add_parser("drr", help="DRR speed and agreement: ours vs RTK's Joseph projector")
    b.add_argument("--size", type=_integer(8), default=128, help="volume size per side (default 128)")
    b.add_argument("--pixels", type=_integer(16), default=256, help="detector pixels per side (default 256)")
    b.add_argument("--repeat", type=_COUNT, default=5,
                   help="timed runs of each method; the table shows their median (default 5)")
    b.add_argument("--threads", type=_COUNT, default=2, help="CPU threads for every method (default 2)")
    _add_bench_json(b, "drr")
    b = bsub.add_parser("register", help="every registration method on the same case suites: Table 1 columns",
                        description="Runs each method on each suite (a folder of case folders, e.g. from "
                                    "simulate-cases), reads the ground truth only to evaluate, prints mTRE (mean, "
                                    "median, p95), SR, CR, RT and SR per initial-mTRE bin, and writes JSON.")
    b.add_argument("--cases", type=Path, nargs="+", required=True, help="one or more suite folders")
    b.add_argument("--methods", default="initial,ours-2d",
                   help="comma-separated: initial, intensity-2d, search, ours-2d, gaussfit-3d, learned, learned-3d, "
                        "learned-2d, learned-both, itk, diffdrr (default initial,ours-2d). With a peer (itk, diffdrr) "
                        "and a method of ours, the run-time ratio peer / ours is printed and written per suite")
    b.add_argument("--model", help="weights for the learned methods (.pt, or 'default')")
    b.add_argument("--limit", type=_COUNT, help="only the first N cases of each suite")
    b.add_argument("--threads", type=_COUNT, default=1,
                   help="CPU threads of torch and of the compiled projector, for every method (default 1; the speed "
                        "goal of issue #21 is for 2)")
    b.add_argument("--diffdrr-python", type=Path, metavar="PATH",
                   help="the python of the DiffDRR peer's own environment (default: $RADGSREG_DIFFDRR_PYTHON, else "
                        ".peers/diffdrr/bin/python here; make it with: python3 -m venv .peers/diffdrr && "
                        ".peers/diffdrr/bin/pip install -r RadGSRegLib/bench/diffdrr-requirements.txt)")
    _add_bench_json(b, "register")
    b = bsub.add_parser("recon", help="reconstructions of several weight files, each scored on every one's grid",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Compares the reconstructions of several weight files on one measure. On each "
                                    "case every weight file\nreconstructs as --init learned does (the pose search, then "
                                    "the network; no refinement), and\neach reconstruction is resampled onto every "
                                    "file's grid (zero outside its own cube) and\nscored there: SSIM % / PSNR dB against "
                                    "the true vertebra volume, and the share of the\nvertebra each grid holds. (A "
                                    "reconstruction's own numbers, as metrics.md defines them, are\nscored on its own "
                                    "grid, so weights with another cube or voxel size cannot be compared by them.)",
                        epilog="example:\n"
                               "  radgsreg bench recon --cases real50-beyond --models shipped=default "
                               "fine=runs/fine/model.pt")
    b.add_argument("--cases", type=Path, nargs="+", required=True, help="one or more suite folders")
    b.add_argument("--models", nargs="+", required=True, metavar="NAME=PATH",
                   help="the weight files, each NAME=PATH (NAME labels its row and column), a bare PATH, or "
                        "'default' (the shipped weights)")
    b.add_argument("--limit", type=_COUNT, help="only the first N cases of each suite")
    b.add_argument("--threads", type=_COUNT, default=1, help="CPU threads of torch and of the compiled projector "
                                                              "(default 1)")
    _add_bench_json(b, "recon")
    b = bsub.add_parser("metal", help="the metal segmentation network on case suites: precision, recall, Dice",
                        description="Scores the metal network (segment_metal, no dilation) on every case of each "
                                    "suite against the exact metal footprint its case.json records (cases made by "
                                    "simulate-cases with --screws/--kwires/--retractors); on suites without metal, "
                                    "the share of each X-ray marked. Prints a table, writes JSON.")
    b.add_argument("--cases", type=Path, nargs="+", required=True, help="one or more suite folders")
    b.add_argument("--model", type=Path, help="weights (default, or 'default': the shipped Resources/Models/metal_seg.pt)")
    b.add_argument("--limit", type=_COUNT, help="only the first N cases of each suite")
    _add_bench_json(b, "metal")
    b = bsub.add_parser("gaussians", help="rasterizer and voxelizer speed and memory, vs a naive dense evaluation")
    b.add_argument("--threads", type=_COUNT, default=1, help="CPU threads (default 1: fastest on 2 shared cores)")
    b.add_argument("--repeat", type=_COUNT, default=5,
                   help="timed forward runs (forward + backward: half as many); the table shows their median "
                        "(default 5; the dense reference is timed once)")
    _add_bench_json(b, "gaussians")
    b = bsub.add_parser("train", help="training speed of a configuration: seconds per sample of each phase",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Trains the configuration's network for 2 RecM, 2 RegM and 1 joint epochs on a "
                                    "few simulated phantom samples (radgsreg train itself, in a temporary folder), once "
                                    "per batch size, and prints each phase's seconds per sample and epoch and what one "
                                    "epoch of the configuration's whole training set would take.",
                        epilog="examples:\n"
                               "  radgsreg bench train                                  # stage1_cpu_all.json on the CPU\n"
                               "  radgsreg bench train --device cuda --batch 4 16 --data-workers 8")
    b.add_argument("--config", type=Path, help="JSON training config (default: stage1_cpu_all.json, the shipped "
                                                          "weights' first run)")
    b.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    b.add_argument("--threads", type=_COUNT, default=2, help="CPU threads for torch (default 2)")
    b.add_argument("--samples", type=_COUNT, default=32, help="training samples per run (default 32)")
    b.add_argument("--batch", type=_COUNT, nargs="+", default=[4], help="batch sizes, one run each (default 4)")
    b.add_argument("--data-workers", type=_COUNT, default=1, help="processes simulating the samples (default 1)")
    _add_bench_json(b, "train")
    for sp in list(sub.choices.values()) + list(bsub.choices.values()):     # `radgsreg CMD ... --debug` too
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    return ap


# ------------------------------------------------------------------ commands
def _cmd_phantom(args):
    import numpy as np

    from .io import write_volume
    from .io.atomic import atomic_dir
    from .io.outputs import check_output
    from .phantom import SACRUM_ID, make_phantom, rib_id

    cfg = _phantom_config(top_level=args.top_level, n_vertebrae=args.n_vertebrae, spacing=tuple(args.spacing),
                          table=args.table, ribs=args.ribs, sacrum=args.sacrum, size=args.size,
                          bone_density=args.bone_density, seed=args.seed)
    check_output(args.out, "phantom", overwrite=args.overwrite, option="--out")
    t = time.perf_counter()
    ct, seg = make_phantom(cfg)
    with atomic_dir(args.out, args.overwrite, kind="phantom") as tmp:
        write_volume(ct, tmp / "ct.nrrd")
        write_volume(seg, tmp / "seg.nrrd")
    ribs = int(np.count_nonzero(np.unique(seg.array) >= rib_id(1, "left"))) if args.ribs else 0   # the rib ids
    print(f"phantom {ct.size} voxels at {tuple(cfg.spacing)} mm, levels {', '.join(cfg.levels)}"
          + (f", {ribs} ribs" if args.ribs else "")
          + (", sacrum and hip bones" if args.sacrum and SACRUM_ID in seg.array
             else ", no sacrum (the column does not reach S1)" if args.sacrum else "")
          + f" ({time.perf_counter() - t:.1f} s) -> {args.out}/ct.nrrd, seg.nrrd")


def _phantom_config(**kw):
    """A PhantomConfig from command-line values; what it refuses is a usage error."""
    from .phantom import PhantomConfig

    try:
        return PhantomConfig(**kw)
    except ValueError as e:
        option = ("--size" if str(e).startswith("size") else "--bone-density" if str(e).startswith("bone_density")
                  else "--top-level" if "level" in str(e) or "vertebra" in str(e) else "--spacing")
        raise UsageError(f"{option}: {e}") from None


def _say(line: str) -> None:
    """A progress line on stdout, at once."""
    print(line, flush=True)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _cmd_simulate(args):
    from .cases import generate_cases, load_labelled_ct
    from .io.outputs import check_output
    from .phantom import make_phantom

    levels = _parse_levels(args.levels, "--levels")
    if args.phantom and args.seg is not None:
        raise UsageError("--seg goes with --ct, not --phantom")
    if not args.phantom and args.seg is None:
        raise UsageError("--ct needs --seg (the vertebra label map on the CT grid)")
    cfg = _case_config(args)
    check_output(args.out, "suite", overwrite=args.overwrite, inputs=[args.ct, args.seg], option="--out")
    if args.phantom:
        probe = _phantom_config(seed=0, spacing=(args.phantom_spacing,) * 3)
        missing = [lv for lv in levels if lv not in probe.levels]
        if missing:
            raise UsageError(f"--levels: the phantom spans {', '.join(probe.levels)}; not {', '.join(missing)}")

        def sources(i):
            pc = _phantom_config(seed=args.seed * 100003 + i, spacing=(args.phantom_spacing,) * 3)
            ct, seg = make_phantom(pc)
            return ct, seg, f"phantom seed {pc.seed}"
    else:
        src = load_labelled_ct(args.ct, args.seg, levels, fields=("--ct", "--seg"))
        for w in src.warnings:
            _warn(w)
        labels = src.labels

        def sources(i):
            return src.ct, src.seg, src.source

    t = time.perf_counter()
    rows = generate_cases(sources, levels, args.n, args.out, cfg, labels=None if args.phantom else labels,
                          overwrite=args.overwrite, progress=_progress("simulating"), inputs=[args.ct, args.seg])
    print(_table(rows, [("case", "case", "s"), ("level", "level", "s"), ("rot_offset_deg", "rot deg", ".1f"),
                        ("trans_offset_mm", "trans mm", ".1f"), ("initial_mtre_mm", "init mTRE mm", ".1f"),
                        ("seconds", "seconds", ".1f")]))
    import numpy as np

    m = np.array([r["initial_mtre_mm"] for r in rows])
    print(f"{len(rows)} cases in {time.perf_counter() - t:.0f} s -> {args.out}; initial mTRE mean {m.mean():.1f} mm, "
          f"median {np.median(m):.1f} mm, range {m.min():.1f}-{m.max():.1f} mm")


def _case_config(args):
    """The case generator's settings from the command line; an impossible C-arm is a usage
    error naming the options (checks.check_view)."""
    from .cases import CaseGenConfig
    from .checks import check_view

    from .articulation import ArticulationConfig
    from .instruments import InstrumentsConfig

    cfg = CaseGenConfig(rot_deg=args.rot_deg, trans_mm=args.trans_mm, pixels=args.pixels, detector_mm=args.detector_mm,
                        sdd=args.sdd, sid=args.sid, sim=_sim_config(args),
                        articulation=ArticulationConfig(args.joint_deg, args.joint_mm),
                        instruments=InstrumentsConfig(args.screws, args.kwires, args.retractors),
                        seed=args.seed)
    if args.beyond_ct_mm is not None:
        cfg = replace(cfg, beyond_ct_mm=args.beyond_ct_mm)
    options = f"--sdd {args.sdd:g} / --sid {args.sid:g} / --pixels {args.pixels} / --detector-mm {args.detector_mm:g}"
    try:
        views = cfg.views()
        for name, view in views.items():
            for w in check_view(view, name):
                print(f"warning: {options}: {w}", file=sys.stderr)
    except (InputError, ValueError) as e:
        raise UsageError(f"{options}: {e}") from None
    return cfg


def _parse_levels(text, option: str = "--level") -> list[str]:
    """Level names ("L1,L2") or explicit label values ("29,30") from the command line."""
    from .levels import parse_levels

    tokens = [t.strip() for t in str(text).split(",") if t.strip()]
    if tokens and all(t.isdigit() for t in tokens):
        return tokens
    try:
        return parse_levels(text)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def _one_level(text) -> str:
    levels = _parse_levels(text)
    if len(levels) != 1:
        raise UsageError("--level takes one level, e.g. --level L3")
    return levels[0]


def _cmd_sample_case(args):
    from .cases import sample_case
    from .io import write_case
    from .io.outputs import check_output
    from .sample_data import lumbar_ct

    sd = lumbar_ct()
    level = _one_level(args.level)
    cfg = _case_config(args)
    check_output(args.out, "case", overwrite=args.overwrite, inputs=[sd.ct, sd.seg], option="--out")
    case = sample_case(level, cfg)
    for w in case.warnings:
        _warn(w)
    write_case(case, args.out, overwrite=args.overwrite, inputs=[sd.ct, sd.seg])
    gen = case.extra["generator"]
    print(f"wrote {args.out} ({level}, label {case.vertebra_label}, {case.image_kind}, {cfg.pixels}x{cfg.pixels} "
          f"pixels); true pose offset {gen['offset_rot_deg']:.1f} deg, {gen['offset_trans_mm']:.1f} mm")


def _cmd_show(args):
    from .io import read_case, read_result
    from .io.outputs import check_output_file
    from .preview import save_montage

    out = args.out or Path(args.case) / "preview.png"
    inputs = [args.case, args.result]
    check_output_file(out, "preview", overwrite=args.overwrite or args.out is None, inputs=inputs,
                      allow_in=[args.case], option="--out")
    case = read_case(args.case, ground_truth="if-present")
    T = None
    if args.result:
        result = read_result(args.result)
        _check_result_belongs(args.case, args.result, result)
        T = result.T_ct_to_carm
    save_montage(case, out, size=args.size, T=T, overwrite=args.overwrite or args.out is None, inputs=inputs,
                 allow_in=[args.case])
    print(f"wrote {out}")


def _check_result_belongs(case_dir, result_dir, result) -> None:
    """Refuse a result folder written for another case (evaluate.result_matches_case)."""
    from .evaluate import result_matches_case

    why = result_matches_case(case_dir, result)
    if why:
        raise InputError(f"{result_dir} is the result of another case, not {case_dir}: {why}")


def _cmd_demo(args):
    from .cases import sample_level
    from .demo import run_demo
    from .levels import LevelError

    level = _one_level(args.level)
    try:
        level = sample_level(level, phantom=args.phantom)
    except LevelError as e:
        raise UsageError(f"--level {e}") from None
    d = run_demo(args.out, level=level, phantom=args.phantom, pixels=args.pixels, rot_deg=args.rot_deg,
                 trans_mm=args.trans_mm, seed=args.seed, overwrite=args.overwrite, option="--out", log=_say, warn=_warn)
    e0, e1 = d.before, d.after
    print(f"case: {d.out / 'case'} ({d.level}, label {d.label}); result: {d.out / 'result'}; "
          f"picture: {d.out / 'preview.png'}")
    print(f"initial guess: mTRE {e0['mtre_mm']:.1f} mm (rotation {e0['rot_err_deg']:.1f} deg, translation "
          f"{e0['trans_err_mm']:.1f} mm)")
    print(f"registered:    mTRE {e1['mtre_mm']:.2f} mm (rotation {e1['rot_err_deg']:.2f} deg, translation "
          f"{e1['trans_err_mm']:.2f} mm) in {d.register_s:.1f} s"
          + ("" if not d.warnings else f"; warning: {'; '.join(d.warnings)}"))
    print(f"done in {d.seconds:.0f} s")


def _cmd_bench(args):
    if args.bench == "drr":
        from .bench.drr_bench import run_drr_bench

        run_drr_bench(n=args.size, pixels=args.pixels, repeat=args.repeat, threads=args.threads, json_path=args.json)
    elif args.bench == "register":
        from .bench.register_bench import METHODS, run_register_bench
        from .evaluate import case_dirs

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise UsageError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(sorted(METHODS))}")
        if any(m.startswith("learned") for m in methods) and not args.model:
            raise UsageError("--methods learned*: give the network's weights with --model (a .pt file or 'default')")
        for suite in args.cases:
            if not case_dirs(suite):
                raise InputError(f"--cases {suite}: holds no case folders (folders with a case.json)")
        if args.diffdrr_python is not None and "diffdrr" not in methods:
            raise UsageError("--diffdrr-python: only with --methods ...,diffdrr")
        run_register_bench(list(args.cases), methods, json_path=args.json, limit=args.limit, model=args.model,
                           threads=args.threads, diffdrr_python=args.diffdrr_python)
    elif args.bench == "recon":
        from .bench.recon_bench import parse_model_args, run_recon_bench
        from .evaluate import case_dirs

        try:
            models = parse_model_args(args.models)
        except ValueError as e:
            raise UsageError(f"--models {e}") from None
        for name, path in models.items():
            if path != "default" and not Path(path).is_file():
                raise InputError(f"--models {name}={path}: no such weight file")
        for suite in args.cases:
            if not Path(suite).is_dir():
                raise InputError(f"--cases {suite}: no such folder")
            if not case_dirs(suite):
                raise InputError(f"--cases {suite}: holds no case folders (folders with a case.json)")
        run_recon_bench(list(args.cases), models, limit=args.limit, threads=args.threads, json_path=args.json)
    elif args.bench == "metal":
        from .bench.metal_bench import run_metal_bench
        from .evaluate import case_dirs

        for suite in args.cases:
            if not case_dirs(suite):
                raise InputError(f"--cases {suite}: holds no case folders (folders with a case.json)")
        run_metal_bench(list(args.cases), model=None if str(args.model) == "default" else args.model,
                        limit=args.limit, json_path=args.json)
    elif args.bench == "gaussians":
        from .bench.gaussians_bench import run_gaussians_bench

        run_gaussians_bench(threads=args.threads, repeat=args.repeat, json_path=args.json)
    elif args.bench == "train":
        from .bench.train_bench import run_train_bench
        from .resources import resource_path

        config = args.config or resource_path("Models/configs/stage1_cpu_all.json")
        run_train_bench(config, device=args.device, threads=args.threads, samples=args.samples, batches=args.batch,
                        data_workers=args.data_workers, json_path=args.json)
    else:
        raise UsageError("choose a benchmark: radgsreg bench drr | gaussians | register | recon | metal | train")


def register_config(args) -> RegisterConfig:
    """The registration settings of ``radgsreg register``: RegisterConfig's defaults, then
    ``--config``, then the options given on the command line. Contradicting options are a
    :class:`~RadGSRegLib.errors.UsageError`."""
    import dataclasses

    from .register import read_config

    cfg = read_config(args.config) if args.config else RegisterConfig()
    given = {k: getattr(args, k) for k in ("init", "refine", "model", "device", "reconstruct", "drrs")
             if getattr(args, k) is not None}
    init, model = given.get("init", cfg.init), given.get("model", cfg.model)
    if init == "learned" and not model:
        raise UsageError("--init learned needs --model (a .pt weight file, or 'default' for the shipped weights)")
    if init in ("none", "search") and model:
        where = "--model" if "model" in given else f"\"model\" in {args.config}"
        raise UsageError(f"{where} is not used with --init {init} (the network runs only with --init learned or "
                         "auto); drop it, or choose --init learned")
    if args.robust is not None:
        given["robust"] = dataclasses.replace(cfg.robust, mode=args.robust)
    metal = {k: v for k, v in (("mode", args.metal), ("model", args.metal_model)) if v is not None}
    mode, weights = metal.get("mode", cfg.metal.mode), metal.get("model", cfg.metal.model)
    if mode == "never" and weights != "default":
        what = "--metal-model" if "model" in metal else f"\"metal\": {{\"model\": ...}} in {args.config}"
        how = "--metal never" if "mode" in metal else f"\"metal\": {{\"mode\": \"never\"}} in {args.config}"
        raise UsageError(f"{what} is not used with {how} (no metal is looked for); drop one of them")
    if metal:
        given["metal"] = dataclasses.replace(cfg.metal, **metal)
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
        if ev.event != "error":
            _check_interrupted()

    report = Reporter(emit)
    try:
        report.stage("start", "starting")
        cfg = register_config(args)
        from .device import resolve_device

        resolve_device(cfg.device)
        model = cfg.model_path() if cfg.init_mode == "learned" else None
        from .io.outputs import check_output

        check_output(args.out, "result", overwrite=args.overwrite, inputs=[args.case, args.config, model],
                     option="--out")
        import torch

        from .io import read_case, write_result
        from .register import run

        torch.set_num_threads(args.threads)
        report.stage("read", f"reading {args.case}")
        case = read_case(args.case)                    # never the ground truth; checked for plausibility
        from .evaluate import case_fingerprint

        fingerprint = case_fingerprint(args.case)       # read now: nothing after the work can fail on it
        from .register.pipeline import load_networks

        net, metal_net = load_networks(cfg)            # the weights before the work: a bad file fails now
        log(f"registering {args.case} ({case.vertebra_name or case.vertebra_label}), init={cfg.init_mode}, "
            f"refine={cfg.refine}{f', model {model}' if model else ''}")
        res = run(case, cfg, log=log, progress=emit, net=net, metal_net=metal_net)
        res.info.update({"case": str(args.case), "case_fingerprint": fingerprint,
                         "device": cfg.device, "threads": args.threads, "model": str(model) if model else None})
        report.stage("write", f"writing {args.out}")
        write_result(res, args.out, overwrite=args.overwrite, inputs=[args.case, args.config, model])
    except BaseException as e:
        emit(ProgressEvent("error", "", report.fraction, one_line(e)))
        raise
    for w in res.info["warnings"]:
        log(f"warning: {w}")
    log(f"T_ct_to_carm written to {args.out}/result.json and transform.h5 in {res.runtime_s['total']:.1f} s "
        f"({', '.join(f'{k} {v:.2f} s' for k, v in res.runtime_s.items() if k != 'total')})")
    emit(ProgressEvent("done", "", 1.0, str(args.out)))


def _cmd_register_batch(args):
    from .batch import register_batch

    from .register import read_config

    config = {}
    if args.config is not None:
        read_config(args.config)                       # its errors name the file and the field
        config = json.loads(Path(args.config).read_text())
    if args.model:
        config.update(model=args.model, init="learned")
    summary = register_batch(args.cases, args.out, config=config, workers=args.workers, threads=args.threads,
                             ray=args.ray)
    if summary["counts"]["failed"]:
        raise InputError(f"{summary['counts']['failed']} of {len(summary['rows'])} cases failed (each with its error "
                         f"in {Path(args.out) / 'batch.json'}); the others are done: run the same command again to "
                         "retry only those")


def _cmd_train(args):
    import dataclasses

    from .training.config import TrainConfig, load_train_config
    from .training.train import train

    if args.no_cal and args.init:
        raise UsageError("--no-cal does not apply with --init: the network (with or without CAL) comes with the "
                         "weights; train from scratch for the ablation")
    over = {"out": str(args.out), "stage": args.stage, "init": args.init, "device": args.device,
            "threads": args.threads, "seed": args.seed, "data_workers": args.data_workers,
            "data_cache": str(args.data_cache) if args.data_cache else None}
    if args.ct:
        over["ct_dirs"] = args.ct
    if args.cases:
        over["case_dirs"] = args.cases
    if args.config:
        cfg = load_train_config(args.config, **over)
    else:
        cfg = TrainConfig.from_dict({k: v for k, v in over.items() if v is not None}, source="the command line")
    if args.no_cal:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cal=False))
    if args.data_workers and args.data_workers > cfg.data_shards:
        print(f"note: --data-workers {args.data_workers}: the config draws its samples as {cfg.data_shards} "
              f"stream(s) (data_shards), so at most {cfg.data_shards} process(es) simulate them; set data_shards in "
              "the config to use more (other shards, other samples)", file=sys.stderr)
    from .io.outputs import check_output
    from .training.data import ct_spec_paths

    inputs = [args.config, cfg.init, *cfg.case_dirs]
    for spec in cfg.ct_dirs:
        try:
            inputs += list(ct_spec_paths(str(spec)))
        except InputError:
            pass                                           # train() names the bad --ct entry
    check_output(cfg.out, "train", overwrite=True, inputs=[p for p in inputs if p], option="--out")
    train(cfg)                       # checks the run folder, data, weights and device before any work


def _cmd_evaluate(args):
    from .evaluate import case_dirs, evaluate_results

    for option, folder in (("CASES", args.cases), ("--results", args.results)):
        if not Path(folder).is_dir():
            raise InputError(f"{option} {folder}: folder not found")
    if not case_dirs(args.cases):
        raise InputError(f"CASES {args.cases}: holds no case folders (folders with a case.json)")
    evaluate_results(args.cases, args.results, json_path=args.json or Path(args.results) / "evaluation.json")


def _cmd_fit_gaussians(args):
    from tqdm import tqdm

    from .gaussians.fit import FitConfig, fit_case
    from .io import read_case, write_volume
    from .io.atomic import atomic_dir
    from .io.outputs import check_output

    if args.views > 2 and not args.simulated:
        raise UsageError("--views: a case has two X-rays; more views need --simulated")
    check_output(args.out, "fit", overwrite=args.overwrite, inputs=[args.case], option="--out")
    case = read_case(args.case, ground_truth="if-present")
    if args.simulated and (case.ground_truth is None or case.seg is None):
        raise InputError(f"--simulated renders the case's vertebra at its true pose: {args.case} needs a "
                         "ground_truth and vertebra labels")
    cfg = FitConfig(iterations=args.iterations, n_gaussians=args.gaussians, max_gaussians=5 * args.gaussians,
                    views_per_step=4, seed=args.seed)
    bar = []

    def starting(line):                      # what is fitted, then the progress bar under it
        _say(line)
        bar.append(tqdm(total=args.iterations, file=sys.stderr, unit="it", dynamic_ncols=True))

    def progress(step, rec):
        bar[0].update(1)
        if step % 10 == 0:
            bar[0].set_postfix(loss=f"{rec['loss']:.4f}", n=rec["n"])

    try:
        fit = fit_case(case, cfg, simulated=args.simulated, views=args.views, pixels=args.pixels,
                       grid_mm=args.grid_mm, voxel_mm=args.voxel_mm, log=starting, progress=progress)
    finally:
        for b in bar:
            b.close()
    with atomic_dir(args.out, args.overwrite, kind="fit", inputs=[args.case]) as tmp:
        fit.result.gaussians.save(tmp / "gaussians.npz")
        write_volume(fit.recon, tmp / "recon.nrrd")
        (tmp / "fit.json").write_text(json.dumps(fit.report, indent=2, default=float))
    msg = (f"{len(fit.result.gaussians)} Gaussians in {fit.result.seconds:.0f} s -> {args.out}/gaussians.npz, "
           "recon.nrrd, fit.json")
    m = fit.report.get("metrics_vs_ground_truth")
    if m is not None:
        msg += f"; against the true vertebra volume: PSNR {m['psnr_db']:.2f} dB, SSIM {m['ssim_pct']:.1f} %"
    print(msg)


def _cmd_train_metal(args):
    import dataclasses

    import torch

    from .training.metal import MetalTrainConfig, train_metal

    cfg = MetalTrainConfig()
    over = {k: v for k, v in (("cases", args.cases), ("val_cases", args.val_cases), ("steps", args.steps),
                              ("seed", args.seed)) if v is not None}
    if args.phantoms is not None:
        over["phantom_seeds"] = tuple(1001 + i for i in range(args.phantoms))
    if args.no_sample_ct:
        over["sample_ct"] = False
    try:
        cfg = dataclasses.replace(cfg, **over)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    path = train_metal(cfg, args.out, log=lambda line: print(line, flush=True), overwrite=args.overwrite)
    print(f"wrote {path}")


_COMMANDS = {"demo": _cmd_demo, "phantom": _cmd_phantom, "simulate-cases": _cmd_simulate, "show": _cmd_show,
             "sample-case": _cmd_sample_case, "fit-gaussians": _cmd_fit_gaussians, "register": _cmd_register,
             "register-batch": _cmd_register_batch, "train": _cmd_train, "train-metal": _cmd_train_metal,
             "evaluate": _cmd_evaluate, "bench": _cmd_bench}


def main(argv=None) -> int:
    """Run one command; returns the exit code: 0 done, 1 bad input or failed job, 2 bad
    usage, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM: ``kill PID``). Errors are one
    line on stderr (with ``--debug``: the traceback); an unexpected error also writes a full
    report to a file and says where."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                        # --help, --version, or a usage error argparse printed
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("radgsreg: error: choose a COMMAND (radgsreg --help lists them)", file=sys.stderr)
        return 2
    name = f"radgsreg {args.command}"
    try:
        with _interruptible():
            _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        import signal

        terminated = signal.SIGTERM in _INTERRUPTED
        print(f"\n{name}: {'terminated (SIGTERM)' if terminated else 'interrupted'}", file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)
    except UsageError as e:
        _debug_traceback(args)
        print(f"{name}: error: {e} (see {name} --help)", file=sys.stderr)
        return 2
    except (InputError, OSError) as e:             # bad input, a refused output, a file system error
        _debug_traceback(args)
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:                         # a bug: one line here, the whole story in a file
        report = _crash_report(argv, e)
        _debug_traceback(args)
        print(f"{name}: internal error: {type(e).__name__}: {one_line(e)} (full report: {report}; please "
              "include it when you report the problem)", file=sys.stderr)
        return 1
    return 0


#: the signals (SIGINT: Ctrl-C; SIGTERM: ``kill PID``) that arrived during a command: the
#: progress callbacks raise KeyboardInterrupt even when Python swallowed the first one (raised
#: inside a C callback or a finaliser)
_INTERRUPTED = []


@contextlib.contextmanager
def _interruptible():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _INTERRUPTED.append(signum)
        raise KeyboardInterrupt

    def unraisable(info, default=sys.unraisablehook):
        # Ctrl-C that lands in a callback Python cannot raise from (e.g. llvmlite's object
        # cache): not a traceback for the user; the next progress checkpoint stops the job
        if not isinstance(info.exc_value, KeyboardInterrupt):
            default(info)

    # SIGTERM as Ctrl-C: the same clean-ups (temporary outputs removed, worker processes
    # stopped) instead of Python's default, which ends the process on the spot
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    _INTERRUPTED.clear()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        sys.unraisablehook = previous_hook


def _check_interrupted():
    """At a safe point of a long job: stop if Ctrl-C was pressed (or SIGTERM came)."""
    if _INTERRUPTED:
        raise KeyboardInterrupt


def _debug_traceback(args):
    if getattr(args, "debug", False):
        import traceback

        traceback.print_exc()


def _crash_report(argv, error: BaseException) -> str:
    """Write the traceback, the command line and the versions to a file; returns its path."""
    import platform
    import tempfile
    import traceback

    from . import __version__

    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    fd, path = tempfile.mkstemp(prefix="radgsreg-crash-", suffix=".txt")
    with open(fd, "w", encoding="utf-8") as f:
        f.write(f"radgsreg {__version__}, Python {platform.python_version()}, {platform.platform()}\n")
        f.write(f"command: radgsreg {' '.join(map(str, sys.argv[1:] if argv is None else argv))}\n\n{text}")
    return path


if __name__ == "__main__":
    sys.exit(main())
