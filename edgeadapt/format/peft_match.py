"""Match a parsed PEFT adapter (:func:`edgeadapt.format.peft.read_peft`) to a bundle's live
weights: key prefixes to weight names, shapes, SHiRA index ranges, the base model's name, the
classifier head; the result is an edgeadapt :class:`~edgeadapt.format.types.Adapter` carrying
the bundle's weight hashes (PEFT stores none). Spec: docs/format.md §7. Torch-free."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np

from edgeadapt.errors import AdapterFormatError, FingerprintMismatchError, TargetMismatchError
from edgeadapt.format.manifest import Manifest, model_location
from edgeadapt.format.peft import BASE_ALIASES, CONFIG_FILE, CooDelta, PeftAdapter
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta


def peft_to_adapter(peft: PeftAdapter, manifest: Manifest, *, force_base: bool = False,
                    bundle: str | Path = "the bundle") -> Adapter:
    """Match ``peft`` to the live weights of a bundle and return it as an Adapter (method
    ``lora`` or ``shira``, the bundle's weight hashes as its base, PEFT's facts in
    ``meta["peft"]``).

    Checks, in order: ``base_model_name_or_path`` against the bundle's model when both are
    known (FingerprintMismatchError unless ``force_base``); each PEFT module maps to a live
    weight, names differing by one prefix found against the bundle's names (TargetMismatchError
    naming the ``--targets`` to re-export with); LoRA shapes equal the weight's, SHiRA holds
    ``r (out + in)`` values (PEFT's SHiRA layer always does) at distinct in-range indices
    (AdapterFormatError); ``modules_to_save`` only a classifier head of the bundle with a zero
    bias.
    """
    where = str(peft.path)
    _check_base_name(peft, manifest, force_base, bundle)
    heads = set(manifest.heads)
    live = {n.removesuffix(".weight") for n in manifest.weights if n not in heads}
    strip, add = _prefix_change(list(peft.targets), live)

    def rename(module: str) -> str | None:
        return add + module.removeprefix(strip) if module.startswith(strip) else None

    names = {m: rename(m) for m in peft.targets}
    unmatched = sorted(m for m, n in names.items() if n not in live)
    if unmatched:
        raise TargetMismatchError(_unmatched_message(peft, manifest, names, unmatched, live,
                                                     bundle))
    targets: dict[str, LoraDelta | ShiraDelta] = {}
    for module, delta in peft.targets.items():
        name = f"{names[module]}.weight"
        out_f, in_f = manifest.weights[name].shape
        if isinstance(delta, LoraDelta):
            got = (int(delta.B.shape[0]), int(delta.A.shape[1]))
            if got != (out_f, in_f):
                raise AdapterFormatError(
                    f"{where}: module {module!r} changes a {list(got)} weight, but the "
                    f"bundle's {name} is {[out_f, in_f]}: an adapter for another model size")
            targets[name] = delta
        else:
            r = peft.config.get("r")
            if isinstance(r, int) and not isinstance(r, bool) and (
                    delta.values.size != r * (out_f + in_f)):
                raise AdapterFormatError(  # PEFT's SHiRA layer holds exactly r (out + in)
                    f"{where}: module {module!r} holds {delta.values.size} SHiRA values, but "
                    f"r={r} on the bundle's {name} {[out_f, in_f]} makes {r * (out_f + in_f)}:"
                    " an adapter for another model size")
            targets[name] = _shira_delta(delta, module, name, (out_f, in_f), where)
    head = _heads(peft, manifest, rename, where)
    method = peft.method
    meta = {"peft": {"peft_type": peft.peft_type, "dir": peft.path.name,
                     "base_model_name_or_path": peft.base_model,
                     "modules": {names[m] + ".weight": m for m in peft.targets},
                     "scaling": {names[m] + ".weight": s for m, s in peft.scaling.items()},
                     "config": peft.config}}
    return Adapter(method=method, targets=targets,
                   shapes={n: tuple(manifest.weights[n].shape) for n in targets},
                   weight_sha256={n: manifest.weights[n].sha256 for n in targets},
                   meta=meta, head=head)


def same_base(peft_name: str | None, bundle_model: str) -> bool | None:
    """Whether PEFT's ``base_model_name_or_path`` names the bundle's model: equal names (case
    does not matter on the Hub), a registry name and its Hub repository
    (:data:`BASE_ALIASES`), or one local directory. None where PEFT recorded no name."""
    if not peft_name:
        return None

    def names(n: str) -> set[str]:
        out = {n, *BASE_ALIASES.get(n, ())}
        out |= {k for k, hub in BASE_ALIASES.items() if n.casefold() in
                {h.casefold() for h in hub}}
        return {x.rstrip("/").casefold() for x in out}

    if names(peft_name) & names(bundle_model):
        return True
    a, b = Path(peft_name), Path(bundle_model)
    try:
        return a.is_dir() and b.is_dir() and a.samefile(b)
    except OSError:
        return False


def _check_base_name(peft: PeftAdapter, manifest: Manifest, force_base: bool,
                     bundle: str | Path) -> None:
    if force_base or same_base(peft.base_model, model_location(manifest, bundle)) is not False:
        return
    raise FingerprintMismatchError(
        f"{peft.path / CONFIG_FILE}: base_model_name_or_path is {peft.base_model!r}, but the "
        f"bundle at {bundle} holds {manifest.model!r}: the adapter was made for another base "
        "model. Export it into a bundle of its model, or pass --force-base if the weights are "
        "the same (shapes are still checked)")


def _prefix_change(modules: list[str], live: set[str]) -> tuple[str, str]:
    """``(strip, add)`` that turns the most PEFT module names into live module names of the
    bundle (``add + name.removeprefix(strip)``), e.g. ``("", "model.")`` for a PEFT adapter
    made on ``LlamaModel`` and a ``LlamaForCausalLM`` bundle. Ties: no change first, then the
    shortest change. ``("", "")`` when no name matches at all."""
    votes: Counter[tuple[str, str]] = Counter()
    for m in modules:
        for n in live:
            if n == m:
                votes["", ""] += 1
            elif n.endswith("." + m):
                votes["", n[:-len(m)]] += 1
            elif m.endswith("." + n):
                votes[m[:-len(n)], ""] += 1
    if not votes:
        return "", ""
    return min(votes, key=lambda k: (-votes[k], len(k[0]) + len(k[1]), k))


def targets_spec(peft: PeftAdapter, bundle_modules: list[str]) -> str:
    """An ``edgeadapt export base --targets`` regex selecting the modules ``peft`` adapts:
    PEFT's ``target_modules`` list as name suffixes where no layer filter applies, else the
    modules themselves (in the bundle's names)."""
    cfg = peft.config
    listed = cfg.get("target_modules")
    if (isinstance(listed, list) and listed and all(isinstance(t, str) for t in listed)
            and cfg.get("layers_to_transform") is None and not cfg.get("layers_pattern")):
        return r"(^|\.)(" + "|".join(re.escape(t) for t in sorted(set(listed))) + ")$"
    return "^(" + "|".join(re.escape(m) for m in sorted(set(bundle_modules))) + ")$"


def _unmatched_message(peft: PeftAdapter, manifest: Manifest, names: dict[str, str | None],
                       unmatched: list[str], live: set[str], bundle: str | Path) -> str:
    shown = ", ".join(unmatched[:4]) + (f" (+{len(unmatched) - 4} more)"
                                         if len(unmatched) > 4 else "")
    if len(unmatched) == len(names):
        return (f"{peft.path}: none of the {len(names)} module(s) the PEFT adapter changes "
                f"({shown}) is a live weight of the bundle at {bundle} (model "
                f"{manifest.model!r}, live weights like {sorted(live)[:2]}): an adapter for "
                "another architecture, or a bundle exported without these weights live; "
                f"re-export the base with --targets '{targets_spec(peft, unmatched)}' if the "
                "model is the right one")
    mapped = [names[m] or m for m in names]
    return (f"{peft.path}: the PEFT adapter changes {len(unmatched)} module(s) the bundle at "
            f"{bundle} does not make live: {shown}. The bundle was exported with --targets "
            f"{manifest.targets_spec!r}; re-export the base with --targets "
            f"'{targets_spec(peft, mapped)}'")


def _shira_delta(delta: CooDelta, module: str, name: str, shape: tuple[int, int],
                 where: str) -> ShiraDelta:
    out_f, in_f = shape
    if delta.rows.size and (int(delta.rows.max()) >= out_f or int(delta.cols.max()) >= in_f):
        raise AdapterFormatError(
            f"{where}: module {module!r}: shira_indices reach row {int(delta.rows.max())}, "
            f"column {int(delta.cols.max())}, outside the bundle's {name} {[out_f, in_f]}: "
            "an adapter for another model size")
    flat = delta.rows * in_f + delta.cols
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    if flat.size > 1 and not bool(np.all(flat[1:] > flat[:-1])):
        raise AdapterFormatError(f"{where}: module {module!r}: shira_indices repeat a "
                                 "position; PEFT's masks never do (a corrupt adapter?)")
    return ShiraDelta(indices=flat.astype(np.int64), values=delta.values[order])


def _heads(peft: PeftAdapter, manifest: Manifest, rename, where: str) -> dict[str, np.ndarray]:
    """``modules_to_save`` tensors that are a classifier head of the bundle (weight kept as
    the adapter's head; bias must be zero, as edgeadapt's heads are bias-free)."""
    head: dict[str, np.ndarray] = {}
    for key, arr in sorted(peft.saved.items()):
        module, param = key.rsplit(".", 1)
        candidates = [f"{n}.weight" for n in (rename(module), module) if n is not None]
        name = next((c for c in candidates if c in manifest.heads), None)
        if name is None:
            raise TargetMismatchError(
                f"{where}: modules_to_save holds {module!r}, which is not a classifier head of "
                f"the bundle (heads: {manifest.heads or 'none'}); edgeadapt carries adapters "
                "of live weights and task heads only")
        if param == "bias":
            if np.any(arr != 0):
                raise AdapterFormatError(
                    f"{where}: modules_to_save {module!r} has a trained bias; edgeadapt's "
                    "heads are bias-free (the bias stays at its zero init): retrain with the "
                    "head's bias frozen at zero")
        elif param == "weight":
            if tuple(arr.shape) != tuple(manifest.weights[name].shape):
                raise AdapterFormatError(f"{where}: head {key!r} is {list(arr.shape)}, the "
                                         f"bundle's {name} {list(manifest.weights[name].shape)}")
            head[name] = np.ascontiguousarray(arr, dtype=np.float32)
        else:
            raise AdapterFormatError(f"{where}: modules_to_save tensor {key!r} is neither the "
                                     "head's weight nor its bias")
    return head
