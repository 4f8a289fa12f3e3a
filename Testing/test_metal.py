"""The metal segmentation network: its input, the shipped weights on simulated X-rays it did
not see, the mask in the registration, its training loop and its weight files."""
import numpy as np
import pytest
import torch

from RadGSRegLib.cases import CaseGenConfig, load_sample, make_case
from RadGSRegLib.instruments import InstrumentsConfig
from RadGSRegLib.learned.metal import MetalNet, MetalNetConfig, metal_probability, network_input, segment_metal
from RadGSRegLib.instruments import case_metal_line_integrals
from RadGSRegLib.training.metal import MetalTrainConfig, mask_metrics, metal_images
from RadGSRegLib.xray import as_line_integral


@pytest.fixture(scope="module")
def shipped():
    from RadGSRegLib.register.config import MetalConfig

    return MetalNet.load(MetalConfig().model_path())


@pytest.fixture(scope="module")
def lumbar():
    return load_sample("L2")


def _case(lumbar, seed, tools):
    cfg = CaseGenConfig(pixels=192, instruments=tools, seed=seed)
    return make_case(lumbar.ct, lumbar.seg, "L2", cfg, np.random.default_rng([99, seed]), label=lumbar.labels["L2"])


def test_network_input_is_standardised_over_the_signal_and_padded():
    from RadGSRegLib.geometry import biplanar_views

    view = biplanar_views(pixels=(100, 90), detector_mm=(230.0, 207.0))["ap"]        # 2.3 mm pixels
    rng = np.random.default_rng(0)
    img = rng.normal(3.0, 0.5, view.shape).astype(np.float32)
    valid = np.ones(view.shape, bool)
    valid[:, :20] = False
    img[~valid] = 99.0                                     # no signal: must not leak in
    x, (H, W) = network_input(img, view, MetalNetConfig(), valid)
    assert (H, W) == (180, 200)                            # 1.15 mm working pixels
    assert x.shape == (1, 2, 192, 208) and torch.all(x[..., H:, :] == 0) and torch.all(x[..., :, W:] == 0)
    z = x[0, 0, :H, :W]
    inside = z[:, 60:]                                      # well inside the signal
    assert abs(float(inside.mean())) < 0.1 and abs(float(inside.std()) - 1.0) < 0.1
    assert float(x[0, :, :H, :30].abs().max()) == 0.0      # the masked strip is zero in both channels


def test_shipped_network_finds_screws_wires_and_blades_and_leaves_clean_xrays_alone(shipped, lumbar):
    """Cases at poses and draws no training run used (seeds 99, k): the metal the simulator
    put there is found (recall, precision on the exact footprint), a clean X-ray is not marked."""
    tools = InstrumentsConfig(screws="both", kwires=1, retractors=2)
    tp = fp = fn = 0
    for seed in (1, 2):
        case = _case(lumbar, seed, tools)
        truth = case_metal_line_integrals(case)
        for name in ("ap", "lat"):
            m = segment_metal(shipped, as_line_integral(case.xrays[name], case.image_kind), case.views[name],
                              dilate_mm=0.0)
            y = truth[name] > 0.1
            tp, fp, fn = tp + int((m & y).sum()), fp + int((m & ~y).sum()), fn + int((~m & y).sum())
    assert tp / (tp + fn) > 0.8 and tp / (tp + fp) > 0.8
    clean = _case(lumbar, 3, InstrumentsConfig())
    for name in ("ap", "lat"):
        p = metal_probability(shipped, as_line_integral(clean.xrays[name], clean.image_kind), clean.views[name])
        assert (p > 0.5).mean() < 0.005


def test_mask_is_left_out_of_the_comparison_and_recorded(shipped, lumbar):
    from RadGSRegLib.register.config import MetalConfig
    from RadGSRegLib.register.pipeline import mask_metal
    from RadGSRegLib.register.target import make_target

    case = _case(lumbar, 4, InstrumentsConfig(screws="target", kwires=1))
    tgt = make_target(case, slab_mm=150.0, coarse_mm=2.0)
    assert tgt.valid("ap", 64) is None
    info = mask_metal(tgt, MetalConfig(), net=shipped)
    assert info["mode"] == "mask" and 0.001 < info["fraction"]["ap"] < 0.2
    truth = case_metal_line_integrals(case)["ap"] > 0.1
    assert not tgt.signal["ap"][truth].any() or tgt.signal["ap"][truth].mean() < 0.1
    assert tgt.valid("ap", 64).mean() < 1.0                 # the resized mask follows
    assert mask_metal(make_target(case, slab_mm=150.0, coarse_mm=2.0), MetalConfig(mode="never")) == {"mode": "never"}
    with pytest.raises(ValueError, match="mask shape"):
        tgt.exclude("ap", np.zeros((3, 3), bool))


def test_metal_config_errors_name_the_field(tmp_path):
    from RadGSRegLib.register.config import ConfigError, MetalConfig, RegisterConfig

    for kw, field in ((dict(mode="maybe"), "mode"), (dict(threshold=1.5), "threshold"), (dict(dilate_mm=-1), "dilate_mm")):
        with pytest.raises(ConfigError, match=field):
            MetalConfig(**kw)
    cfg = RegisterConfig.from_dict({"metal": {"mode": "never"}})
    assert cfg.metal.mode == "never"
    from RadGSRegLib.learned.model import WeightFileError

    bad = tmp_path / "m.pt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(WeightFileError, match=r"m\.pt: not a metal segmentation weight file"):
        MetalNet.load(bad)
    with pytest.raises(WeightFileError, match=r"nope\.pt: model weights not found"):
        MetalNet.load(tmp_path / "nope.pt")


def test_training_lowers_the_loss_and_writes_a_loadable_network(tmp_path):
    """A tiny run (the lumbar CT, 3 cases, 30 steps on 64-pixel crops): the simulated labels
    are the metal's footprint, the loss falls, the weight file loads and agrees, a second run
    reads the simulated images back instead of simulating again."""
    from RadGSRegLib.training.metal import train_metal

    cfg = MetalTrainConfig(cases=3, val_cases=1, phantom_seeds=(), pixels=96, crop=64, batch=4, steps=30,
                           net=MetalNetConfig(features=(4, 4, 8, 8, 16, 4)), metal_share=1.0)
    lines = []
    path = train_metal(cfg, tmp_path / "run", log=lines.append)
    hist = __import__("json").loads((tmp_path / "run" / "history.json").read_text())
    assert hist[-1]["loss"] < hist[0]["loss"]
    net = MetalNet.load(path)
    assert net.card["config"]["steps"] == 30 and "validation" in net.card
    data = metal_images(cfg, validation=True)
    assert all(d["y"].any() for d in data) and data[0]["x"].shape[0] == 2
    assert mask_metrics(net, data)["images"] == 2
    with pytest.raises(Exception, match="exists"):
        train_metal(cfg, tmp_path / "run", log=lines.append)
    lines.clear()
    train_metal(cfg, tmp_path / "run", log=lines.append, overwrite=True)
    assert any("read back" in line for line in lines)


def test_train_metal_refuses_a_folder_it_did_not_write_and_the_cli_checks_options(tmp_path, capsys):
    from RadGSRegLib.cli import main
    from RadGSRegLib.errors import OutputError
    from RadGSRegLib.training.metal import train_metal

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"notes\.txt"):
        train_metal(MetalTrainConfig(cases=1, val_cases=1, phantom_seeds=()), tmp_path, log=print)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]          # nothing written
    assert main(["train-metal", "--out", str(tmp_path / "r"), "--cases", "0"]) == 2
    assert main(["train-metal", "--out", str(tmp_path / "r"), "--phantoms", "0", "--no-sample-ct"]) == 2
    assert "no CT to simulate" in capsys.readouterr().err


def test_exclude_updates_cached_masks_and_a_network_marking_everything_is_not_used(lumbar):
    """A mask computed before (a round field: cached) follows a later exclusion; a network
    that marks (nearly) the whole X-ray is not used for it, and the run says so."""
    from dataclasses import replace

    from RadGSRegLib.register import RegisterConfig, run
    from RadGSRegLib.register.config import MetalConfig
    from RadGSRegLib.register.pipeline import MAX_METAL, mask_metal
    from RadGSRegLib.register.target import make_target
    from RadGSRegLib.simulate import XraySimConfig

    cfg = CaseGenConfig(pixels=128, sim=XraySimConfig(field_diameter_mm=230.0), seed=5)
    case = make_case(lumbar.ct, lumbar.seg, "L2", cfg, np.random.default_rng(5), label=lumbar.labels["L2"])
    tgt = make_target(case, slab_mm=150.0, coarse_mm=2.0)
    before = tgt.valid("ap", 64).copy()                     # cached now
    m = np.zeros(tgt.images["ap"].shape, bool)
    m[50:70, 50:70] = True
    tgt.exclude("ap", m)
    after = tgt.valid("ap", 64)
    assert after.sum() < before.sum() and not after[26:34, 26:34].any()

    everything = MetalNet(MetalNetConfig(features=(4, 4, 8, 8, 16, 4)))
    with torch.no_grad():
        for p in everything.parameters():
            p.zero_()
        everything.unet.final_conv.bias.fill_(10.0)         # metal everywhere
    tgt = make_target(case, slab_mm=150.0, coarse_mm=2.0)
    untouched = tgt.signal["ap"].copy()
    info = mask_metal(tgt, MetalConfig(), net=everything)
    assert info["skipped"] == ["ap", "lat"] and min(info["fraction"].values()) > MAX_METAL
    assert "nothing left out" in info["warning"] and np.array_equal(tgt.signal["ap"], untouched)
    res = run(replace(case, ground_truth=None), RegisterConfig(init="none", refine="none"), metal_net=everything)
    assert any("metal network marked more than" in w for w in res.info["warnings"])
