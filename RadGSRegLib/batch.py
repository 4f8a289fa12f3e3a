"""Many case folders registered once each (``radgsreg register-batch``), on local worker
processes or on a Ray cluster.

:func:`register_batch` registers every case folder under a folder (or a list of case
folders) into ``OUT/<case name>/`` (the result folder ``radgsreg register`` writes,
:func:`~RadGSRegLib.io.write_result`: written to a temporary and renamed, so a result
folder is either whole or absent). It resumes: a case whose result folder already holds a
result *of that case* (:func:`~RadGSRegLib.evaluate.result_matches_case`) is kept, not
redone; a result folder of another case is never overwritten (that case fails, said so). A
case that fails is recorded with its error and the batch goes on. With ``workers`` > 1 the
cases run on that many processes (spawned; each with ``threads`` torch/numba threads, by
default the cores shared out so they are not oversubscribed), each loading the networks
once. ``OUT/batch.json`` records every case (status ``registered``, ``kept`` or
``failed``, seconds, error) and, when every case carries its ground truth and none failed,
the evaluation (:func:`~RadGSRegLib.evaluate.evaluate_results`, ``OUT/evaluation.json``).

Callable from Slicer's Python console as from a script::

    from RadGSRegLib.batch import register_batch
    summary = register_batch("cases/", "results/", workers=2)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["register_batch", "config_key"]

READY_S = 120.0       # seconds Ray gets to place every worker


def _cases(cases) -> list[Path]:
    """The case folders: those under a folder (``*/case.json``), or a list of them; their
    names (the result folders' names) must differ."""
    from .errors import InputError
    from .evaluate import case_dirs

    if isinstance(cases, (str, os.PathLike)):
        if not Path(cases).is_dir():
            raise InputError(f"CASES {cases}: folder not found")
        dirs = case_dirs(cases)
        if not dirs:
            raise InputError(f"CASES {cases}: holds no case folders (folders with a case.json)")
    else:
        dirs = [Path(d) for d in cases]
        for d in dirs:
            if not (d / "case.json").is_file():
                raise InputError(f"{d}: not a case folder (no case.json)")
    seen = {}
    for d in dirs:
        if d.name in seen:
            raise InputError(f"two cases share the name {d.name!r} ({seen[d.name]} and {d}): their results would "
                             "share a folder")
        seen[d.name] = d
    return dirs


def _failed(case: str, error: str) -> dict:
    """The record of a case that was not registered."""
    return {"case": case, "status": "failed", "seconds": 0.0, "error": error}


_WORKER = {}          # per worker process: its configuration and loaded networks (set by _init)


def _init(config: dict, threads: int) -> None:
    """A worker's start: its threads, its configuration and the networks, loaded once."""
    import numba
    import torch

    from .register import RegisterConfig
    from .register.pipeline import load_networks

    torch.set_num_threads(threads)
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    cfg = RegisterConfig.from_dict(config)
    net, metal_net = load_networks(cfg)
    _WORKER.update(cfg=cfg, net=net, metal_net=metal_net, threads=threads, key=config_key(config))


def config_key(config: dict) -> str:
    """What identifies a batch's settings (SHA-256 of its RegisterConfig fields as JSON), kept
    in each result (``info["batch_config"]``) so that a resumed batch with other settings does
    not pass earlier results off as its own."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _one(case_dir: str, out_dir: str) -> dict:
    """Register one case into ``out_dir`` (in a worker: :func:`_init` ran). Returns its row."""
    from .errors import one_line
    from .evaluate import case_fingerprint
    from .io import read_case, write_result
    from .register import run

    t = time.perf_counter()
    row = _failed(Path(case_dir).name, None)
    try:
        case = read_case(case_dir)                      # never the ground truth
        cfg = _WORKER["cfg"]
        res = run(case, cfg, net=_WORKER["net"], metal_net=_WORKER["metal_net"])
        res.info.update({"case": str(case_dir), "case_fingerprint": case_fingerprint(case_dir), "device": cfg.device,
                         "threads": _WORKER["threads"], "model": str(cfg.model_path()) if _WORKER["net"] else None,
                         "batch_config": _WORKER["key"]})
        write_result(res, out_dir, inputs=[case_dir])
        row.update(status="registered", doubtful=bool(res.info.get("doubtful")), runtime_s=res.runtime_s["total"])
    except Exception as e:                                 # recorded; the batch goes on
        row["error"] = one_line(e)
    row["seconds"] = time.perf_counter() - t
    return row


class _RayWorker:
    """One Ray actor: a worker process that keeps its networks between cases."""

    def __init__(self, config: dict, threads: int):
        _init(config, threads)

    def one(self, case_dir: str, out_dir: str) -> dict:
        return _one(case_dir, out_dir)


def _on_ray(todo: list, out: Path, config: dict, workers: int, threads: int, address: str, on_row, log) -> int:
    """The cases on Ray: ``address`` "local" starts a Ray instance here (stopped after), else
    ``ray.init(address=...)`` joins a cluster ("auto", "host:port", "ray://host:port"); an
    already initialised Ray is used as it is. ``workers`` actors of ``threads`` CPUs each, at
    most as many as the cluster's CPUs hold. Returns the actors used."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        from .errors import InputError

        raise InputError("--ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from e
    started = not ray.is_initialized()
    if started:
        kw = {"include_dashboard": False, "log_to_driver": False}
        ray.init(**kw) if address == "local" else ray.init(address=address, **kw)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        if cpus < threads:                              # an actor that can never be placed: no hang, an error
            from .errors import InputError

            raise InputError(f"--threads {threads}: the Ray cluster has {cpus} CPU(s); an actor asks for as many "
                             "CPUs as it has threads")
        n = min(workers, cpus // threads)
        if n < workers:
            log(f"Ray: {cpus} CPUs hold {n} worker(s) of {threads} thread(s), not {workers}")
        actor = ray.remote(num_cpus=threads)(_RayWorker)
        actors = [actor.remote(config, threads) for _ in range(n)]
        ready, waiting = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=n, timeout=READY_S)
        if waiting:                                     # no node has room for them: an error, not a hang
            from .errors import InputError

            raise InputError(f"Ray placed {len(ready)} of {n} worker(s) of {threads} CPU(s) in {READY_S:.0f} s (too "
                             "few free CPUs on one node?): use fewer --workers or --threads")
        ray.get(ready)                                  # a worker that failed to start says why here
        pool = ActorPool(actors)
        for row in pool.map_unordered(lambda a, d: a.one.remote(str(d.resolve()), str((out / d.name).resolve())),
                                      todo):
            on_row(row)
        return n
    finally:
        if started:
            ray.shutdown()


def _has_truth(case_dir: Path) -> bool:
    """Whether a case folder's case.json holds a ground truth (an unreadable one: no)."""
    try:
        return "ground_truth" in json.loads((case_dir / "case.json").read_text())
    except (OSError, ValueError):
        return False


def register_batch(cases, out, *, config: dict | None = None, workers: int = 1, threads: int | None = None,
                   ray: str | None = None, log=print, progress: bool = True) -> dict:
    """Register every case of ``cases`` into ``out`` (see the module docstring).

    Args:
        cases: a folder of case folders, or a list of case folders.
        out: the results folder (made if missing); ``out/<case name>/`` per case,
            ``out/batch.json`` the summary.
        config: :class:`~RadGSRegLib.register.RegisterConfig` fields (JSON form, as
            ``--config``); None: the defaults.
        workers: processes (1: this process, no pool), or Ray actors.
        threads: torch/numba threads per worker (None: the CPU cores divided among the
            workers, at least 1; on Ray 1, each actor asking for that many CPUs).
        ray: run the cases as tasks of Ray actors (``workers`` of them, each loading the
            networks once, at most as many as the cluster's CPUs hold): "local" starts a Ray
            instance on this machine, "auto" joins the cluster this machine belongs to, or an
            address ("host:port", "ray://host:port"); None: local processes. On a cluster the
            case and result folders must be on a file system every node sees, and the nodes
            need this package (``pip install radgsreg[ray]``).
        log: a callable taking one line of text. progress: a progress bar (tqdm, stderr).

    Returns:
        ``{"cases", "out", "workers", "threads", "rows": [{"case", "status", "seconds",
        "error", ...}], "counts": {status: n}, "evaluation": evaluate_results' summary or
        None, "wall_s", "cases_per_minute"}``.
    """
    from tqdm import tqdm

    from .errors import InputError, one_line
    from .evaluate import evaluate_results, result_matches_case
    from .io import read_result
    from .io.outputs import write_json
    from .register import RegisterConfig

    dirs = _cases(cases)
    config = dict(config or {})
    settings = RegisterConfig.from_dict(config)         # a bad setting fails before any case
    for what, path in (("the RadGS-Reg weights (model)", settings.model_path() if settings.init_mode == "learned"
                        else None),
                       ("the metal network's weights (metal.model)", settings.metal.model_path()
                        if settings.metal.mode == "mask" else None)):
        if path is not None and not Path(path).is_file():          # before a worker fails on it
            raise InputError(f"{what}: {path} not found")
    key = config_key(config)
    if workers < 1:
        raise InputError(f"--workers must be 1 or more, not {workers}")
    threads_given = threads
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    out = Path(out)
    roots = {d.resolve() for d in dirs} | {d.resolve().parent for d in dirs}
    if any(out.resolve() == r or r in out.resolve().parents for r in roots):
        raise InputError(f"--out {out}: the results must go to a folder of their own, not into the cases' folder "
                         "or a case folder")
    out.mkdir(parents=True, exist_ok=True)
    rows, todo = {}, []
    for d in dirs:
        r = out / d.name
        if (r / "result.json").is_file():
            try:
                res = read_result(r)
                why = result_matches_case(d, res)
                made = res.info.get("batch_config")
                if why is None and made is not None and made != key:
                    why = "it was made with other settings (batch_config in result.json); move it away to redo it"
            except Exception as e:                      # unreadable: not ours to replace
                why = f"unreadable ({one_line(e)})"
            rows[d.name] = ({"case": d.name, "status": "kept", "seconds": 0.0, "error": None} if why is None else
                            _failed(d.name, f"{r} holds another result, left as it is: {why}"))
        elif r.exists() and (not r.is_dir() or any(r.iterdir())):
            rows[d.name] = _failed(d.name, f"{r} exists and is not a result folder: left as it is")
        else:
            todo.append(d)
    kept = sum(r["status"] == "kept" for r in rows.values())
    if ray:
        threads = threads_given or 1
    where = f"Ray ({ray})" if ray else "this machine"
    log(f"{len(dirs)} cases: {kept} done before (kept), {len(todo)} to register on {where}, {workers} worker"
        f"{'s' if workers > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}")
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="case", disable=not progress or not todo)

    def take(row):
        rows[row["case"]] = row
        bar.update(1)
        if row["error"]:
            log(f"{row['case']}: failed: {row['error']}")

    if ray and todo:
        try:
            _on_ray(todo, out, config, workers, threads, ray, take, log)
        except InputError:                              # settings the cluster cannot run: said before any case
            raise
        except Exception as e:                          # a dead worker, a lost cluster: the rest recorded
            for d in todo:
                if d.name not in rows:
                    take(_failed(d.name, f"not registered: {one_line(e)}"))
    elif workers == 1:                                  # in this process: its thread settings restored after
        import numba
        import torch

        before = torch.get_num_threads(), numba.get_num_threads()
        try:
            _init(config, threads)
            for d in todo:
                take(_one(str(d), str(out / d.name)))
        finally:
            _WORKER.clear()
            torch.set_num_threads(before[0])
            numba.set_num_threads(before[1])
    else:
        from concurrent.futures import as_completed

        from .workers import process_pool

        with process_pool(workers, initializer=_init, initargs=(config, threads)) as pool:
            futures = {pool.submit(_one, str(d), str(out / d.name)): d for d in todo}
            for f in as_completed(futures):
                try:
                    row = f.result()
                except Exception as e:                  # the worker itself died
                    row = _failed(futures[f].name, one_line(e))
                take(row)
    bar.close()
    wall = time.perf_counter() - t0
    ordered = [rows[d.name] for d in dirs]
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("registered", "kept", "failed")}
    done = counts["registered"]
    summary = {"cases": str(cases) if isinstance(cases, (str, os.PathLike)) else [str(d) for d in dirs],
               "out": str(out), "workers": workers, "threads": threads, "ray": ray, "config": config, "rows": ordered,
               "counts": counts, "wall_s": wall, "cases_per_minute": 60.0 * done / wall if done and wall > 0 else None,
               "evaluation": None}
    log(f"registered {counts['registered']}, kept {counts['kept']}, failed {counts['failed']} in {wall:.1f} s"
        + (f" ({summary['cases_per_minute']:.1f} cases/min)" if summary["cases_per_minute"] else ""))
    # written now (the registrations' record stands whatever the evaluation does) and again with it
    write_json(out / "batch.json", summary, "batch", overwrite=True, inputs=dirs, allow_in=[out], default=float)
    if isinstance(cases, (str, os.PathLike)) and all(_has_truth(d) for d in dirs):
        if counts["failed"]:
            log(f"no evaluation while {counts['failed']} case(s) failed: once all are done, run this again or "
                f"'radgsreg evaluate {cases} --results {out}'")
        else:
            try:
                summary["evaluation"] = evaluate_results(Path(cases), out, json_path=out / "evaluation.json",
                                                         log=log)["summary"]
            except Exception as e:                      # the registrations stand; the evaluation says why not
                summary["evaluation_error"] = one_line(e)
                log(f"no evaluation: {summary['evaluation_error']}")
    write_json(out / "batch.json", summary, "batch", overwrite=True, inputs=dirs, allow_in=[out], default=float)
    log(f"wrote {out / 'batch.json'}")
    return summary
