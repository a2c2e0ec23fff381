"""``edgeadapt train`` (``edgeadapt quickstart``, which also exports, lives in
:mod:`edgeadapt.cli`).

Bad input raises :mod:`edgeadapt.errors` types; the ``edgeadapt`` group prints them as one
``error: ...`` line. Torch is imported inside the commands so ``edgeadapt --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

import click

from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import GRIDS

# CLI option -> config field, per method. An option given for a method that lacks it is an error.
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "shira": {"mask": "mask", "density": "density", "budget_rank": "budget_rank",
              "exclude_run": "exclude_run", "targets": "targets"},
    "lora": {"rank": "r", "alpha": "alpha", "targets": "targets"},
    "sora": {"rank": "r_max", "alpha": "alpha", "xi": "xi", "l1": "l1", "targets": "targets"},
    "sira": {"rank": "r", "alpha": "alpha", "experts": "num_experts", "top_k": "top_k",
             "capacity_factor": "capacity_factor", "expert_dropout": "expert_dropout",
             "aux_loss_weight": "aux_loss_weight", "targets": "targets"},
    "none": {},
}


def adapter_options(method: str, given: dict[str, Any], seed: int) -> dict[str, Any]:
    """The method's config fields from the CLI options that were given (not None)."""
    mapping = METHOD_OPTIONS.get(method)
    if mapping is None:  # the trainer reports the unknown method with the valid names
        return {}
    stray = sorted(k for k, v in given.items() if v is not None and k not in mapping)
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ConfigError(f"{flags} does not apply to --method {method}")
    fields = {mapping[k]: v for k, v in given.items() if v is not None}
    if method == "shira":
        fields["seed"] = seed  # the random mask follows the run's seed
    return fields


@click.command()
@click.option("--model", default="minilm", show_default=True,
              help="minilm | smollm2 | tiny-minilm | tiny-smollm2 | a local HF model directory")
@click.option("--task", default="rt-sentiment", show_default=True,
              help="rt-sentiment | subjectivity | politics | hamlet | rt+politics | "
                   "rt+subjectivity")
@click.option("--method", default="shira", show_default=True,
              help="shira | lora | sora | sira | none (frozen base, head only)")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="run directory to write")
@click.option("--targets", default=None, help="qv (default) | attn | all | regex over module names")
@click.option("--mask", default=None, help="SHiRA mask: random | wm | grad | snip | struct")
@click.option("--exclude-run", default=None,
              help="SHiRA: avoid the positions of this run's SHiRA adapter (non-overlapping)")
@click.option("--density", type=float, default=None, help="SHiRA: fraction trained, (0, 1]")
@click.option("--budget-rank", type=int, default=None,
              help="SHiRA: as many parameters as a LoRA of this rank")
@click.option("--rank", type=int, default=None, help="LoRA r, SoRA r_max, SiRA expert rank")
@click.option("--alpha", type=float, default=None, help="LoRA/SoRA/SiRA scale numerator")
@click.option("--xi", type=float, default=None, help="SoRA proximal threshold per step")
@click.option("--l1", type=float, default=None, help="SoRA L1 weight on the gates")
@click.option("--sora-schedule", default=None, help="SoRA sparsifying scheduler: linear|log|exp")
@click.option("--sora-stages", type=int, default=4, show_default=True)
@click.option("--sora-xi-max", type=float, default=None, help="xi at the last stage (10 * xi)")
@click.option("--gate-lr", type=float, default=None, help="SoRA gate learning rate (= --lr)")
@click.option("--experts", type=int, default=None, help="SiRA experts per layer")
@click.option("--top-k", type=int, default=None, help="SiRA experts per token")
@click.option("--capacity-factor", type=float, default=None, help="SiRA expert capacity factor")
@click.option("--expert-dropout", type=float, default=None, help="SiRA router dropout")
@click.option("--aux-loss-weight", type=float, default=None, help="SiRA load-balancing weight")
@click.option("--epochs", type=float, default=1.0, show_default=True)
@click.option("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--lr", type=float, default=None, help="adapter learning rate [2e-3]")
@click.option("--head-lr", type=float, default=1e-2, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["constant", "linear"]), default="constant",
              show_default=True, help="linear: warm up, then decay every lr to 0")
@click.option("--warmup-steps", type=int, default=0, show_default=True)
@click.option("--max-train", type=int, default=None, help="training examples (LM: blocks)")
@click.option("--max-test", type=int, default=None, help="test examples (LM: blocks)")
@click.option("--max-len", type=int, default=64, show_default=True, help="tokens per example")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads")
@click.option("--quant", type=click.Choice(list(GRIDS)), default=None,
              help="train on the quantized reference of a bundle of that --weights "
                   "(SHiRA: values on the base's grid, quantization-aware)")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(model: str, task: str, method: str, out: str, sora_stages: int,
          sora_xi_max: float | None, sora_schedule: str | None, gate_lr: float | None,
          epochs: float, steps: int | None, batch_size: int, lr: float | None, head_lr: float,
          lr_schedule: str, warmup_steps: int, max_train: int | None, max_test: int | None,
          max_len: int, seed: int, threads: int | None, quant: str | None, progress: bool,
          **adapter: Any) -> None:
    """Train an adapter on a task and write runs/<x>/ (adapter, config, metrics)."""
    from edgeadapt.train.trainer import TrainConfig, describe
    from edgeadapt.train.trainer import train as run_training

    fields = adapter_options(method, adapter, seed)
    if method != "sora" and sora_schedule is not None:
        raise ConfigError(f"--sora-schedule does not apply to --method {method}")
    set_threads(threads)
    cfg = TrainConfig(model=model, task=task, method=method, adapter=fields, epochs=epochs,
                      steps=steps, batch_size=batch_size, lr=lr, head_lr=head_lr,
                      lr_schedule=lr_schedule, warmup_steps=warmup_steps, gate_lr=gate_lr,
                      max_train=max_train, max_test=max_test, max_len=max_len,
                      seed=seed, sora_schedule=sora_schedule, sora_stages=sora_stages,
                      sora_xi_max=sora_xi_max, quant=quant)
    metrics = run_training(cfg, out=out, progress=progress).metrics
    if "test" in metrics:  # rank 0
        click.echo(describe(metrics))
        click.echo(f"wrote {out}/")


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)`` (None: torch's default); ConfigError below 1."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
