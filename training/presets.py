"""Training presets: frozen dataclass instances, one per named recipe.

    from splitdet.training.presets import PRESETS
    config = PRESETS["cpu"]                      # or "paper", "tiny"
    config = dataclasses.replace(config, epochs=5)

`paper` is the paper's recipe (Table 2). `cpu` is the recipe that learns from scratch on a
2-core CPU within 30 minutes (see `cpu`'s comments for what was measured). `tiny` is for tests.

Only `paper` (BatchNorm, ResNet50) can start from `--init imagenet` or `--init coco`; the others
use GroupNorm, which those weights carry no statistics for, and train from scratch. Each preset
reads images at its model's input size (min_size / max_size): `cpu` at 512 / 640, so a 2448x2048
image is read at 612x512 (x0.25) and a 2 px scratch is 0.5 px there; `train` logs the scale, and
it and `data check` warn when many boxes are under 2 px at it. A run ends at whichever comes
first, its `minutes` or its `epochs`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from splitdet.shared.config import ModelConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("step", "cosine", "none")
PRECISIONS = ("fp32", "bf16", "auto")
#: The key under which last.pt and train_config.json record, beside the recipe, the run's
#: number of processes (DDP ranks: a step takes batch_size times as many images), which is not
#: the recipe's (`--nproc-per-node`). Runs of an older splitdet lack it.
PROCESSES_KEY = "processes"
#: Largest --seed: torch seeds are 64-bit, and DistributedSampler adds the epoch to it.
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (data and output folders aside)."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    # optimiser
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4  # not applied to norm weights and biases
    clip_grad_norm: float | None = None  # max total gradient norm; None: no clipping
    # schedule
    scheduler: str = "step"  # step: StepLR per epoch | cosine: per iteration | none
    step_size: int = 3  # StepLR: epochs per step
    gamma: float = 0.33  # StepLR: factor per step
    warmup_iters: int = 0  # linear warm-up from lr/10 (cosine only)
    # data
    batch_size: int = 4  # images per step and process
    epochs: int = 200
    minutes: float | None = (
        None  # training-time budget (evaluation excluded); cosine anneals over it
    )
    crop: int | None = None  # square training crops, px at the model's input scale; None: whole
    crop_object_fraction: float = 0.6  # crops of defective images centred on an object
    # The last share of the run (of the time budget if there is one, else of the epochs) trains
    # on whole images instead of crops, `whole_image_batch_size` per step: GroupNorm normalises
    # each image over what it shows, and a crop shows other statistics than the whole image
    # inference sees. 0: crops to the end. Needs `crop`.
    whole_image_fraction: float = 0.0
    whole_image_batch_size: int = 2
    flips: bool = True  # random horizontal and vertical flips
    workers: int = 0  # DataLoader worker processes
    # fp32 | bf16 (autocast: convolutions and matrix products in bfloat16, weights, optimiser
    # and losses in fp32) | auto (bf16 where the processor computes it natively, else fp32).
    # Training only: evaluation, export and inference always run in fp32.
    precision: str = "fp32"
    seed: int = 0
    # losses and sampling (training-time only: not part of the model)
    defect_loss_weight: float = 1.0  # weight of loss_defect in the summed loss
    detach_gate: bool = False  # the defect loss trains the head only, not backbone and FPN
    rpn_pre_nms_top_n_train: int = 2000  # proposals per level before NMS, torchvision default
    rpn_post_nms_top_n_train: int = 2000  # torchvision default
    box_batch_size_per_image: int = 512  # ROI samples per image, torchvision default
    # anchors and proposals are matched to ground truth on boxes widened to at least this many
    # px each way (0: plain IoU); regression targets stay the true boxes
    match_min_side: float = 0.0
    # evaluation during training
    eval_every: int = 1  # epochs between validation passes (0: never)
    eval_images: int | None = None  # validation images per pass (None: all, evenly spaced subset)
    best_metric: str = "map50"  # metric that selects best.pt; ties: mAP@[.5:.95] (BestEpoch)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be 0-{MAX_SEED}, got {self.seed}")
        # nan and inf pass a plain `> 0`: nan trains on nan weights, inf on none
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        # a negative budget ended the run before its first step, nan never ended it, and inf
        # failed after the first epoch
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes >= 0):
            raise ValueError(f"minutes must be a number >= 0, got {self.minutes}")
        if self.crop is not None and (self.crop <= 0 or self.crop % 32):
            raise ValueError(f"crop must be a positive multiple of 32, got {self.crop}")
        if self.crop is not None and self.crop > self.model.max_size:
            # the crop is at the model's input scale: past its longest side it is black padding
            raise ValueError(
                f"crop {self.crop} is larger than the model's input (max_size "
                f"{self.model.max_size} px); give a smaller crop, or 0 for whole images"
            )
        if len(set(self.model.class_names)) < len(self.model.class_names):
            twice = sorted(
                {n for n in self.model.class_names if self.model.class_names.count(n) > 1}
            )
            raise ValueError(f"class names must differ: {', '.join(map(repr, twice))} twice")
        if not 0.0 <= self.whole_image_fraction < 1.0:
            raise ValueError(
                f"whole_image_fraction must be in [0, 1), got {self.whole_image_fraction}"
            )
        if self.whole_image_fraction and self.crop is None:
            raise ValueError("whole_image_fraction needs crops: without them every step is whole")
        if self.whole_image_batch_size < 1:
            raise ValueError("whole_image_batch_size must be >= 1")
        if not 0.0 <= self.crop_object_fraction <= 1.0:
            raise ValueError(
                f"crop_object_fraction must be in [0, 1], got {self.crop_object_fraction}"
            )

    @property
    def budget_seconds(self) -> float | None:
        """The training-time budget in seconds; None when `minutes` is None or 0 (no budget:
        the run is fixed by `epochs`)."""
        return self.minutes * 60.0 if self.minutes else None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-able dict (the model's configuration as its own dict)."""
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The recipe `to_dict` made; ValueError for keys it does not know."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown train config keys: {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("model"), dict):
            data["model"] = ModelConfig.from_dict(data["model"])
        return cls(**data)


#: The paper (Table 2): ResNet50-FPN, SGD lr 0.01, StepLR(3, 0.33), batch 4, 200 epochs,
#: input 2448x2048; momentum 0.9 and weight decay 1e-4, which it does not state, are
#: torchvision's reference recipe's. min_size=2048 / max_size=2448 keep the camera's native
#: resolution: torchvision's default (800/1333) would shrink a 2448x2048 image 2.6x and a
#: 1-6 px scratch to sub-pixel width; the paper states its input size as 2448x2048.
PAPER = TrainConfig(
    name="paper",
    model=ModelConfig(depth=50, min_size=2048, max_size=2448),
    optimizer="sgd",
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    scheduler="step",
    step_size=3,
    gamma=0.33,
    batch_size=4,
    epochs=200,
    workers=2,
)

#: From scratch on 2 CPU cores in 30 minutes, on 612x512 images (a quarter of 2448x2048).
#: ResNet18-FPN with GroupNorm (batch statistics of 8 crops are noise), zero-init residuals,
#: a 512-wide box head, small thin anchors (scratches are ~1 px wide and 7-350 px long at this
#: scale), native-scale 256 px crops centred on scratches 60% of the time, AdamW with warm-up and
#: a cosine annealed over the time budget. The gate is the dense head on P3 ("1"): trained on
#: image labels alone the pooled heads stayed at the class prior.
#: Per-step cost, profiled (1 thread): convolutions ~60%, ROI-align backward 12%, RPN NMS 7%.
#: Hence 64 FPN channels (the FPN + RPN head convs cost more than the ResNet18 body at 128),
#: 500 proposals per level before/after NMS and 64 ROI samples per image: 1.75x faster steps
#: than 128 channels / 1000 / 128 measured side by side. The gate's loss trains its head only
#: (`detach_gate`): with it flowing into the backbone, detection and gate were still at chance
#: after 810 steps on generator-v2 data; detached, both left chance within 670 steps.
#: AdamW (lr 1e-3, weight decay 0.05) in place of SGD (lr 0.02): validation mAP@.5 after 30
#: minutes 0.356 against 0.095, same data and seed. bf16 autocast ("auto": where the CPU has
#: native bf16) makes a step 1.6x faster (0.64 against 1.05 s) for the same curve per step.
#: The measured curves are in training/RESULTS.md. On a machine with 0.40 s steps
#: (earlier ones: 0.64 s) the same preset reached validation mAP@.5 0.667 (gate AUC 0.97) in 30
#: minutes; held-out test mAP@.5 0.601, gate recall 98.1% at accuracy 78.4%, mAP kept 100%.
#: On generator-v3 data (no dot-like scratches): val mAP@.5 0.738 in 30 minutes, held-out test
#: 0.668, gate recall 99.1% at accuracy 77.0%, mAP kept 99.9%.
#: The box head pools a window 1.5x each box (`box_roi_context`: whether a thin stroke goes on
#: past the box shows only around it), and kept boxes are voted over the candidates at IoU >= 0.6
#: (`box_vote_iou`, chosen on validation from 0.5 / 0.6 / 0.7). Same data and seed, 30 minutes:
#: val mAP@.5 0.741 (0.644 against 0.573 at 15 minutes), held-out test mAP@.5 0.683 against
#: 0.668, mAP 0.331 -> 0.338 with voting (0.310 before), loose boxes 170 against 219, gate AUC
#: 0.96 against 0.94 (recall 98.1% at accuracy 88.5%).
#: ROI-align samples each bin of the box head once, at its centre (`box_roi_sampling_ratio` 1,
#: torchvision's is 2): its backward pass took a fifth of a step (profiled). Steps 20% shorter,
#: measured interleaved (0.66 against 0.83 s). On a slower machine (0.77 s steps
#: against the 0.40 s above), same data and seed, 30 minutes: 41 epochs against 31, validation
#: mAP@.5 0.696 against 0.521, held-out test mAP@.5 0.613 against 0.427, mAP 0.285 against
#: 0.176, gate AUC 0.92 against 0.89; seed 1 there (36 epochs): test mAP@.5 0.580, AUC 0.92.
#: Crops of 192 px: steps 28% shorter, the same held-out mAP@.5 (0.613) in 30 minutes.
#: Voting weighs candidates on an IoU ramp (`box_vote_ramp` 0.2: from 0 at IoU 0.4 to full at
#: 0.8; chosen on validation from 0.1 / 0.2): int8 boxes within 1 px of fp32 98.6 -> 99.0% and
#: 99.0 -> 99.5% on the seed-0 / seed-1 30-minute models, test mAP within a few thousandths.
#: On a 740-image held-out split (seed 4): mAP@.5 0.680 / 0.619 / 0.667 for seeds 0 / 1 / 2 (seed
#: 2 trained with the ramp, 40 epochs), gate recall 99% at accuracy 79-83%.
#: At inference the box head regresses its own boxes twice more (`box_refine_steps` 2, scores
#: averaged over the three passes; chosen on validation from 1 / 2 / 3: mAP@.5 0.723 / 0.724 /
#: 0.715 and 0.676 / 0.684 / 0.682 for seeds 0 / 1, against 0.697 and 0.657 in one pass). The
#: same models on the 740 images: mAP@.5 0.680 / 0.619 / 0.667 -> 0.705 / 0.660 / 0.696, mAP
#: +0.02-0.03. It costs the cloud 0.08 s per defective image (ROI heads 0.05 -> 0.13 s, 612x512,
#: 2 cores).
#: Matching anchors and proposals on boxes widened to at least 8 px each way (`match_min_side`
#: 8; with plain IoU a box 8 px thick around a 2 px thick scratch is background) was measured
#: and not adopted: 740 held-out images, mAP@.5 0.660 -> 0.694 (seed 1), 0.696 -> 0.699 (seed 2),
#: mAP 0.308 -> 0.315 and 0.333 -> 0.320. Within the spread between seeds.
CPU = TrainConfig(
    name="cpu",
    model=ModelConfig(
        depth=18,
        fpn_channels=64,
        norm="group",
        zero_init_residual=True,
        gate_level="1",
        gate_pooling="dense",
        anchor_sizes=(16, 32, 64, 128, 256),
        anchor_ratios=(0.2, 0.5, 1.0, 2.0, 5.0),
        box_head_dim=512,
        box_roi_context=1.5,
        box_roi_sampling_ratio=1,
        box_vote_iou=0.6,
        box_vote_ramp=0.2,
        box_refine_steps=2,
        min_size=512,
        max_size=640,
    ),
    optimizer="adamw",
    lr=1e-3,
    weight_decay=0.05,
    clip_grad_norm=10.0,
    scheduler="cosine",
    warmup_iters=100,
    batch_size=8,
    epochs=1000,
    minutes=30.0,
    crop=256,
    crop_object_fraction=0.6,
    precision="auto",
    detach_gate=True,
    rpn_pre_nms_top_n_train=500,
    rpn_post_nms_top_n_train=500,
    box_batch_size_per_image=64,
    eval_every=3,
    eval_images=60,
)

#: Seconds-long runs for tests: tiny ResNet18-FPN on small images.
TINY = replace(
    CPU,
    name="tiny",
    model=replace(CPU.model, box_head_dim=128, min_size=128, max_size=160),
    optimizer="sgd",  # tests tune their lr for SGD and check its momentum state on resume
    lr=0.01,
    weight_decay=1e-4,
    precision="fp32",  # exact, and the same on every machine
    warmup_iters=2,
    batch_size=2,
    epochs=2,
    minutes=None,
    crop=96,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=200,
    box_batch_size_per_image=64,
    eval_every=1,
    eval_images=None,
)

#: The benchmark's ResNet50-FPN, trained with the `cpu` recipe on 2448x2048 images. The
#: architecture is the paper's where the benchmark's costs come from: ResNet50, 256 FPN
#: channels and the 1024-wide box head, so the lazy FPN and the skipped heads weigh what they
#: weigh in the paper's model; GroupNorm, zero-init residuals, thin anchors and the dense gate
#: on P3 are the `cpu` recipe's (what learns from scratch on a CPU).
#: Input at half the camera's scale (2448x2048 -> 1224x1024): the generator's 1-6 px scratches
#: stay 0.5-3 px wide. At torchvision's default 956x800 (0.4-2.3 px) a run was still at chance
#: after 20 training minutes (validation mAP@.5 0.001, gate AUC 0.43 after 440 steps); at the full
#: 2448x2048 the monolithic detector takes ~8 s per image here, too slow to benchmark.
#: A step costs ~2.9 s in bf16 (4.5x the ResNet18's); validation every 10 epochs on 30
#: images (a pass costs ~2 minutes at this scale). Measured at this scale, 2 cores: validation
#: mAP@.5 / gate AUC 0.001 / 0.50, 0.007 / 0.56, 0.007 / 0.61 and 0.041 / 0.61 after 26, 53,
#: 80 and 114 training minutes (2340 steps); the gate's loss falls (1.7 -> 0.8), detection's
#: barely moves: not yet a useful detector. Resumed to a 145-minute budget (the cosine restarts
#: at 1e-4): 0.057 / 0.69 after 119, 0.071 / 0.84 after 145 minutes; held-out test mAP@.5 0.027,
#: gate AUC 0.72. It needs many hours here, or a GPU.
#: (Measured before the `cpu` recipe gained box-head context, box voting and one ROI-align
#: sample per bin, which it inherits; not its box refinement.)
CPU_R50 = replace(
    CPU,
    name="cpu-r50",
    model=replace(
        CPU.model,
        depth=50,
        fpn_channels=256,
        box_head_dim=1024,
        min_size=1024,
        max_size=1224,
        # a pass of the 1024-wide head over 1000 proposals costs 0.3-0.45 s here; what more
        # passes buy this model is not measured
        box_refine_steps=0,
    ),
    minutes=120.0,
    eval_every=10,
    eval_images=30,
)

PRESETS: dict[str, TrainConfig] = {
    "paper": PAPER,
    "cpu": CPU,
    "cpu-r50": CPU_R50,
    "tiny": TINY,
}
