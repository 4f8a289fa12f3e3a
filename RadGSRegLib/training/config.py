"""Configuration of a training run (:class:`TrainConfig`): a dataclass saved inside every
checkpoint and readable from a JSON file (``radgsreg train --config FILE``), the network's
own settings nested under ``model`` (:class:`~RadGSRegLib.learned.config.ModelConfig`).

Every value is checked when the object is made (from JSON or in Python): a wrong type, an
unknown key, a count below its minimum, an unknown backbone, stage or device raise
:class:`~RadGSRegLib.configio.ConfigError` (an :class:`~RadGSRegLib.errors.InputError`)
naming the file and the field path (``model.backbone``), before any work starts.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..configio import ConfigError, at_least, build, check, read_json
from ..learned.config import ModelConfig

__all__ = ["TrainConfig", "STAGES", "DEVICES", "REALISM", "MODEL_CHANGES", "load_train_config", "ConfigError"]

#: the model settings ``TrainConfig.model_changes`` may replace in ``init``'s: the X-rays' window and
#: the loss's render window, which keep every parameter's shape
MODEL_CHANGES = ("crop", "render_pixels")

STAGES = (1, 2, 3)
#: ``TrainConfig.realism`` values
REALISM = ("none", "drawn")
#: ``TrainConfig.device`` values (also "cuda:N")
DEVICES = ("cpu", "cuda")


@dataclass
class TrainConfig:
    """One training run (``radgsreg train``).

    Attributes:
        stage: 1 simulated X-rays of many CTs (phantoms and any ``ct_dirs``), 2 real
            X-ray cases with known poses (``case_dirs``), 3 patient-specific (simulated
            X-rays of the target patient's own CT, ``ct_dirs``; run before surgery).
        out: run folder (checkpoints, ``log.jsonl``, TensorBoard events when available,
            ``model.pt``); a run there is resumed, not overwritten.
        init: weights to start from (stages 2-3 start from stage 1's): a ``.pt`` file, or
            "default" for the shipped stage-1 weights (:mod:`RadGSRegLib.resources`); None: random.
        model: the network (ignored when ``init`` is given: the weights carry theirs).
        new_regm: with ``init``: None keeps its RegM; "resnet" or "flow" keeps its RecM and
            starts a new, untrained RegM of that kind
            (:mod:`~RadGSRegLib.learned.regm`; seeded by ``seed``).
        add_locator: with ``init`` weights that have no locator: add RecM's locator
            (``model.locate``; :class:`~RadGSRegLib.learned.recm.RecM` step 5), new and
            starting at a shift of 0, so that the network starts as ``init``'s exactly.
        fine_tune: the config continues trained weights (its learning rate and few epochs are
            chosen for that): refused without ``init``, so that it cannot train new weights
            from random by mistake.
        model_changes: with ``init``: model settings that replace the weights' own and keep
            every parameter's shape (:data:`MODEL_CHANGES`: ``crop``, ``render_pixels``),
            e.g. ``{"crop": 0.6, "render_pixels": 106}``: the trained network fine-tuned to
            see a window of each X-ray at finer pixels; None: the weights' settings.
        phantoms / phantom_spacing_mm: stage 1: phantom CTs generated (seeded) and their
            voxel size. Each phantom has 5 vertebrae, its top drawn from T11, T12, L1 when
            ``levels`` lie within T11-L5 (the earlier shipped weights' data), otherwise from the tops
            whose 5 vertebrae include at least one of ``levels``.
        phantom_ribs: stage 1: the phantoms' thoracic vertebrae get their ribs
            (:class:`~RadGSRegLib.phantom.PhantomConfig` ``ribs``); false: the phantoms of the
            earlier shipped weights' data.
        phantom_sacrum: stage 1: a phantom whose column reaches S1 gets a sacrum and hip bones
            there (:class:`~RadGSRegLib.phantom.PhantomConfig` ``sacrum``), so that S1 can be
            a training level as a sacrum and L4/L5 are seen with the pelvis beside them.
        phantom_size / phantom_bone_density: stage 1: ``[low, high]`` (factors > 0, at most 3): each phantom's
            ``size`` / ``bone_density`` (:class:`~RadGSRegLib.phantom.PhantomConfig`) drawn
            uniformly from that range (after its other draws, from its own seeded stream), so
            that the network sees larger and smaller vertebrae, dense and porous bone. None:
            1, the phantoms of the earlier shipped weights' data.
        ct_dirs: CTs with vertebra label maps: ``CT:LABELS`` path pairs, folders holding
            ``ct.nrrd`` + ``seg.nrrd`` (a case folder, or ``radgsreg phantom``'s output), or
            "sample" for the bundled lumbar CT.
        ct_spacing_mm: stages 1 and 3: a CT of ``ct_dirs`` whose voxels are finer than this
            (mm) is averaged in whole blocks to about this size before its X-rays are
            simulated (:func:`~RadGSRegLib.volume.coarsen`; its labels likewise), which cuts
            the simulation's time by about the block's voxel count (a 1 mm CT at 2.0: 8x
            fewer voxels); null keeps every CT as it is. The suites' X-rays are simulated from
            the CT as it is either way.
        case_dirs: stage 2: case folders with ``ground_truth``.
        levels: vertebra levels to draw from.
        samples_per_ct: training samples drawn from each CT (pose, level, noise).
        val_samples: held-out samples (stage 1: from phantoms of other seeds; otherwise
            drawn from the same CTs with other poses).
        pose_rot_deg / pose_trans_mm: ground-truth pose range about the nominal pose
            (as the case generator's).
        input_rot_deg / input_trans_mm: RegM's input pose, the truth perturbed about the
            vertebra (what the localisation step leaves).
        realism: the X-rays of stages 1 and 3: "none" (the whole CT only, with the default
            formation model: the first shipped weights' data) or "drawn" (every sample's
            effects drawn as :func:`~RadGSRegLib.cases.random_case_config` draws them for a
            case: instruments, articulation, round field, dose, scatter, the body beyond
            the scan; simulated at twice ``model.image_pixels``, at least
            ``model.input_pixels``, on the standard 292.8 mm detector, as the case suites are, then resampled).
        metal_share: with ``realism`` "drawn", the share of samples with instruments.
        data_shards: the training samples are drawn as this many independent seeded streams
            (phantoms split among them, or one CT's samples split among them when there are
            fewer sources than streams), so that several processes can make them; 1 (default)
            is the first runs' single stream. A data setting: other shards, other samples.
        data_workers: processes that simulate the shards in parallel (at most
            ``data_shards``; each uses one torch thread). The samples do not depend on it.
        rec_epochs / reg_epochs / joint_epochs: module-aware phases: RecM alone, RegM alone
            (on the frozen RecM's reconstruction, input poses redrawn every batch), then
            both with Eq. 4.
        time_budget_s: the run's time, in seconds from its start (the samples' simulation
            included). With it, ``rec_epochs``, ``reg_epochs`` and ``joint_epochs`` are the
            most epochs of each phase: after the first RecM epoch the run plans as many of
            each as fit for it to end within the budget (the RegM and joint epochs estimated
            from a few timed batches of each; ``training.train.plan_epochs``): every RegM
            and joint epoch and RecM the rest when there is time, and when there is not,
            fewer RegM epochs first (down to one), then fewer joint ones, then no RegM
            epoch (but a RegM that starts untrained, without ``init`` or with
            ``new_regm``, always gets one), down to the one RecM epoch made.
            The plan is kept in the checkpoint, so a resumed run follows it. On a coarse CT
            that leaves time for many RecM epochs, on a fine one for few. A plan, not a hard
            stop (an estimate may be off by some seconds). The card's ``time_budget``
            records the budget, the plan and the run's seconds (a resumed run's: since it
            resumed). One process only (not under torchrun). None: the epochs exactly.
        batch: samples per step. lr: Adam learning rate (halved every ``lr_halve_epochs``).
        lr_template: learning rate of RecM's per-anchor template (a shape prior that must
            move by several units; at ``lr`` it barely moves in a CPU-sized run, and raising
            ``lr`` for the whole network instead collapsed every density to zero).
        lambda_ssim / lambda_tv: Eq. 2's weights (0.2, 0.05).
        lambda_volume: weight of the volume loss against the ground-truth vertebra volume
            (not in the paper's Eq. 2; available because the data are simulated).
        lambda_centroid: weight of the distance (in 10 mm) between the mass centroids of the
            reconstruction and of the ground-truth volume in Eq. 2 (ours, not the paper's;
            0: off): a direct reward for drawing the vertebra where it is in the cube, which
            the volume and projection terms give little of while the reconstruction is blurry
            (the model card's "Where the network's error comes from").
        lambda_locate: with a locator (``model.locate``), weight of its error (the distance
            between its shift and the vertebra's true offset from the cube centre, in 10 mm)
            in the RecM and joint phases' loss (ours).
        lambda_geo: weight of the pose loss in Eq. 3 (the paper's 0.02). Its pose term
            is the geodesic rotation error (rad) plus the translation error of the
            vertebra's centre / 10 mm.
        lambda_flow: with the flow RegM, weight of its displacement error (mean over the
            voxels where the CT shows tissue, in 10 mm) in Eq. 3.
        threads: torch CPU threads. device: "cpu" or "cuda". seed: everything is seeded.
        data_cache: folder for generated samples (default ``out/data``); reused if the
            data settings match (the file name carries them), by this run or another
            (``radgsreg train --data-cache``); a started run resumes only with its own.
    """

    stage: int = 1
    out: str = "runs/stage1"
    init: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    new_regm: str | None = None
    add_locator: bool = False
    fine_tune: bool = False
    model_changes: dict | None = None
    phantoms: int = 24
    phantom_spacing_mm: float = 2.0
    phantom_ribs: bool = False
    phantom_sacrum: bool = False
    phantom_size: list[float] | None = None
    phantom_bone_density: list[float] | None = None
    ct_dirs: list[str] = field(default_factory=list)
    ct_spacing_mm: float | None = None
    case_dirs: list[str] = field(default_factory=list)
    levels: list[str] = field(default_factory=lambda: ["L1", "L2", "L3", "L4", "L5"])
    samples_per_ct: int = 10
    val_samples: int = 16
    pose_rot_deg: float = 20.0
    pose_trans_mm: float = 50.0
    input_rot_deg: float = 10.0
    input_trans_mm: float = 10.0
    realism: str = "none"
    metal_share: float = 0.3
    data_shards: int = 1
    data_workers: int = 1
    rec_epochs: int = 6
    reg_epochs: int = 6
    joint_epochs: int = 3
    time_budget_s: float | None = None
    batch: int = 4
    lr: float = 5e-4
    lr_template: float = 0.03
    lr_halve_epochs: int = 4
    lambda_ssim: float = 0.2
    lambda_tv: float = 0.05
    lambda_volume: float = 10.0
    lambda_centroid: float = 0.0
    lambda_locate: float = 1.0
    lambda_geo: float = 0.02
    lambda_flow: float = 1.0
    threads: int = 1
    device: str = "cpu"
    seed: int = 0
    data_cache: str | None = None

    def __post_init__(self):
        check(self)                    # types (and ``model`` given as a dict)
        if self.stage not in STAGES:
            raise ConfigError(f"must be 1, 2 or 3, not {self.stage!r}", field="stage")
        if not self.out:
            raise ConfigError("must name the run folder", field="out")
        at_least(self, ("phantoms", "val_samples", "rec_epochs", "reg_epochs", "joint_epochs", "seed"), 0,
                  "an integer >= 0")
        at_least(self, ("samples_per_ct", "batch", "lr_halve_epochs", "threads", "data_shards", "data_workers"), 1,
                 "an integer >= 1")
        at_least(self, ("pose_rot_deg", "pose_trans_mm", "input_rot_deg", "input_trans_mm", "lr_template",
                         "lambda_ssim", "lambda_tv", "lambda_volume", "lambda_centroid", "lambda_locate", "lambda_geo",
                         "lambda_flow"), 0,
                 ">= 0")
        for name in ("phantom_spacing_mm", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, not {getattr(self, name)}", field=name)
        for name in ("phantom_size", "phantom_bone_density"):
            r = getattr(self, name)
            if r is None:
                continue
            from ..phantom import MAX_FACTOR

            ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= MAX_FACTOR
                for v in r)
            if not ok or r[0] > r[1]:
                raise ConfigError(f"must be [low, high], two factors > 0 and <= {MAX_FACTOR:g} with low <= high "
                                  f"(or null), not {r!r}", field=name)
            setattr(self, name, [float(v) for v in r])
        if self.realism not in REALISM:
            raise ConfigError(f"must be one of {', '.join(REALISM)}, not {self.realism!r}", field="realism")
        if not 0 <= self.metal_share <= 1:
            raise ConfigError(f"must be between 0 and 1, not {self.metal_share}", field="metal_share")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ConfigError(f"must be one of {', '.join(DEVICES)} (or cuda:N), not {self.device!r}", field="device")
        if not self.levels:
            raise ConfigError("must name at least one vertebra level (e.g. [\"L1\", \"L3\"])", field="levels")
        from ..levels import level_id

        for i, lv in enumerate(self.levels):
            if not lv.strip().isdigit():
                try:
                    level_id(lv)
                except ValueError:
                    raise ConfigError(f"must be a vertebra level like L3, T12, C7, S1 (or a label value), not {lv!r}",
                                      field=f"levels[{i}]") from None
        if self.ct_spacing_mm is not None and self.ct_spacing_mm <= 0:
            raise ConfigError(f"must be a positive voxel size in mm (or null), not {self.ct_spacing_mm}",
                              field="ct_spacing_mm")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ConfigError(f"must be a positive number of seconds (or null), not {self.time_budget_s}",
                              field="time_budget_s")
        if self.time_budget_s is not None and self.rec_epochs == 0:
            raise ConfigError("is planned after the first RecM epoch, and rec_epochs is 0: drop the budget or "
                              "give rec_epochs (the most RecM epochs)", field="time_budget_s")
        if self.rec_epochs + self.reg_epochs + self.joint_epochs < 1:
            raise ConfigError("rec_epochs, reg_epochs and joint_epochs are all 0: nothing to train")
        if self.rec_epochs == 0 and self.joint_epochs == 0 and not self.init:
            raise ConfigError("rec_epochs and joint_epochs are 0 without init: RegM would learn on an untrained "
                              "RecM's reconstructions; give init (the weights to continue from)", field="init")
        if self.fine_tune and not self.init:
            raise ConfigError("this config fine-tunes trained weights (fine_tune is true): give init (the "
                              "weights it continues, e.g. --init PT)", field="init")
        if self.stage == 1 and self.phantoms < 1 and not self.ct_dirs:
            raise ConfigError("stage 1 trains on phantoms and CTs: give phantoms >= 1 or ct_dirs")
        if self.stage == 2 and not self.case_dirs:
            raise ConfigError("stage 2 trains on real X-ray cases: give case_dirs (folders with ground_truth)")
        if self.stage == 3 and not self.ct_dirs:
            raise ConfigError("stage 3 is patient-specific: give the patient's CT in ct_dirs")
        if self.new_regm is not None:
            from ..learned.config import REGM_KINDS

            if self.new_regm not in REGM_KINDS:
                raise ConfigError(f"must be one of {', '.join(REGM_KINDS)} (or absent: keep init's RegM), "
                                  f"not {self.new_regm!r}", field="new_regm")
            if not self.init:
                raise ConfigError("a new RegM needs init (the weights whose RecM it keeps); without init, "
                                  "set model.regm", field="new_regm")
        if self.add_locator and not self.init:
            raise ConfigError("adds a locator to init's network; without init, set model.locate", field="add_locator")
        if self.model_changes is not None:
            if not self.init:
                raise ConfigError("changes init's model settings; without init, set them in model",
                                  field="model_changes")
            for k, v in self.model_changes.items():
                if k not in MODEL_CHANGES:
                    raise ConfigError(f"cannot change {k!r} (it would change the weights' shapes or meaning); "
                                      f"changeable: {', '.join(MODEL_CHANGES)}", field="model_changes")
                try:
                    ModelConfig(**{k: v})
                except ConfigError as e:
                    raise ConfigError(e.problem, field=f"model_changes.{k}") from None
        if self.stage in (2, 3) and not self.init:
            raise ConfigError(f"stage {self.stage} fine-tunes earlier weights: give init (e.g. the shipped stage-1 model)")

    def init_path(self) -> Path | None:
        """The weight file ``init`` names ("default": the shipped stage-1 weights), or None."""
        if not self.init:
            return None
        if self.init == "default":
            from ..resources import resource_path

            return resource_path("Models/radgsreg_stage1.pt")
        return Path(self.init)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str | None = None) -> "TrainConfig":
        """From a JSON object (``model`` nested); errors name ``source`` (a file) and the field."""
        return build(cls, d, source=source, unknown="unknown train config key")


def load_train_config(path, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a JSON file, then ``overrides`` (keys of the dataclass;
    None values are ignored: the command line's options).

    Raises:
        ConfigError: the file is missing or not JSON, or a value cannot be used; the message
            names the file (or the override) and the field path.
    """
    path = Path(path)
    data = read_json(path)
    over = {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainConfig.from_dict({**data, **over}, source=str(path))
    except ConfigError as e:
        key = (e.field or "").split(".")[0].split("[")[0]
        if key in over and key not in data or (key in over and data.get(key) != over[key]):
            raise ConfigError(e.problem, field=e.field, source=f"{key}={over[key]!r} (given over {path})") from None
        raise
