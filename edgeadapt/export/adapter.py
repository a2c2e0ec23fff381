"""``export_adapter``: a training run, a PEFT adapter directory or an ``.eadp`` file ->
``adapters/<name>.eadp`` registered in a bundle.

Checks, before anything is written: every weight the adapter touches is adaptable in the bundle
(TargetMismatchError naming them and the ``--targets`` to re-export with) and was trained on the
bundle's base (a run's or an ``.eadp``'s per-weight sha256, FingerprintMismatchError; a PEFT
adapter, which stores no hash, by what can be checked:
:func:`edgeadapt.format.peft_match.peft_to_adapter`). SiRA adapters (and LoRA / SoRA with
``unfused=True``, by default on a quantized ONNX Runtime base) need a graph variant carrying the
branches; it is exported into the bundle the first time it is needed, on the base's grid
(``--weights``), and recorded under ``variants`` in bundle.json.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    ExportError,
    FingerprintMismatchError,
    TargetMismatchError,
)
from edgeadapt.export.bundle import (
    EXPORTERS,
    _normalise_section,
    backend_exporter,
    reload_base,
    run_exporters,
)
from edgeadapt.format.adapter_file import VALUE_DTYPES, check_against_manifest, read_adapter
from edgeadapt.format.adapter_file import write_adapter as _write_adapter
from edgeadapt.format.container import read_container
from edgeadapt.format.manifest import (
    AdapterEntry,
    Manifest,
    read_manifest,
    variant_key,
    write_manifest,
)
from edgeadapt.format.peft import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, is_peft_dir, read_peft
from edgeadapt.format.peft_match import peft_to_adapter
from edgeadapt.format.rounding import ROUNDING_WARN, delta_change
from edgeadapt.format.run_dir import INFO_FILE
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch

log = logging.getLogger("edgeadapt.export")
#: the backends whose graph variants run on a quantized base (its codes + scales beside fp32
#: branches; docs/quantized.md)
QUANTIZED_VARIANTS = ("onnxruntime",)
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
                   pte_shapes: list[tuple[int, int]] | None = None, *,
                   model: str | Path | None = None) -> str:
    """Export the graph variant carrying ``branch`` into the bundle if it is not there yet;
    record it in ``manifest.variants`` (not written here). Returns its key.

    pte_shapes: the (batch, seq) shapes the ExecuTorch program of a *static-shape* variant
    (SiRA) must run, one lowered method each (default: 1x1, 1 x max_seq, max_batch x max_seq,
    :func:`edgeadapt.export.executorch.static_shapes`); dynamic-shape programs (LoRA) run every
    shape up to the maxima and ignore it. A recorded variant whose ExecuTorch program lacks a
    requested shape gets that program re-lowered with the union of its shapes and the new ones
    (its ONNX graph, dynamic, is kept).

    Exporting reloads the base (:func:`edgeadapt.export.bundle.reload_base`): from where
    bundle.json records it (a relative directory from the bundle's directory), or from
    ``model`` (``--model DIR``: checked against the bundle's config and live-weight hashes).
    """
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
    decoder = _needs_decoder(manifest, key, redo)
    if not redo and not decoder:
        if model is not None:
            log.info("--model %s not used: graph variant %s is in the bundle already", model, key)
        return key
    refused = [f for f in redo if f not in QUANTIZED_VARIANTS and precision_of(manifest, f)
               != "fp32"]
    if refused:
        raise ConfigError(
            f"{', '.join(refused)} graph variants (unfused LoRA / SiRA) of a quantized bundle "
            f"are not supported yet (its program is {precision_of(manifest, refused[0])}); on a "
            f"quantized base they run on {', '.join(QUANTIZED_VARIANTS)}: export the base "
            "with --backends onnxruntime to run them")
    lm = reload_base(bundle, manifest, model)  # the live weights' sha256 checked
    live = list(manifest.weights)
    if redo:
        _export_variant(lm, bundle, manifest, key, branch, redo, static, check, pte_shapes)
    if decoder:
        from edgeadapt.export.onnx_decoder import export_onnx_decoder

        log.info("exporting the onnxruntime KV-cache decoder with branch %s", branch)
        base = manifest.onnxruntime["decoder"]
        manifest.variants[key]["onnxruntime"]["decoder"] = export_onnx_decoder(
            lm, bundle, live, max_context=int(manifest.extra["generate"]["max_context"]),
            expected=base["weights"], check=check, branch=branch,
            precision=base.get("precision", "fp32"))["section"]
    return key


def precision_of(manifest: Manifest, backend: str) -> str:
    """The precision (``fp32``, ``int8``, ``int4``) the bundle's ``backend`` base was exported
    with (``--weights``); its graph variants are exported with it."""
    return str((getattr(manifest, backend) or {}).get("precision", "fp32"))


def lora_unfused_by_default(manifest: Manifest) -> bool:
    """Whether a LoRA / SoRA adapter gets a graph variant when ``export_adapter`` is not told
    (``unfused=None``): where the base is quantized and every backend of the bundle runs
    quantized variants. Fused on codes, a LoRA re-quantizes every touched matrix and 90-100%
    of ``B A`` rounds away (docs/quantized.md)."""
    backends = _backends(manifest)
    return any(precision_of(manifest, b) != "fp32" for b in backends) and all(
        b in QUANTIZED_VARIANTS for b in backends)


def _needs_decoder(manifest: Manifest, key: str, redo: list[str]) -> bool:
    """Whether variant ``key`` needs (or lacks) an ONNX Runtime KV-cache decoder: the bundle
    was exported with ``--generate`` (its base has one) and the variant's ONNX graph is being
    exported now or is recorded without one (a variant exported before variants generated)."""
    if "decoder" not in (manifest.onnxruntime or {}) or "generate" not in manifest.extra:
        return False
    section = (manifest.variants.get(key) or {}).get("onnxruntime")
    return "onnxruntime" in redo or (section is not None and "decoder" not in section)


def _export_variant(lm: Any, bundle: Path, manifest: Manifest, key: str, branch: tuple,
                    redo: list[str], static: bool, check: bool,
                    pte_shapes: list[tuple[int, int]] | None) -> None:
    """Export variant ``key``'s graphs for the backends ``redo`` and record them in
    ``manifest.variants`` (:func:`ensure_variant`)."""
    live = list(manifest.weights)
    others = [f for f in redo if not (static and f == "executorch")]
    groups: dict[str, list[str]] = {}  # each backend's variant on its base's grid
    for fmt in others:
        groups.setdefault(precision_of(manifest, fmt), []).append(fmt)
    results = {}
    for precision, fmts in groups.items():
        results |= run_exporters(lm, bundle, live, fmts, branch=branch, check=check,
                                 precision=precision)
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


def export_adapter(source: str | Path, bundle: str | Path, name: str,
                   value_dtype: str | None = None, *, unfused: bool | None = None,
                   check: bool = True, pte_shapes: list[tuple[int, int]] | None = None,
                   force_base: bool = False, model: str | Path | None = None) -> Path:
    """Write ``bundle/adapters/<name>.eadp`` from ``source`` and register it in
    ``bundle.json``; returns the file's path.

    source: an edgeadapt training run directory, a Hugging Face PEFT adapter directory (LoRA
        or SHiRA: ``adapter_config.json`` + ``adapter_model.safetensors``) or an ``.eadp`` file.
    value_dtype: ``float16`` | ``bfloat16`` | ``float32`` for the stored values; None: an
        ``.eadp`` source keeps its own, the others get ``float16``. A warning is logged when the
        rounding changes a target's delta by more than ``ROUNDING_WARN`` (relative).
    unfused: for LoRA / SoRA, also export (once) a graph variant with LoRA branches, so the
        adapter can run without weight edits. None: only on a quantized base whose backends
        run quantized variants (:func:`lora_unfused_by_default`); a LoRA / SoRA left fused on
        a quantized base is logged as a warning. SiRA always gets its variant.
    pte_shapes: (batch, seq) shapes SiRA's static-shape ExecuTorch variant is lowered for
        (default 1x1, 1 x max_seq, max_batch x max_seq); see :func:`ensure_variant`.
    force_base: PEFT sources only: accept a ``base_model_name_or_path`` other than the
        bundle's model (names, shapes and index ranges are still checked).
    model: where the bundle's base model directory is now, if it moved (``--model DIR``);
        used only where a graph variant is exported, and accepted only if its config.json and
        live weights hash as bundle.json records (FingerprintMismatchError, nothing written);
        bundle.json then records the new location.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use letters, digits, '_', '.', '-' (max 64)")
    if value_dtype is not None and value_dtype not in VALUE_DTYPES:
        raise ConfigError(f"--dtype {value_dtype!r}: choose from {', '.join(VALUE_DTYPES)}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    adapter, own_dtype = source_adapter(source, bundle, manifest, force_base)
    value_dtype = value_dtype or own_dtype
    lora = adapter.method in ("lora", "sora")
    if unfused is None:
        unfused = lora and lora_unfused_by_default(manifest)
    if lora and not unfused and any(precision_of(manifest, b) != "fp32"
                                    for b in _backends(manifest)):
        log.warning("adapter %r (%s) fuses on the quantized base's codes: every touched matrix "
                    "is re-quantized and most of B A rounds away (docs/quantized.md); run it "
                    "unfused (--unfused, ONNX Runtime)", name, adapter.method)
    branch = branch_for(adapter, unfused)

    # The file first (its encoding refuses non-finite or overflowing values, before a variant
    # is exported for nothing), under a name no entry uses, so a registered adapter stays as
    # it was until bundle.json points at the new file; bundle.json last; the old file then.
    old = manifest.adapters.get(name)
    rel = _free_adapter_file(bundle, manifest, name)
    path = _write_adapter(bundle / rel, adapter, value_dtype)
    try:
        stored = read_adapter(path, manifest)  # what the runtime will do: fail here, not later
        _warn_rounding(adapter, stored, value_dtype, name)
        variant = (ensure_variant(bundle, manifest, branch, check, pte_shapes, model=model)
                   if branch is not None else None)
        manifest.adapters[name] = AdapterEntry(
            file=rel, method=adapter.method, variant=variant,
            info={"value_dtype": value_dtype, "targets": len(adapter.targets),
                  **({"task": adapter.meta["task"]} if "task" in adapter.meta else {}),
                  **({"source": "peft"} if "peft" in adapter.meta else {})})
        write_manifest(bundle, manifest)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if old is not None:
        log.info("replaced adapter %r in %s", name, bundle)
        if old.file != rel and all(e.file != old.file for e in manifest.adapters.values()):
            (bundle / old.file).unlink(missing_ok=True)
    return path


def source_adapter(source: str | Path, bundle: Path, manifest: Manifest,
                   force_base: bool = False) -> tuple[Adapter, str]:
    """The Adapter of ``source`` (run directory, PEFT adapter directory or ``.eadp`` file),
    checked against the bundle, and the value dtype it is written with by default.

    Raises TargetMismatchError / FingerprintMismatchError / AdapterFormatError as the checks
    find (see :func:`export_adapter`); nothing is written.
    """
    path = Path(source)
    if force_base and not is_peft_dir(path):
        raise ConfigError(f"--force-base: {path} is not a PEFT adapter directory; a training "
                          "run or .eadp file carries its base's hashes, which are checked")
    if path.is_file() and path.name in (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE):
        raise AdapterFormatError(f"{path} is one file of a PEFT adapter: pass its directory "
                                 f"({path.parent})")
    if path.is_file():
        adapter = read_adapter(path, manifest)  # the fingerprint, targets and shapes checked
        return adapter, read_container(path).metadata["value_dtype"]
    if is_peft_dir(path):
        adapter = peft_to_adapter(read_peft(path), manifest, force_base=force_base,
                                  bundle=bundle)
        check_against_manifest(adapter, manifest, f"PEFT adapter {path}")
        return adapter, "float16"
    if not (path / INFO_FILE).is_file():
        raise AdapterFormatError(
            f"{path}: not a training run ({INFO_FILE}), a PEFT adapter directory "
            "(adapter_config.json) or an .eadp file: nothing to export")
    adapter, info = load_run_adapter(path)
    where = f"run {path}"
    try:
        check_targets(adapter, manifest, info, where)
        check_against_manifest(adapter, manifest, where)
    except (TargetMismatchError, FingerprintMismatchError) as exc:
        if isinstance(info.get("model"), str) and info["model"] != manifest.model:
            raise FingerprintMismatchError(  # the cause to name, not the targets it implies
                f"{where} trained model {info['model']!r}; the bundle at {bundle} holds "
                f"{manifest.model!r}: export into a bundle of the run's model") from exc
        raise
    return adapter, "float16"


def _warn_rounding(adapter: Adapter, stored: Adapter, value_dtype: str, name: str) -> None:
    """Log a warning when storing as ``value_dtype`` moved a target's delta by more than
    ROUNDING_WARN (relative, Frobenius): values below fp16's normal range, typically."""
    change = delta_change(adapter, stored)
    worst = max(change, key=change.__getitem__, default=None)
    if worst is not None and change[worst] > ROUNDING_WARN:
        log.warning("adapter %r: %s storage changes the delta of %s by %.2g relative (above "
                    "%g); export with --dtype float32 to keep it exact", name, value_dtype,
                    worst, change[worst], ROUNDING_WARN)


def _free_adapter_file(bundle: Path, manifest: Manifest, name: str) -> str:
    """``adapters/<name>.eadp``, or ``adapters/<name>.<k>.eadp`` (smallest k >= 1) where that
    file exists or an entry of ``manifest`` points at it."""
    used = {e.file for e in manifest.adapters.values()}
    for k in range(10_000):
        rel = f"adapters/{name}.eadp" if k == 0 else f"adapters/{name}.{k}.eadp"
        if rel not in used and not (bundle / rel).exists():
            return rel
    raise ExportError(f"{bundle / 'adapters'}: no free file name for adapter {name!r}")
