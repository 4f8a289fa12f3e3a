"""register-batch: every case once, on local workers, resumable, failures recorded."""
import json
import os

import numpy as np
import pytest

from RadGSRegLib.batch import register_batch
from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.io import read_result, write_case

FAST = {"search": {"rot_deg": [0.0], "candidates": 1}, "metal": {"mode": "never"},
        "refine2d": {"levels": [{"pixels": 64, "iterations": 8, "step_deg": 1.0, "step_mm": 1.0, "margin_mm": 30.0,
                                 "highpass_mm": None}]}}


@pytest.fixture(scope="module")
def cases(tmp_path_factory, small_phantom):
    ct, seg = small_phantom
    root = tmp_path_factory.mktemp("batch") / "cases"
    for i in range(3):
        case = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=3.0, trans_mm=6.0, pixels=64, seed=10 + i),
                         np.random.default_rng(10 + i))
        write_case(case, root / f"case_{i:03d}")
    return root


def _quiet(**kw):
    return dict(config=FAST, threads=1, log=lambda line: None, progress=False, **kw)


def test_two_workers_give_the_serial_transforms_and_an_evaluation(cases, tmp_path):
    one = register_batch(cases, tmp_path / "serial", workers=1, **_quiet())
    two = register_batch(cases, tmp_path / "pool", workers=2, **_quiet())
    assert one["counts"] == two["counts"] == {"registered": 3, "kept": 0, "failed": 0}
    for name in ("case_000", "case_001", "case_002"):
        a, b = read_result(tmp_path / "serial" / name), read_result(tmp_path / "pool" / name)
        np.testing.assert_array_equal(a.T_ct_to_carm, b.T_ct_to_carm)
        assert b.info["case_fingerprint"] and b.info["threads"] == 1
    batch = json.loads((tmp_path / "pool" / "batch.json").read_text())
    assert batch["radgsreg"]["kind"] == "batch" and [r["case"] for r in batch["rows"]] == ["case_000", "case_001",
                                                                                          "case_002"]
    assert two["evaluation"]["n"] == 3 and (tmp_path / "pool" / "evaluation.json").is_file()
    assert two["cases_per_minute"] > 0


def test_a_batch_resumes_without_redoing_finished_cases_and_records_failures(cases, tmp_path):
    import shutil

    out = tmp_path / "res"
    first = register_batch(cases, out, workers=1, **_quiet())
    assert first["counts"]["registered"] == 3
    stamp = {n: os.stat(out / n / "result.json").st_mtime_ns for n in ("case_000", "case_002")}
    shutil.rmtree(out / "case_001")                     # as if the batch was killed before it
    (out / ".case_001.tmp-x").mkdir()                    # and left a half-written temporary
    again = register_batch(cases, out, workers=1, **_quiet())
    assert again["counts"] == {"registered": 1, "kept": 2, "failed": 0}
    assert {r["case"]: r["status"] for r in again["rows"]} == {"case_000": "kept", "case_001": "registered",
                                                              "case_002": "kept"}
    assert stamp == {n: os.stat(out / n / "result.json").st_mtime_ns for n in stamp}

    # a broken case fails alone, said so; a result of another case is never overwritten
    broken = tmp_path / "cases2"
    shutil.copytree(cases, broken)
    (broken / "case_001" / "xray_ap.nrrd").write_bytes(b"not an image")
    out2 = tmp_path / "res2"
    shutil.copytree(out / "case_002", out2 / "case_000")          # case_002's result where case_000's goes
    before = (out2 / "case_000" / "result.json").read_bytes()
    res = register_batch(broken, out2, workers=1, **_quiet())
    rows = {r["case"]: r for r in res["rows"]}
    assert rows["case_001"]["status"] == "failed" and "xray_ap" in rows["case_001"]["error"]
    assert rows["case_000"]["status"] == "failed" and "another result" in rows["case_000"]["error"]
    assert rows["case_002"]["status"] == "registered"
    assert (out2 / "case_000" / "result.json").read_bytes() == before


def test_register_batch_cli(cases, tmp_path, capsys):
    from RadGSRegLib.cli import main

    cfg = tmp_path / "fast.json"
    cfg.write_text(json.dumps(FAST))
    assert main(["register-batch", str(cases), "--out", str(tmp_path / "r"), "--config", str(cfg),
                 "--threads", "1"]) == 0
    assert main(["register-batch", str(cases), "--out", str(tmp_path / "r"), "--config", str(cfg)]) == 0
    assert "3 done before (kept), 0 to register" in capsys.readouterr().out
    assert main(["register-batch", str(cases), "--out", str(cases / "case_000")]) == 1      # into a case folder
    assert "folder of their own" in capsys.readouterr().err
    assert main(["register-batch", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2")]) == 1
    assert "folder not found" in capsys.readouterr().err


def test_a_local_ray_cluster_gives_the_serial_transforms(cases, tmp_path):
    """``ray="local"``: a Ray instance with this machine's CPUs, two actors (each loads the
    networks once); the same transforms as the serial run, the same batch record."""
    pytest.importorskip("ray")
    serial = register_batch(cases, tmp_path / "serial", workers=1, **_quiet())
    on_ray = register_batch(cases, tmp_path / "ray", workers=2, ray="local", **_quiet())
    assert serial["counts"] == on_ray["counts"] == {"registered": 3, "kept": 0, "failed": 0}
    assert on_ray["ray"] == "local" and on_ray["threads"] == 1
    for name in ("case_000", "case_001", "case_002"):
        np.testing.assert_array_equal(read_result(tmp_path / "serial" / name).T_ct_to_carm,
                                      read_result(tmp_path / "ray" / name).T_ct_to_carm)
    again = register_batch(cases, tmp_path / "ray", workers=2, ray="local", **_quiet())
    assert again["counts"] == {"registered": 0, "kept": 3, "failed": 0}       # nothing started: nothing to do
    import shutil

    shutil.rmtree(tmp_path / "ray" / "case_001")                        # one to do, on actors of too many threads
    with pytest.raises(Exception, match="CPU"):
        register_batch(cases, tmp_path / "ray", workers=1, ray="local", config=FAST, threads=4096,
                       log=lambda line: None, progress=False)


def test_a_batch_with_other_settings_does_not_keep_earlier_results(cases, tmp_path):
    out = tmp_path / "res"
    register_batch(cases, out, workers=1, **_quiet())
    other = {**FAST, "min_ncc": 0.55}
    res = register_batch(cases, out, workers=1, **{**_quiet(), "config": other})
    assert res["counts"] == {"registered": 0, "kept": 0, "failed": 3}
    assert all("other settings" in r["error"] for r in res["rows"])
    with pytest.raises(Exception, match="not found"):
        register_batch(cases, tmp_path / "x", **{**_quiet(), "config": {**FAST, "init": "learned", "model": "nope.pt"}})


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (1, 4), (3, 2), (5, 3), (6, 3), (2, 4)])
def test_every_rank_takes_as_many_batches(n, world):
    """torchrun's ranks must take the same number of steps (their collectives pair up), and
    every batch is taken by some rank."""
    from RadGSRegLib.training.distributed import Dist

    starts = list(range(0, 2 * n, 2))
    parts = [Dist(rank, world).share(starts) for rank in range(world)]
    assert len({len(p) for p in parts}) == 1
    assert set().union(*map(set, parts)) == set(starts)
    assert len(parts[0]) == (-(-n // world) if n else 0)
