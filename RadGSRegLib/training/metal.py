"""Training the metal segmentation network (:mod:`RadGSRegLib.learned.metal`) on X-rays our
simulator makes.

A training image is one view of a simulated case (:func:`~RadGSRegLib.cases.make_case`)
whose effects are drawn per case (:func:`~RadGSRegLib.cases.random_case_config`): instruments (screws in the
neighbours and/or the target, K-wires, retractor blades; none in a share of the cases, so
that the network learns to leave clean images alone), articulation, a round field or not,
the dose, the scatter, the body beyond the scan. Its label is exact: the metal's own line
integral at that pixel (:func:`~RadGSRegLib.instruments.case_metal_line_integrals`: at the
true pose, each instrument moving with its vertebra) above ``label_threshold``.
CTs: procedural phantoms (seeds ``phantom_seeds``) and, with ``sample_ct``, the bundled
lumbar CT (:func:`~RadGSRegLib.sample_data.lumbar_ct`); every level of each in turn.

:func:`train_metal` simulates the images once (cached in the run folder, ``data.pt``),
then trains on random crops with Dice + BCE, validates on held-out cases (other seeds) and
writes ``metal_seg.pt`` (with its model card: data, config, validation metrics) and
``history.json``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..instruments import case_metal_line_integrals
from ..learned.metal import MetalNet, MetalNetConfig, network_input

__all__ = ["MetalTrainConfig", "training_cts", "metal_images", "train_metal", "mask_metrics"]


@dataclass
class MetalTrainConfig:
    """A metal-network training run.

    Attributes:
        cases / val_cases: simulated training / validation cases (two X-rays each).
        phantom_seeds: the procedural phantoms used (~35 s each to build); val uses the
            same CTs at other poses and effects (seed ``seed + 1``).
        sample_ct: also the bundled lumbar CT.
        pixels / detector_mm: the simulated detector.
        metal_share: the share of cases with instruments (the rest are clean).
        label_threshold: metal line integral (60 keV, dimensionless; 0.1 = ~0.1 mm of steel)
            above which a pixel is metal.
        crop / batch / steps / lr: training crops (working pixels), batch size, Adam steps
            and learning rate (cosine decay).
        seed: draws cases ``(seed, i)`` and the training order.
        net: the network's :class:`~RadGSRegLib.learned.metal.MetalNetConfig`.
    """

    cases: int = 240
    val_cases: int = 24
    phantom_seeds: tuple = (1001, 1002)
    sample_ct: bool = True
    pixels: int = 256
    detector_mm: float = 292.8
    metal_share: float = 0.8
    label_threshold: float = 0.1
    crop: int = 128
    batch: int = 8
    steps: int = 2000
    lr: float = 2e-3
    seed: int = 7
    net: MetalNetConfig = field(default_factory=MetalNetConfig)

    def __post_init__(self):
        if isinstance(self.net, dict):
            self.net = MetalNetConfig(**self.net)
        self.phantom_seeds = tuple(int(s) for s in self.phantom_seeds)
        if not self.phantom_seeds and not self.sample_ct:
            raise ValueError("no CT to simulate: give phantom_seeds or sample_ct")
        for name in ("cases", "val_cases", "pixels", "crop", "batch", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.crop % 16:
            raise ValueError(f"crop must be a multiple of 16, got {self.crop}")

    def to_dict(self) -> dict:
        return asdict(self)


def training_cts(cfg: MetalTrainConfig) -> list:
    """The :class:`~RadGSRegLib.cases.LabelledCT` s images are made of: the phantoms of
    ``cfg.phantom_seeds`` and, with ``cfg.sample_ct``, the bundled lumbar CT."""
    from ..cases import load_sample

    sources = [load_sample("L3", phantom=True, seed=s) for s in cfg.phantom_seeds]
    if cfg.sample_ct:
        sources.append(load_sample("L3"))
    return sources


def metal_images(cfg: MetalTrainConfig, *, validation: bool, sources: list | None = None,
                 progress=None) -> list[dict]:
    """Simulated training images: one dict per view, ``x`` (2, H, W) float32 network input
    (:func:`~RadGSRegLib.learned.metal.network_input`, unpadded), ``y`` (H, W) bool metal
    label at the working size, ``metal`` whether the case had instruments, ``source``.
    ``sources``: :func:`training_cts` when already loaded. ``progress(i, n)``, if given,
    after each case."""
    from ..cases import make_case, random_case_config
    from ..levels import level_name
    from ..xray import as_line_integral, resize_view_image, signal_mask

    sources = sources if sources is not None else training_cts(cfg)
    levels = {id(s): _levels(s.seg) for s in sources}
    n = cfg.val_cases if validation else cfg.cases
    seed = cfg.seed + (1 if validation else 0)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        src = sources[i % len(sources)]
        lv = levels[id(src)][(i // len(sources)) % len(levels[id(src)])]
        case_cfg = random_case_config(rng, pixels=cfg.pixels, detector_mm=cfg.detector_mm,
                                      metal_share=cfg.metal_share, seed=seed)
        case = make_case(src.ct, src.seg, level_name(lv), case_cfg, rng, label=lv, source=src.source)
        metal = case_metal_line_integrals(case)
        for name in ("ap", "lat"):
            img = as_line_integral(case.xrays[name], case.image_kind)
            view = case.views[name]
            valid = signal_mask(img)
            x, (H, W) = network_input(img, view, cfg.net, None if valid.all() else valid)
            lab, _ = resize_view_image(metal[name].astype(np.float32), view, (W, H))
            out.append({"x": x[0, :, :H, :W].clone(), "y": torch.from_numpy(lab > cfg.label_threshold),
                        "metal": bool(case.extra["generator"].get("instruments")), "source": src.source})
        if progress:
            progress(i, n)
    return out


def _levels(seg) -> list[int]:
    """The lumbar labels (L1-L5) the label map has."""
    from ..levels import level_id

    present = set(np.unique(seg.array).tolist())
    return [level_id(f"L{k}") for k in range(1, 6) if level_id(f"L{k}") in present]


def _batch(data: list, idx, crop: int, rng: np.random.Generator):
    """(B, 2, crop, crop) inputs and (B, 1, crop, crop) labels: random crops (zero-padded
    when an image is smaller), random left-right flips."""
    xs, ys = [], []
    for k in idx:
        x, y = data[k]["x"], data[k]["y"].float()[None]
        H, W = x.shape[-2:]
        ph, pw = max(0, crop - H), max(0, crop - W)
        if ph or pw:
            x, y = F.pad(x, (0, pw, 0, ph)), F.pad(y, (0, pw, 0, ph))
            H, W = x.shape[-2:]
        r0, c0 = int(rng.integers(0, H - crop + 1)), int(rng.integers(0, W - crop + 1))
        x, y = x[:, r0:r0 + crop, c0:c0 + crop], y[:, r0:r0 + crop, c0:c0 + crop]
        if rng.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        xs.append(x)
        ys.append(y)
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def mask_metrics(net: MetalNet, data: list, threshold: float = 0.5) -> dict:
    """On whole images: pooled Dice, precision and recall over the images with metal, and
    the mean fraction of pixels marked on the images without (false alarms)."""
    net.eval()
    tp = fp = fn = 0
    clean = []
    for d in data:
        x = d["x"][None]
        H, W = x.shape[-2:]
        xp = F.pad(x, (0, (-W) % 16, 0, (-H) % 16))
        m = (torch.sigmoid(net(xp))[0, 0, :H, :W] > threshold)
        if d["metal"]:
            y = d["y"]
            tp += int((m & y).sum())
            fp += int((m & ~y).sum())
            fn += int((~m & y).sum())
        else:
            clean.append(float(m.float().mean()))
    return {"dice": 2 * tp / max(2 * tp + fp + fn, 1), "precision": tp / max(tp + fp, 1),
            "recall": tp / max(tp + fn, 1), "clean_marked_fraction": float(np.mean(clean)) if clean else None,
            "images": len(data)}


def train_metal(cfg: MetalTrainConfig, out, *, log=print, overwrite: bool = False) -> Path:
    """Train (see the module docstring); returns the path of ``out/metal_seg.pt``.

    ``out`` is new, empty or a folder a metal run wrote (marker kind "train-metal"). The
    simulated images are cached in ``out/data.pt`` (made once per config; reused when the
    config's data fields match). ``out/metal_seg.pt`` exists already: refused unless
    ``overwrite``."""
    from monai.losses import DiceLoss

    from ..errors import OutputError

    from ..io.outputs import write_marker
    from .train import _check_out

    out = Path(out)
    _check_out(out, "train-metal")
    weights = out / "metal_seg.pt"
    if weights.exists() and not overwrite:
        raise OutputError(f"{weights}: exists; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "train-metal")
    train, val = _cached_images(cfg, out, log)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    net = MetalNet(cfg.net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    shares = [float(d["y"].float().mean()) for d in train if d["metal"]]
    pos = float(np.mean(shares)) if shares else 0.01          # the mean share of metal pixels
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(min(20.0, max(1.0, 0.2 / max(pos, 1e-4)))))
    dice = DiceLoss(sigmoid=True, batch=True)
    history, t0 = [], time.perf_counter()
    every = max(1, cfg.steps // 10)
    running = []
    for step in range(1, cfg.steps + 1):
        net.train()
        x, y = _batch(train, rng.integers(0, len(train), cfg.batch), cfg.crop, rng)
        logits = net(x)
        loss = bce(logits, y) + dice(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % every == 0 or step == cfg.steps:
            row = {"step": step, "seconds": time.perf_counter() - t0, "loss": float(np.mean(running)),
                   "val": mask_metrics(net, val)}
            running = []
            history.append(row)
            v = row["val"]
            log(f"step {step}/{cfg.steps} ({row['seconds']:.0f} s): loss {row['loss']:.3f}; validation Dice "
                f"{v['dice']:.3f} (precision {v['precision']:.3f}, recall {v['recall']:.3f}), clean images marked "
                f"{(v['clean_marked_fraction'] or 0) * 100:.2f} %")
    from ..io.atomic import atomic_file

    with atomic_file(out / "history.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(history, indent=1))
    card = {"trained_on": "simulated X-rays (RadGSRegLib.training.metal): phantoms "
                          f"{list(cfg.phantom_seeds)}" + (" and the bundled lumbar CT" if cfg.sample_ct else ""),
            "config": cfg.to_dict(), "validation": history[-1]["val"], "train_seconds": history[-1]["seconds"],
            "torch": str(torch.__version__)}
    return net.save(weights, card=card, overwrite=overwrite)


def _cached_images(cfg: MetalTrainConfig, out: Path, log) -> tuple[list, list]:
    """The training and validation images, simulated or read back from ``out/data.pt``
    (keyed by the config's data fields)."""
    from ..learned.model import load_plain

    key = json.dumps({k: v for k, v in cfg.to_dict().items() if k not in ("crop", "batch", "steps", "lr")},
                     sort_keys=True, default=str)
    path = out / "data.pt"
    if path.exists():
        blob = load_plain(path)
        if blob.get("key") == key:
            log(f"simulated images: read back from {path}")
            return blob["train"], blob["val"]
    t = time.perf_counter()

    def say(what):
        def progress(i, n):
            if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
                log(f"simulating {what} cases: {i + 1}/{n} ({time.perf_counter() - t:.0f} s)")
        return progress

    log("building the CTs (a phantom takes ~35 s)")
    sources = training_cts(cfg)
    train = metal_images(cfg, validation=False, sources=sources, progress=say("training"))
    val = metal_images(cfg, validation=True, sources=sources, progress=say("validation"))
    from ..io.atomic import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        torch.save({"key": key, "train": train, "val": val}, tmp)
    return train, val

