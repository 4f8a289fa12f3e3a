"""The bad-input table: what a new user gets wrong, and what ``radgsreg`` must do about it.

Each :class:`Row` is one mistake: the command line (with ``{placeholders}`` for the files a
:class:`Workspace` makes), a setup that spoils an input, and what must happen: the exit code
(2: usage, 1: bad input or failed job, 0: done with a named warning), words the one-line
message must contain (the file, field or option, and what was expected), and always: no
traceback, inputs byte-identical afterwards, no partial output.

``Testing/test_bad_inputs.py`` runs every row against the current code. Run this file as a
script to classify the outcomes of any checkout (e.g. the code before the hardening)::

    PYTHONPATH=<checkout> python Testing/bad_inputs.py

Classes: clear (the expected exit code and words), traceback (an exception escaped),
data loss (an input or someone's file changed or vanished), foreign code (a planted pickle
ran), silent (exit 0 with no word of the cause), unclear (anything else: wrong code, no
words, a partial output).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

#: a quick registration (one rotation hypothesis, two levels): rows that must run a registration
_LEVELS = {"levels": [{"pixels": 48, "iterations": 5, "step_deg": 1.0, "step_mm": 1.0,
                       "margin_mm": 30.0, "highpass_mm": None},
                      {"pixels": 96, "iterations": 3, "step_deg": 0.5, "step_mm": 0.5,
                       "margin_mm": 20.0, "highpass_mm": 12.0}]}
try:                                  # the pose search's own settings (older checkouts: inside refine2d)
    from RadGSRegLib.register.config import SearchConfig  # noqa: F401
    FAST_CONFIG = {"search": {"rot_deg": [0.0], "candidates": 1}, "refine2d": _LEVELS}
except ImportError:
    FAST_CONFIG = {"refine2d": {"search_rot_deg": [0.0], "candidates": 1, **_LEVELS}}


@dataclass
class Row:
    id: str
    argv: list
    code: int
    words: tuple = ()
    setup: Optional[Callable] = None      # setup(ws): spoil an input, make a folder ...
    output: str = ""                       # placeholder of the output the command would write
    finding: str = ""                      # the class of this mistake (before the fix)
    keep_output: bool = False              # the output existed before and must stay as it was


@dataclass
class Outcome:
    code: int
    out: str
    err: str
    traceback: str
    changed: list = field(default_factory=list)
    partial: bool = False
    planted_ran: bool = False


class Workspace:
    """Inputs every row may use, made once (``make``) and copied fresh per row (``fresh``)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # ------------------------------------------------------------------ building the originals
    @classmethod
    def make(cls, root: Path) -> "Workspace":
        from RadGSRegLib.cases import CaseGenConfig, make_case
        from RadGSRegLib.io import write_case, write_volume
        from RadGSRegLib.phantom import PhantomConfig, make_phantom

        root = Path(root)
        (root / "orig").mkdir(parents=True)
        ct, seg = make_phantom(PhantomConfig(spacing=(4.0, 4.0, 4.0), seed=1))
        write_volume(ct, root / "orig" / "ct.nrrd")
        write_volume(seg, root / "orig" / "seg.nrrd")
        case = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=3.0, trans_mm=6.0, pixels=96, seed=3),
                         np.random.default_rng(3))
        write_case(case, root / "orig" / "case")
        (root / "orig" / "fast.json").write_text(json.dumps(FAST_CONFIG))
        return cls(root)

    def fresh(self, name: str) -> "Workspace":
        d = self.root / "rows" / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(self.root / "orig", d / "in")
        (d / "out").mkdir()
        return Workspace(d)

    # ------------------------------------------------------------------ paths of a row
    @property
    def inputs(self) -> Path:
        return self.root / "in"

    def path(self, key: str) -> Path:
        p = {"case": "in/case", "ct": "in/ct.nrrd", "seg": "in/seg.nrrd", "fast": "in/fast.json",
             "cases": "in/cases", "res": "out/res", "json": "out/eval.json", "png": "out/p.png", "run": "out/run",
             "foreign": "in/foreign", "dir": "out/dir", "ro": "in/ro/out", "model": "in/model.pt",
             "marker": "in/planted-ran"}.get(key, key)
        return self.root / p

    def expand(self, argv: list) -> list:
        keys = ("case", "ct", "seg", "fast", "cases", "res", "json", "png", "run", "foreign", "dir", "ro", "model")
        out = []
        for a in argv:
            for k in keys:
                a = a.replace("{" + k + "}", str(self.path(k)))
            out.append(a)
        return out

    def snapshot(self, exclude: Path | None = None) -> dict:
        snap = {}
        for p in sorted(self.root.rglob("*")):
            if p.is_file() and not (exclude and (p == exclude or exclude in p.parents)):
                snap[str(p.relative_to(self.root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return snap

    # ------------------------------------------------------------------ spoiling inputs
    def edit_json(self, rel: str, fn: Callable[[dict], None]):
        p = self.path("case") / rel
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))

    def edit_image(self, rel: str, fn: Callable[[np.ndarray], np.ndarray]):
        import SimpleITK as sitk

        p = self.path("case") / rel
        img = sitk.ReadImage(str(p))
        arr = fn(sitk.GetArrayFromImage(img).astype(np.float32))
        new = sitk.GetImageFromArray(arr.astype(np.float32))
        new.CopyInformation(img)
        sitk.WriteImage(new, str(p))

    def plant_pickle(self, path: Path):
        """A file that runs code when unpickled: it would create ``planted-ran``."""
        import pickle

        class Payload:
            def __reduce__(self):
                return (Path.touch, (self_marker,))

        self_marker = self.path("marker")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump({"state": Payload()}, f)

    def result_of_ours(self):
        """A previous result folder written by `radgsreg register` (our own output)."""
        from RadGSRegLib.io import Result, write_result

        write_result(Result(T_ct_to_carm=np.eye(4), info={"warnings": []}), self.path("res"))


# ------------------------------------------------------------------ setups
def _cases_folder(ws):
    shutil.copytree(ws.path("case"), ws.path("cases") / "case_000")


def _foreign_folder(ws):
    ws.path("foreign").mkdir()
    (ws.path("foreign") / "notes.txt").write_text("my thesis, do not delete")


def _ct_array(fn):
    def setup(ws):
        import SimpleITK as sitk

        p = ws.path("case") / "ct.nrrd"
        img = sitk.ReadImage(str(p))
        arr = fn(sitk.GetArrayFromImage(img).astype(np.float32))
        new = sitk.GetImageFromArray(arr)
        new.CopyInformation(img)
        sitk.WriteImage(new, str(p))
    return setup


def _ct_spacing(spacing):
    """Both the CT and its labels (so they stay on one grid) at an absurd voxel size."""
    def setup(ws):
        import SimpleITK as sitk

        for name in ("ct.nrrd", "seg.nrrd"):
            p = ws.path("case") / name
            img = sitk.ReadImage(str(p))
            img.SetSpacing(spacing)
            sitk.WriteImage(img, str(p))
    return setup


def _xray(view, fn):
    return lambda ws: ws.edit_image(f"xray_{view}.nrrd", fn)


def _geometry(fn):
    return lambda ws: ws.edit_json("geometry.json", fn)


def _set_view(view, key, value):
    def fn(d):
        d["views"][view][key] = value
        d["views"][view].pop("projection_matrix", None)
    return _geometry(fn)


def _swap_views(ws):
    a, b = ws.path("case") / "xray_ap.nrrd", ws.path("case") / "xray_lat.nrrd"
    tmp = a.with_name("swap.nrrd")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _image_kind(kind):
    def fn(d):
        d["image_kind"] = kind
    return _geometry(fn)


def _to_intensity_values(ws):
    """Detector intensities (0..4095, bone dark) in files that say line_integral."""
    for v in ("ap", "lat"):
        ws.edit_image(f"xray_{v}.nrrd", lambda a: np.clip(np.exp(-a), 0, 1) * 4095.0)


def _train_config(ws, **changes):
    cfg = {"stage": 1, "model": {"backbone": "small", "image_pixels": 64, "anchors": 4, "per_anchor": 1,
                                 "voxels": 16}, "phantoms": 1, "samples_per_ct": 2, "val_samples": 1,
           "rec_epochs": 1, "reg_epochs": 0, "joint_epochs": 0, "batch": 2, "threads": 1}
    cfg.update(changes)
    (ws.inputs / "train.json").write_text(json.dumps(cfg))


def _corrupt_file(rel):
    return lambda ws: (ws.inputs / rel).write_bytes(b"this is not what you think")


def _trained_run(ws):
    """A finished tiny training run in ``{run}`` (its checkpoint will be replaced)."""
    from RadGSRegLib.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--config", str(ws.inputs / "train.json"), "--out", str(ws.path("run"))])
    assert code in (0, None), "the tiny training run failed"


def _hand_made_case(ws):
    """A case folder someone made by hand (docs/case-format.md): our file names, no marker,
    no generator record."""
    ws.edit_json("case.json", lambda d: d.pop("generator"))
    (ws.path("case") / ".radgsreg.json").unlink(missing_ok=True)


def _patient_folder(ws):
    """Someone's CT and labels in a folder of their own (what a phantom folder looks like)."""
    (ws.inputs / "patient").mkdir()
    shutil.copy(ws.path("ct"), ws.inputs / "patient" / "ct.nrrd")
    shutil.copy(ws.path("seg"), ws.inputs / "patient" / "seg.nrrd")


def _no_labels(ws):
    def fn(d):
        d.pop("segmentation")
        d.pop("vertebra_label")
    ws.edit_json("case.json", fn)


def _normalised_ct_file(ws):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(ws.path("ct")))
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    new = sitk.GetImageFromArray((a - a.min()) / (a.max() - a.min()))
    new.CopyInformation(img)
    sitk.WriteImage(new, str(ws.inputs / "ct01.nrrd"))


def _result_for_case(ws):
    """A result folder of ours for ``cases/case_000``, under the cases' results folder."""
    _cases_folder(ws)
    from RadGSRegLib.io import Result, write_result

    write_result(Result(T_ct_to_carm=np.eye(4), info={"warnings": [], "case": "case_000"}),
                 ws.root / "out" / "results" / "case_000")


def _result_elsewhere(ws):
    """A result folder of ours for another case, under the cases' results folder."""
    _cases_folder(ws)
    from RadGSRegLib.io import Result, write_result

    write_result(Result(T_ct_to_carm=np.eye(4), info={"warnings": [], "case": "/elsewhere/case_007"}),
                 ws.root / "out" / "results" / "case_000")


def _both(*setups):
    def setup(ws):
        for s in setups:
            s(ws)
    return setup


# ------------------------------------------------------------------ the table
REG = ["register", "{case}", "--out", "{res}"]
FAST = ["--config", "{fast}"]

ROWS = [
    # --- usage: exit 2, the option named
    Row("no-command", [], 2, ("usage",), finding="clear"),
    Row("unknown-command", ["regster"], 2, ("invalid choice",), finding="clear"),
    Row("register-no-out", ["register", "{case}"], 2, ("--out",), finding="clear"),
    Row("threads-zero", REG + ["--threads", "0"], 2, ("--threads",), output="res", finding="traceback"),
    Row("threads-negative", REG + ["--threads", "-2"], 2, ("--threads",), output="res", finding="traceback"),
    Row("threads-word", REG + ["--threads", "two"], 2, ("--threads",), output="res", finding="clear"),
    Row("init-learned-no-model", REG + ["--init", "learned"], 2, ("--model",), output="res", finding="clear"),
    Row("model-ignored-init-none", REG + ["--init", "none", "--model", "default"], 2, ("--model", "--init"),
        output="res", finding="silent"),
    Row("model-ignored-init-search", REG + ["--init", "search", "--model", "default"], 2, ("--model", "--init"),
        output="res", finding="silent"),
    Row("refine-bad", REG + ["--refine", "3d2d"], 2, ("--refine",), output="res", finding="clear"),
    Row("sim-pixels-zero", ["simulate-cases", "--phantom", "--n", "1", "--pixels", "0", "--out", "{dir}"], 2,
        ("--pixels",), output="dir", finding="traceback"),
    Row("sim-n-zero", ["simulate-cases", "--phantom", "--n", "0", "--out", "{dir}"], 2, ("--n",), output="dir",
        finding="clear"),
    Row("sim-rot-negative", ["simulate-cases", "--phantom", "--n", "1", "--rot-deg", "-5", "--out", "{dir}"], 2,
        ("--rot-deg",), output="dir", finding="silent"),
    Row("sim-dose-negative", ["simulate-cases", "--phantom", "--n", "1", "--dose", "-1", "--out", "{dir}"], 2,
        ("--dose",), output="dir", finding="traceback"),
    Row("sim-field-zero", ["simulate-cases", "--phantom", "--n", "1", "--field-mm", "0", "--out", "{dir}"], 2,
        ("--field-mm",), output="dir", finding="new option"),
    Row("sim-joint-too-large", ["simulate-cases", "--phantom", "--n", "1", "--joint-deg", "45", "--out", "{dir}"],
        2, ("--joint-deg",), output="dir", finding="new option"),
    Row("sim-screws-unknown", ["sample-case", "--level", "L3", "--screws", "all", "--out", "{dir}"], 2,
        ("--screws", "neighbours"), output="dir", finding="new option"),
    Row("sim-kwires-three", ["sample-case", "--level", "L3", "--kwires", "3", "--out", "{dir}"], 2,
        ("--kwires",), output="dir", finding="new option"),
    Row("sim-detector-zero", ["simulate-cases", "--phantom", "--n", "1", "--detector-mm", "0", "--out", "{dir}"],
        2, ("--detector-mm",), output="dir", finding="traceback"),
    Row("sim-sid-beyond-sdd", ["simulate-cases", "--phantom", "--n", "1", "--sid", "1200", "--sdd", "1000",
                               "--out", "{dir}"], 2, ("--sid", "--sdd"), output="dir", finding="silent"),
    Row("sim-sid-zero", ["simulate-cases", "--phantom", "--n", "1", "--sid", "0", "--out", "{dir}"], 2, ("--sid",),
        output="dir", finding="traceback"),
    Row("sim-level-unknown", ["simulate-cases", "--phantom", "--n", "1", "--levels", "L9", "--out", "{dir}"], 2,
        ("L9",), output="dir", finding="clear"),
    Row("sim-phantom-and-seg", ["simulate-cases", "--phantom", "--seg", "{seg}", "--n", "1", "--out", "{dir}"], 2,
        ("--seg",), output="dir", finding="clear"),
    Row("sim-ct-no-seg", ["simulate-cases", "--ct", "{ct}", "--n", "1", "--out", "{dir}"], 2, ("--seg",),
        output="dir", finding="clear"),
    Row("sim-spacing-zero", ["simulate-cases", "--phantom", "--n", "1", "--phantom-spacing", "0", "--out", "{dir}"],
        2, ("--phantom-spacing",), output="dir", finding="traceback"),
    Row("sample-two-levels", ["sample-case", "--level", "L1,L2", "--out", "{dir}"], 2, ("--level",), output="dir",
        finding="clear"),
    Row("show-size-zero", ["show", "{case}", "--out", "{png}", "--size", "0"], 2, ("--size",), output="png",
        finding="traceback"),
    Row("fit-iterations-zero", ["fit-gaussians", "{case}", "--out", "{dir}", "--iterations", "0"], 2,
        ("--iterations",), output="dir", finding="silent"),
    Row("fit-views-one", ["fit-gaussians", "{case}", "--out", "{dir}", "--views", "1"], 2, ("--views",),
        output="dir", finding="clear"),
    Row("fit-gaussians-zero", ["fit-gaussians", "{case}", "--out", "{dir}", "--gaussians", "0"], 2, ("--gaussians",),
        output="dir", finding="traceback"),
    Row("fit-voxel-negative", ["fit-gaussians", "{case}", "--out", "{dir}", "--voxel-mm", "-1"], 2, ("--voxel-mm",),
        output="dir", finding="traceback"),
    Row("phantom-spacing-zero", ["phantom", "--out", "{dir}", "--spacing", "0", "1", "1"], 2, ("--spacing",),
        output="dir", finding="traceback"),
    Row("phantom-n-zero", ["phantom", "--out", "{dir}", "--n-vertebrae", "0"], 2, ("--n-vertebrae",), output="dir",
        finding="traceback"),
    Row("phantom-top-unknown", ["phantom", "--out", "{dir}", "--top-level", "X9"], 2, ("--top-level",),
        output="dir", finding="traceback"),
    Row("bench-method-unknown", ["bench", "register", "--cases", "{cases}", "--methods", "ours-9d", "--json", "{json}"],
        2, ("ours-9d",), setup=_cases_folder, output="json", finding="traceback"),
    Row("bench-limit-zero", ["bench", "register", "--cases", "{cases}", "--limit", "0", "--json", "{json}"], 2,
        ("--limit",), setup=_cases_folder, output="json", finding="silent"),
    Row("train-threads-zero", ["train", "--out", "{run}", "--threads", "0"], 2, ("--threads",), output="run",
        finding="traceback"),
    # --- missing or broken input files: exit 1, the file (and field) named
    Row("case-missing", ["register", "{case}-nope", "--out", "{res}"], 1, ("case-nope",), output="res",
        finding="clear"),
    Row("case-json-broken", REG, 1, ("case.json",), setup=lambda ws: (ws.path("case") / "case.json").write_text("{"),
        output="res", finding="clear"),
    Row("geometry-field-missing", REG, 1, ("geometry.json", "source"),
        setup=_geometry(lambda d: d["views"]["ap"].pop("source")), output="res", finding="clear"),
    Row("xray-corrupt", REG, 1, ("xray_ap.nrrd",),
        setup=lambda ws: (ws.path("case") / "xray_ap.nrrd").write_bytes(b"NRRD0004\ngarbage"), output="res",
        finding="clear"),
    Row("config-missing", REG + ["--config", "{case}/nope.json"], 1, ("nope.json",), output="res", finding="clear"),
    Row("config-bad-field", REG + ["--config", "{case}/case.json"], 1, ("case.json", "unknown field"), output="res",
        finding="clear"),
    Row("model-missing", REG + ["--model", "{case}/nope.pt"], 1, ("nope.pt",), output="res", finding="late"),
    Row("model-corrupt", REG + ["--model", "{model}"], 1, ("model.pt",), setup=_corrupt_file("model.pt"),
        output="res", finding="traceback"),
    Row("device-cuda-absent", REG + ["--device", "cuda", "--model", "default"], 1, ("cuda",), output="res",
        finding="traceback"),
    Row("sim-ct-missing", ["simulate-cases", "--ct", "{ct}x", "--seg", "{seg}", "--n", "1", "--out", "{dir}"], 1,
        ("ct.nrrdx",), output="dir", finding="clear"),
    Row("sim-seg-level-absent", ["simulate-cases", "--ct", "{ct}", "--seg", "{seg}", "--levels", "C3", "--n", "1",
                                 "--out", "{dir}"], 1, ("C3", "absent"), output="dir", finding="clear"),
    Row("evaluate-results-missing", ["evaluate", "{cases}", "--results", "{dir}", "--json", "{json}"], 1,
        ("dir",), setup=_cases_folder, output="json", finding="clear"),
    Row("evaluate-no-ground-truth", ["evaluate", "{cases}", "--results", "{root}/out/results", "--json", "{json}"], 1,
        ("ground_truth",), setup=_both(_result_for_case,
                                       lambda ws: ws.edit_json("../cases/case_000/case.json",
                                                               lambda d: d.pop("ground_truth", None))),
        output="json", finding="clear"),
    Row("train-config-type", ["train", "--config", "{root}/in/train.json", "--out", "{run}"], 1,
        ("train.json", "rec_epochs"), setup=lambda ws: _train_config(ws, rec_epochs="ten"), output="run",
        finding="traceback"),
    Row("train-config-unknown", ["train", "--config", "{root}/in/train.json", "--out", "{run}"], 1,
        ("train.json", "'epoch'"), setup=lambda ws: _train_config(ws, epoch=3), output="run", finding="traceback"),
    Row("train-init-corrupt", ["train", "--config", "{root}/in/train.json", "--init", "{model}", "--out", "{run}"], 1,
        ("model.pt",), setup=_both(_train_config, _corrupt_file("model.pt")), output="run", finding="late"),
    Row("train-ct-missing", ["train", "--config", "{root}/in/train.json", "--ct", "{ct}x:{seg}", "--out", "{run}"],
        1, ("ct.nrrdx",), setup=_train_config, output="run", finding="late"),
    # --- impossible or implausible inputs: refused with the cause (exit 1)
    Row("source-at-isocentre", REG, 1, ("geometry.json", "source"), setup=_set_view("ap", "source", [0, 0, 0]),
        output="res", finding="traceback"),
    Row("detector-before-patient", REG, 1, ("geometry.json", "detector"),
        setup=_geometry(lambda d: _move_detector(d, 0.3)), output="res", finding="silent"),
    Row("pixel-spacing-absurd", REG, 1, ("geometry.json", "pixel_spacing"),
        setup=_set_view("lat", "pixel_spacing", [40.0, 40.0]), output="res", finding="wrong"),
    Row("ct-constant", REG, 1, ("ct.nrrd", "constant"), setup=_ct_array(lambda a: np.zeros_like(a)), output="res",
        finding="wrong"),
    Row("ct-normalised", REG, 1, ("ct.nrrd", "Hounsfield"),
        setup=_ct_array(lambda a: (a - a.min()) / (a.max() - a.min())), output="res", finding="wrong"),
    Row("ct-voxel-absurd", REG, 1, ("ct.nrrd", "voxel"), setup=_ct_spacing((40.0, 40.0, 40.0)), output="res",
        finding="wrong"),
    Row("xray-all-zero", REG, 1, ("xray_ap", "constant"), setup=_xray("ap", lambda a: np.zeros_like(a)),
        output="res", finding="wrong"),
    Row("xray-constant", REG, 1, ("xray_lat", "constant"), setup=_xray("lat", lambda a: np.full_like(a, 3.0)),
        output="res", finding="wrong"),
    Row("xray-nan", REG, 1, ("xray_ap",), setup=_xray("ap", lambda a: np.where(a > np.median(a), np.nan, a)),
        output="res", finding="clear"),
    Row("intensities-labelled-line-integral", REG, 1, ("line_integral", "intensit"), setup=_to_intensity_values,
        output="res", finding="wrong"),
    # --- wrong but possible: the job runs and says what is wrong (exit 0, a named warning)
    Row("xray-inverted", REG + FAST, 0, ("polarity",), setup=_xray("ap", lambda a: a.max() - a), output="res",
        finding="wrong"),
    Row("views-swapped", REG + FAST, 0, ("swapped",), setup=_swap_views, output="res", finding="wrong"),
    Row("refine-none-checked", REG + ["--refine", "none", "--init", "none"], 0, ("doubtful",),
        setup=_xray("lat", lambda a: a.max() - a), output="res", finding="silent"),
    # --- outputs that must not hurt
    Row("out-is-the-case", ["register", "{case}", "--out", "{case}", "--overwrite"], 1, ("--out", "input"),
        finding="loss"),
    Row("out-inside-the-case", ["register", "{case}", "--out", "{case}/result", "--overwrite"], 1, ("--out", "input"),
        output="case/result", finding="loss"),
    Row("out-foreign-folder", ["register", "{case}", "--out", "{foreign}", "--overwrite"], 1, ("notes.txt",),
        setup=_foreign_folder, finding="loss"),
    Row("out-exists-no-overwrite", REG, 1, ("--overwrite",), setup=lambda ws: ws.result_of_ours(), output="res",
        keep_output=True, finding="clear"),
    Row("out-unwritable", ["register", "{case}", "--out", "/proc/radgsreg-result"], 1, ("/proc",), finding="late"),
    Row("evaluate-json-over-case", ["evaluate", "{cases}", "--results", "{root}/out/results", "--json",
                                    "{cases}/case_000/case.json"], 1, ("case.json",), setup=_result_elsewhere,
        finding="loss"),
    Row("evaluate-other-case", ["evaluate", "{cases}", "--results", "{root}/out/results", "--json", "{json}"], 1,
        ("case_000", "another case"), setup=_result_elsewhere, output="json", finding="wrong"),
    Row("show-over-foreign-png", ["show", "{case}", "--out", "{foreign}/notes.txt"], 1, ("notes.txt",),
        setup=_foreign_folder, finding="loss"),
    Row("sim-over-foreign", ["simulate-cases", "--phantom", "--n", "1", "--out", "{foreign}", "--overwrite"], 1,
        ("notes.txt",), setup=_foreign_folder, finding="loss"),
    Row("phantom-over-case", ["phantom", "--out", "{case}", "--overwrite"], 1, ("--out",), finding="loss"),
    Row("fit-into-case", ["fit-gaussians", "{case}", "--out", "{case}/fit", "--iterations", "2"], 1,
        ("--out", "input"), output="case/fit", finding="loss"),
    Row("demo-over-foreign", ["demo", "--out", "{foreign}", "--overwrite"], 1, ("notes.txt",),
        setup=_foreign_folder, finding="loss"),
    Row("train-over-foreign", ["train", "--config", "{root}/in/train.json", "--out", "{foreign}"], 1,
        ("notes.txt",), setup=_both(_train_config, _foreign_folder), finding="loss"),
    Row("out-hand-made-case", ["sample-case", "--out", "{case}", "--overwrite", "--pixels", "64"], 1,
        ("--out", "nothing in it shows"), setup=_hand_made_case, finding="loss"),
    Row("phantom-over-patient", ["phantom", "--out", "{root}/in/patient", "--overwrite"], 1,
        ("--out", "nothing in it shows"), setup=_patient_folder, finding="loss"),
    Row("out-empty", ["register", "{case}", "--out", ""], 1, ("--out", "current folder"), finding="traceback"),
    Row("out-current-folder", ["register", "{case}", "--out", "."], 1, ("current folder",), finding="loss"),
    Row("refine-3d-without-labels", REG + ["--refine", "3d"], 1, ("label",), setup=_no_labels, output="res",
        finding="traceback"),
    Row("demo-two-levels", ["demo", "--out", "{dir}", "--level", "L1,L2"], 2, ("--level",), output="dir",
        finding="silent"),
    Row("sim-ct-normalised", ["simulate-cases", "--ct", "{root}/in/ct01.nrrd", "--seg", "{seg}", "--n", "1",
                              "--out", "{dir}"], 1, ("ct01.nrrd", "Hounsfield"), setup=_normalised_ct_file,
        output="dir", finding="wrong"),
    # --- foreign code: a planted pickle never runs
    Row("planted-checkpoint", ["train", "--config", "{root}/in/train.json", "--out", "{run}"], 1, ("checkpoint.pt",),
        setup=_both(_train_config, _trained_run, lambda ws: ws.plant_pickle(ws.path("run") / "checkpoint.pt")),
        finding="code"),
    Row("planted-model", REG + ["--model", "{model}"], 1, ("model.pt",),
        setup=lambda ws: ws.plant_pickle(ws.path("model")), output="res", finding="clear"),
]


def _move_detector(d, fraction):
    """Move the AP detector to ``fraction`` of the way from the source to the isocentre."""
    v = d["views"]["ap"]
    src = np.array(v["source"], float)
    origin = np.array(v["detector_origin"], float)
    u, w = np.array(v["detector_u"], float), np.array(v["detector_v"], float)
    n = np.cross(u, w)
    dist = float((origin - src) @ n)                      # signed source-to-detector-plane distance
    target = float((np.zeros(3) - src) @ n) * fraction
    v["detector_origin"] = (origin + (target - dist) * n).tolist()
    v.pop("projection_matrix", None)


# ------------------------------------------------------------------ running a row
def run_row(row: Row, ws: Workspace) -> Outcome:
    """Run one row in this process against whatever RadGSRegLib is importable."""
    from RadGSRegLib.cli import main

    if row.setup:
        row.setup(ws)
    out_path = ws.path(row.output) if row.output else None
    before = ws.snapshot()
    argv = [a.replace("{root}", str(ws.root)) for a in ws.expand(row.argv)]
    stdout, stderr, tb, code = io.StringIO(), io.StringIO(), "", 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                stderr.write(e.code + "\n")
        except BaseException:                          # an exception escaped: the user sees a traceback
            tb = traceback.format_exc()
            code = 1
    after = ws.snapshot()
    expected_new = out_path if (out_path and code == 0) else None
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not (expected_new and (ws.root / k == expected_new or expected_new in (ws.root / k).parents)))
    partial = bool(out_path and code != 0 and not row.keep_output and out_path.exists())
    # the row's folder is named after the row: take it out of the messages, so that a word
    # the message must contain cannot be found in a path by accident
    root = str(ws.root)
    return Outcome(code=int(code or 0), out=stdout.getvalue().replace(root, "<row>"),
                   err=stderr.getvalue().replace(root, "<row>"), traceback=tb, changed=changed, partial=partial,
                   planted_ran=ws.path("marker").exists())


def classify(row: Row, o: Outcome) -> str:
    if o.planted_ran:
        return "foreign code"
    if o.traceback or "Traceback (most recent call last)" in o.err or "internal error" in o.err:
        return "traceback"
    if o.changed:
        return "data loss"
    text = (o.out + o.err).lower()
    named = all(w.lower() in text for w in row.words)
    if o.code == row.code and named and not o.partial:
        return "clear"
    if o.code == 0 and not named:
        return "silent"
    return "unclear"


def main(argv=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        base = Workspace.make(Path(d))
        counts = {}
        for row in ROWS:
            ws = base.fresh(row.id)
            o = run_row(row, ws)
            c = classify(row, o)
            counts[c] = counts.get(c, 0) + 1
            first = (o.err.strip().splitlines() or o.traceback.strip().splitlines()[-1:] or [""])[-1][:110]
            print(f"{row.id:36s} exit {o.code}  {c:12s} {first}", flush=True)
            for p in ws.root.rglob("*"):                    # read-only folders: make them removable
                if p.is_dir():
                    os.chmod(p, 0o755)
        print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, os.environ.get("PYTHONPATH", ""))
    main()
