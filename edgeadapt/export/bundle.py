"""``export_base``: a base model -> a deployment bundle (graphs + ``bundle.json``).

Steps: load the model, resolve ``targets`` to the adaptable (live) base weight names, hash each
(sha256 of its fp32 bytes, torch layout), call every backend exporter with those live weights,
and write ``bundle.json`` with, per weight, where each backend keeps it. Backend exporters:
:func:`edgeadapt.export.onnx.export_onnx` and :func:`edgeadapt.export.executorch.export_pte`,
each returning ``{"section": {...}, "weights": {name: {...}}}``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgeadapt.errors import ConfigError, EdgeAdaptError, ExportError
from edgeadapt.format.container import check_writable_dir
from edgeadapt.format.manifest import (
    Manifest,
    WeightEntry,
    manifest_path,
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
                  pte_repack: bool = True, pte_live_form: str | None = None
                  ) -> dict[str, dict]:
    """Call each available backend exporter; returns {backend: exporter result}.

    pte_repack: also write ExecuTorch's all-constant program that repack mode reloads (a second
    full lowering; skip it for bundles that only run live). pte_live_form: the form of the
    ExecuTorch base program's live linears (None: the exporter's default)."""
    results = {}
    for fmt in backends:
        exporter = backend_exporter(fmt)
        if exporter is None:
            continue
        kwargs = {"check": check} if fmt == "onnxruntime" else {"verify": check}
        if fmt == "executorch" and branch is None:
            kwargs["repack"] = pte_repack
            if pte_live_form is not None:
                kwargs["live_form"] = pte_live_form
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
                pte_repack: bool = True, pte_live_form: str | None = None) -> Path:
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
    Adapters already registered in ``out`` are kept if they still fit the new base.
    """
    from edgeadapt.models import head_weight_names, load_model, target_weight_names

    fmts = parse_backends(backends)
    out = check_writable_dir(out)  # before the model loads and the exporters run
    lm = model if hasattr(model, "model") and hasattr(model, "kind") else load_model(
        str(model), num_labels=num_labels, seed=seed)
    heads = head_weight_names(lm.model, lm.kind)  # live too: each adapter brings its head
    live = target_weight_names(lm.model, targets) + heads
    weights = base_weight_entries(lm, live)
    # Every file is written (and checked) in a staging folder first, published into ``out``
    # (bundle.json last) only once all of it is there: the bundle already in ``out`` keeps
    # working while this export runs, and if it fails.
    out.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(out)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=_staging_prefix(os.getpid())))
    try:
        results = run_exporters(lm, staging, live, fmts, check=check, pte_repack=pte_repack,
                                pte_live_form=pte_live_form)
        sections = {}
        for key, res in results.items():
            sections[key] = _normalise_section(key, res["section"])
            for name, entry in res["weights"].items():
                setattr(weights[name], key, entry)
        inputs = [_with_range(i, lm.vocab_size) for i in
                  next((s["inputs"] for s in sections.values() if s.get("inputs")), [])]
        extra = {"num_labels": getattr(lm.model.config, "num_labels", None) if
                 lm.kind == "classifier" else None, "seed": seed}
        manifest = Manifest(model=lm.name, kind=lm.kind, targets_spec=targets,
                            weights=weights, inputs=inputs, onnxruntime=sections.get("onnxruntime"),
                            executorch=sections.get("executorch"), heads=heads, extra=extra)
        _keep_fitting_adapters(out, manifest)
        _publish(staging, out)
        write_manifest(out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s: %d live weights, backends %s", out / "bundle.json", len(live),
             ", ".join(sections))
    return out


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
