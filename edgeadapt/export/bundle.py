"""``export_base``: a base model -> a deployment bundle (graphs + ``bundle.json``).

Steps: load the model, resolve ``targets`` to the adaptable (live) base weight names, hash each
(sha256 of its fp32 bytes, torch layout), call every backend exporter with those live weights,
and write ``bundle.json`` with, per weight, where each backend keeps it. Backend exporters:
:func:`edgeadapt.export.onnx.export_onnx` and :func:`edgeadapt.export.executorch.export_pte`,
each returning ``{"section": {...}, "weights": {name: {...}}}``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgeadapt.errors import (
    BundleError,
    ConfigError,
    EdgeAdaptError,
    ExportError,
    FingerprintMismatchError,
)
from edgeadapt.format.container import check_writable_dir
from edgeadapt.format.manifest import (
    Manifest,
    WeightEntry,
    manifest_path,
    model_location,
    read_manifest,
    write_manifest,
)

log = logging.getLogger("edgeadapt.export")

#: backend (``--backends`` name and bundle.json section key) -> (module, exporter function)
EXPORTERS = {"onnxruntime": ("edgeadapt.export.onnx", "export_onnx"),
             "executorch": ("edgeadapt.export.executorch", "export_pte")}
#: the names before one name per backend, for an error that says the new one
OLD_BACKEND_NAMES = {"onnx": "onnxruntime", "pte": "executorch"}


def backend_exporter(fmt: str) -> Callable[..., dict] | None:
    """The exporter function of backend ``fmt`` ("onnxruntime" | "executorch"), or None if it
    cannot be imported."""
    import importlib

    if fmt not in EXPORTERS:
        raise ConfigError(f"unknown backend {fmt!r}; use {', '.join(EXPORTERS)}")
    module, func = EXPORTERS[fmt]
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        log.warning("skipping %s: its exporter is not available (%s)", fmt, exc)
        return None


def parse_backends(backends: str | Iterable[str]) -> list[str]:
    """``"onnxruntime,executorch"`` or an iterable -> validated list of backend names;
    ConfigError naming the choices (and the new name of an old one: ``onnx``, ``pte``)."""
    items = [f.strip() for f in backends.split(",")] if isinstance(backends, str) \
        else list(backends)
    items = [f for f in items if f]
    old = [f for f in items if f in OLD_BACKEND_NAMES]
    if old:
        new = ",".join(OLD_BACKEND_NAMES.get(f, f) for f in items)
        raise ConfigError(f"--backends {','.join(items)}: the backends are now named "
                          f"{', '.join(EXPORTERS)}; use --backends {new}")
    bad = [f for f in items if f not in EXPORTERS]
    if bad or not items:
        raise ConfigError(f"--backends {','.join(items) or '(empty)'}: choose from "
                          f"{', '.join(EXPORTERS)}")
    return items


def base_weight_entries(lm: Any, names: list[str]) -> dict[str, WeightEntry]:
    """Shape, dtype and sha256 (fp32 bytes, torch layout) of each named base weight."""
    from edgeadapt.format.fingerprint import weight_sha256

    params = dict(lm.model.named_parameters())
    return {n: WeightEntry(shape=tuple(params[n].shape), dtype="float32",
                           sha256=weight_sha256(params[n].detach().float().cpu().numpy()))
            for n in names}


def run_exporters(lm: Any, out: Path, live: list[str], backends: list[str],
                  branch: tuple | None = None, check: bool = True,
                  pte_repack: bool = True, pte_live_form: str | None = None,
                  decoder_context: int | None = None, precision: str = "fp32"
                  ) -> dict[str, dict]:
    """Call each available backend exporter; returns {backend: exporter result}.

    pte_repack: also write ExecuTorch's all-constant program that repack mode reloads (a second
    full lowering; skip it for bundles that only run live). pte_live_form: the form of the
    ExecuTorch base program's live linears (None: the exporter's default). decoder_context:
    ``--generate``: lower ExecuTorch's KV-cache decoder into its base program, its cache this
    many positions (:mod:`edgeadapt.export.executorch_decoder`). precision: ``fp32`` or a
    grid of :mod:`edgeadapt.format.quant` (:mod:`edgeadapt.export.onnx_quant`,
    :mod:`edgeadapt.export.executorch_quant`; ExecuTorch: no variants (ConfigError) and no
    constant program yet)."""
    from edgeadapt.format.quant import grid

    if precision != "fp32" and grid(precision).affine and "executorch" in backends:
        raise ConfigError(f"--weights {precision} runs on ONNX Runtime only: ExecuTorch's "
                          "quantized linears have no offset term yet (use --backends "
                          "onnxruntime, or --weights int4)")
    results = {}
    for fmt in backends:
        exporter = backend_exporter(fmt)
        if exporter is None:
            continue
        kwargs = {"check": check, "precision": precision} if fmt == "onnxruntime" \
            else {"verify": check}
        if fmt == "executorch" and precision != "fp32":
            kwargs["precision"] = precision
        if fmt == "executorch" and branch is None:
            kwargs["repack"] = pte_repack
            if pte_live_form is not None:
                kwargs["live_form"] = pte_live_form
            if decoder_context is not None:
                kwargs["decoder_context"] = decoder_context
        log.info("exporting %s%s ...", fmt, "" if branch is None else f" with branch {branch}")
        results[fmt] = exporter(lm, out, live, branch, **kwargs)
    if not results:
        raise ExportError(f"no backend exporter available for backends {backends}")
    return results


def _normalise_section(key: str, section: dict) -> dict:
    """bundle.json names the ONNX live-weights file ``live_weights`` (docs/design.md)."""
    if key == "onnxruntime" and "live_weights" not in section and "live_weights_file" in section:
        section = {**section, "live_weights": section["live_weights_file"]}
    return section


def export_base(model: str | Path | Any, out: str | Path,
                backends: str | Iterable[str] = ("onnxruntime", "executorch"),
                targets: str = "qv", *,
                num_labels: int = 2, seed: int = 0, check: bool = True,
                pte_repack: bool = True, pte_live_form: str | None = None,
                generate: bool = False, max_context: int | None = None,
                precision: str = "fp32") -> Path:
    """Export a base model to the bundle directory ``out`` and return ``out``.

    model: a registry name (``smollm2`` | ``minilm`` | ``tiny-*``), a Hugging Face directory, or
        an already loaded :class:`~edgeadapt.models.LoadedModel`.
    backends: ``"onnxruntime"`` and/or ``"executorch"`` (a backend whose exporter is missing is
        skipped with a warning; none available -> ExportError).
    targets: preset (``qv`` | ``attn`` | ``all``) or regex over nn.Linear module names; those
        weights are live (editable in place), every other weight stays constant. A
        classifier's head matrix is live as well (``heads`` in bundle.json).
    check: let each exporter verify its graph against PyTorch (ExportError on mismatch).
    pte_repack: write ExecuTorch's constant-weight program for repack mode (False: live only).
    pte_live_form: ``linear`` | ``weight-left`` | ``own-kernel``, how ExecuTorch's live
        linears are written (:mod:`edgeadapt.export.executorch_live_form`; None: the
        exporter's default, own-kernel or weight-left without a C++ compiler).
    generate: causal LMs: also write the KV-cache decoder graph, the tokenizer and the
        ``generate`` section (:mod:`edgeadapt.export.decoder`, docs/generate.md);
        ``max_context``: the positions a conversation may hold (default: up to 2048).
    precision: ``fp32`` | ``int8`` | ``int4`` | ``int4-affine`` (``--weights``): the
        transformer blocks' weights (and a causal LM's head) quantized, the live ones held as
        codes + scales that switches edit in place (:mod:`edgeadapt.export.onnx_quant`,
        docs/quantized.md); ``int4-affine`` adds a float offset per block (ONNX Runtime only),
        ``int4-affine-live8`` puts the ``targets`` (the live weights) on int8 beside it.
    Adapters already registered in ``out`` are kept if they still fit the new base.
    """
    from edgeadapt.format.quant import PRECISIONS
    from edgeadapt.models import head_weight_names, load_model, target_weight_names

    fmts = parse_backends(backends)
    if precision not in PRECISIONS:
        raise ConfigError(f"weights {precision!r}: choose one of {', '.join(PRECISIONS)}")
    out = check_writable_dir(out)  # before the model loads and the exporters run
    lm = model if hasattr(model, "model") and hasattr(model, "kind") else load_model(
        str(model), num_labels=num_labels, seed=seed)
    heads = head_weight_names(lm.model, lm.kind)  # live too: each adapter brings its head
    live = target_weight_names(lm.model, targets) + heads
    weights = base_weight_entries(lm, live)
    if generate:
        from edgeadapt.export.decoder import export_generation, generation_context

        max_context = generation_context(lm, fmts, max_context)
    elif max_context is not None:
        raise ConfigError("--max-context is the decoder's context: it needs --generate")
    # Every file is written (and checked) in a staging folder first, published into ``out``
    # (bundle.json last) only once all of it is there: the bundle already in ``out`` keeps
    # working while this export runs, and if it fails.
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=_staging_prefix(os.getpid())))
    try:
        results = run_exporters(lm, staging, live, fmts, check=check, pte_repack=pte_repack,
                                pte_live_form=pte_live_form,
                                decoder_context=max_context if generate else None,
                                precision=precision)
        decoders, generation = export_generation(
            lm, staging, live, results, max_context=max_context, check=check,
            precision=precision) \
            if generate else ({}, None)
        sections = {}
        for key, res in results.items():
            sections[key] = _normalise_section(key, res["section"])
            for name, entry in res["weights"].items():
                setattr(weights[name], key, entry)
            if key in decoders:
                sections[key] = {**sections[key], "decoder": decoders[key]}
        inputs = [_with_range(i, lm.vocab_size) for i in
                  next((s["inputs"] for s in sections.values() if s.get("inputs")), [])]
        extra = {"num_labels": getattr(lm.model.config, "num_labels", None) if
                 lm.kind == "classifier" else None, "seed": seed}
        if generation is not None:
            extra["generate"] = generation
        recorded, config_sha = model_record(lm.name, out)
        manifest = Manifest(model=recorded, kind=lm.kind, targets_spec=targets,
                            weights=weights, inputs=inputs, onnxruntime=sections.get("onnxruntime"),
                            executorch=sections.get("executorch"), heads=heads, extra=extra,
                            model_config_sha256=config_sha)
        _keep_fitting_adapters(out, manifest)
        _publish(staging, out)
        write_manifest(out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: %d live weights, backends %s", out / "bundle.json", len(live),
             ", ".join(sections))
    return out


def config_sha256(model_dir: str | Path) -> str:
    """sha256 of a Hugging Face model directory's config.json bytes: what identifies the model
    besides its live weights' hashes (bundle.json ``model_config_sha256``)."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def model_record(name: str, out: str | Path) -> tuple[str, str | None]:
    """What bundle.json records of the base ``name`` (``LoadedModel.name``) in the bundle at
    ``out``: ``(model, model_config_sha256)``. A registry name, or a name that is no local
    model directory, as it is, with no hash; a local Hugging Face directory as its path
    relative to ``out`` (``./x`` or ``../x``, ``/`` separators: the bundle and its model can
    move together), absolute where no relative path exists (another drive), with the sha256
    of its config.json."""
    from edgeadapt.models import REAL_MODELS, TINY_MODELS

    path = Path(name)
    if name in REAL_MODELS + TINY_MODELS or not _is_model_dir(path):
        return name, None
    return _dir_record(path, out), config_sha256(path)


def _dir_record(path: Path, out: str | Path) -> str:
    """A model directory's path relative to the bundle directory ``out`` (``./x``, ``../x``;
    absolute where there is none), in ``/`` form."""
    where = path.resolve()
    try:
        rel = Path(os.path.relpath(where, Path(out).resolve())).as_posix()
    except ValueError:  # no relative path between them (Windows: another drive)
        return where.as_posix()
    return rel if rel == ".." or rel.startswith("../") else f"./{rel}"


def reload_base(bundle: str | Path, manifest: Manifest, model: str | Path | None = None
                ) -> Any:
    """The bundle's base model loaded again in PyTorch (a ``LoadedModel``), with the
    ``num_labels`` and ``seed`` of its export, its live weights checked against bundle.json's
    sha256.

    model: where the base's Hugging Face directory is now (``--model DIR``), overriding the
        recorded location; accepted only if its config.json and the live weights hash as the
        bundle records (else FingerprintMismatchError naming what differs, and ``manifest`` is
        left as it was). Once accepted, ``manifest`` records the new location (not written
        here) unless the bundle's model is a registry name.
    Without ``model``: the recorded location (:func:`edgeadapt.format.manifest.model_location`:
    a relative directory is found from the bundle's directory). A directory that is not there
    is a BundleError naming the recorded path and the fix (``--model DIR``); a directory whose
    config.json differs is a FingerprintMismatchError; reloaded weights that differ from the
    bundle's are an ExportError (re-export the base).
    """
    from edgeadapt.models import REAL_MODELS, TINY_MODELS, load_model

    bundle = Path(bundle)
    registry = manifest.model in REAL_MODELS + TINY_MODELS
    if model is not None:
        where = Path(model)
        what = f"--model {model}"
        if not _is_model_dir(where):
            raise ConfigError(f"{what}: not a Hugging Face model directory (no config.json); "
                              "pass the directory the bundle's base was exported from")
    else:
        location = model_location(manifest, bundle)
        where = Path(location)
        what = f"the bundle's base model {manifest.model!r}" + (
            f" ({location})" if location != manifest.model else "")
        if not registry and not _is_model_dir(where):
            raise BundleError(
                f"{manifest_path(bundle)}: {what} is not found (no config.json there): the "
                "model directory or the bundle moved. Pass where the base model is now: "
                f"edgeadapt export adapter ... --bundle {bundle} --model DIR (its config.json "
                "and weights are checked against the bundle)")
    config_sha = None
    if model is not None or not registry:
        config_sha = config_sha256(where)
        want = manifest.model_config_sha256
        if want is not None and config_sha != want:
            raise FingerprintMismatchError(
                f"{what}: its config.json has sha256 {config_sha[:12]}..., the bundle's base "
                f"{want[:12]}... (model_config_sha256): another model than the one the bundle "
                "was exported from. Pass that model's directory with --model DIR, or re-export "
                "the base")
    lm = load_model(str(where) if model is not None or not registry else manifest.model,
                    num_labels=manifest.extra.get("num_labels") or 2,
                    seed=int(manifest.extra.get("seed") or 0))
    params = dict(lm.model.named_parameters())
    live = list(manifest.weights)
    missing = [n for n in live if n not in params]
    reloaded = base_weight_entries(lm, [n for n in live if n in params])
    changed = missing + [n for n in reloaded if reloaded[n].sha256 != manifest.weights[n].sha256]
    if changed and model is not None:
        more = " ..." if len(changed) > 3 else ""
        raise FingerprintMismatchError(
            f"{what}: its weights are not the bundle's base: {len(changed)} of the "
            f"{len(live)} live weights ({', '.join(changed[:3])}{more}) are missing or differ "
            "from the sha256 in bundle.json: another model; pass the directory the bundle's "
            "base was exported from")
    if changed:
        raise ExportError(f"{bundle}: reloading {what} gives different weights ({changed[0]} "
                          "...) than the bundle; re-export the base")
    if model is not None and not registry:
        recorded = _dir_record(where, bundle)
        if (recorded, config_sha) != (manifest.model, manifest.model_config_sha256):
            log.info("bundle.json now records the base model at %s", recorded)
            manifest.model, manifest.model_config_sha256 = recorded, config_sha
    return lm


def _staging_host() -> str:
    """``.export-<host>-``: how the staging folders of this host's exports begin."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"
    return f".export-{host}-"


def _staging_prefix(pid: int) -> str:
    """``.export-<host>-<pid>-``: the staging folder names the process that writes it, so a
    later export can tell the folder of a killed export from one still being written."""
    return f"{_staging_host()}{pid}-"


def _remove_dead_staging(out: Path) -> None:
    """Delete the staging folders in ``out`` left by exports of this host whose process is gone
    (killed before its ``finally`` ran). Folders of a live process, of another host, or not
    named by :func:`_staging_prefix` are left alone."""
    host = _staging_host()
    for path in out.glob(".export-*"):
        rest = path.name[len(host):] if path.name.startswith(host) else ""
        pid = rest.split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            log.warning("removing %s, left by an export that was killed", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, someone else's
        return True
    return True


def _publish(staging: Path, out: Path) -> None:
    """Move the files of a finished export from ``staging`` into ``out`` (``os.replace`` each:
    same file system). The old bundle.json keeps pointing at a mixture of old and new files
    only for the milliseconds these renames take, not for the minutes of the export."""
    for path in sorted(staging.iterdir()):
        if path.is_dir():
            raise ExportError(f"{path}: exporters write files only")
        os.replace(path, out / path.name)


def _with_range(spec: dict, vocab_size: int) -> dict:
    """An input spec with the ``range`` [low, high) its values must lie in (token ids below the
    vocabulary size, an attention mask 0 or 1), checked by ``Runtime.run``."""
    bounds = {"input_ids": [0, int(vocab_size)], "attention_mask": [0, 2]}.get(spec["name"])
    return {**spec, "range": bounds} if bounds else dict(spec)


def _keep_fitting_adapters(out: Path, manifest: Manifest) -> None:
    """Carry over fused adapters of a previous bundle.json that still fit (graph variants are
    invalidated by re-exporting the base, so adapters that need one are dropped)."""
    from edgeadapt.format.adapter_file import read_adapter

    if not manifest_path(out).exists():
        return
    try:
        old = read_manifest(out)
    except EdgeAdaptError as exc:
        log.warning("replacing an unreadable bundle.json; its adapter registrations are lost "
                    "(the files under adapters/ stay): %s", exc)
        return
    for name, entry in old.adapters.items():
        try:
            if entry.variant is not None:
                raise ExportError("its graph variant must be re-exported")
            read_adapter(out / entry.file, manifest)
        except EdgeAdaptError as exc:
            log.warning("dropping adapter %r from the re-exported bundle: %s", name, exc)
            continue
        manifest.adapters[name] = entry
