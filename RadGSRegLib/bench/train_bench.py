"""``radgsreg bench train``: how fast a training configuration trains on this machine.

For each batch size, one short run of :func:`RadGSRegLib.training.train.train` itself (the
real phases, losses and optimiser; nothing re-implemented here) on the configuration's model
and data settings, shrunk to ``samples`` training samples and 2 RecM, 2 RegM and 1 joint
epochs, in a temporary folder; the samples are simulated once (``data_workers`` processes)
and shared by the runs. Reported: seconds per sample and epoch of each phase, from the run's
``log.jsonl`` (validation excluded), taking each phase's last epoch (the first of a run
includes the device's warm-up); the data's seconds per sample; and what one epoch of the
full configuration's training set would take. The runs start from the shipped weights when
they are the configuration's network (a trained RecM's Gaussians, whose sizes set the
rasterizer's cost, not a random one's), else from random weights.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

__all__ = ["run_train_bench"]

_EPOCHS = {"rec": 2, "reg": 2, "joint": 1}
_EPOCHS_CFG = {f"{k}_epochs": v for k, v in _EPOCHS.items()}


def _per_sample(rows: list, n: int) -> dict:
    """{phase: seconds per sample of its last epoch} from a run's log rows."""
    out, prev = {}, 0.0
    for row in rows:
        out[row["phase"]] = (row["seconds"] - prev) / n
        prev = row["seconds"]
    return out


def run_train_bench(config, *, device: str = "cpu", threads: int = 2, samples: int = 32, batches=(4,),
                    data_workers: int = 1, json_path: Path | None = None, overwrite: bool = True, log=print) -> dict:
    """Time the phases of training ``config`` (a JSON file, or a TrainConfig) on ``device``.

    Args:
        samples: training samples per run (rounded up to whole CTs of ``samples_per_ct``).
        batches: batch sizes, one run each.
        data_workers: processes simulating the samples (as many sample streams at least).
    Returns:
        ``{"config", "device", "device_name", "torch", "threads", "samples", "data_s_per_sample",
        "rows": [{"batch", "s_per_sample": {phase: s}, "epoch_s_full": {phase: s}}]}``; written
        to ``json_path`` (kind "bench-train") when given.
    """
    import torch

    from ..io.outputs import check_output_file, write_json
    from ..training.config import TrainConfig, load_train_config
    from ..training.train import train

    if json_path is not None:
        check_output_file(json_path, "bench-train", overwrite=overwrite)
    from ..learned.model import RadGSRegNet
    from ..resources import resource_path

    # the epochs are the bench's own (a RegM-only continuation without its init loads too)
    full = config if isinstance(config, TrainConfig) else load_train_config(config, **_EPOCHS_CFG)
    model = RadGSRegNet.load(full.init_path()).cfg if full.init else full.model   # stages 2-3: the weights'
    shipped = resource_path("Models/radgsreg_stage1.pt")
    init = str(shipped) if RadGSRegNet.load(shipped).cfg == model else None
    per = full.samples_per_ct
    full_n = per * ((full.phantoms if full.stage == 1 else 0) + (len(full.ct_dirs) if full.stage in (1, 3) else 0)
                    + (len(full.case_dirs) if full.stage == 2 else 0))
    with tempfile.TemporaryDirectory(prefix="radgsreg-bench-train-") as tmp:
        tmp = Path(tmp)
        # the configuration's model and sample settings on stage-1 phantoms (the phases cost the
        # same in every stage; the data's cost is the phantoms')
        small = dataclasses.replace(full, stage=1, init=init, model=model, ct_dirs=[], case_dirs=[],
                                    phantoms=max(1, -(-samples // per)), val_samples=1,
                                    rec_epochs=_EPOCHS["rec"], reg_epochs=_EPOCHS["reg"], joint_epochs=_EPOCHS["joint"],
                                    device=device, threads=threads, data_workers=data_workers,
                                    data_shards=max(full.data_shards, data_workers), data_cache=str(tmp / "data"))
        n = small.phantoms * per
        rows, data_s = [], None
        for batch in batches:
            cfg = dataclasses.replace(small, batch=batch, out=str(tmp / f"batch{batch}"))
            t = time.perf_counter()
            train(cfg, log=lambda *a: None, progress=False)
            wall = time.perf_counter() - t
            hist = [json.loads(x) for x in (Path(cfg.out) / "log.jsonl").read_text().splitlines()]
            sps = _per_sample(hist, n)
            if data_s is None:                     # the first run simulated the samples
                data_s = max(0.0, wall - hist[-1]["seconds"]) / (n + 1)
            rows.append({"batch": batch, "s_per_sample": sps,
                         "epoch_s_full": {k: v * full_n for k, v in sps.items()}})
            log(f"  batch {batch}: " + ", ".join(f"{k} {v:.4f} s/sample" for k, v in sps.items()))
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    log("")
    log(f"Training speed: {name}, torch {torch.__version__}, {threads} thread(s), {n} samples per run, from "
        f"{'the shipped weights' if init else 'random weights'}; data {data_s:.2f} s per sample (upper bound: "
        "includes start-up)")
    log(f"{'batch':>5} {'RecM s/sample':>14} {'RegM s/sample':>14} {'joint s/sample':>15}   one epoch of the "
        f"config's {full_n} samples (RecM / RegM / joint)")
    for r in rows:
        s, e = r["s_per_sample"], r["epoch_s_full"]
        log(f"{r['batch']:>5} {s.get('rec', float('nan')):>14.4f} {s.get('reg', float('nan')):>14.4f} "
            f"{s.get('joint', float('nan')):>15.4f}   {e.get('rec', 0) / 60:.1f} / {e.get('reg', 0) / 60:.1f} / "
            f"{e.get('joint', 0) / 60:.1f} min")
    result = {"config": str(config) if not isinstance(config, TrainConfig) else full.to_dict(), "device": device,
              "init": "shipped" if init else "random", "device_name": name, "torch": torch.__version__,
              "threads": threads, "samples": n, "config_samples": full_n, "data_s_per_sample": data_s, "rows": rows}
    if json_path is not None:
        write_json(json_path, result, "bench-train", overwrite=overwrite, default=float)
        log(f"wrote {json_path}")
    return result
