"""The trainer, top to bottom: load -> tokenise -> attach -> optimise -> evaluate -> save.

One loop for every method. What differs is small and spelled out where it happens:

- ``none``: no adapter; only a classifier's head trains (the frozen-encoder linear probe; for a
  causal LM nothing trains and the run is the zero-shot baseline).
- ``shira``: ``grad`` / ``snip`` masks score weights on a calibration batch before training;
  ``exclude_run`` (``--exclude-run``) reads another SHiRA run's positions into the config's
  ``exclude`` once the base model is loaded.
- ``sora``: gates have their own optimizer and, after each gate step, a proximal soft-threshold
  ``g <- sign(g) max(|g| - xi, 0)``; with ``sora_schedule`` xi rises over stages (linear / log /
  exp up to ``sora_xi_max``) and each stage's accuracy and live ranks are recorded.
- ``sira``: the routers' load-balancing loss is added to the task loss.
- ``quant`` (``--quant int8|int4``): the frozen base is the PyTorch reference of a quantized
  bundle (``edgeadapt.models.quantized.quantize_reference_``, the adapter's targets live), so
  training and evaluation see the quantized forward. SHiRA's values then sit on the base's
  grid with a straight-through estimator (quantization-aware SHiRA; the run exports grid
  deltas, exact on that base); LoRA / SoRA / SiRA train unfused on the quantized base.

A classifier's head always trains (it is new). The frozen base runs in eval mode (no dropout:
deterministic, so data-parallel ranks stay identical); adapter layers run in train mode.
Under ``torchrun`` each rank takes a strided shard of every global batch and gradients are
summed (see :mod:`edgeadapt.train.distributed`); only rank 0 evaluates and writes the run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from edgeadapt.adapters.base import is_finite_number
from edgeadapt.adapters.shira.model import saturated_on_grid
from edgeadapt.errors import ConfigError, UnknownNameError
from edgeadapt.format.container import check_writable_dir
from edgeadapt.format.quant import GRIDS
from edgeadapt.models import LoadedModel, load_model
from edgeadapt.models.quantized import quantize_reference_
from edgeadapt.tasks import load_task
from edgeadapt.train.data import collate, encode_task
from edgeadapt.train.distributed import all_reduce_grads, barrier, init_world
from edgeadapt.train.objective import evaluate, loss_count, loss_sum
from edgeadapt.train.run import (
    base_weight_hashes,
    excluded_positions,
    head_parameters,
    save_run,
)

METHODS = ("shira", "lora", "sora", "sira", "none")
SCHEDULES = ("linear", "log", "exp")
LR_SCHEDULES = ("constant", "linear")
DEFAULT_LR = 2e-3  # adapter learning rate of every method unless --lr says otherwise


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on (saved in metrics.json). ``adapter``: the method's config
    fields (e.g. ``{"mask": "snip", "density": 0.01}``), see ``edgeadapt.adapters.CONFIGS``."""

    model: str = "minilm"
    task: str = "rt-sentiment"
    method: str = "shira"
    adapter: dict[str, Any] = dataclasses.field(default_factory=dict)
    epochs: float = 1.0
    steps: int | None = None          # overrides epochs
    batch_size: int = 16
    lr: float | None = None           # adapter lr (default per method)
    head_lr: float = 1e-2
    gate_lr: float | None = None      # SoRA gates (default: lr)
    lr_schedule: str = "constant"     # constant | linear (warmup, then decay to 0): lr_factor
    warmup_steps: int = 0
    max_train: int | None = None
    max_test: int | None = None
    max_len: int = 64
    seed: int = 0
    eval_batch_size: int = 64
    sora_schedule: str | None = None  # linear | log | exp
    sora_stages: int = 4
    sora_xi_max: float | None = None  # default: 10 * xi
    calib_size: int = 32              # examples scoring SHiRA grad/snip masks
    quant: str | None = None          # int8 | int4: train on the quantized reference base

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UnknownNameError(f"unknown method {self.method!r}: use one of "
                                   f"{', '.join(METHODS)}")
        if self.sora_schedule is not None and self.sora_schedule not in SCHEDULES:
            raise UnknownNameError(f"unknown SoRA schedule {self.sora_schedule!r}: use one of "
                                   f"{', '.join(SCHEDULES)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UnknownNameError(f"unknown lr schedule {self.lr_schedule!r}: use one of "
                                   f"{', '.join(LR_SCHEDULES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("batch_size", "max_len", "sora_stages", "eval_batch_size", "calib_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.quant is not None and self.quant not in GRIDS:
            raise UnknownNameError(f"unknown --quant {self.quant!r}: use one of "
                                   f"{', '.join(GRIDS)}")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        # every float must be finite: NaN passes no comparison and trains a NaN adapter
        # silently; inf overflows the step count or does the same
        if not is_finite_number(self.epochs) or (self.epochs <= 0 and self.steps is None):
            raise ConfigError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name in ("lr", "head_lr", "gate_lr"):
            value = getattr(self, name)
            if value is not None and (not is_finite_number(value) or value <= 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value}")
        if self.sora_xi_max is not None and (not is_finite_number(self.sora_xi_max)
                                             or self.sora_xi_max < 0):
            raise ConfigError(f"sora_xi_max must be a finite number >= 0, got "
                              f"{self.sora_xi_max}")


def adapter_config(method: str, options: dict[str, Any]):
    """The method's config dataclass from ``options`` (None-valued options are dropped;
    options the method does not have are an error). ``none`` -> None."""
    from edgeadapt.adapters import config_from_dict

    if method == "none":
        return None
    return config_from_dict({"method": method,
                             **{k: v for k, v in options.items() if v is not None}})


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """Multiplier of every learning rate at optimizer step ``step`` (0-based) of ``total``.

    constant: 1. linear: ``(step + 1) / warmup`` for ``step < warmup``, then
    ``(total - step) / (total - warmup)``: 1 at the first step after warmup, ``1 / (total -
    warmup)`` at the last (the usual linear decay to zero; the last step still moves).
    """
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def sora_xi(schedule: str, stage: int, stages: int, xi: float, xi_max: float) -> float:
    """xi during ``stage`` (0-based) of ``stages``: rises from ``xi`` to ``xi_max`` at the last
    stage. With t = stage / (stages - 1): linear xi + (xi_max - xi) t; log uses
    log(1 + 9t) / log(10); exp uses (10^t - 1) / 9."""
    t = stage / (stages - 1) if stages > 1 else 1.0
    shape = {"linear": t, "log": math.log1p(9 * t) / math.log(10),
             "exp": (10 ** t - 1) / 9}[schedule]
    return xi + (xi_max - xi) * shape


def set_train_mode(lm: LoadedModel) -> None:
    """Frozen base in eval mode, adapter layers (and their dropout) in train mode."""
    from edgeadapt.adapters import adapted_layers

    lm.model.eval()
    for _, layer in adapted_layers(lm.model):
        layer.train()


def _count(params) -> int:
    return sum(p.numel() for p in params)


@dataclasses.dataclass
class TrainResult:
    """metrics: what metrics.json holds (on rank 0; ``{}`` on other ranks). lm: the trained
    model, adapter attached, in eval mode. targets: the adapted base weight names."""

    metrics: dict[str, Any]
    lm: LoadedModel
    targets: list[str]


def train(cfg: TrainConfig, out: str | Path | None = None, progress: bool = True
          ) -> TrainResult:
    """Train one run; write it to ``out`` (rank 0) if given.

    Also usable as a library call: ``train(TrainConfig(model="tiny-minilm", ...)).metrics``.
    """
    from edgeadapt.adapters import (
        adapter_state,
        attach,
        gate_parameters,
        live_ranks,
        sira_aux_loss,
        sora_l1,
        sora_proximal_step,
        trainable_parameters,
    )

    cfg.validate()
    config = adapter_config(cfg.method, cfg.adapter)
    if out is not None:  # before any work: a bad --out must not cost a training
        out = check_writable_dir(out, "--out ")
    world = init_world()
    started = time.perf_counter()
    task = load_task(cfg.task, seed=cfg.seed, max_train=cfg.max_train, max_test=cfg.max_test)
    lm = load_model(cfg.model, num_labels=max(task.num_labels, 2), seed=cfg.seed)
    enc = encode_task(lm, task, cfg.max_len)
    n_train = len(enc.train)
    if n_train == 0:
        raise ConfigError(f"task {cfg.task!r} has no training examples at max_len {cfg.max_len}")

    gen = torch.Generator().manual_seed(cfg.seed)
    epoch_orders: list[list[int]] = []

    def order(epoch: int) -> list[int]:
        while len(epoch_orders) <= epoch:  # the same permutations on every rank
            epoch_orders.append(torch.randperm(n_train, generator=gen).tolist())
        return epoch_orders[epoch]

    def batch_loss(index: list[int], count: int) -> torch.Tensor:
        batch = collate(lm, enc.train, index, enc.pad_id)
        return loss_sum(lm, batch, enc.label_tokens) / count

    # --- adapter ---------------------------------------------------------------------------
    targets: list[str] = []
    if getattr(config, "exclude_run", None) and config.exclude is None:  # shira --exclude-run
        config = dataclasses.replace(
            config, exclude=excluded_positions(config.exclude_run, lm.model))
    if config is not None:
        calib_index = order(0)[: cfg.calib_size]
        torch.manual_seed(cfg.seed)  # adapter init, identical on every rank
        targets = attach(lm.model, config, calib=lambda: batch_loss(
            calib_index, loss_count(enc.train, calib_index)))
    if cfg.quant is not None:  # after attach: masks are scored on the fp32 base
        quantize_reference_(lm, cfg.quant, live=targets)
    head = list(head_parameters(lm).values())
    for p in head:
        p.requires_grad_(True)
    gates = gate_parameters(lm.model) if cfg.method == "sora" else []
    gate_ids = {id(g) for g in gates}
    params = [p for p in trainable_parameters(lm.model)] if config is not None else []
    params = [p for p in params if id(p) not in gate_ids]
    lr = cfg.lr or DEFAULT_LR
    groups = [g for g in ({"params": params, "lr": lr}, {"params": head, "lr": cfg.head_lr})
              if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0) if groups else None
    gate_opt = (torch.optim.AdamW(gates, lr=cfg.gate_lr or lr, weight_decay=0.0)
                if gates else None)
    all_trainable = params + gates + head

    # --- schedule --------------------------------------------------------------------------
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * steps_per_epoch)
    if not all_trainable:
        total = 0  # a causal LM with --method none: the zero-shot baseline
    xi0 = getattr(config, "xi", 0.0)
    xi_max = cfg.sora_xi_max if cfg.sora_xi_max is not None else 10 * xi0
    stage_len = math.ceil(total / cfg.sora_stages) if cfg.sora_schedule else total + 1
    l1 = getattr(config, "l1", 0.0)

    # --- loop ------------------------------------------------------------------------------
    metrics: dict[str, Any] = {"train_loss": [], "stages": []}
    set_train_mode(lm)
    bar = tqdm(range(total), desc=f"train {cfg.method}", disable=not (progress and world.main))
    train_started = time.perf_counter()
    for step in bar:
        epoch, pos = divmod(step, steps_per_epoch)
        index = order(epoch)[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]
        mine = world.shard(index)
        loss = (batch_loss(mine, loss_count(enc.train, index)) if mine
                else sum(p.sum() * 0 for p in all_trainable))
        objective = loss
        if cfg.method == "sira":
            objective = objective + sira_aux_loss(lm.model) / world.size
        if cfg.method == "sora" and l1:
            objective = objective + l1 * sora_l1(lm.model) / world.size
        objective.backward()
        all_reduce_grads(all_trainable, world)
        factor = lr_factor(cfg.lr_schedule, step, total, cfg.warmup_steps)
        for opt in (optimizer, gate_opt):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
                opt.step()
                opt.zero_grad(set_to_none=True)
        if gates:
            stage = step // stage_len
            xi = (sora_xi(cfg.sora_schedule, stage, cfg.sora_stages, xi0, xi_max)
                  if cfg.sora_schedule else xi0)
            sora_proximal_step(lm.model, xi)
            if cfg.sora_schedule and ((step + 1) % stage_len == 0 or step + 1 == total):
                if world.main:
                    ranks = live_ranks(lm.model)
                    result = evaluate(lm, enc, batch_size=cfg.eval_batch_size,
                                      groups=task.groups, progress=progress)
                    metrics["stages"].append({"stage": stage, "step": step + 1, "xi": xi,
                                              "live_rank_total": sum(ranks.values()),
                                              "live_ranks": ranks, **result})
                set_train_mode(lm)
        if step % 10 == 0 or step + 1 == total:
            shown = loss.item() * world.size  # this rank's shard, scaled as if it were the batch
            metrics["train_loss"].append([step, shown])
            bar.set_postfix(loss=f"{shown:.4f}")
    train_s = time.perf_counter() - train_started

    # --- evaluate and save -----------------------------------------------------------------
    lm.model.eval()
    if world.main:
        metrics.update(
            task=task.name, model=lm.name, method=cfg.method, metric=task.metric,
            test=evaluate(lm, enc, batch_size=cfg.eval_batch_size, groups=task.groups,
                          progress=progress),
            steps=total, epochs_done=round(total / steps_per_epoch, 3),
            train_examples=n_train, test_examples=len(enc.test),
            trainable_params=_count(params) + _count(gates), head_params=_count(head),
            targets=len(targets), world_size=world.size, train_s=round(train_s, 2),
            wall_s=round(time.perf_counter() - started, 2), config=dataclasses.asdict(cfg),
        )
        if cfg.method == "sora":
            metrics["sora"] = sora_summary(lm, live_ranks(lm.model), config)
        if cfg.quant is not None:
            metrics["quant"] = {"precision": cfg.quant,
                                "saturated": sum(saturated_on_grid(lm.model).values())}
        if not metrics["stages"]:
            del metrics["stages"]
        if out is not None:
            info = {"method": cfg.method, "config": config.to_dict() if config else {},
                    "model": lm.name, "task": task.name, "targets": targets,
                    "weight_sha256": base_weight_hashes(lm, targets),
                    "num_labels": max(task.num_labels, 2), "labels": list(task.labels),
                    "max_len": cfg.max_len, "seed": cfg.seed, "quant": cfg.quant}
            save_run(Path(out), lm, info, adapter_state(lm.model) if config else {}, metrics)
    barrier(world)
    return TrainResult(metrics if world.main else {}, lm, targets)


def sora_summary(lm: LoadedModel, ranks: dict[str, int], config) -> dict[str, Any]:
    """Per-layer live ranks and the parameter count before pruning (A, B and gate at r_max)
    and after (A' and B' at the live rank; the gate is folded away)."""
    before = after = 0
    for name, live in ranks.items():
        layer = lm.model.get_submodule(name)
        before += config.r_max * (layer.in_features + layer.out_features + 1)
        after += live * (layer.in_features + layer.out_features)
    return {"r_max": config.r_max, "live_ranks": ranks, "live_rank_total": sum(ranks.values()),
            "params_before": before, "params_after": after}


def describe(metrics: dict[str, Any]) -> str:
    """One line: method, metric and trainable parameters of a run."""
    test = metrics["test"]
    value = (f"accuracy {test['accuracy']:.4f}" if "accuracy" in test
             else f"perplexity {test['perplexity']:.2f}")
    line = (f"{metrics['method']:>5}: {value}  ({metrics['trainable_params']:,} adapter + "
            f"{metrics['head_params']:,} head params, {metrics['train_s']:.0f} s training)")
    if "sora" in metrics:
        s = metrics["sora"]
        line += (f"\n       live rank {s['live_rank_total']} of {s['r_max'] * len(s['live_ranks'])}"
                 f"; parameters {s['params_before']:,} before pruning, {s['params_after']:,} "
                 "after")
    return line


