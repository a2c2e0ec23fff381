"""``export_adapter``: a training run -> ``adapters/<name>.eadp`` registered in a bundle.

Checks, before anything is written: every weight the adapter touches is adaptable in the bundle
(TargetMismatchError naming them and the ``--targets`` to re-export with) and was trained on the
bundle's base (per-weight sha256, FingerprintMismatchError). SiRA adapters (and LoRA / SoRA
with ``unfused=True``) need a graph variant carrying the branches; it is exported into the
bundle the first time it is needed and recorded under ``variants`` in bundle.json.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from edgeadapt.errors import (
    ConfigError,
    ExportError,
    FingerprintMismatchError,
    TargetMismatchError,
)
from edgeadapt.export.bundle import (
    EXPORTERS,
    _normalise_section,
    backend_exporter,
    base_weight_entries,
    run_exporters,
)
from edgeadapt.format.adapter_file import VALUE_DTYPES, check_against_manifest, read_adapter
from edgeadapt.format.adapter_file import write_adapter as _write_adapter
from edgeadapt.format.manifest import (
    AdapterEntry,
    Manifest,
    read_manifest,
    variant_key,
    write_manifest,
)
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch

log = logging.getLogger("edgeadapt.export")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def load_run_adapter(run_dir: str | Path) -> tuple[Adapter, dict[str, Any]]:
    """The numpy Adapter of a training run (``edgeadapt.train.load_run`` + ``extract``), with
    the run's base weight hashes, and the run info (adapter.json)."""
    from edgeadapt.adapters import extract
    from edgeadapt.train import load_run

    lm, info = load_run(run_dir)
    if info.get("method") == "none":
        raise ConfigError(f"{run_dir}: a head-only run (method 'none') has no adapter to export")
    adapter = extract(lm.model, weight_sha256=info.get("weight_sha256") or None)
    adapter.head = run_head(lm, run_dir)
    adapter.meta.update({k: info[k] for k in ("task", "model") if info.get(k) is not None})
    adapter.meta["run"] = Path(run_dir).name
    return adapter, info


def run_head(lm: Any, run_dir: str | Path) -> dict:
    """A classifier run's trained head matrices (Adapter.head). Head biases are not carried,
    so a run whose head bias moved from its zero init is refused rather than exported wrong."""
    from edgeadapt.models import head_weight_names

    names = head_weight_names(lm.model, lm.kind)
    moved = [n for n, p in lm.model.named_parameters()
             if n.removesuffix(".bias") + ".weight" in names and n.endswith(".bias")
             and bool(p.detach().abs().max() > 0)]
    if moved:
        raise ExportError(f"run {run_dir}: its head bias {moved} was trained; edgeadapt carries "
                          "bias-free heads (retrain with this version of edgeadapt)")
    return {n: lm.model.get_parameter(n).detach().float().cpu().numpy().copy() for n in names}


def check_targets(adapter: Adapter, manifest: Manifest, info: dict[str, Any],
                  where: str) -> None:
    """TargetMismatchError unless every target is a live weight of the bundle."""
    missing = sorted(n for n in adapter.targets if n not in manifest.weights)
    if not missing:
        return
    spec = (info.get("config") or {}).get("targets") or info.get("targets_spec")
    if not isinstance(spec, str):
        modules = sorted(n.removesuffix(".weight") for n in adapter.targets)
        spec = "(" + "|".join(re.escape(m) for m in modules) + ")$"
    raise TargetMismatchError(
        f"{where}: the adapter touches {len(missing)} weight(s) the bundle does not expose as "
        f"adaptable: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. The bundle "
        f"was exported with --targets {manifest.targets_spec!r}; re-export the base with "
        f"--targets '{spec}'")


def branch_for(adapter: Adapter, unfused: bool) -> tuple | None:
    """The graph branch an adapter needs: SiRA ``("sira", E, r, top_k, cf)`` (always),
    LoRA/SoRA ``("lora", max rank)`` when ``unfused``, else None (fused switching)."""
    deltas = list(adapter.targets.values())
    if adapter.method == "sira":
        shapes = {(d.num_experts, int(d.A.shape[1]), d.top_k, float(d.capacity_factor))
                  for d in deltas if isinstance(d, SiraBranch)}
        if len(shapes) != 1:
            raise ExportError(f"SiRA targets differ in (E, r, top_k, capacity_factor): "
                              f"{sorted(shapes)}; one graph variant needs them equal")
        return ("sira", *shapes.pop())
    if unfused and adapter.method in ("lora", "sora"):
        rank = max((d.rank for d in deltas if isinstance(d, LoraDelta)), default=0)
        if rank < 1:
            raise ExportError("every rank of this adapter was pruned: nothing to run unfused")
        return ("lora", rank)
    if unfused:
        raise ConfigError(f"{adapter.method} adapters have no unfused graph variant")
    return None


def ensure_variant(bundle: Path, manifest: Manifest, branch: tuple, check: bool = True,
                   pte_shapes: list[tuple[int, int]] | None = None) -> str:
    """Export the graph variant carrying ``branch`` into the bundle if it is not there yet;
    record it in ``manifest.variants`` (not written here). Returns its key.

    pte_shapes: the (batch, seq) shapes the ExecuTorch program of a *static-shape* variant
    (SiRA) must run, one lowered method each (default: 1x1, 1 x max_seq, max_batch x max_seq,
    :func:`edgeadapt.export.executorch.static_shapes`); dynamic-shape programs (LoRA) run every
    shape up to the maxima and ignore it. A recorded variant whose ExecuTorch program lacks a
    requested shape gets that program re-lowered with the union of its shapes and the new ones
    (its ONNX graph, dynamic, is kept).
    """
    from edgeadapt.models import load_model

    key = variant_key(branch)
    static = branch[0] == "sira" and "executorch" in _backends(manifest)
    redo: list[str] = []
    if key not in manifest.variants:
        redo = _backends(manifest)
    elif static:
        have = _static_of(manifest.variants[key])
        want = set(_pte_static(manifest, pte_shapes))
        if have is not None and not want <= have:
            redo, pte_shapes = ["executorch"], sorted(have | want)
    if not redo:
        return key
    lm = load_model(manifest.model, num_labels=manifest.extra.get("num_labels") or 2,
                    seed=int(manifest.extra.get("seed") or 0))
    live = list(manifest.weights)
    reloaded = base_weight_entries(lm, live)
    changed = [n for n in live if reloaded[n].sha256 != manifest.weights[n].sha256]
    if changed:
        raise ExportError(f"{bundle}: reloading base model {manifest.model!r} gives different "
                          f"weights ({changed[0]} ...) than the bundle; re-export the base")
    others = [f for f in redo if not (static and f == "executorch")]
    results = run_exporters(lm, bundle, live, others, branch=branch, check=check) if others \
        else {}
    if static:  # run_exporters has no say in the shapes: call the ExecuTorch exporter here
        exporter = backend_exporter("executorch")
        if exporter is not None:
            base = manifest.executorch or {}
            shapes = _pte_static(manifest, pte_shapes)
            log.info("exporting executorch with branch %s, static shapes %s", branch, shapes)
            results["executorch"] = exporter(
                lm, bundle, live, branch, verify=check, static=shapes,
                max_batch=int(base.get("max_batch", 8)), max_seq=int(base.get("max_seq", 64)))
    if not results:
        raise ExportError(f"no backend exporter available for backends {redo}")
    variant: dict[str, Any] = manifest.variants.get(key) or {
        "branch": {"kind": branch[0], "spec": list(branch)}, "weights": {n: {} for n in live}}
    for sec, res in results.items():
        variant[sec] = _normalise_section(sec, res["section"])
        for name, entry in res["weights"].items():
            variant["weights"].setdefault(name, {})[sec] = entry
    manifest.variants[key] = variant
    return key


def _backends(manifest: Manifest) -> list[str]:
    """The backends (``onnxruntime``, ``executorch``) the bundle's base was exported for."""
    return [b for b in EXPORTERS if getattr(manifest, b) is not None]


def _pte_static(manifest: Manifest, shapes: list[tuple[int, int]] | None
                ) -> list[tuple[int, int]]:
    """The static shapes asked of a SiRA ExecuTorch program (default: static_shapes)."""
    from edgeadapt.export.executorch import static_shapes

    if shapes is not None:
        return [(int(b), int(s)) for b, s in shapes]
    base = manifest.executorch or {}
    return static_shapes(int(base.get("max_batch", 8)), int(base.get("max_seq", 64)))


def _static_of(variant: dict[str, Any]) -> set[tuple[int, int]] | None:
    """The (batch, seq) methods of a variant's ExecuTorch program (None: none recorded)."""
    static = ((variant.get("executorch") or {}).get("methods") or {}).get("static")
    if static is None:
        return None
    return {tuple(int(v) for v in k.split("x")) for k in static}


def export_adapter(run_dir: str | Path, bundle: str | Path, name: str,
                   value_dtype: str = "float16", *, unfused: bool = False,
                   check: bool = True, pte_shapes: list[tuple[int, int]] | None = None
                   ) -> Path:
    """Write ``bundle/adapters/<name>.eadp`` from a training run and register it in
    ``bundle.json``; returns the file's path.

    value_dtype: ``float16`` | ``bfloat16`` | ``float32`` for the stored values.
    unfused: for LoRA / SoRA, also export (once) a graph variant with LoRA branches, so the
        adapter can run without weight edits. SiRA always gets its variant.
    pte_shapes: (batch, seq) shapes SiRA's static-shape ExecuTorch variant is lowered for
        (default 1x1, 1 x max_seq, max_batch x max_seq); see :func:`ensure_variant`.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    if value_dtype not in VALUE_DTYPES:
        raise ConfigError(f"--dtype {value_dtype!r}: choose from {', '.join(VALUE_DTYPES)}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    adapter, info = load_run_adapter(run_dir)
    where = f"run {run_dir}"
    try:
        check_targets(adapter, manifest, info, where)
        check_against_manifest(adapter, manifest, where)
    except (TargetMismatchError, FingerprintMismatchError) as exc:
        if isinstance(info.get("model"), str) and info["model"] != manifest.model:
            raise FingerprintMismatchError(  # the cause to name, not the targets it implies
                f"{where} trained model {info['model']!r}; the bundle at {bundle} holds "
                f"{manifest.model!r}: export into a bundle of the run's model") from exc
        raise
    branch = branch_for(adapter, unfused)

    # The file first (its encoding refuses non-finite or overflowing values, before a variant
    # is exported for nothing), under a name no entry uses, so a registered adapter stays as
    # it was until bundle.json points at the new file; bundle.json last; the old file then.
    old = manifest.adapters.get(name)
    rel = _free_adapter_file(bundle, manifest, name)
    path = _write_adapter(bundle / rel, adapter, value_dtype)
    try:
        read_adapter(path, manifest)  # what the runtime will do: fail here, not on the device
        variant = (ensure_variant(bundle, manifest, branch, check, pte_shapes)
                   if branch is not None else None)
        manifest.adapters[name] = AdapterEntry(
            file=rel, method=adapter.method, variant=variant,
            info={"value_dtype": value_dtype, "targets": len(adapter.targets),
                  **({"task": adapter.meta["task"]} if "task" in adapter.meta else {})})
        write_manifest(bundle, manifest)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if old is not None:
        log.info("replaced adapter %r in %s", name, bundle)
        if old.file != rel and all(e.file != old.file for e in manifest.adapters.values()):
            (bundle / old.file).unlink(missing_ok=True)
    return path


def _free_adapter_file(bundle: Path, manifest: Manifest, name: str) -> str:
    """``adapters/<name>.eadp``, or ``adapters/<name>.<k>.eadp`` (smallest k >= 1) where that
    file exists or an entry of ``manifest`` points at it."""
    used = {e.file for e in manifest.adapters.values()}
    for k in range(10_000):
        rel = f"adapters/{name}.eadp" if k == 0 else f"adapters/{name}.{k}.eadp"
        if rel not in used and not (bundle / rel).exists():
            return rel
    raise ExportError(f"{bundle / 'adapters'}: no free file name for adapter {name!r}")
