"""``mocha-edge train``: the coarse base detector, the MOCHA-distilled student, and its plain baseline.

One loop serves all three (``stage="base"``; ``stage="distill"`` with ``distill=True`` or ``False``) so the
baseline differs from the distilled student only by the teacher terms: same data order, augmentations and
seeds (every epoch reseeds from ``(seed, epoch)``), same student optimiser steps at the same epochs and
learning rates. Built from ultralytics parts: dataset + augmentations, detection loss, EMA, validator.

Published schedule (default): the translator trains every epoch; the student joins every
``student_every``-th epoch with ``L_det``. ``schedule="joint"``: the student trains every epoch.

Under torchrun (:mod:`mocha_edge.distributed`; ``mocha-edge train --nproc N``) each rank trains on its
contiguous part of every global batch of the one-process loader (:func:`rank_batches`); DDP averages the
gradients of losses renormalised to the global batch (:meth:`Trainer._global_batch_loss`), so the steps are
one process's up to float summation order (BatchNorm aside: per rank unless ``sync_bn``); rank 0 alone
keeps the EMA, validates and writes the run folder.

Recipes (:data:`RECIPES`): named sets of defaults. ``paper`` is the public MOCHA code's distillation recipe,
``edge`` this toolkit's (translator-stripped deployment). Every :class:`TrainConfig` field a recipe covers
is ``None`` until resolved from the recipe; a value passed explicitly overrides it.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocha_edge.distributed import DistEnv
from mocha_edge.errors import MochaError
from mocha_edge.models.pooling import POOLING
from mocha_edge.utils import atomic_path, keep_torch_threads, write_json_atomic

CKPT_FORMAT = "mocha-edge-student/1"


class TrainError(MochaError):
    """Training cannot start or had to stop (diverged, out of memory, incompatible inputs)."""


@dataclass(frozen=True)
class Recipe:
    """A named, documented set of training defaults (README: "Recipes" table)."""

    name: str
    doc: str
    epochs: int
    schedule: (
        str  # published: translator every epoch, student every student_every-th; joint: both every epoch
    )
    student_every: int  # the student trains every N-th epoch (published schedule)
    lr_student: float  # distill stage (the base stage defaults to 1e-3 in both recipes)
    lr_translator: float
    optimizer: str  # adam: torch Adam, weight decay added to the gradient (coupled L2); adamw: decoupled
    betas: tuple[float, float]
    weight_decay: float  # translator
    weight_decay_student: float  # student backbone + neck
    weight_decay_head: float  # student Detect head
    warmup_epochs: float | None  # shared linear warm-up, in epochs of iterations ...
    warmup_iters: int | None  # ... or in iterations (exactly one of the two is set)
    lrf: float  # the per-iteration cosine ends at lrf * lr
    augment: bool  # ultralytics' augmentation while distilling (False: letterboxed images only)
    loss_per_image: bool  # backpropagate the per-image loss (else ultralytics' per-batch sum, x batch)
    grad_clip: float  # max gradient norm; 0: none
    ema: bool  # the saved student is an EMA of its weights (else the weights themselves)
    tau: float  # L_emb temperature
    emb_on: str  # student | translated
    # distil targets whitened per PCA component (a whitened cache required) or the PCA projection itself (a
    # whitened cache's targets multiplied back by its divisors)
    whitened_targets: bool


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper",
        doc="The public MOCHA code's distillation settings (SamsungLabs/MOCHA distillation.py).",
        epochs=20,
        schedule="published",
        student_every=4,
        lr_student=1e-4,
        lr_translator=1e-3,
        optimizer="adam",
        betas=(0.937, 0.999),
        weight_decay=1e-4,
        weight_decay_student=1e-5,
        weight_decay_head=0.0,
        warmup_epochs=None,
        warmup_iters=1000,
        lrf=0.0,
        augment=False,
        loss_per_image=True,
        grad_clip=0.0,
        ema=False,
        tau=1.0,
        emb_on="translated",
        whitened_targets=True,
    ),
    "edge": Recipe(
        name="edge",
        doc="mocha-edge's recipe for the translator-stripped student it deploys, chosen by the README's "
        "ablations: student and translator every epoch at lr 1e-3 for 5 epochs, unwhitened targets, "
        "letterboxed images without augmentation.",
        epochs=5,
        schedule="joint",
        student_every=4,
        lr_student=1e-3,
        lr_translator=1e-3,
        optimizer="adamw",
        betas=(0.9, 0.999),
        weight_decay=5e-4,
        weight_decay_student=5e-4,
        weight_decay_head=5e-4,
        warmup_epochs=1.0,
        warmup_iters=None,
        lrf=0.01,
        augment=False,
        loss_per_image=False,
        grad_clip=10.0,
        ema=True,
        tau=0.01,
        emb_on="student",
        whitened_targets=False,
    ),
}
DEFAULT_RECIPE = "edge"
# --stage base (the coarse detector, no teacher): ultralytics-like training whatever the recipe's distillation
# settings (20 epochs, student lr 1e-3, its default augmentation); other options come from the edge recipe
BASE_STAGE: dict[str, Any] = {"epochs": 20, "lr_student": 1e-3, "augment": True}
_RECIPE_FIELDS = [f for f in Recipe.__dataclass_fields__ if f not in ("name", "doc")]


def default_workers(device: str) -> int:
    """Data-loading processes when none are asked for: none on a CPU with at most 4 cores, where torch's
    threads already use every core and loader processes only take turns with them (a base epoch on the 2-core
    machine: 28-35 s with none, 34-42 s with two), else ``min(8, cores // 2)``."""
    import os

    cores = os.cpu_count() or 1
    if str(device).startswith("cpu") and cores <= 4:
        return 0
    return min(8, max(1, cores // 2))


@dataclass
class TrainConfig:
    """Everything that determines a training run; stored (resolved) in every checkpoint.

    Fields left at ``None`` take the value of ``recipe`` (:data:`RECIPES`); explicit values override it.
    """

    data: str
    out: str
    model: str = "yolov8n.yaml"
    stage: str = "distill"  # base | distill
    distill: bool = True  # False: the baseline (same run without the teacher terms)
    teacher_cache: str | None = None
    recipe: str = DEFAULT_RECIPE  # paper | edge
    epochs: int | None = None
    imgsz: int = 640
    batch: int = 16
    workers: int | None = None  # None: default_workers(device)
    device: str = "cpu"
    seed: int = 0
    schedule: str | None = None  # published | joint
    student_every: int | None = None
    lr_student: float | None = None  # default: BASE_STAGE's for stage base, the recipe's for distill
    lr_translator: float | None = None
    optimizer: str | None = None
    betas: tuple[float, float] | None = None
    weight_decay: float | None = None
    weight_decay_student: float | None = None
    weight_decay_head: float | None = None
    warmup_epochs: float | None = None
    warmup_iters: int | None = None
    lrf: float | None = None  # final lr fraction of the cosine
    # shared: one warm-up over the run's first iterations; per-group: each group warms over its own first
    # trained iterations (mocha-edge before the recipes; kept for the README's ablation)
    warmup_mode: str = "shared"
    augment: bool | None = None
    loss_per_image: bool | None = None
    grad_clip: float | None = None
    ema: bool | None = None
    lambda_dist: float = 1.0
    lambda_emb: float = 1.0
    # edge: L_emb on the student's own vectors (the space that is deployed once the translator is stripped)
    # at a temperature matched to distances/dim of unit-RMS targets (~0.02-0.09): at τ = 1 every row's
    # softmax is flat and the loss carries no signal. Measured in the README (ablation).
    tau: float | None = None
    emb_on: str | None = None  # student | translated: which vectors L_emb compares with the teacher's
    whitened_targets: bool | None = None
    focus_weighting: bool = False
    close_mosaic: int = 0
    hyp: dict[str, Any] = field(
        default_factory=dict
    )  # ultralytics augmentation overrides (mosaic=..., fliplr=...)
    val_every: int = 1  # validate every N epochs (and after the last); 0 = never

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise TrainError(f"recipe must be one of {', '.join(RECIPES)}, not {self.recipe!r}")
        if self.stage not in ("base", "distill"):
            raise TrainError(f"stage must be 'base' or 'distill', not {self.stage!r}")
        if self.stage == "base" and self.recipe == "paper":
            raise TrainError(
                "the paper recipe is the public code's distillation recipe (its base detector was trained "
                "with ultralytics); train the base stage with --recipe edge"
            )
        rec = RECIPES[self.recipe]
        if self.warmup_epochs is not None or self.warmup_iters is not None:  # one given: the other is off
            if self.warmup_epochs is not None and self.warmup_iters is not None:
                raise TrainError("give the warm-up in epochs or in iterations, not both")
        else:
            self.warmup_epochs, self.warmup_iters = rec.warmup_epochs, rec.warmup_iters
        if self.stage == "base":  # a plain detector: its own defaults, whatever the recipe distils with
            for name, value in BASE_STAGE.items():
                if getattr(self, name) is None:
                    setattr(self, name, value)
        for name in _RECIPE_FIELDS:
            if getattr(self, name) is None and name not in ("warmup_epochs", "warmup_iters"):
                setattr(self, name, getattr(rec, name))
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.workers is None:
            self.workers = default_workers(self.device)
        if self.workers < 0:
            raise TrainError(f"workers must be >= 0, not {self.workers}")
        if self.schedule not in ("published", "joint"):
            raise TrainError(f"schedule must be 'published' or 'joint', not {self.schedule!r}")
        if self.emb_on not in ("translated", "student"):
            raise TrainError(f"emb_on must be 'translated' or 'student', not {self.emb_on!r}")
        if self.warmup_mode not in ("shared", "per-group"):
            raise TrainError(f"warmup_mode must be 'shared' or 'per-group', not {self.warmup_mode!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise TrainError(f"optimizer must be 'adam' or 'adamw', not {self.optimizer!r}")
        if self.epochs < 1 or self.batch < 1 or self.student_every < 1:
            raise TrainError("epochs, batch and student_every must be >= 1")
        if (self.warmup_iters or 0) < 0 or (self.warmup_epochs or 0) < 0 or not 0 <= self.lrf <= 1:
            raise TrainError("warm-up must be >= 0 and lrf in [0, 1]")

    @property
    def uses_teacher(self) -> bool:
        return self.stage == "distill" and self.distill

    def student_trains(self, epoch: int) -> bool:
        """Whether the student's weights update in ``epoch`` (0-based)."""
        if self.stage == "base" or self.schedule == "joint":
            return True
        return epoch % self.student_every == self.student_every - 1

    def student_epochs(self) -> list[int]:
        return [e for e in range(self.epochs) if self.student_trains(e)]

    def warmup_steps(self, batches_per_epoch: int) -> int:
        """Length of the shared warm-up in optimiser iterations (0: none)."""
        if self.warmup_iters is not None:
            return int(self.warmup_iters)
        return round(float(self.warmup_epochs or 0.0) * batches_per_epoch)

    def settings(self) -> dict[str, Any]:
        """The recipe name and every setting a recipe covers, as resolved for this run."""
        return {"recipe": self.recipe, **{k: getattr(self, k) for k in _RECIPE_FIELDS}}


def lr_factor(it: int, total: int, warmup: int, lrf: float) -> float:
    """LR multiplier at global optimiser iteration ``it`` (0-based) of ``total``: a linear warm-up over the
    first ``warmup`` iterations, shared by every parameter group (``(it + 1) / warmup``), times a cosine
    from 1 at iteration 0 to ``lrf`` at ``total``. Iterations count every batch of every epoch, whichever
    groups train in it, so a student that first trains in epoch 4 starts where the schedule is by then."""
    warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
    progress = min(max(it / max(total, 1), 0.0), 1.0)
    return warm * (lrf + (1.0 - lrf) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cache_targets_whitened(cache: Any) -> bool:
    """Whether ``cache``'s targets are whitened per PCA component (``teach --whiten measured|paper-fit``;
    caches written before whitening existed read as ``"none"``)."""
    return getattr(cache, "whiten", "none") != "none"


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    student: Path
    history: list[dict[str, Any]]


# --------------------------------------------------------------------------------------------- helpers
def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _quiet(_: str) -> None:
    """The log of ranks other than 0 under torchrun (rank 0 logs for the run)."""


def single_process_batches(n: int, batch: int, generator: torch.Generator, shuffle: bool) -> list[list[int]]:
    """The dataset indices of every batch a one-process ``DataLoader(batch_size=batch, shuffle=shuffle,
    generator=generator)`` over ``n`` images yields (the same draws from ``generator``, no image loaded)."""
    order = torch.utils.data.DataLoader(
        range(n), batch_size=batch, shuffle=shuffle, generator=generator, collate_fn=list
    )
    return [list(b) for b in order]


def rank_batches(batches: list[list[int]], rank: int, world: int) -> tuple[list[list[int]], list[int]]:
    """Rank ``rank``'s part of every global batch, and the global batches' sizes.

    Each global batch is cut into ``world`` contiguous parts in order (sizes differ by at most one, so
    rank 0 holds the batch's first images): the ranks' parts, concatenated by rank, are the batch. A batch
    with fewer images than ranks (only the last can be) is left out on every rank.
    """
    mine, sizes = [], []
    for b in batches:
        if len(b) < world:
            continue
        q, extra = divmod(len(b), world)
        start = rank * q + min(rank, extra)
        mine.append(b[start : start + q + (rank < extra)])
        sizes.append(len(b))
    return mine, sizes


def _ultralytics_sees_one_process() -> None:
    """Make the loaded ultralytics modules see one process (``RANK = LOCAL_RANK = -1``, ``WORLD_SIZE = 1``).

    ultralytics reads torchrun's variables once, at import, into module globals, and then its validator
    joins collectives of its own DDP training (barriers, gathers of the metrics). Here the ranks are ours and
    rank 0 validates alone, so ultralytics must behave as in one process; modules imported later copy the
    values from ``ultralytics.utils``, set here first.
    """
    import sys

    import ultralytics.utils  # noqa: F401  (the others copy its values when imported)

    one = {"RANK": -1, "LOCAL_RANK": -1, "WORLD_SIZE": 1}
    for name, module in list(sys.modules.items()):
        if name == "ultralytics" or name.startswith("ultralytics."):
            for key, value in one.items():
                if isinstance(getattr(module, key, None), int):
                    setattr(module, key, value)


class _ScoreSum:
    """Stands in for the detection loss' assigner and keeps the sum of its target scores (the loss'
    normaliser) for :meth:`Trainer._global_batch_loss`; everything else is the assigner's."""

    def __init__(self, assigner: Any) -> None:
        self.assigner = assigner
        self.last: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.assigner(*args, **kwargs)
        self.last = out[2].detach().sum()  # (labels, boxes, scores, fg mask, gt index): as the loss sums them
        return out

    def __getattr__(self, name: str) -> Any:
        if name == "assigner":  # not set yet (copying)
            raise AttributeError(name)
        return getattr(self.assigner, name)

    def take(self) -> torch.Tensor:
        last, self.last = self.last, None
        if last is None:
            raise TrainError(
                "the detection loss did not run its assigner: this student's loss cannot be normalised "
                "over the ranks (torchrun supports ultralytics' v8 detection loss)"
            )
        return last


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state on the CPU in the default (contiguous) layout, whatever layout it trains in."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _head_preds(preds: Any) -> dict[str, Any]:
    """The raw head-output dict (training mode), for plain and end-to-end heads alike."""
    if isinstance(preds, tuple):
        preds = preds[1]
    return preds.get("one2many", preds)


def _param_groups(
    model: torch.nn.Module, lr: float, wd: float, head: torch.nn.Module | None = None, wd_head: float = 0.0
) -> list[dict[str, Any]]:
    """ultralytics' convention: weight decay on conv/linear weights only, not on norms or biases; the
    weights of ``head`` (the student's Detect module) get ``wd_head`` instead of ``wd``."""
    in_head = {id(p) for p in head.parameters()} if head is not None else set()
    decay, decay_head, no_decay = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(
                module, torch.nn.modules.batchnorm._NormBase | torch.nn.LayerNorm
            ):
                no_decay.append(p)
            elif id(p) in in_head:
                decay_head.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": wd, "initial_lr": lr},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "initial_lr": lr},
    ]
    if head is not None:
        groups.append({"params": decay_head, "lr": lr, "weight_decay": wd_head, "initial_lr": lr})
    return groups


def build_optimizer(
    cfg: TrainConfig, student: torch.nn.Module, translator: torch.nn.Module | None
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the student's groups (weights of backbone+neck / norms and biases / head
    weights) and the translator's (weights / norms and biases), each group named for the trainer.

    ``adam`` is torch's Adam, whose ``weight_decay`` adds ``wd * p`` to the gradient (coupled L2, as in
    the public MOCHA code); ``adamw`` decays the weights apart from the gradient (decoupled). The head's
    own group exists only when its decay differs (the groups of runs saved before it stay resumable)."""
    head = None
    if cfg.weight_decay_head != cfg.weight_decay_student and hasattr(student, "model"):
        head = student.model[-1]
    groups = _param_groups(student, cfg.lr_student, cfg.weight_decay_student, head, cfg.weight_decay_head)
    for g in groups:
        g["name"] = "student"
    if translator is not None:
        for g in _param_groups(translator, cfg.lr_translator, cfg.weight_decay):
            g["name"] = "translator"
            groups.append(g)
    opt = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return opt(groups, betas=cfg.betas)


def _memory_check(
    model: torch.nn.Module, cfg: TrainConfig, log: Callable[[str], None], batch: int | None = None
) -> None:
    """On CPU, estimate peak RAM from one small forward/backward and warn before an OOM kill can happen
    (``batch``: the images this process trains on at once; default ``cfg.batch``)."""
    if not cfg.device.startswith("cpu"):
        return
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    x = torch.zeros(2, 3, cfg.imgsz, cfg.imgsz)
    model.train()
    out = _head_preds(model(x))
    sum(f.float().mean() for f in out["feats"]).backward()
    model.zero_grad(set_to_none=True)
    per_image = max(proc.memory_info().rss - before, 0) / 2
    batch = cfg.batch if batch is None else batch
    need = before + per_image * batch * 1.5
    avail = psutil.virtual_memory().available + before
    if need > 0.8 * avail:
        log(
            f"warning: --batch {cfg.batch} at --imgsz {cfg.imgsz} needs about {need / 2**30:.1f} GiB of RAM, "
            f"{avail / 2**30:.1f} GiB available; lower --batch if the process gets killed"
        )


# --------------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run. ``run()`` trains (or resumes) and returns a :class:`TrainResult`.

    Under torchrun (``dist``, :func:`mocha_edge.distributed.init`) every rank runs the same trainer on its
    share of each global batch (:func:`rank_batches`), DDP averages the gradients, and rank 0 alone keeps the
    EMA, validates, logs and writes the run folder (the others wait for it in a step). ``sync_bn``: the
    student's BatchNorm layers normalise over the global batch (``SyncBatchNorm``, GPUs only).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        progress: bool = True,
        log: Callable[[str], None] = print,
        dist: DistEnv | None = None,
        sync_bn: bool = False,
    ) -> None:
        self.cfg = cfg
        self.dist = dist or DistEnv()
        self.progress = progress and self.dist.is_main
        self.log = log if self.dist.is_main else _quiet
        self.sync_bn = sync_bn
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "last.ckpt"
        self.student_path = self.out / "student.pt"
        self.vector_space: Any = None  # fitted when the run ends (fit_vector_space)

    # ----------------------------------------------------------------------------- set-up
    def _setup(self, resume_state: dict | None) -> None:
        from mocha_edge.data import load_dataset
        from mocha_edge.data.check import check_dataset
        from mocha_edge.models.pooling import head_channels
        from mocha_edge.models.translator import Translator
        from mocha_edge.student import build_student, set_loss_args, write_yolo_view

        cfg = self.cfg
        env = self.dist
        if env.distributed:
            _ultralytics_sees_one_process()
        if env.distributed and cfg.batch % env.world:
            raise TrainError(
                f"--batch {cfg.batch} is the global batch: it must divide by the {env.world} ranks "
                f"(e.g. --batch {max(cfg.batch // env.world, 1) * env.world})"
            )
        # under torchrun: this rank's device (cuda:LOCAL_RANK); else the configured one
        self.device_name = env.device if env.distributed else cfg.device
        if resume_state is not None:
            self.sync_bn = self.sync_bn or bool((resume_state.get("distributed") or {}).get("sync_bn"))
        if self.sync_bn and env.distributed and not self.device_name.startswith("cuda"):
            raise TrainError("--sync-bn needs GPUs (--device cuda): torch's SyncBatchNorm has no CPU kernel")
        self.device = torch.device(self.device_name)
        ds = load_dataset(cfg.data)
        self.ds_fingerprint = ds.fingerprint()
        report = check_dataset(ds)
        for p in ds.problems:
            if p.fatal:
                self.log(f"warning: {p} (skipped)")
        if not report.ok or not ds.items("train"):
            raise TrainError(f"{cfg.data}: no usable training image")
        self.ds = ds
        self.names = ds.names
        self.k = len(ds.names)

        # teacher cache -> a target row per training box
        self.cache = None
        self.pca = None
        if cfg.uses_teacher:
            from mocha_edge.cache import TeacherCache

            if not cfg.teacher_cache:
                raise TrainError(
                    "distillation needs --teacher-cache (from `mocha-edge teach`), or pass --no-distill"
                )
            self.cache = TeacherCache.load(cfg.teacher_cache)
            self.cache.check(dataset_fingerprint=self.ds_fingerprint)
            if cfg.whitened_targets and not cache_targets_whitened(self.cache):
                raise TrainError(
                    f"{cfg.teacher_cache}: recipe {cfg.recipe} distils targets whitened per PCA component, "
                    f"this cache's are not (whiten={getattr(self.cache, 'whiten', 'none')}); rebuild it with "
                    "`mocha-edge teach --whiten measured` (or paper-fit), or pass --no-whitened-targets"
                )
            if resume_state and resume_state.get("teacher"):
                want = resume_state["teacher"]
                self.cache.check(teacher_fingerprint=want["teacher_fingerprint"], d_t=int(want["d_t"]))
            if cfg.focus_weighting and "focus" not in self.cache.extras:
                raise TrainError(
                    f"{cfg.teacher_cache}: no focus map in this cache; build it with a LLaVA teacher and "
                    "`mocha-edge teach --focus`, or drop --focus-weighting"
                )
            # Targets are standardised to unit RMS per dimension (one scalar, fitted on the rows the PCA
            # was fitted on): PCA outputs of unit-norm teacher vectors are ~1/sqrt(d_t) per dimension, which
            # would leave MSE+L1 satisfied by predicting zeros. The scalar is stored in the checkpoint.
            tgt = self.cache.targets
            if not cfg.whitened_targets and cache_targets_whitened(self.cache):
                # the PCA projection itself: each component multiplied back by the divisor teach divided it
                # by, i.e. a `teach --whiten none` cache's targets (edge: measured better for the stripped
                # student, README "Recipes: what each setting is worth")
                tgt = tgt * np.asarray(self.cache.pca.scale, tgt.dtype)[None, :]
            cache_rows = self._cache_rows(ds.items("train"))
            fit_rows = [r for rows in cache_rows for r in rows.tolist() if r >= 0]
            rms = float(np.sqrt(np.mean(tgt[fit_rows] ** 2))) if fit_rows else 1.0
            self.target_scale = 1.0 / max(rms, 1e-12)
            self.targets = torch.from_numpy(tgt).float() * self.target_scale
            self.focus = torch.from_numpy(self.cache.extras["focus"]).float() if cfg.focus_weighting else None
        self.train_items = list(ds.items("train"))
        self.train_rows = (
            cache_rows
            if self.cache is not None
            else [np.full(len(it.boxes), -1, np.int64) for it in self.train_items]
        )
        self.val_items = ds.items("val")
        self._val_rows: list[np.ndarray] | None = None

        # student (+ translator)
        if resume_state is not None:
            from mocha_edge.student import detection_model

            model = detection_model(resume_state["student_yaml"], self.k, str(self.ckpt_path),
                                    state=resume_state["student"])  # fmt: skip
            model.names = dict(enumerate(self.names))
        else:
            model = self._initial_student(build_student)
        self.hyp = set_loss_args(model, {"imgsz": cfg.imgsz, **cfg.hyp})
        # channels-last convolutions: 11-13 % less time a training step for a YOLOv8n at 256 px on the 2-core
        # CPU (README: `train`); checkpoints are written in the default layout
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.strides = [float(s) for s in model.stride]
        self.channels = head_channels(model)
        self.dim = sum(self.channels)
        self.criterion = model.init_criterion()
        if env.distributed:
            if not hasattr(self.criterion, "assigner"):
                raise TrainError(
                    f"{type(self.criterion).__name__}: torchrun training supports ultralytics' v8 detection "
                    "loss (a student whose loss has a target assigner)"
                )
            self.criterion.assigner = _ScoreSum(self.criterion.assigner)
        self.translator = None
        if self.cache is not None:
            self.translator = Translator(self.dim, self.cache.d_t).to(self.device)
        from ultralytics.utils.torch_utils import ModelEMA

        # ema=False: decay 0, so the "EMA" is a copy of the weights after every student step
        self.ema = ModelEMA(self.model) if cfg.ema else ModelEMA(self.model, decay=0.0)
        self.optimizer = build_optimizer(cfg, self.model, self.translator)
        self.steps = {"student": 0, "translator": 0}
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0
        if resume_state is not None:
            self.ema.ema.load_state_dict(resume_state["ema"])
            self.ema.updates = resume_state["ema_updates"]
            if self.translator is not None:
                self.translator.load_state_dict(resume_state["translator"])
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.steps = dict(resume_state["steps"])
            self.history = list(resume_state["history"])
            self.start_epoch = int(resume_state["epoch"]) + 1
        # validation is rank 0's: the other ranks never read (or write) the YOLO view
        self.view_yaml = (
            write_yolo_view(ds, self.out / "yolo_view") if self.val_items and env.is_main else None
        )
        self.n_batches = math.ceil(len(self.train_items) / cfg.batch)
        self.warmup_steps = cfg.warmup_steps(self.n_batches)
        self.total_steps = cfg.epochs * self.n_batches
        self._student, self._translator = self.model, self.translator  # DDP-wrapped by _wrap under torchrun

    def _wrap(self) -> None:
        """Under torchrun: SyncBatchNorm in the student (``sync_bn``), then DDP around it and the translator.

        The EMA, the checkpoint and the optimiser keep the plain modules (the same parameters). Buffers are
        not broadcast at every forward: each epoch starts from rank 0's BatchNorm statistics instead. The
        translator may leave its input norm unused (a global batch with one object): it finds unused ones.
        """
        env = self.dist
        if not env.distributed:
            return
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.sync_bn:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        opts: dict[str, Any] = {"device_ids": [self.device.index] if self.device.type == "cuda" else None}
        # rank 0's buffers at construction, none at every forward (newer torch renames the option)
        no_sync = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
        opts["forward_sync_buffers" if no_sync else "broadcast_buffers"] = False
        with env.guard("wrapping the student and the translator in DistributedDataParallel"):
            self._student = DDP(self.model, **opts)
            if self.translator is not None:
                self._translator = DDP(self.translator, find_unused_parameters=True, **opts)

    def _cache_rows(self, items, strict: bool = True) -> list[np.ndarray]:
        """Cache row of every box of ``items`` (-1 for novel instances, which never contribute teacher
        knowledge). ``strict``: a box without a target is an error (training); else it gets -1 (val)."""
        out, missing = [], 0
        for it in items:
            rows = np.full(len(it.boxes), -1, np.int64)
            for j, box in enumerate(it.boxes):
                if int(it.instance[j]) in self.ds.novel_instances:
                    continue
                r = self.cache.index_of(it.content_hash, box)
                if r is None:
                    missing += 1
                else:
                    rows[j] = r
            out.append(rows)
        if missing and strict:
            raise TrainError(
                f"{self.cfg.teacher_cache}: no target for {missing} training boxes; rebuild it with `mocha-edge teach`"
            )
        return out

    def _initial_student(self, build_student):
        cfg = self.cfg
        spec = cfg.model
        if spec.endswith(".ckpt"):  # a previous mocha-edge run (e.g. the base stage)
            state = load_checkpoint(spec)
            if [state["names"][i] for i in range(len(state["names"]))] != self.names:
                raise TrainError(
                    f"{spec}: trained for classes {state['names']}, this dataset has {self.names}"
                )
            from mocha_edge.student import detection_model

            model = detection_model(state["student_yaml"], self.k, spec, state=state["ema"])
            model.names = dict(enumerate(self.names))
            return model
        if cfg.stage == "distill" and spec.endswith((".yaml", ".yml")):
            self.log(f"note: distilling into an untrained {spec}; usually --model is a trained base detector")
        return build_student(spec, self.names, log=self.log)

    # ----------------------------------------------------------------------------- data
    def _loader(self, epoch: int, items, rows, augment: bool, shuffle: bool, split: bool = False):
        """The epoch's loader; ``split`` (training under torchrun): this rank's part of every global batch
        (:func:`rank_batches`), with its own worker seeds; the global batch sizes go to ``self.batch_sizes``."""
        from ultralytics.data.build import seed_worker

        from mocha_edge.student import make_yolo_dataset

        dataset = make_yolo_dataset(
            items, rows, self.names, self.cfg.imgsz, self.hyp, augment=augment, batch=self.cfg.batch,
            stride=int(max(self.strides)),
        )  # fmt: skip
        if augment and self.cfg.close_mosaic and epoch >= self.cfg.epochs - self.cfg.close_mosaic:
            dataset.close_mosaic(hyp=self.hyp)
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        if split and self.dist.distributed:
            order = single_process_batches(len(dataset), self.cfg.batch, g, shuffle)
            mine, self.batch_sizes = rank_batches(order, self.dist.rank, self.dist.world)
            g = torch.Generator().manual_seed((self.cfg.seed * 100_003 + epoch) * 1_009 + self.dist.rank)
            return torch.utils.data.DataLoader(
                dataset, batch_sampler=mine, num_workers=self.cfg.workers, collate_fn=dataset.collate_fn,
                worker_init_fn=seed_worker, generator=g, pin_memory=self.device.type == "cuda",
                persistent_workers=False,
            )  # fmt: skip
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.cfg.batch, shuffle=shuffle, num_workers=self.cfg.workers,
            collate_fn=dataset.collate_fn, worker_init_fn=seed_worker, generator=g, drop_last=False,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )  # fmt: skip

    # ----------------------------------------------------------------------------- one step
    def _object_vectors(self, feats, batch, valid: torch.Tensor) -> torch.Tensor:
        from mocha_edge.models.pooling import box_mean_pool

        h, w = batch["img"].shape[2:]
        xywh = batch["bboxes"][valid].to(self.device).float()
        scale = torch.tensor([w, h, w, h], device=self.device, dtype=torch.float32)
        xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1) * scale
        return box_mean_pool(feats, xyxy, batch["batch_idx"][valid].to(self.device), self.strides)

    def _distill_losses(
        self, feats, batch, rows: torch.Tensor, grad: bool = False
    ) -> dict[str, torch.Tensor]:
        """L_dist, L_emb and the mean cosine of the batch's objects that have a teacher target.

        Under torchrun every rank computes them over the whole global batch: the object vectors and their
        rows are gathered from all ranks (:meth:`DistEnv.gather_rows`, in global batch order), so the
        translator's BatchNorm and L_emb's pairs see the same objects as in one process. ``grad``: the student
        trains (its vectors carry gradients back to each rank).
        """
        from mocha_edge.losses import local_alignment_loss, relational_loss

        valid = rows >= 0
        zero = torch.zeros((), device=self.device)
        if self.dist.distributed:
            if bool(valid.any()):
                v = self._object_vectors(feats, batch, valid)
            else:
                v = torch.zeros((0, self.dim), device=self.device)
            if grad and not v.requires_grad:  # no object on this rank: it still joins the gather's backward
                v = v.detach().requires_grad_(True)
            v = self.dist.gather_rows(v)
            r = self.dist.gather_rows(rows[valid].to(self.device)).cpu()
            if len(r) == 0:
                return {"dist": zero, "emb": zero, "cos": zero}
        else:
            if int(valid.sum()) == 0:
                return {"dist": zero, "emb": zero, "cos": zero}
            v = self._object_vectors(feats, batch, valid)
            r = rows[valid].cpu()
        t = self.targets[r].to(self.device)
        s = self._translator(v)
        w = None
        if self.focus is not None:
            m = self.focus[r].to(self.device)
            w = 0.5 + 0.5 * m / m.mean().clamp(min=1e-12)
        emb_src = s if self.cfg.emb_on == "translated" else v
        return {
            "dist": local_alignment_loss(s, t, w),
            "emb": relational_loss(emb_src, t, self.cfg.tau),
            "cos": torch.nn.functional.cosine_similarity(s.detach(), t, dim=1).mean(),
        }

    def _set_lr(self, epoch: int, i: int) -> dict[str, float]:
        """Every group at its initial lr times :func:`lr_factor` of the run's global iteration; with
        ``warmup_mode="per-group"`` the warm-up part counts the group's own trained iterations instead."""
        it = epoch * self.n_batches + i
        f = lr_factor(it, self.total_steps, self.warmup_steps, self.cfg.lrf)
        out = {}
        for g in self.optimizer.param_groups:
            if self.cfg.warmup_mode == "per-group" and self.warmup_steps > 0:
                own = self.steps["student" if g["name"].startswith("student") else "translator"]
                cos = lr_factor(it, self.total_steps, 0, self.cfg.lrf)
                g["lr"] = g["initial_lr"] * min(1.0, (own + 1) / self.warmup_steps) * cos
            else:
                g["lr"] = g["initial_lr"] * f
            out[g["name"]] = g["lr"]
        return out

    def _set_modes(self, student_on: bool) -> None:
        """Modes for an epoch: the student trains (train mode, gradients) only in its epochs."""
        self.model.train() if student_on else self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(student_on)
        if self.translator is not None:
            self.translator.train()

    def _epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm import tqdm

        from mocha_edge.student import decode_cls

        cfg = self.cfg
        env = self.dist
        student_on = cfg.student_trains(epoch)
        distill_on = self.translator is not None
        _seed_all(cfg.seed * 100_003 + epoch)
        if env.distributed:
            # each rank draws its own augmentations (python's and numpy's generators; torch's stays shared)
            aug_seed = (cfg.seed * 100_003 + epoch) * 1_009 + env.rank
            random.seed(aug_seed)
            np.random.seed(aug_seed % 2**32)
            with env.guard(f"taking rank 0's BatchNorm statistics before epoch {epoch + 1}"):
                env.broadcast_tensors(list(self.model.buffers()))  # what rank 0 checkpoints; resumes alike
        loader = self._loader(
            epoch, self.train_items, self.train_rows, augment=cfg.augment, shuffle=True, split=True
        )
        self._set_modes(student_on)
        sums: dict[str, float] = {}
        n = 0
        lrs: dict[str, float] = {}
        what = ("student+translator" if distill_on else "student") if student_on else "translator"
        bar = tqdm(
            loader, disable=not self.progress, desc=f"epoch {epoch + 1}/{cfg.epochs} [{what}]", unit="batch"
        )
        for i, batch in enumerate(bar):
            lrs = self._set_lr(epoch, i)
            coarse, rows = decode_cls(batch["cls"], self.k)
            img = batch["img"].to(self.device, non_blocking=True).float().div_(255.0)
            img = img.contiguous(memory_format=torch.channels_last)
            loss = torch.zeros((), device=self.device)
            parts: dict[str, float] = {}
            try:
                with env.guard(f"training epoch {epoch + 1}, batch {i + 1}"):
                    if env.distributed:
                        n_img = self.batch_sizes[i]  # the global batch's
                        loss, total, parts = self._global_batch_loss(
                            img, batch, coarse, rows, student_on, n_img
                        )
                    else:
                        n_img = img.shape[0]
                        if student_on:
                            preds = _head_preds(self.model(img))
                            det_batch = {
                                "batch_idx": batch["batch_idx"].to(self.device),
                                "cls": coarse.float().view(-1, 1).to(self.device),
                                "bboxes": batch["bboxes"].to(self.device).float(),
                            }
                            det, det_items = self.criterion(preds, det_batch)
                            loss = loss + det.sum()
                            items = (
                                list(det_items.values()) if isinstance(det_items, dict) else list(det_items)
                            )
                            for name, v in zip(("box", "cls", "dfl"), items):
                                parts[f"loss_{name}"] = float(v)
                            parts["loss_det"] = float(det.detach().sum()) / img.shape[0]
                        else:
                            with torch.no_grad():
                                preds = _head_preds(self.model(img))
                        if distill_on:
                            d = self._distill_losses(preds["feats"], batch, rows)
                            bs = img.shape[0]  # same per-batch scaling as ultralytics' detection loss
                            loss = loss + bs * (cfg.lambda_dist * d["dist"] + cfg.lambda_emb * d["emb"])
                            parts.update(
                                loss_dist=float(d["dist"].detach()),
                                loss_emb=float(d["emb"].detach()),
                                train_cos=float(d["cos"]),
                            )
                        total = loss
                    if not torch.isfinite(total):
                        raise TrainError(
                            f"loss became {float(total.detach())} at epoch {epoch + 1}, batch {i + 1} "
                            f"({', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); stopped. "
                            f"Last good checkpoint kept: {self.ckpt_path if self.ckpt_path.exists() else 'none yet'}"
                        )
                    self.optimizer.zero_grad(set_to_none=True)
                    (loss / n_img if cfg.loss_per_image else loss).backward()  # DDP: all-reduced here
                    if cfg.grad_clip > 0:
                        params = [
                            p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
                        ]
                        torch.nn.utils.clip_grad_norm_(params, max_norm=cfg.grad_clip)
                    self.optimizer.step()
            except torch.cuda.OutOfMemoryError:
                raise TrainError(
                    f"CUDA out of memory at --batch {cfg.batch}, --imgsz {cfg.imgsz}; retry with --batch {max(cfg.batch // 2, 1)}"
                ) from None
            if student_on:
                if env.is_main:  # the EMA is rank 0's (it validates and saves)
                    self.ema.update(self.model)
                self.steps["student"] += 1
            if distill_on:
                self.steps["translator"] += 1
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(
                {k: f"{sums[k] / n:.3f}" for k in ("loss_det", "loss_dist", "loss_emb") if k in sums}
            )
        bar.close()
        for p in self.model.parameters():
            p.requires_grad_(True)
        row = {"epoch": epoch + 1, "student_trained": int(student_on), "distill": int(distill_on)}
        row.update({k: v / max(n, 1) for k, v in sums.items()})
        row.update({f"lr_{k}": v for k, v in lrs.items()})
        return row

    def _global_batch_loss(
        self, img: torch.Tensor, batch: dict[str, Any], coarse: torch.Tensor, rows: torch.Tensor,
        student_on: bool, n_batch: int,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:  # fmt: skip
        """Under torchrun: (this rank's loss to backpropagate, the global batch's loss, its logged parts).

        ultralytics' detection loss is a sum over the batch divided by the batch's sum of target scores (then
        x batch size). One all-reduce of every rank's score sum and unnormalised losses gives the global
        batch's, and each rank's part is renormalised to it: the parts add up to the one-process loss of the
        global batch, and ``world`` x a part, averaged by DDP, gives its gradient. The teacher terms are the
        global batch's on every rank (:meth:`_distill_losses`; their gather sums the ranks' gradients).
        """
        cfg, env = self.cfg, self.dist
        parts: dict[str, float] = {}
        loss = torch.zeros((), device=self.device)
        total = torch.zeros((), device=self.device)
        if student_on:
            preds = _head_preds(self._student(img))
            det_batch = {
                "batch_idx": batch["batch_idx"].to(self.device),
                "cls": coarse.float().view(-1, 1).to(self.device),
                "bboxes": batch["bboxes"].to(self.device).float(),
            }
            det, det_items = self.criterion(preds, det_batch)
            items = list(det_items.values()) if isinstance(det_items, dict) else list(det_items)
            mine = self.criterion.assigner.take().float()  # this rank's (unclamped) sum of target scores
            norm_mine = mine.clamp(min=1)
            stats = torch.cat(
                [mine.reshape(1), torch.stack([torch.as_tensor(v) for v in items]).float() * norm_mine]
            )
            env.all_sum(stats)
            norm = stats[0].clamp(min=1)
            comps = stats[1:] / norm  # box, cls, dfl of the global batch
            loss = det.sum() * (norm_mine / norm) * (env.world * n_batch / img.shape[0])
            total = comps.sum() * n_batch
            for name, v in zip(("box", "cls", "dfl"), comps.tolist()):
                parts[f"loss_{name}"] = v
            parts["loss_det"] = float(comps.sum())
        else:
            with torch.no_grad():
                preds = _head_preds(self.model(img))
        if self.translator is not None:
            d = self._distill_losses(preds["feats"], batch, rows, grad=student_on)
            extra = n_batch * (cfg.lambda_dist * d["dist"] + cfg.lambda_emb * d["emb"])
            loss = loss + extra
            total = total + extra.detach()
            parts.update(
                loss_dist=float(d["dist"].detach()),
                loss_emb=float(d["emb"].detach()),
                train_cos=float(d["cos"]),
            )
        return loss, total, parts

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        """Val detection mAP50/mAP50-95 of the EMA student; mean cosine translator(student) vs teacher."""
        out: dict[str, float] = {}
        if self.view_yaml is None:
            return out
        import logging

        from ultralytics.models.yolo.detect import DetectionValidator
        from ultralytics.utils import LOGGER

        model = deepcopy(self.ema.ema).float().eval()
        args = {
            "data": str(self.view_yaml), "imgsz": self.cfg.imgsz, "batch": self.cfg.batch, "device": self.device_name,
            "plots": False, "verbose": False, "save_json": False, "split": "val", "workers": 0,
        }  # fmt: skip
        level = LOGGER.level
        LOGGER.setLevel(logging.WARNING)
        try:
            with keep_torch_threads():
                stats = DetectionValidator(args=args, save_dir=self.out / "val")(model=model)
        finally:
            LOGGER.setLevel(level)
        out["val_map50"] = 100.0 * float(stats.get("metrics/mAP50(B)", 0.0))
        out["val_map50_95"] = 100.0 * float(stats.get("metrics/mAP50-95(B)", 0.0))
        if self.translator is not None:
            out["val_align_cos"] = self.alignment_cosine()
        return out

    @torch.no_grad()
    def alignment_cosine(self) -> float:
        """Mean cosine between translated EMA-student vectors and teacher targets over val boxes (no augmentation)."""
        if self._val_rows is None:
            self._val_rows = self._cache_rows(self.val_items, strict=False)
        loader = self._loader(0, self.val_items, self._val_rows, augment=False, shuffle=False)
        from mocha_edge.student import decode_cls

        model = self.ema.ema.eval()
        self.translator.eval()
        cos = []
        for batch in loader:
            _, r = decode_cls(batch["cls"], self.k)
            valid = r >= 0
            if not valid.any():
                continue
            img = batch["img"].to(self.device).float() / 255.0
            feats = _head_preds(model(img))["feats"]
            s = self.translator(self._object_vectors(feats, batch, valid))
            t = self.targets[r[valid]].to(self.device)
            cos.append(torch.nn.functional.cosine_similarity(s, t, dim=1).cpu())
        self.translator.train()
        return float(torch.cat(cos).mean()) if cos else float("nan")

    @torch.no_grad()
    def fit_vector_space(self):
        """Fit the final EMA student's vector space on the training split (:func:`mocha_edge.space.fit_space`)."""
        from mocha_edge.infer import Student
        from mocha_edge.space import fit_space

        model = deepcopy(self.ema.ema).float().eval()
        student = Student(model, list(self.names), self.cfg.imgsz, device=self.device_name)
        return fit_space(student, self.ds, seed=self.cfg.seed)

    # ----------------------------------------------------------------------------- outputs
    def _state(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        env = self.dist
        teacher = None
        if self.cache is not None:
            m = self.cache.meta
            teacher = {k: m[k] for k in ("teacher", "teacher_fingerprint", "dataset_fingerprint", "d_t")}
            teacher["cache"] = str(Path(cfg.teacher_cache).resolve())
        return {
            "format": CKPT_FORMAT,
            "epoch": epoch,
            "config": asdict(cfg),
            "recipe": {**cfg.settings(), "warmup_steps": self.warmup_steps, "total_steps": self.total_steps},
            "names": dict(enumerate(self.names)),
            "student_yaml": self.model.yaml,
            "student": _plain_state(self.model),
            "ema": _plain_state(self.ema.ema),
            "ema_updates": int(self.ema.updates),
            "translator": None if self.translator is None else self.translator.state_dict(),
            "translator_cfg": None if self.translator is None else self.translator.config(),
            "optimizer": self.optimizer.state_dict(),
            "steps": dict(self.steps),
            "history": self.history,
            "pca": None
            if self.cache is None
            else {
                "mean": torch.from_numpy(self.cache.pca.mean),
                "components": torch.from_numpy(self.cache.pca.components),
                "scale": torch.from_numpy(self.cache.pca.scale),
            },
            "teacher": teacher,
            "target_scale": getattr(self, "target_scale", 1.0),
            "vector": {
                "dim": self.dim,
                "channels": self.channels,
                "strides": self.strides,
                "pooling": POOLING,
            },
            "preprocess": {
                "imgsz": cfg.imgsz,
                "letterbox": True,
                "pad_value": 114,
                "scale": 1 / 255,
                "channels": "RGB",
            },
            "dataset_fingerprint": self.ds_fingerprint,
            "vector_space": None if self.vector_space is None else self.vector_space.to_state(),
            # how a torchrun run ran (absent from one-process runs, whose checkpoints stay as they were)
            **({"distributed": {"world": env.world, "sync_bn": self.sync_bn}} if env.distributed else {}),
        }

    def _save(self, epoch: int) -> None:
        from mocha_edge.student import save_ultralytics_checkpoint

        with atomic_path(self.ckpt_path) as tmp:
            torch.save(self._state(epoch), tmp)
        save_ultralytics_checkpoint(
            self.ema.ema, self.student_path, {"imgsz": self.cfg.imgsz, "data": self.cfg.data}
        )
        self._write_metrics()

    def _write_metrics(self) -> None:
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in keys]
        with atomic_path(self.out / "metrics.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)
        plot_metrics(self.history, self.out / "metrics.png")

    # ----------------------------------------------------------------------------- run
    def run(self, resume: bool = False, epochs: int | None = None, recipe: str | None = None) -> TrainResult:
        """Train from scratch, or (``resume``) continue the run in ``out`` with its saved config, recipe
        included (``recipe``, when given, must be the saved one); ``epochs`` may extend a resumed run.

        Under torchrun every rank reads the same checkpoint to resume; rank 0 alone writes (config.json,
        checkpoints, metrics, student.pt) while the others wait for it in a step that shares its failure.
        """
        cfg = self.cfg
        env = self.dist
        state = None
        with env.together(f"checking {self.out}"):  # on every rank, before rank 0 writes anything there
            if resume:
                if not self.ckpt_path.is_file():
                    raise TrainError(f"{self.ckpt_path}: nothing to resume (no checkpoint in {self.out})")
                state = load_checkpoint(self.ckpt_path)
                saved = TrainConfig(**state["config"])
                if recipe is not None and recipe != saved.recipe:
                    raise TrainError(
                        f"{self.out} was trained with --recipe {saved.recipe}; --resume keeps it "
                        f"(drop --recipe {recipe}, or start a new run in another --out)"
                    )
                if epochs:
                    saved.epochs = epochs  # extend (or shorten) the resumed run
                self.cfg = cfg = saved
            elif self.ckpt_path.exists():
                raise TrainError(
                    f"{self.out} already holds a run; pass --resume to continue it or choose another --out"
                )
            self.out.mkdir(parents=True, exist_ok=True)
        with env.together("setting up the run"):
            _seed_all(cfg.seed)
            self._setup(state)
        self._wrap()
        self.log(
            f"recipe {cfg.recipe}: "
            + ", ".join(f"{k}={v}" for k, v in cfg.settings().items() if k != "recipe")
            + f" (warm-up {self.warmup_steps} of {self.total_steps} iterations)"
        )
        if env.distributed:
            self.log(f"torchrun: {env.world} ranks ({env.backend}), {cfg.batch // env.world} images each per "
                     f"batch of {cfg.batch}" + (", SyncBatchNorm" if self.sync_bn else ""))  # fmt: skip
        elif self.sync_bn:
            self.log("note: --sync-bn has no effect in one process")
        if self.warmup_steps > self.total_steps / 2:
            self.log(f"note: the warm-up ({self.warmup_steps} iterations) is over half of this run's "
                     f"{self.total_steps} iterations")  # fmt: skip
        if not cfg.augment and (cfg.hyp or cfg.close_mosaic):
            self.log("note: --hyp/--close-mosaic have no effect without augmentation (--no-augment)")
        if state is None:
            with env.together("validating the initial student (rank 0)"):
                if env.is_main:
                    write_json_atomic(self.out / "config.json", asdict(cfg))
                _memory_check(self.model, cfg, self.log, batch=cfg.batch // env.world)  # every rank: same BN
                if env.is_main:
                    first = {
                        "epoch": 0,
                        **(self.evaluate() if cfg.val_every > 0 else {}),
                    }  # before training: reference
                    self.history.append(first)
                    self.log(_fmt_row(first))
        else:
            self.log(f"resuming {self.out} after epoch {self.start_epoch} of {cfg.epochs}")
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            if not cfg.student_trains(epoch) and self.translator is None:
                continue  # baseline: the distilled run's translator-only epochs are no-ops here
            row = self._epoch(epoch)
            row["train_s"] = time.perf_counter() - t0  # the epoch's steps alone (scripts/scale_bench.py)
            with env.together(f"validating and saving epoch {epoch + 1} (rank 0)"):
                if env.is_main:
                    if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch == cfg.epochs - 1):
                        row.update(self.evaluate())
                    row["seconds"] = time.perf_counter() - t0
                    self.history.append(row)
                    self.log(_fmt_row(row))
                    self._save(epoch)
        # the matching space of the final student: centring means + shipped base vectors (mocha_edge.space)
        with env.together("fitting the vector space and saving (rank 0)"):
            if env.is_main:
                t0 = time.perf_counter()
                self.vector_space = self.fit_vector_space()
                self.log(f"vector space: {self.vector_space.name}, {len(self.vector_space.base_vectors)} base "
                         f"vectors kept ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
                self._save(cfg.epochs - 1)
        return TrainResult(self.out, self.ckpt_path, self.student_path, self.history)


def _fmt_row(row: dict[str, Any]) -> str:
    keys = ("loss_det", "loss_dist", "loss_emb", "val_map50", "val_map50_95", "val_align_cos", "seconds")
    return f"epoch {row['epoch']}: " + ", ".join(f"{k}={row[k]:.4g}" for k in keys if k in row)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a mocha-edge training checkpoint (tensors and plain types only: ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainError(f"{path}: unreadable checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise TrainError(f"{path}: not a mocha-edge training checkpoint")
    return state


def plot_metrics(history: list[dict[str, Any]], dest: Path) -> None:
    """Losses and val metrics per epoch as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("losses", ["loss_det", "loss_dist", "loss_emb"]),
        ("val detection mAP (points)", ["val_map50", "val_map50_95"]),
        ("val alignment cosine", ["val_align_cos"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = [(r["epoch"], r[k]) for r in history if k in r and r[k] == r[k]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def train(
    cfg: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    epochs: int | None = None,
    recipe: str | None = None,
    dist: DistEnv | None = None,
    sync_bn: bool = False,
) -> TrainResult:
    """Train (or resume) according to ``cfg``; see :class:`Trainer` (``dist``: this rank under torchrun)."""
    trainer = Trainer(cfg, progress=progress, log=log, dist=dist, sync_bn=sync_bn)
    return trainer.run(resume=resume, epochs=epochs, recipe=recipe)


__all__ = [
    "RECIPES",
    "Recipe",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "load_checkpoint",
    "lr_factor",
    "rank_batches",
    "single_process_batches",
    "train",
]
