"""``radgsreg train``: module-aware, three-stage training of RadGS-Reg.

Module-aware phases (paper Sec. 2): RecM alone (Eq. 2), RegM alone (Eq. 3 on the frozen
RecM's own reconstruction, at input poses drawn anew every batch), then both together
(Eq. 4: Eq. 2 + Eq. 3 on RecM's volume, gradients flowing into RecM; RecM's batch norm on its
running statistics). RegM learns on what it will see at inference: trained on the
ground-truth volume instead (with fixed or with fresh input poses), its validation mTRE
stayed at 6.2-6.9 mm over 3 epochs against 5.7-5.9 mm this way (same data, re-initialised
RegM; measured before this became the rule). Data-aware stages (Sec. 3.2) are
separate runs (:class:`~.config.TrainConfig` ``stage``), each starting from the previous
one's weights.

A run folder holds ``config.json``, ``checkpoint.pt`` (after every epoch: weights,
optimiser, position, RNG states), ``log.jsonl`` (one line per epoch: losses, validation
metrics, seconds), TensorBoard event files (``tensorboard/``) when ``tensorboard`` is
installed, the simulated samples (``data/``, unless ``data_cache`` is elsewhere) and, at
the end, ``model.pt`` (the weight file with its model card). Running the same command again
resumes from the checkpoint; a different configuration in a folder whose run has started
(it holds ``checkpoint.pt`` or ``model.pt``) is refused, and a folder that holds files
``train`` did not write is refused (so that a mistyped ``--out`` scatters nothing). Every
file is written atomically (a temporary file beside it, then renamed) and read back with
``torch.load(weights_only=True)``: nothing in a ``.pt`` file runs.

Before any sample is simulated, :func:`check_run` checks everything that can fail: the
output folder, the device, the ``init`` weights, every CT and label map, every case
folder, and an existing checkpoint. ``config.json`` is written once those checks pass and
the samples are ready.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from ..errors import OutputError
from ..io.atomic import atomic_file
from ..io.outputs import check_writable, read_marker, write_marker
from ..learned.model import (RadGSRegNet, UnsafeFileError, level_names, load_plain, locate_errors, plain,
                             trained_levels)
from ..region import cube_affine_batch
from .config import ConfigError, TrainConfig
from .data import SAMPLE_KEYS, build_samples, collate, perturb_pose

__all__ = ["train", "check_run", "same_run", "evaluate_samples", "PHASES", "RunFolderError", "CHECKPOINT_FORMAT",
           "SAMPLES_FORMAT", "RUN_FILES"]

PHASES = ("rec", "reg", "joint")
CHECKPOINT_FORMAT = "radgsreg-checkpoint/1"
SAMPLES_FORMAT = "radgsreg-samples/1"
#: the files of a run folder (all it may hold is :mod:`RadGSRegLib.io.outputs`' "train" layout:
#: these, ``data/`` sample caches, ``tensorboard/`` events, the marker, our own temp leftovers)
RUN_FILES = ("config.json", "checkpoint.pt", "log.jsonl", "model.pt")


class RunFolderError(OutputError, FileExistsError):
    """A run folder that holds another run, or files ``radgsreg train`` did not write."""


def _seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _rebuilt(old: RadGSRegNet, new_cfg, seed: int, *, keep: str = "") -> RadGSRegNet:
    """A network of settings ``new_cfg`` (a :class:`~RadGSRegLib.learned.config.ModelConfig`)
    with ``old``'s parameters whose names start with ``keep`` ("": all of them; "recm.": its
    RecM) and ``old``'s card; the parameters it does not take from ``old`` start from ``seed``
    (the global torch generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RadGSRegNet(new_cfg)
    state = net.state_dict()
    state.update({k: v for k, v in old.state_dict().items() if k.startswith(keep)})
    net.load_state_dict(state)
    net.card = old.card
    return net


def _data_key(cfg: TrainConfig) -> str:
    keys = ("stage", "phantoms", "phantom_spacing_mm", "ct_dirs", "case_dirs", "levels", "samples_per_ct",
            "val_samples", "pose_rot_deg", "pose_trans_mm", "input_rot_deg", "input_trans_mm", "seed")
    if cfg.realism != "none":                  # keys of runs before realism keep their caches
        keys += ("realism", "metal_share")
    if cfg.data_shards != 1:                   # and those of one stream
        keys += ("data_shards",)
    if cfg.phantom_ribs:                       # and those of phantoms without ribs
        keys += ("phantom_ribs",)
    if cfg.phantom_sacrum:                     # and those without a sacrum
        keys += ("phantom_sacrum",)
    if cfg.ct_spacing_mm is not None:          # and those of CTs as they are
        keys += ("ct_spacing_mm",)
    if cfg.stage == 1:                         # and those of the phantoms as they were (stage 1's only)
        keys += tuple(k for k in ("phantom_size", "phantom_bone_density") if getattr(cfg, k) is not None)
    d = {k: getattr(cfg, k) for k in keys}
    d["model"] = {k: getattr(cfg.model, k) for k in ("image_pixels", "roi_mm", "voxels", "render_pixels")}
    if cfg.model.crop is not None:             # X-rays at input_pixels: keys of whole-detector runs unchanged
        d["model"]["crop"] = cfg.model.crop
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_path(cfg: TrainConfig) -> Path:
    return Path(cfg.data_cache or Path(cfg.out) / "data") / f"samples-{_data_key(cfg)}.pt"


def _read_cache(path: Path) -> tuple[list, list]:
    """The samples in a cache file; ValueError (with the reason) if they cannot be used."""
    try:
        blob = load_plain(path)
    except UnsafeFileError as e:
        raise ValueError(e.reason) from None
    if not isinstance(blob, dict) or blob.get("format", SAMPLES_FORMAT) != SAMPLES_FORMAT:
        raise ValueError(f"not a sample cache of this version (expected format {SAMPLES_FORMAT})")
    for part in ("train", "val"):
        items = blob.get(part)
        if not isinstance(items, list) or not all(isinstance(x, dict) and set(SAMPLE_KEYS) <= set(x) for x in items):
            raise ValueError(f"its {part!r} samples are missing or incomplete")
    return blob["train"], blob["val"]


def _dataset(cfg: TrainConfig, log) -> tuple[list, list]:
    """The run's samples: from the cache when it holds them (read safely), else simulated
    and cached (an unreadable cache is replaced, and the log says so)."""
    path = _cache_path(cfg)
    if path.is_file():
        try:
            tr, va = _read_cache(path)
        except ValueError as e:
            log(f"data: ignoring the sample cache {path}: {e}; simulating the samples again (the file is replaced)")
        else:
            log(f"data: {len(tr)} training + {len(va)} validation samples from {path}")
            return tr, va
    from tqdm import tqdm

    t = time.perf_counter()
    unit = "CT" if cfg.data_shards == 1 else "shard"
    log(f"data: simulating training samples ({cfg.data_shards} shard(s), {min(cfg.data_workers, cfg.data_shards)} "
        "process(es))" if cfg.data_shards > 1 else "data: simulating training samples")
    tr = build_samples(cfg, validation=False, progress=lambda it: tqdm(it, desc="training data", unit=unit))
    va = build_samples(cfg, validation=True, progress=lambda it: tqdm(it, desc="validation data", unit="CT"))
    tr, va = plain(tr), plain(va)
    with atomic_file(path, overwrite=True) as tmp:
        torch.save({"format": SAMPLES_FORMAT, "key": _data_key(cfg), "train": tr, "val": va}, tmp)
    log(f"data: {len(tr)} training + {len(va)} validation samples in {time.perf_counter() - t:.0f} s -> {path}")
    return tr, va


# ------------------------------------------------------------------ checks before any work
def _cfg_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


#: settings that do not change a run's samples or weights: a run resumes with other values.
#: Not ``data_cache``: a cache elsewhere may hold other samples under the same name (a file
#: simulated by older code, a link), so a started run keeps its folder.
_MACHINE_ONLY = ("data_workers",)


def same_run(old, cfg: TrainConfig) -> bool:
    """Whether a run folder's ``config.json`` (``old``, parsed JSON or None) describes the run
    ``cfg`` would make: compared with the keys it lacks at their defaults (a folder written
    before a key existed), and without :data:`_MACHINE_ONLY` settings."""
    if not isinstance(old, dict):
        return False
    try:
        then = _cfg_json(TrainConfig.from_dict(old))
    except (ConfigError, TypeError, ValueError):
        return False
    now = _cfg_json(cfg)
    for k in _MACHINE_ONLY:
        then.pop(k, None)
        now.pop(k, None)
    return then == now


def _started(out: Path) -> bool:
    return (out / "checkpoint.pt").is_file() or (out / "model.pt").is_file()


def _check_out(out: Path, kind: str = "train") -> None:
    """The run folder is new, empty, or one a run of ``kind`` wrote (RadGSRegLib.io.outputs'
    layouts: "train" holds config.json, checkpoint.pt, log.jsonl, model.pt, data/,
    tensorboard/; "train-metal" data.pt, history.json, metal_seg.pt)."""
    from ..io.outputs import why_not_ours

    if out.exists():
        if not out.is_dir():
            raise OutputError(f"run folder (--out) {out}: is a file; give a folder")
        if any(out.iterdir()):
            why = why_not_ours(out, kind)
            if why:
                raise RunFolderError(f"run folder (--out) {out} {why}; give a new or empty folder")
    check_writable(out, f"run folder (--out) {out}", inside=True)


def _check_image(path: Path, what: str) -> None:
    """A readable 3-D image (header only; DICOM folders: a series is there)."""
    import SimpleITK as sitk

    from ..io import CaseFormatError

    if path.is_dir():
        if not sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)):
            raise CaseFormatError(path, what, "folder holds no DICOM series")
        return
    if not path.is_file():
        raise CaseFormatError(path, what, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CaseFormatError(path, what, f"cannot be read as an image ({str(e).strip().splitlines()[-1]})") from None
    if reader.GetDimension() != 3:
        raise CaseFormatError(path, what, f"expected a 3-D volume, got a {reader.GetDimension()}-D image")


def _check_ct(spec: str, levels) -> None:
    """A ``ct_dirs`` entry: the CT readable, the label map readable and holding a level."""
    from ..io import read_label_map
    from .data import ct_spec_paths, usable_levels

    from ..checks import PlausibilityError, check_ct
    from ..io import CaseFormatError, read_volume

    ct_p, seg_p = ct_spec_paths(spec)
    _check_image(ct_p, "ct_dirs (--ct)")
    try:
        check_ct(read_volume(ct_p, field="ct_dirs (--ct)"))        # Hounsfield units, voxels: before any work
    except PlausibilityError as e:
        raise CaseFormatError(ct_p, "ct_dirs (--ct)", e.detail) from None
    seg = read_label_map(seg_p, field="ct_dirs (--ct), labels")
    usable_levels(seg, levels, str(seg_p))


def _check_case(d: str) -> None:
    """A stage-2 case folder: case.json with ground truth and the vertebra's labels, its
    CT, label map, geometry and X-rays present (images: headers only)."""
    from ..io import CaseFormatError, read_geometry

    path = Path(d)
    if not path.is_dir():
        raise CaseFormatError(path, "case_dirs (--cases)", "case folder not found")
    cj = path / "case.json"
    if not cj.is_file():
        raise CaseFormatError(path, "case_dirs (--cases)", "not a case folder (no case.json)")
    try:
        c = json.loads(cj.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaseFormatError(cj, None, f"not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise CaseFormatError(cj, None, "expected a JSON object")
    gt = c.get("ground_truth")
    if gt is None:
        raise CaseFormatError(cj, "ground_truth", "missing: stage 2 trains on cases with a known pose")
    try:
        ok = isinstance(gt, dict) and np.asarray(gt.get("T_ct_to_carm"), dtype=np.float64).shape == (4, 4)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CaseFormatError(cj, "ground_truth", 'expected {"T_ct_to_carm": 4x4 matrix}')
    for key in ("ct", "segmentation"):
        if not isinstance(c.get(key), str):
            raise CaseFormatError(cj, key, "missing: stage 2 needs the case's CT and its vertebra label map")
    if not isinstance(c.get("vertebra_label"), int) or isinstance(c.get("vertebra_label"), bool):
        raise CaseFormatError(cj, "vertebra_label", "missing: stage 2 needs the vertebra's label value")
    _check_image(path / c["ct"], "ct")
    _check_image(path / c["segmentation"], "segmentation")
    g = c.get("geometry", "geometry.json")
    if not isinstance(g, str):
        raise CaseFormatError(cj, "geometry", "expected a file name")
    views, images, _ = read_geometry(path / g)
    for vn in ("ap", "lat"):
        if vn not in views:
            raise CaseFormatError(path / g, "views", f"the learned method needs an {vn!r} X-ray")
        img = path / (images[vn] or f"xray_{vn}.nrrd")
        if not img.is_file():
            raise CaseFormatError(img, f"views.{vn}.image", "file not found")


def _read_checkpoint(ckpt: Path) -> dict:
    what = (f"{ckpt}: not a RadGSReg checkpoint (or one written by an older version); move it away to start over")
    try:
        blob = load_plain(ckpt)
    except UnsafeFileError as e:
        raise RunFolderError(f"{what} ({e.reason})") from None
    need = ("state_dict", "position", "history", "seconds", "torch_rng")
    if (not isinstance(blob, dict) or blob.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT
            or any(k not in blob for k in need)):
        raise RunFolderError(what)
    return blob


def _save_checkpoint(ckpt: Path, net, opt, position: tuple, history: list, seconds: float,
                     plan: dict | None) -> float:
    """Write the checkpoint (atomically): weights, optimizer, the next (phase, epoch), the
    history, the epochs' seconds, the random states and the time budget's plan (the epochs
    of each phase, :func:`plan_epochs`); returns the seconds the write took."""
    state = {"format": CHECKPOINT_FORMAT, "state_dict": net.state_dict(), "opt_state": opt.state_dict(),
             "position": list(position), "history": plain(history), "seconds": float(seconds),
             "torch_rng": torch.get_rng_state(), "rng": _rng_states(),
             **({"epochs_planned": dict(plan)} if plan is not None else {})}
    t = time.perf_counter()
    with atomic_file(ckpt, overwrite=True) as tmp:
        torch.save(state, tmp)
    return time.perf_counter() - t


def _checkpoint_plan(blob: dict, cfg: TrainConfig) -> dict | None:
    """The time budget's plan a checkpoint holds, or None (not planned yet, or no budget); a
    checkpoint written before the plan covered every phase holds only its RecM epochs, and
    its run made the config's RegM and joint epochs."""
    if "epochs_planned" in blob:
        return {k: int(v) for k, v in blob["epochs_planned"].items()}
    if "rec_epochs_planned" in blob:
        return {"rec": int(blob["rec_epochs_planned"]), "reg": cfg.reg_epochs, "joint": cfg.joint_epochs}
    return None


def plan_epochs(budget_s: float, spent_s: float, epoch_s: dict, *, done: int, most: dict,
                new_regm: bool = False) -> dict:
    """The epochs of each phase that a run with a time budget makes, so that it ends within
    ``budget_s`` (seconds from the run's start) after ``spent_s`` of them are spent and
    ``done`` RecM epochs (at least 1) are made.

    Args:
        epoch_s: seconds of one epoch (with its validation and checkpoint) of each phase,
            keys ``rec``, ``reg``, ``joint``: the RecM epoch measured, the others estimated.
        most: the config's epochs of each phase (same keys), the most the plan gives.
        new_regm: the run's RegM starts untrained (no ``init`` weights, or ``new_regm``):
            it gets its first epoch (when ``most["reg"]`` has one) even past the budget, so
            that no run writes weights whose RegM was never trained.

    Returns:
        ``{"rec", "reg", "joint"}``: epochs in all. What is left of the budget is handed out
        greedily in this order, each as many epochs as fit: one RegM epoch, the joint
        epochs (only after a RegM epoch, or without RegM epochs in the config), the other
        RegM epochs, more RecM epochs. So an ample budget runs every RegM and joint epoch
        and gives RecM the rest (at most ``most["rec"]``), a tight one drops RegM epochs
        first (down to one), then joint ones, then the last RegM one (not a new RegM's);
        RecM never has fewer than ``done``.
    """
    left = budget_s - spent_s

    def fit(phase: str, n: int) -> int:
        nonlocal left
        k = max(0, min(n, int(left // max(epoch_s[phase], 1e-9)))) if left > 0 else 0
        left -= k * epoch_s[phase]
        return k

    first = min(1, most["reg"])
    if new_regm and first:
        left -= epoch_s["reg"]
        reg = first
    else:
        reg = fit("reg", first)
    joint = fit("joint", most["joint"]) if reg or not most["reg"] else 0
    reg += fit("reg", most["reg"] - reg)
    rec = max(done, 1) + fit("rec", most["rec"] - max(done, 1))
    return {"rec": rec, "reg": reg, "joint": joint}


def _phase_batch_seconds(net: RadGSRegNet, samples: list, cfg: TrainConfig, device, *, batches: int = 3) -> dict:
    """Seconds per batch of a RegM and of a joint step, timed as the loop makes them (batch
    made, forward, backward, clipping, Adam step; CUDA synchronised before each clock
    reading), on a copy of ``net`` with its own optimizer, so that the run's weights,
    batch-norm statistics, optimizer and random streams (CPU and CUDA) are untouched: the
    median of ``batches`` batches after one untimed (warm-up) batch."""
    import copy

    cuda = torch.device(device).type == "cuda"

    def clock():
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    probe = copy.deepcopy(net)
    rng = np.random.default_rng(12345)
    out = {}
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else []):
        for phase in ("reg", "joint"):
            params = list(probe.regm.parameters()) if phase == "reg" else list(probe.parameters())
            opt = torch.optim.Adam(params, lr=cfg.lr)
            probe.train()
            probe.recm.eval()
            times = []
            for k in range(batches + 1):
                t = clock()
                idx = rng.choice(len(samples), size=min(cfg.batch, len(samples)), replace=False)
                b = _to(collate([samples[j] for j in idx]), device)
                opt.zero_grad()
                if phase == "reg":
                    b = _fresh_inputs(b, rng, cfg)
                    with torch.no_grad():
                        _, rec = probe.reconstruct(b["images"], b["proj"], b["centre"])
                    loss, _, _ = probe.registration_loss(b, rec, lambda_geo=cfg.lambda_geo, lambda_flow=cfg.lambda_flow)
                else:
                    loss, rec, _ = probe.reconstruction_loss(b, lambda_ssim=cfg.lambda_ssim, lambda_tv=cfg.lambda_tv,
                                                             lambda_volume=cfg.lambda_volume,
                                                             lambda_centroid=cfg.lambda_centroid,
                                                             lambda_locate=cfg.lambda_locate)
                    lreg, _, _ = probe.registration_loss(b, rec, lambda_geo=cfg.lambda_geo,
                                                         lambda_flow=cfg.lambda_flow)
                    loss = loss + lreg
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                if k:
                    times.append(clock() - t)
            out[phase] = float(np.median(times))
    del probe
    return out


def levels_seen(cfg: TrainConfig, init_levels: list[str] | None) -> list[str] | None:
    """The levels a run's weights have been trained on, for their card's ``levels_seen``: the
    ``init`` weights' (``init_levels``, :func:`~RadGSRegLib.learned.model.trained_levels`)
    and this run's ``levels`` (stages 1 and 3; :func:`~RadGSRegLib.learned.model.level_names`),
    in spinal order; None (written as null) where that cannot be told: ``init`` weights whose
    card does not say, stage 2 (whose levels are its cases'), or levels given as label values
    of another numbering than TotalSegmentator's."""
    if (cfg.init and init_levels is None) or cfg.stage == 2:
        return None
    from ..levels import TOTALSEG_IDS

    if any(str(lv).strip().isdigit() and int(str(lv).strip()) not in TOTALSEG_IDS.values() for lv in cfg.levels):
        return None                             # a label value we cannot name
    return level_names(list(init_levels or []) + level_names(cfg.levels))


class _Run:
    """What :func:`check_run` found: the effective config, the network, the checkpoint."""

    def __init__(self, cfg, device, net, blob, replace_config):
        self.cfg, self.device, self.net, self.blob, self.replace_config = cfg, device, net, blob, replace_config


def check_run(cfg: TrainConfig, *, log=print) -> _Run:
    """Every check that can be made before simulating a sample, in this order: the run
    folder (new, empty or holding only what a run writes; writable), the data cache
    folder, the device, the ``init`` weights (loaded), an existing checkpoint (read safely),
    the run folder's configuration (the same one if its run has started; a ``config.json``
    without a checkpoint or model belongs to a run that never started and will be
    replaced), every CT + label map and case folder, and the checkpoint's weights (loaded
    into the network). Writes nothing.

    With ``init``, the network's settings come from the weights; the samples are made for
    them (``model`` of the config is replaced by the weights' own).

    Raises:
        InputError: what cannot be used, naming the file, field or option
            (:class:`~RadGSRegLib.errors.OutputError` / :class:`RunFolderError` for the run
            folder).
    """
    out = Path(cfg.out)
    _check_out(out)
    if cfg.data_cache:
        check_writable(Path(cfg.data_cache), f"data_cache folder {cfg.data_cache}", inside=True)
    device = resolve_device(cfg.device, "device (--device)")
    if cfg.init:
        net = RadGSRegNet.load(cfg.init_path())
        if cfg.new_regm:                        # init's RecM, a new untrained RegM of that kind
            try:
                new_cfg = dataclasses.replace(net.cfg, regm=cfg.new_regm)
            except ConfigError as e:
                raise ConfigError(f"{cfg.new_regm!r}: the network of {cfg.init_path()} cannot take it ({e})",
                                  field="new_regm") from None
            net = _rebuilt(net, new_cfg, cfg.seed, keep="recm.")   # the card: what the kept RecM was trained on
            log(f"init {cfg.init}: its RecM, and a new untrained {cfg.new_regm} RegM (new_regm)")
        if cfg.add_locator:                     # init's network, and a new locator that starts at shift 0
            if net.cfg.locate:
                raise ConfigError(f"{cfg.init_path()} has a locator already; drop add_locator", field="add_locator")
            net = _rebuilt(net, dataclasses.replace(net.cfg, locate=True), cfg.seed)   # all but the locator: init's
            log(f"init {cfg.init}: its network, and a new locator (add_locator)")
        if cfg.model_changes:                   # init's parameters under other input settings
            net = _rebuilt(net, dataclasses.replace(net.cfg, **cfg.model_changes), cfg.seed)
            log(f"init {cfg.init}: its network, with " + ", ".join(f"{k} {v}" for k, v in cfg.model_changes.items())
                + " (model_changes)")
        if net.cfg != cfg.model:
            log(f"init {cfg.init}: the network's settings come from the weights (the config's model settings "
                "are not used)")
            cfg = dataclasses.replace(cfg, model=net.cfg)
    else:
        net = None
    cfg_path = out / "config.json"
    ckpt = out / "checkpoint.pt"
    blob = _read_checkpoint(ckpt) if ckpt.is_file() else None          # refuses an unsafe file unread
    started = _started(out)
    replace_config = True
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            old = None
        if old == _cfg_json(cfg):
            replace_config = False
        elif started and same_run(old, cfg):    # written before a key existed, or other machine settings
            replace_config = False
        elif started:
            raise RunFolderError(f"{out} holds a run with another configuration ({cfg_path}); "
                                 "choose another --out, or delete the folder to start over")
    elif started:
        raise RunFolderError(f"{out} holds a run without its config.json; move it away to start over")
    for spec in cfg.ct_dirs if cfg.stage in (1, 3) else ():
        _check_ct(spec, cfg.levels)
    for d in cfg.case_dirs if cfg.stage == 2 else ():
        _check_case(d)
    if net is None:
        with torch.random.fork_rng(devices=[]):     # the starting weights follow the seed
            torch.manual_seed(cfg.seed)
            net = RadGSRegNet(cfg.model)
    if blob is not None:
        try:
            net.load_state_dict(blob["state_dict"])
        except (RuntimeError, TypeError, AttributeError):
            raise RunFolderError(f"{ckpt}: its weights do not fit the network of {cfg_path}; move it away to "
                                 "start over") from None
    return _Run(cfg, device, net, blob, replace_config)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _fresh_inputs(batch: dict, rng: np.random.Generator, cfg: TrainConfig) -> dict:
    """The batch with RegM's input poses drawn anew (``T_in``, ``centre``; see
    :func:`~.data.perturb_pose`): every epoch of the RegM phase sees new perturbations of
    the same X-rays, for the cost of a resampling."""
    T_in, centre = [], []
    for G, c in zip(batch["G"].cpu().numpy().astype(np.float64), batch["centroid"].cpu().numpy().astype(np.float64)):
        t, m = perturb_pose(G, c, rng, rot_deg=cfg.input_rot_deg, trans_mm=cfg.input_trans_mm)
        T_in.append(t)
        centre.append(m)
    dev = batch["G"].device
    return {**batch, "T_in": torch.as_tensor(np.stack(T_in), dtype=torch.float32, device=dev),
            "centre": torch.as_tensor(np.stack(centre), dtype=torch.float32, device=dev)}


def _points(batch: dict, b: int, n: int = 2000) -> np.ndarray:
    """Target points for validation: centres of the CT crop's vertebra-region voxels."""
    ct = batch["ct"][b].cpu().numpy()
    A = batch["ct_affine"][b].cpu().numpy().astype(np.float64)
    kji = np.argwhere(ct > 0.25 * ct.max())
    kji = kji[np.random.default_rng(0).choice(len(kji), min(n, len(kji)), replace=False)]
    return kji[:, ::-1] @ A[:3, :3].T + A[:3, 3]


def evaluate_samples(net: RadGSRegNet, samples: list, *, device="cpu", batch: int = 4) -> dict:
    """Validation metrics over samples: reconstruction PSNR/SSIM (metrics.md, against the
    ground-truth volume), how the reconstruction follows the vertebra within its cube
    (``recon_follow``, ``recon_offset_error_median_mm``: :func:`~RadGSRegLib.metrics.localization`;
    1 = where the vertebra is, 0 = at the cube's centre, where ``T_in`` puts it) and RegM's
    mTRE / success rate from ``T_in`` (target points: the vertebra region's voxels), with the
    input mTRE for comparison; with RecM's locator, the median distance between its shift and
    the vertebra's true offset (``locate_error_median_mm``)."""
    from ..geometry import mtre
    from ..metrics import localization, mass_offset, recon_metrics

    net.eval()
    psnr, ssim, e_in, e_out, off_gt, off_rec, e_loc = [], [], [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            b = _to(collate(samples[i:i + batch]), device)
            fact, rec = net.reconstruct(b["images"], b["proj"], b["centre"])
            errs = locate_errors(fact, b)
            if errs is not None:
                e_loc += errs.cpu().tolist()
            T = net.estimate(b, rec)
            grids = cube_affine_batch(b["centre"].cpu(), net.cfg.roi_mm, net.cfg.voxels).numpy().astype(np.float64)
            for k in range(rec.shape[0]):
                r, g = rec[k, 0].cpu().numpy(), b["gt_volume"][k].cpu().numpy()
                off_rec.append(mass_offset(r, grids[k]))
                off_gt.append(mass_offset(g, grids[k]))
                m = recon_metrics(r, g)
                psnr.append(m["psnr_db"])
                ssim.append(m["ssim_pct"])
                pts = _points(b, k)
                G = b["G"][k].cpu().numpy().astype(np.float64)
                e_in.append(mtre(b["T_in"][k].cpu().numpy().astype(np.float64), G, pts))
                e_out.append(mtre(T[k].cpu().numpy().astype(np.float64), G, pts))
    net.train()
    e_out = np.asarray(e_out)
    loc = localization(off_gt, off_rec)
    return {"psnr_db": float(np.mean(psnr)), "ssim_pct": float(np.mean(ssim)), "recon_follow": loc["follow"],
            "recon_offset_error_median_mm": loc["offset_error_median_mm"], "mtre_in_mm": float(np.mean(e_in)),
            "mtre_mm": float(np.mean(e_out)), "mtre_median_mm": float(np.median(e_out)),
            "sr_pct": float(100 * np.mean(e_out < 2.0)), "n": len(e_out),
            **({"locate_error_median_mm": float(np.median(e_loc))} if e_loc else {})}


class _Logger:
    """``log.jsonl`` (rewritten from the checkpoint's history when a run starts or resumes,
    so that it never holds an epoch the checkpoint lost) and TensorBoard when installed."""

    def __init__(self, out: Path, history: list):
        self.path = out / "log.jsonl"
        text = "".join(json.dumps(row, default=float) + "\n" for row in history)
        with atomic_file(self.path, overwrite=True) as tmp:
            tmp.write_text(text)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:                                                     # noqa: BLE001  (optional)
            self.tb = None

    def write(self, row: dict, step: int):
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()


def _rng_states() -> dict:
    """Python's, NumPy's (legacy global) and torch's RNG states as tensors and plain values."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
            "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}


def _set_rng_states(blob: dict) -> None:
    torch.set_rng_state(blob["torch_rng"])
    st = blob.get("rng")
    if isinstance(st, dict):
        version, state, gauss = st["python"]
        random.setstate((version, tuple(state), gauss))
        n = st["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))


def train(cfg: TrainConfig, *, log=print, progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the path of its ``model.pt``.

    Everything that can fail is checked first (:func:`check_run`); then the samples are
    read from the cache or simulated, ``config.json`` is written, and the epochs run.

    Under ``torchrun --nproc-per-node N`` the same call trains on N processes
    (:mod:`.distributed`): every process checks, rank 0 simulates the samples and the others
    read its cache, each takes its share of the batches with the gradients averaged, and rank
    0 alone logs, validates and writes the run folder; every process returns the
    ``model.pt`` path.

    Raises:
        InputError: from :func:`check_run` (before any work), or a CT / case that cannot
            be simulated.
    """
    from tqdm import tqdm

    from .distributed import Dist

    t_run = time.perf_counter()                 # the time budget counts from here
    if Dist.env_rank() != 0:                    # under torchrun: rank 0 speaks for the run
        log = _silent
    run = check_run(cfg, log=log)               # every process: reads only
    cfg, device, net, blob = run.cfg, run.device, run.net, run.blob
    init_levels = trained_levels(net.card) if cfg.init else None
    par = Dist.from_env(device)
    if cfg.time_budget_s is not None and par.world > 1:
        raise ConfigError("a time budget is planned by one process; run without torchrun, or drop it",
                          field="time_budget_s")
    device = par.device(device)
    progress = progress and par.main
    out = Path(cfg.out)
    par.barrier()                               # every process checked the folder before rank 0 writes in it
    if par.main and read_marker(out) is None:   # mark the run folder as ours before anything is in it
        out.mkdir(parents=True, exist_ok=True)
        write_marker(out, "train")
    torch.set_num_threads(cfg.threads)
    _seed(cfg.seed)
    if par.main:                                # simulated once (and cached); the others read the cache
        tr, va = _dataset(cfg, log)
    par.barrier()
    if not par.main:
        tr, va = _dataset(cfg, log)
    torch.set_num_threads(cfg.threads)          # again: the simulation's parallel projector may have reset it
    cfg_path = out / "config.json"
    if par.main and run.replace_config:
        if cfg_path.is_file():
            log(f"replacing {cfg_path}: its run never started (no checkpoint)")
        text = json.dumps(_cfg_json(cfg), indent=2)
        with atomic_file(cfg_path, overwrite=True) as tmp:
            tmp.write_text(text)
    if cfg.init:
        log(f"starting from {cfg.init} (model config from the weights)")
    net.to(device).train()
    par.broadcast(net)                          # one start for every process
    model_cfg = net.cfg
    ckpt = out / "checkpoint.pt"
    schedule = [(p, n) for p, n in zip(PHASES, (cfg.rec_epochs, cfg.reg_epochs, cfg.joint_epochs)) if n > 0]
    start, history, seconds = (0, 0), [], 0.0
    plan = None                                 # every phase's epochs under the time budget, once decided
    if blob is not None:
        start, history, seconds = tuple(blob["position"]), list(blob["history"]), float(blob["seconds"])
        plan = _checkpoint_plan(blob, cfg)
        _set_rng_states(blob)
        log(f"resuming {out} at phase {schedule[start[0]][0] if start[0] < len(schedule) else 'done'}, "
            f"epoch {start[1] + 1}")
    logger = _Logger(out, history) if par.main else None
    reg_weights = {"lambda_geo": cfg.lambda_geo, "lambda_flow": cfg.lambda_flow}   # Eq. 3's, in every phase
    step = sum(1 for _ in history)
    for pi, (phase, epochs) in enumerate(schedule):
        if pi < start[0]:
            continue
        params = (list(net.recm.parameters()) if phase == "rec" else
                  list(net.regm.parameters()) if phase == "reg" else list(net.parameters()))
        template = [p for p in params if p is net.recm.anchor_bias]
        groups = [{"params": [p for p in params if p is not net.recm.anchor_bias], "base": cfg.lr}]
        if template:
            groups.append({"params": template, "base": cfg.lr_template})
        factor = 0.5 if phase == "joint" else 1.0
        opt = torch.optim.Adam([{**g, "lr": g["base"] * factor} for g in groups])
        first = start[1] if pi == start[0] else 0
        if pi == start[0] and first and blob is not None and "opt_state" in blob:
            opt.load_state_dict(blob["opt_state"])
        if plan is not None:
            epochs = plan[phase]
        for ep in range(first, epochs):
            for g in opt.param_groups:
                g["lr"] = g["base"] * factor * 0.5 ** (ep // max(cfg.lr_halve_epochs, 1))
            net.train()
            if phase in ("reg", "joint"):
                # RecM's batch norm uses its running statistics after the RecM phase: frozen in
                # the RegM phase, and in the joint phase RegM keeps seeing the reconstructions
                # it will see at inference (batch-of-4 statistics would shift them)
                net.recm.eval()
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, pi, ep])
            order = rng.permutation(len(tr))
            # the input poses of the RegM phase: one stream per process (one process: the same as before)
            draws = rng if par.world == 1 else np.random.default_rng([cfg.seed, pi, ep, 1 + par.rank])
            sums, nb = {}, 0
            bar = tqdm(par.share(range(0, len(order), cfg.batch)), desc=f"{phase} {ep + 1}/{epochs}", unit="batch",
                       disable=not progress)
            for i in bar:
                b = _to(collate([tr[j] for j in order[i:i + cfg.batch]]), device)
                opt.zero_grad()
                parts = {}
                if phase in ("rec", "joint"):
                    lrec, rec, pr = net.reconstruction_loss(b, lambda_ssim=cfg.lambda_ssim, lambda_tv=cfg.lambda_tv,
                                                            lambda_volume=cfg.lambda_volume,
                                                            lambda_centroid=cfg.lambda_centroid,
                                                            lambda_locate=cfg.lambda_locate)
                    parts.update({f"rec_{k}": v for k, v in pr.items()})
                    loss = lrec
                    if phase == "joint":
                        lreg, _, pg = net.registration_loss(b, rec, **reg_weights)
                        parts.update({f"reg_{k}": v for k, v in pg.items()})
                        loss = loss + lreg
                else:
                    b = _fresh_inputs(b, draws, cfg)
                    with torch.no_grad():
                        _, rec = net.reconstruct(b["images"], b["proj"], b["centre"])
                    loss, _, pg = net.registration_loss(b, rec, **reg_weights)
                    parts.update({f"reg_{k}": v for k, v in pg.items()})
                if not par.all_finite(loss):
                    log(f"{phase} epoch {ep + 1}: skipped a batch with a non-finite loss")
                    continue
                loss.backward()
                par.average_gradients(params)
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                parts["loss"] = float(loss.detach())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                nb += 1
                bar.set_postfix(loss=f"{sums['loss'] / nb:.3f}")
            seconds += time.perf_counter() - t0
            sums, nb = par.sum_stats(sums, nb)       # the logged losses: every process's batches
            par.average_buffers(net)                 # one set of batch-norm statistics
            if not par.main:                         # rank 0 validates and writes; the others wait for it
                par.barrier()
                continue
            epoch_s = time.perf_counter() - t0
            planning = phase == "rec" and cfg.time_budget_s is not None and plan is None
            # the timing probe of the other phases before this epoch's checkpoint, so that the
            # checkpoint without a plan is followed at once by the one with it
            per = _phase_batch_seconds(net, tr, cfg, device) if planning else None
            t_val = time.perf_counter()
            val = evaluate_samples(net, va, device=device) if va else {}
            t_val = time.perf_counter() - t_val
            row = {"phase": phase, "epoch": ep + 1, "lr": opt.param_groups[0]["lr"],
                   **{k: v / max(nb, 1) for k, v in sums.items()}, **{f"val_{k}": v for k, v in val.items()},
                   "seconds": seconds}
            history.append(row)
            step += 1
            t_save = _save_checkpoint(ckpt, net, opt, (pi, ep + 1) if ep + 1 < epochs else (pi + 1, 0), history,
                                      seconds, plan)
            if planning:
                # plan every phase's epochs (then saved again, so that a resumed run follows the plan)
                n_batches = -(-len(tr) // cfg.batch)
                spent = time.perf_counter() - t_run
                plan = plan_epochs(cfg.time_budget_s, spent,
                                   {"rec": epoch_s + t_val + t_save, "reg": per["reg"] * n_batches + t_val + t_save,
                                    "joint": per["joint"] * n_batches + t_val + t_save},
                                   done=ep + 1, most={"rec": epochs, "reg": cfg.reg_epochs,
                                                      "joint": cfg.joint_epochs},
                                   new_regm=not cfg.init or bool(cfg.new_regm))
                epochs = plan["rec"]
                row.update({f"{k}_epochs_planned": v for k, v in plan.items()})
                _save_checkpoint(ckpt, net, opt, (pi, ep + 1) if ep + 1 < epochs else (pi + 1, 0), history, seconds,
                                 plan)
                fewer = [f"{plan[k]} {name} of {n}" for k, name, n in
                         (("reg", "RegM", cfg.reg_epochs), ("joint", "joint", cfg.joint_epochs)) if plan[k] < n]
                log(f"time budget {cfg.time_budget_s:.0f} s: {spent:.0f} s spent, a RecM epoch "
                    f"{epoch_s + t_val + t_save:.0f} s, a RegM one about {per['reg'] * n_batches + t_val + t_save:.0f} s, "
                    f"a joint one {per['joint'] * n_batches + t_val + t_save:.0f} s: {plan['rec']} RecM "
                    f"epoch{'s' if plan['rec'] != 1 else ''} of at most {cfg.rec_epochs}"
                    + (f"; only {', '.join(fewer)} epochs fit" if fewer else ""))
            logger.write(row, step)
            log(f"{phase} epoch {ep + 1}/{epochs}: loss {row.get('loss', float('nan')):.4f}; validation "
                f"PSNR {val.get('psnr_db', float('nan')):.2f} dB, SSIM {val.get('ssim_pct', float('nan')):.1f} %, "
                f"follow {val.get('recon_follow', float('nan')):.2f}, "
                + (f"locator {val['locate_error_median_mm']:.1f} mm off, " if "locate_error_median_mm" in val else "")
                + f"mTRE {val.get('mtre_in_mm', float('nan')):.1f} -> {val.get('mtre_mm', float('nan')):.2f} mm "
                f"({seconds:.0f} s)")
            par.barrier()
            if ep + 1 >= epochs:                # the time budget's plan ended the RecM phase early
                break
    if not par.main:
        par.barrier()                           # until rank 0 has written model.pt
        par.close()
        return out / "model.pt"
    seen = levels_seen(cfg, init_levels)
    card = {"stage": cfg.stage, "train_config": _cfg_json(cfg), "train_samples": len(tr), "val_samples": len(va),
            "train_seconds": seconds, "device": str(device), "threads": cfg.threads, "processes": par.world,
            "validation": {k[4:]: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")},
            "history": history, "model_config": model_cfg.to_dict(), "levels_seen": seen,
            **({"time_budget": {"budget_s": cfg.time_budget_s,
                                **{f"{k}_epochs": v for k, v in (plan or {}).items()},
                                "run_s": time.perf_counter() - t_run}} if cfg.time_budget_s is not None else {})}
    path = net.save(out / "model.pt", card=card, overwrite=True)
    log(f"wrote {path}")
    par.barrier()
    par.close()
    return path


def _silent(*_args) -> None:
    """The log of a process other than rank 0."""
