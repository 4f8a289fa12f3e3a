"""`radgsreg train` hardening: nothing read from disk runs code, every setting is checked
when it is read, everything checkable is checked before samples are simulated, a failed
run leaves no state that blocks the corrected one, a run folder never receives our files
among someone else's, and every file is written atomically."""
import json
import pathlib
import pickle

import numpy as np
import pytest
import torch

from RadGSRegLib.configio import ConfigError
from RadGSRegLib.errors import InputError, OutputError
from RadGSRegLib.io.outputs import write_marker
from RadGSRegLib.training import train as T
from RadGSRegLib.learned.config import ModelConfig
from RadGSRegLib.training.config import TrainConfig, load_train_config
from RadGSRegLib.learned.model import RadGSRegNet, WeightFileError

TINY = dict(anchors=4, per_anchor=1, image_pixels=64, features=8, hidden=16, voxels=16, render_pixels=32,
            regm_channels=(4, 8, 8, 8))


def tiny(tmp_path, **kw) -> TrainConfig:
    d = dict(out=str(tmp_path / "run"), model=ModelConfig(**TINY), phantoms=1, phantom_spacing_mm=4.0,
             samples_per_ct=2, val_samples=1, levels=["L3"], rec_epochs=1, reg_epochs=0, joint_epochs=0, batch=2)
    d.update(kw)
    return TrainConfig(**d)


# ------------------------------------------------------------------ planted pickles
class _Payload:
    """Unpickling this creates ``marker``: code from the file would have run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant(path: pathlib.Path, marker: pathlib.Path, how: str = "torch"):
    """A .pt file that runs code when loaded unsafely: a torch zip file or a bare pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": "radgsreg-checkpoint/1", "state_dict": _Payload(marker), "train": [_Payload(marker)],
            "val": [], "positions": _Payload(marker)}
    if how == "torch":
        torch.save(blob, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(blob, f)
    return path


@pytest.fixture()
def no_simulation(monkeypatch):
    """Fail the test if samples are simulated (the checks must come first)."""
    def boom(*a, **k):
        raise AssertionError("samples were simulated before the checks failed")

    monkeypatch.setattr(T, "build_samples", boom)


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_the_planted_file_is_live(tmp_path, how):
    """Sanity: loaded the old way (weights_only=False), the planted file does run code."""
    marker = tmp_path / "ran"
    plant(tmp_path / "x.pt", marker, how)
    try:
        torch.load(tmp_path / "x.pt", weights_only=False)
    except RuntimeError:                                  # a bare pickle: run, then "invalid magic number"
        pass
    assert marker.exists()


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_planted_checkpoint_is_refused_unread(tmp_path, how, no_simulation):
    marker = tmp_path / "ran"
    cfg = tiny(tmp_path)
    run = pathlib.Path(cfg.out)
    plant(run / "checkpoint.pt", marker, how)
    (run / "config.json").write_text("{}")          # even with a config.json of another run: the checkpoint is named
    # a folder with no marker and no proof of being a run is refused before anything in it is read
    with pytest.raises(OutputError, match=r"nothing in it shows RadGSReg wrote it"):
        T.train(cfg, log=lambda *_: None, progress=False)
    from RadGSRegLib.io.outputs import write_marker

    write_marker(run, "train")                      # a run folder of ours, with a planted checkpoint
    with pytest.raises(OutputError, match=r"checkpoint\.pt: not a RadGSReg checkpoint .*move it away") as e:
        T.train(cfg, log=lambda *_: None, progress=False)
    assert not marker.exists()
    assert "weights_only" not in str(e.value)            # no advice to load it unsafely
    assert (run / "config.json").read_text() == "{}"     # nothing written


@pytest.mark.parametrize("how", ["torch", "pickle"])
def test_planted_weight_file_is_refused(tmp_path, how, no_simulation):
    marker = tmp_path / "ran"
    w = plant(tmp_path / "w.pt", marker, how)
    with pytest.raises(WeightFileError, match=r"w\.pt: not a RadGSReg weight file"):
        RadGSRegNet.load(w)
    # as --init: refused before the run folder is even made
    with pytest.raises(InputError, match=r"w\.pt"):
        T.train(tiny(tmp_path, init=str(w)), log=lambda *_: None, progress=False)
    assert not marker.exists() and not (tmp_path / "run").exists()
    with pytest.raises(InputError, match=r"nope\.pt: model weights not found"):
        RadGSRegNet.load(tmp_path / "nope.pt")


def test_planted_gaussians_files_are_refused(tmp_path):
    from RadGSRegLib.gaussians.model import RadiativeGaussians

    marker = tmp_path / "ran"
    plant(tmp_path / "g.pt", marker)
    with pytest.raises(InputError, match=r"g\.pt: not a Gaussians file"):
        RadiativeGaussians.load(tmp_path / "g.pt")
    np.savez(tmp_path / "g.npz", positions=np.array([_Payload(marker)], dtype=object), scales=np.zeros((1, 3)),
             rotations_xyzw=np.zeros((1, 4)), densities=np.zeros(1))
    with pytest.raises(InputError, match=r"g\.npz: not a Gaussians file"):
        RadiativeGaussians.load(tmp_path / "g.npz")
    assert not marker.exists()


# ------------------------------------------------------------------ one real run: cache, atomic writes, resume
def test_planted_cache_is_replaced_checkpoints_are_atomic_and_resume_works(tmp_path, monkeypatch):
    """A planted sample cache under the exact name train reads is ignored (the log says so)
    and replaced; a checkpoint write that dies half-way leaves the previous checkpoint
    whole and no temporary file; the rerun resumes; everything written loads with
    weights_only=True."""
    marker = tmp_path / "ran"
    cfg = tiny(tmp_path, rec_epochs=2)
    cache = T._cache_path(cfg)
    assert cache.parent == tmp_path / "run" / "data" and cache.name.startswith("samples-")
    plant(cache, marker)
    write_marker(tmp_path / "run", "train")         # the run folder as train makes it
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **k):
        if pathlib.Path(f).name.startswith(".checkpoint.pt."):
            calls.append(f)
            if len(calls) == 2:                          # the second epoch's checkpoint
                pathlib.Path(f).write_bytes(b"half a checkpoint")
                raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, log=lines.append, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    run = tmp_path / "run"
    assert not marker.exists()
    assert any("ignoring the sample cache" in x and "simulating the samples again" in x for x in lines)
    blob = torch.load(cache, weights_only=True)          # replaced by a safe one
    assert blob["format"] == T.SAMPLES_FORMAT and len(blob["train"]) == 2
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["position"] == [0, 1] and len(ck["history"]) == 1
    assert {p.name for p in run.iterdir()} - {"tensorboard"} == {"checkpoint.pt", "config.json", "data", "log.jsonl",
                                                                 ".radgsreg.json"}
    assert not [p for p in run.rglob(".*") if p.name != ".radgsreg.json"]     # no temporary file left
    # the same command again: resumes at epoch 2 from the cache, finishes
    lines = []
    path = T.train(cfg, log=lines.append, progress=False)
    assert any("samples from" in x for x in lines) and any("resuming" in x and "epoch 2" in x for x in lines)
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [("rec", 1), ("rec", 2)]
    w = torch.load(path, weights_only=True)
    assert w["card"]["train_config"]["rec_epochs"] == 2
    assert torch.load(run / "checkpoint.pt", weights_only=True)["position"] == [1, 0]
    assert json.loads((run / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict(), default=str))
    assert not [p for p in run.rglob(".*") if p.name != ".radgsreg.json"]
    # a run that started refuses another configuration
    with pytest.raises(FileExistsError, match="another configuration"):
        T.train(tiny(tmp_path, rec_epochs=2, lr=0.1), progress=False)


# ------------------------------------------------------------------ settings checked when read
@pytest.mark.parametrize("change, words", [
    ({"rec_epochs": "ten"}, "rec_epochs must be an integer"),
    ({"lr": [0.1]}, "lr must be a number"),
    ({"epochs": 3}, "unknown train config key 'epochs'"),
    ({"model": {"backbone": "resnet18"}}, "model.backbone must be one of"),
    ({"model": {"anchors": 0}}, "model.anchors must be a positive integer"),
    ({"model": {"voxel": 16}}, "unknown train config key 'model.voxel'"),
    ({"model": {"scale_mm": [1.0, "2"]}}, r"model.scale_mm\[1\] must be a number"),
    ({"device": "tpu"}, "device must be one of cpu, cuda"),
    ({"stage": 4}, "stage must be 1, 2 or 3"),
    ({"threads": 0}, "threads must be an integer >= 1"),
    ({"batch": -1}, "batch must be an integer >= 1"),
    ({"samples_per_ct": 0}, "samples_per_ct must be an integer >= 1"),
    ({"rec_epochs": -1}, "rec_epochs must be an integer >= 0"),
    ({"levels": ["L9"]}, r"levels\[0\] must be a vertebra level"),
    ({"levels": "L3"}, "levels must be a list"),
    ({"init": 3}, "init must be a string"),
    ({"realism": "all"}, "realism must be one of none, drawn"),
    ({"metal_share": 1.5}, "metal_share must be between 0 and 1"),
    ({"rec_epochs": 0, "reg_epochs": 0, "joint_epochs": 0}, "rec_epochs, reg_epochs and joint_epochs are all 0"),
    ({"rec_epochs": 0, "reg_epochs": 3, "joint_epochs": 0}, "init rec_epochs and joint_epochs are 0 without init"),
    ({"data_shards": 0}, "data_shards must be an integer >= 1"),
    ({"data_workers": 0}, "data_workers must be an integer >= 1"),
])
def test_config_file_errors_name_the_file_and_field(tmp_path, change, words):
    p = tmp_path / "train.json"
    p.write_text(json.dumps({"stage": 1, "phantoms": 1, **change}))
    with pytest.raises(ConfigError, match=rf"train\.json: {words}"):
        load_train_config(p)


def test_config_file_itself_and_overrides(tmp_path):
    p = tmp_path / "train.json"
    with pytest.raises(ConfigError, match=r"train\.json: file not found"):
        load_train_config(p)
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"train\.json: must hold a JSON object"):
        load_train_config(p)
    p.write_text('{"threads": 2}')
    assert load_train_config(p, threads=None).threads == 2
    with pytest.raises(ConfigError, match=r"threads=0 \(given over .*train\.json\): threads must be an integer >= 1"):
        load_train_config(p, threads=0)
    with pytest.raises(ConfigError, match="device must be one of"):
        load_train_config(p, device="gpu")


def test_python_made_configs_are_checked_too():
    for kw, words in [({"threads": 0}, "threads"), ({"rec_epochs": "3"}, "rec_epochs must be an integer"),
                      ({"model": {"backbone": "x"}}, "model.backbone"), ({"device": "cuda:x"}, "device"),
                      ({"stage": 2}, "case_dirs")]:
        with pytest.raises(ConfigError, match=words):
            TrainConfig(**kw)
    with pytest.raises(ConfigError, match="backbone"):
        ModelConfig(backbone="resnet18")
    cfg = TrainConfig(out=pathlib.Path("runs/x"), model={"anchors": 3}, levels=("L1",))
    assert cfg.out == "runs/x" and cfg.model.anchors == 3 and cfg.levels == ["L1"]
    assert TrainConfig(device="cuda:1").device == "cuda:1"


# ------------------------------------------------------------------ late failures first
def _images(tmp_path, *, labels=0):
    import SimpleITK as sitk

    arr = np.full((20, 20, 20), -1000, np.int16)               # air, a body, a bone: plausible HU
    arr[3:17, 3:17, 3:17] = 40
    arr[7:13, 7:13, 7:13] = 700
    ct = sitk.GetImageFromArray(arr)
    ct.SetSpacing((2.0, 2.0, 2.0))
    seg = sitk.Image(20, 20, 20, sitk.sitkUInt8)
    seg.SetSpacing((2.0, 2.0, 2.0))
    if labels:
        seg[7:13, 7:13, 7:13] = labels
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(seg, str(tmp_path / "seg.nrrd"))
    return tmp_path / "ct.nrrd", tmp_path / "seg.nrrd"


def test_inputs_are_checked_before_any_sample_is_simulated(tmp_path, no_simulation):
    ct, seg = _images(tmp_path)
    (tmp_path / "text.nrrd").write_text("not an image")
    w = tmp_path / "w.pt"
    RadGSRegNet(ModelConfig(**TINY)).save(w)
    bad = [
        (dict(ct_dirs=[f"{ct}x:{seg}"]), r"ct\.nrrdx.*file not found"),
        (dict(ct_dirs=[f"{tmp_path / 'text.nrrd'}:{seg}"]), r"text\.nrrd.*cannot be read as an image"),
        (dict(ct_dirs=[str(tmp_path / "nowhere")]), r"nowhere.*CT:LABELS"),
        (dict(ct_dirs=[f"{ct}:{seg}"]), r"seg\.nrrd: none of the levels L3"),
        (dict(stage=3, init=str(w), ct_dirs=[f"{ct}:{seg}"]), r"seg\.nrrd: none of the levels"),
        (dict(stage=2, init=str(w), case_dirs=[str(tmp_path / "nocase")]), r"nocase.*case folder not found"),
        (dict(stage=2, init=str(w), case_dirs=[str(tmp_path)]), r"no case\.json"),
        (dict(init=str(tmp_path / "missing.pt")), r"missing\.pt: model weights not found"),
    ]
    for kw, words in bad:
        with pytest.raises(InputError, match=words):
            T.train(tiny(tmp_path, **kw), log=lambda *_: None, progress=False)
        assert not (tmp_path / "run").exists(), kw           # nothing written, not even the folder


def test_stage2_case_without_ground_truth_is_refused_first(tmp_path, small_phantom, no_simulation):
    from RadGSRegLib.cases import CaseGenConfig, make_case
    from RadGSRegLib.io import write_case

    ct, seg = small_phantom
    case = make_case(ct, seg, "L3", CaseGenConfig(pixels=32, seed=2), np.random.default_rng(2))
    case.ground_truth = None
    write_case(case, tmp_path / "case")
    w = tmp_path / "w.pt"
    RadGSRegNet(ModelConfig(**TINY)).save(w)
    with pytest.raises(InputError, match=r"case\.json.*ground_truth"):
        T.train(tiny(tmp_path, stage=2, init=str(w), case_dirs=[str(tmp_path / "case")]), progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_first(tmp_path, no_simulation):
    with pytest.raises(InputError, match="device .* cuda: CUDA is not available"):
        T.train(tiny(tmp_path, device="cuda"), progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ the run folder
def test_run_folder_that_is_not_ours_is_refused(tmp_path, no_simulation):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "model.pt").write_text("x")
    with pytest.raises(OutputError, match=r"holds files RadGSReg did not write \(e\.g\. notes\.txt\)"):
        T.train(tiny(tmp_path), progress=False)
    (run / "notes.txt").unlink()
    (run / "data").mkdir()
    (run / "data" / "photo.jpg").write_text("mine")
    with pytest.raises(OutputError, match=r"data/photo\.jpg"):
        T.check_run(tiny(tmp_path))
    assert sorted(p.name for p in run.iterdir()) == ["data", "model.pt"]
    (run / "data" / "photo.jpg").unlink()
    (run / "model.pt").unlink()
    write_marker(run, "train")
    # what a run (or an interrupted one) leaves is ours
    for name in (".DS_Store", ".checkpoint.pt.ab12cd.pt", "checkpoint.tmp", "data/samples-0123.pt",
                 "data/.samples-0123.pt.x1.pt", "tensorboard/events.out.tfevents.1.host"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("")
    T.check_run(tiny(tmp_path))
    # a file as the run folder, a folder under a file
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        T.check_run(tiny(tmp_path, out=str(tmp_path / "afile")))
    with pytest.raises(OutputError, match="afile is a file"):
        T.check_run(tiny(tmp_path, out=str(tmp_path / "afile" / "run")))
    with pytest.raises(OutputError, match="data_cache"):
        T.check_run(tiny(tmp_path, data_cache=str(tmp_path / "afile" / "data")))


def test_a_run_that_never_started_does_not_block_the_corrected_one(tmp_path, no_simulation):
    """A failed train leaves no config.json; a config.json without a checkpoint (an older
    version's failed run) is replaced, not a reason to refuse."""
    ct, seg = _images(tmp_path)
    with pytest.raises(InputError):
        T.train(tiny(tmp_path, ct_dirs=[f"{ct}:{seg}"]), progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stage": 1, "lr": 9.0}))
    (run / "log.jsonl").write_text('{"phase": "rec"}\n')
    # without the marker nothing shows that a run wrote this (a hand-written config.json): refused
    with pytest.raises(OutputError, match="nothing in it shows RadGSReg wrote it"):
        T.check_run(tiny(tmp_path))
    write_marker(run, "train")                      # a run folder of ours whose run never started
    assert T.check_run(tiny(tmp_path)).replace_config
    # started (a checkpoint) with another config: refused, and the checkpoint is named safe first
    net = RadGSRegNet(ModelConfig(**TINY))
    torch.save({"format": T.CHECKPOINT_FORMAT, "state_dict": net.state_dict(), "position": [0, 1], "history": [],
                "seconds": 0.0, "torch_rng": torch.get_rng_state()}, run / "checkpoint.pt")
    with pytest.raises(FileExistsError, match="another configuration"):
        T.check_run(tiny(tmp_path))
    (run / "config.json").unlink()
    with pytest.raises(OutputError, match="without its config.json"):
        T.check_run(tiny(tmp_path))
    # a checkpoint of another network: refused before any work
    (run / "config.json").write_text(json.dumps(json.loads(json.dumps(tiny(tmp_path).to_dict(), default=str))))
    torch.save({"format": T.CHECKPOINT_FORMAT, "state_dict": RadGSRegNet(ModelConfig(**{**TINY, "anchors": 3})).state_dict(),
                "position": [0, 1], "history": [], "seconds": 0.0, "torch_rng": torch.get_rng_state()},
               run / "checkpoint.pt")
    with pytest.raises(OutputError, match=r"checkpoint\.pt: its weights do not fit"):
        T.check_run(tiny(tmp_path))


def test_init_weights_set_the_network_and_the_samples(tmp_path, no_simulation):
    """With init, the model settings are the weights' own, so the samples fit the network."""
    w = tmp_path / "w.pt"
    RadGSRegNet(ModelConfig(**{**TINY, "image_pixels": 48})).save(w)
    lines = []
    run = T.check_run(tiny(tmp_path, init=str(w)), log=lines.append)
    assert run.cfg.model.image_pixels == 48 and run.net.cfg.image_pixels == 48
    assert any("come from the weights" in x for x in lines)


def test_data_workers_beyond_the_shards_is_said(tmp_path, capsys):
    """--data-workers N with a config of fewer sample streams: a note says that only
    data_shards processes can work (before any work; here the run stops at its missing init)."""
    from pathlib import Path

    from RadGSRegLib.cli import main

    cfg = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "configs" / "stage1_tiny.json"
    rc = main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--data-workers", "3",
               "--init", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert rc != 0 and "note: --data-workers 3" in err and "1 stream(s)" in err and "missing.pt" in err
    assert not (tmp_path / "run").exists()


def test_a_run_resumes_under_a_config_json_written_before_a_key_existed():
    """same_run: a run folder's config.json lacking keys added since (at their defaults) or
    with other machine-only settings (data_workers) is the same run; another value is not."""
    from RadGSRegLib.training.train import _cfg_json, same_run

    cfg = TrainConfig(phantoms=3, rec_epochs=1, reg_epochs=1, joint_epochs=0, data_workers=2)
    old = _cfg_json(cfg)
    for key in ("data_shards", "data_workers"):
        old.pop(key)
    assert same_run(old, cfg)                                    # written before the keys existed
    assert same_run({**old, "data_workers": 7}, cfg)             # other processes, same samples
    assert not same_run({**old, "data_shards": 2}, cfg)          # other samples
    assert not same_run({**old, "lr": 0.1}, cfg)
    assert not same_run({**old, "no_such_key": 1}, cfg) and not same_run(None, cfg) and not same_run([1], cfg)
