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
metrics, seconds), TensorBoard event files when ``tensorboard`` is installed, and, at the
end, ``model.pt`` (the weight file with its model card). Running the same command again
resumes from the checkpoint; a different configuration in the same folder is refused.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import build_samples, collate, perturb_pose
from .model import RadGSRegNet

__all__ = ["train", "evaluate_samples", "PHASES"]

PHASES = ("rec", "reg", "joint")


def _seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _data_key(cfg: TrainConfig) -> str:
    keys = ("stage", "phantoms", "phantom_spacing_mm", "ct_dirs", "case_dirs", "levels", "samples_per_ct",
            "val_samples", "pose_rot_deg", "pose_trans_mm", "input_rot_deg", "input_trans_mm", "seed")
    d = {k: getattr(cfg, k) for k in keys}
    d["model"] = {k: getattr(cfg.model, k) for k in ("image_pixels", "roi_mm", "voxels", "render_pixels")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dataset(cfg: TrainConfig, log) -> tuple[list, list]:
    cache = Path(cfg.data_cache or Path(cfg.out) / "data")
    path = cache / f"samples-{_data_key(cfg)}.pt"
    if path.is_file():
        blob = torch.load(path, weights_only=False)
        log(f"data: {len(blob['train'])} training + {len(blob['val'])} validation samples from {path}")
        return blob["train"], blob["val"]
    from tqdm import tqdm

    t = time.perf_counter()
    log("data: simulating training samples")
    tr = build_samples(cfg, validation=False, progress=lambda it: tqdm(it, desc="training data", unit="CT"))
    va = build_samples(cfg, validation=True, progress=lambda it: tqdm(it, desc="validation data", unit="CT"))
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"train": tr, "val": va}, path)
    log(f"data: {len(tr)} training + {len(va)} validation samples in {time.perf_counter() - t:.0f} s -> {path}")
    return tr, va


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
    ground-truth volume) and RegM's mTRE / success rate from ``T_in`` (target points: the
    vertebra region's voxels), with the input mTRE for comparison."""
    from ..geometry import mtre
    from ..metrics import recon_metrics

    net.eval()
    psnr, ssim, e_in, e_out = [], [], [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            b = _to(collate(samples[i:i + batch]), device)
            _, rec = net.reconstruct(b["images"], b["proj"], b["centre"])
            T = net.estimate(b, rec)
            for k in range(rec.shape[0]):
                m = recon_metrics(rec[k, 0].cpu().numpy(), b["gt_volume"][k].cpu().numpy())
                psnr.append(m["psnr_db"])
                ssim.append(m["ssim_pct"])
                pts = _points(b, k)
                G = b["G"][k].cpu().numpy().astype(np.float64)
                e_in.append(mtre(b["T_in"][k].cpu().numpy().astype(np.float64), G, pts))
                e_out.append(mtre(T[k].cpu().numpy().astype(np.float64), G, pts))
    net.train()
    e_out = np.asarray(e_out)
    return {"psnr_db": float(np.mean(psnr)), "ssim_pct": float(np.mean(ssim)), "mtre_in_mm": float(np.mean(e_in)),
            "mtre_mm": float(np.mean(e_out)), "mtre_median_mm": float(np.median(e_out)),
            "sr_pct": float(100 * np.mean(e_out < 2.0)), "n": len(e_out)}


class _Logger:
    def __init__(self, out: Path):
        self.path = out / "log.jsonl"
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


def train(cfg: TrainConfig, *, log=print, progress: bool = True) -> Path:
    """Run (or resume) a training run; returns the path of its ``model.pt``."""
    from tqdm import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        if old != json.loads(json.dumps(cfg.to_dict(), default=str)):
            raise FileExistsError(f"{out} holds a run with another configuration ({cfg_path}); "
                                  "choose another --out, or delete the folder to start over")
    else:
        cfg_path.write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    _seed(cfg.seed)
    tr, va = _dataset(cfg, log)
    if cfg.init:
        net = RadGSRegNet.load(cfg.init)
        log(f"starting from {cfg.init} (model config from the weights)")
    else:
        net = RadGSRegNet(cfg.model)
    net.to(device).train()
    model_cfg = net.cfg
    ckpt = out / "checkpoint.pt"
    schedule = [(p, n) for p, n in zip(PHASES, (cfg.rec_epochs, cfg.reg_epochs, cfg.joint_epochs)) if n > 0]
    start, history, seconds = (0, 0), [], 0.0
    if ckpt.is_file():
        blob = torch.load(ckpt, weights_only=False)
        net.load_state_dict(blob["state_dict"])
        start, history, seconds = tuple(blob["position"]), blob["history"], blob["seconds"]
        torch.set_rng_state(blob["torch_rng"])
        log(f"resuming {out} at phase {schedule[start[0]][0] if start[0] < len(schedule) else 'done'}, "
            f"epoch {start[1] + 1}")
    logger = _Logger(out)
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
        if pi == start[0] and first and "opt_state" in blob:
            opt.load_state_dict(blob["opt_state"])
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
            sums, nb = {}, 0
            bar = tqdm(range(0, len(order), cfg.batch), desc=f"{phase} {ep + 1}/{epochs}", unit="batch",
                       disable=not progress)
            for i in bar:
                b = _to(collate([tr[j] for j in order[i:i + cfg.batch]]), device)
                opt.zero_grad()
                parts = {}
                if phase in ("rec", "joint"):
                    lrec, rec, pr = net.reconstruction_loss(b, lambda_ssim=cfg.lambda_ssim, lambda_tv=cfg.lambda_tv,
                                                            lambda_volume=cfg.lambda_volume)
                    parts.update({f"rec_{k}": v for k, v in pr.items()})
                    loss = lrec
                    if phase == "joint":
                        lreg, _, pg = net.registration_loss(b, rec, lambda_geo=cfg.lambda_geo)
                        parts.update({f"reg_{k}": v for k, v in pg.items()})
                        loss = loss + lreg
                else:
                    b = _fresh_inputs(b, rng, cfg)
                    with torch.no_grad():
                        _, rec = net.reconstruct(b["images"], b["proj"], b["centre"])
                    loss, _, pg = net.registration_loss(b, rec, lambda_geo=cfg.lambda_geo)
                    parts.update({f"reg_{k}": v for k, v in pg.items()})
                if not torch.isfinite(loss):
                    log(f"{phase} epoch {ep + 1}: skipped a batch with a non-finite loss")
                    continue
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                opt.step()
                parts["loss"] = float(loss.detach())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                nb += 1
                bar.set_postfix(loss=f"{sums['loss'] / nb:.3f}")
            seconds += time.perf_counter() - t0
            val = evaluate_samples(net, va, device=device) if va else {}
            row = {"phase": phase, "epoch": ep + 1, "lr": opt.param_groups[0]["lr"],
                   **{k: v / max(nb, 1) for k, v in sums.items()}, **{f"val_{k}": v for k, v in val.items()},
                   "seconds": seconds}
            history.append(row)
            step += 1
            logger.write(row, step)
            log(f"{phase} epoch {ep + 1}/{epochs}: loss {row.get('loss', float('nan')):.4f}; validation "
                f"PSNR {val.get('psnr_db', float('nan')):.2f} dB, SSIM {val.get('ssim_pct', float('nan')):.1f} %, "
                f"mTRE {val.get('mtre_in_mm', float('nan')):.1f} -> {val.get('mtre_mm', float('nan')):.2f} mm "
                f"({seconds:.0f} s)")
            nxt = (pi, ep + 1) if ep + 1 < epochs else (pi + 1, 0)
            blob = {"state_dict": net.state_dict(), "opt_state": opt.state_dict(), "position": nxt,
                    "history": history, "seconds": seconds, "torch_rng": torch.get_rng_state()}
            tmp = ckpt.with_suffix(".tmp")
            torch.save(blob, tmp)
            tmp.replace(ckpt)
    card = {"stage": cfg.stage, "train_config": cfg.to_dict(), "train_samples": len(tr), "val_samples": len(va),
            "train_seconds": seconds, "device": str(device), "threads": cfg.threads,
            "validation": {k[4:]: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")},
            "history": history, "model_config": model_cfg.to_dict()}
    path = net.save(out / "model.pt", card=card, overwrite=True)
    log(f"wrote {path}")
    return path
