"""Hugging Face PEFT adapter directories: read a PEFT LoRA or SHiRA adapter into an edgeadapt
:class:`~edgeadapt.format.types.Adapter` for a bundle, and write an Adapter as a PEFT adapter.

Spec: docs/format.md §7. Torch-free: safetensors' own parser and numpy. A PEFT adapter
directory (``save_pretrained``) holds

- ``adapter_config.json``: ``peft_type`` (``LORA`` | ``SHIRA`` here), ``base_model_name_or_path``,
  and the method's options (LoRA: ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
  ``alpha_pattern``, ``fan_in_fan_out``, ``target_modules``, ...);
- ``adapter_model.safetensors``, keyed ``base_model.model.<module>.<part>``: LoRA
  ``lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r); SHiRA ``shira_weight`` (K,) and
  ``shira_indices`` (2, K) int, rows then columns; ``modules_to_save`` modules as
  ``<module>.<parameter>`` (a classifier head). The older ``adapter_model.bin`` is a pickle and
  is never opened.

Reading is two steps: :func:`read_peft` parses and checks the directory on its own (types,
shapes, finite values, options edgeadapt cannot reproduce), :func:`peft_to_adapter` matches it
to a bundle's live weights (names, shapes, index ranges, base model name): PEFT stores no hash of
the base, so what can be checked is checked and the adapter takes the bundle's weight hashes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import deserialize

from edgeadapt.errors import (
    AdapterFormatError,
    ConfigError,
    FingerprintMismatchError,
    TargetMismatchError,
)
from edgeadapt.format.codecs import bf16_bits_to_f32
from edgeadapt.format.container import atomic_write_bytes, read_json_object
from edgeadapt.format.manifest import Manifest, model_location
from edgeadapt.format.types import Adapter, LoraDelta, ShiraDelta

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
#: what PEFT's wrappers (PeftModel.base_model.model) put before every module name
KEY_PREFIX = "base_model.model."
#: PEFT type -> edgeadapt method
PEFT_TYPES = {"LORA": "lora", "SHIRA": "shira"}
#: edgeadapt registry names (``edgeadapt.models.REAL_MODELS``) -> the Hugging Face Hub
#: repositories their weights come from, for the base-model name check. (smollm2 is the Q4_1
#: GGUF of the Instruct model, dequantised: the same model, not bit-identical weights.)
BASE_ALIASES = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2",),
                "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct",)}
#: LoRA options that change what the adapter computes beyond ``W + s B A``: refused when set
#: (VeLoRA changes the backward pass only and is accepted)
REFUSED_LORA_OPTIONS = {
    "use_dora": "DoRA", "use_qalora": "QALoRA", "lora_bias": "a LoRA bias",
    "monteclora_config": "MonteCLoRA", "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "layer_replication": "layer replication", "target_parameters": "LoRA on nn.Parameters",
    "trainable_token_indices": "trainable tokens",
}
#: ``init_lora_weights`` values that rewrite the base weights when the adapter is created
#: (the adapter then only fits the rewritten base)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")
_SHIRA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>shira_weight|shira_indices)")
_LORA_OTHER = re.compile(r".+\.(lora_\w+|base_layer)(\.|$)")


@dataclass(frozen=True)
class CooDelta:
    """PEFT SHiRA's delta of one weight, before the weight's shape is known: ``W[rows[k],
    cols[k]] += values[k]``. rows, cols: (K,) int64; values: (K,) float32."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray


@dataclass
class PeftAdapter:
    """A PEFT adapter directory as read by :func:`read_peft`.

    targets: PEFT module name (``base_model.model.`` removed) -> its delta in the weight
        parameter's layout: LoRA a LoraDelta with the scaling folded into B (``fan_in_fan_out``
        transposed), SHiRA a CooDelta.
    scaling: LoRA module -> the ``lora_alpha / r`` (rsLoRA: ``/ sqrt(r)``) folded into B.
    saved: ``modules_to_save`` tensors, ``<module>.<parameter>`` -> float32 array.
    """

    path: Path
    peft_type: str
    config: dict[str, Any]
    targets: dict[str, LoraDelta | CooDelta]
    scaling: dict[str, float] = field(default_factory=dict)
    saved: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return PEFT_TYPES[self.peft_type]

    @property
    def base_model(self) -> str | None:
        """``base_model_name_or_path``, or None where PEFT recorded none."""
        name = self.config.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None


def is_peft_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a PEFT ``adapter_config.json``."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft(path: str | Path) -> PeftAdapter:
    """Read and check a PEFT adapter directory (LoRA or SHiRA).

    Raises AdapterFormatError naming the file and the fix: no or unreadable
    ``adapter_config.json``; only the pickle ``adapter_model.bin``; a PEFT type other than LORA
    and SHIRA; LoRA options edgeadapt does not reproduce (:data:`REFUSED_LORA_OPTIONS`,
    :data:`BASE_CHANGING_INITS`, ``bias`` other than ``none``); tensors that are not the method's
    (with their shapes and dtypes) or not finite.
    """
    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = _read_config(cfg_file)
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterFormatError(
            f"{cfg_file}: PEFT type {peft_type!r} is not supported; edgeadapt imports "
            f"{' and '.join(PEFT_TYPES)} adapters (other methods: merge them into the base "
            "with PEFT's merge_and_unload and export that model)")
    if not weights_file.is_file():
        if (path / PICKLE_FILE).is_file():
            raise AdapterFormatError(
                f"{path / PICKLE_FILE}: a pickle, which edgeadapt never loads (no pickle); "
                f"re-save the adapter with save_pretrained(..., safe_serialization=True) to "
                f"get {WEIGHTS_FILE}")
        raise AdapterFormatError(f"{weights_file} is missing: save the adapter with PEFT's "
                                 "save_pretrained (safe_serialization=True)")
    tensors = _read_tensors(weights_file)
    saved_modules = _module_list(config.get("modules_to_save"))
    saved = {k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()
             if _listed(k.removeprefix(KEY_PREFIX).rsplit(".", 1)[0], saved_modules)}
    rest = {k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()
            if k.removeprefix(KEY_PREFIX) not in saved}
    for key, arr in saved.items():
        _check_float(arr, key, weights_file)
    peft = PeftAdapter(path=path, peft_type=peft_type, config=config, targets={},
                       saved={k: v.astype(np.float32) for k, v in saved.items()})
    if peft_type == "LORA":
        _read_lora(peft, rest, cfg_file, weights_file)
    else:
        _read_shira(peft, rest, cfg_file, weights_file)
    if not peft.targets:
        raise AdapterFormatError(f"{weights_file}: no {peft_type} tensors in it")
    return peft


def _read_config(file: Path) -> dict[str, Any]:
    return read_json_object(file, "not a PEFT adapter directory (PEFT's save_pretrained "
                                  "writes it)")


def _read_tensors(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy (bf16 widened exactly to float32)."""
    try:
        entries = deserialize(file.read_bytes())
    except OSError as exc:
        raise AdapterFormatError(f"{file} cannot be read: {exc.strerror or exc}") from exc
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise AdapterFormatError(f"{file} is not a valid safetensors file: {exc}") from exc
    out: dict[str, np.ndarray] = {}
    for name, entry in entries:
        dtype = entry["dtype"]
        if dtype == "BF16":
            arr = bf16_bits_to_f32(np.frombuffer(entry["data"], dtype="<u2"))
        else:
            np_dtype = _NUMPY.get(dtype)
            if np_dtype is None:
                raise AdapterFormatError(f"{file}: tensor {name!r} has dtype {dtype}, which "
                                         "no PEFT LoRA or SHiRA tensor has")
            arr = np.frombuffer(entry["data"], dtype=np_dtype)
        out[name] = arr.reshape(entry["shape"])
    return out


_NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U8": "u1"}


def _module_list(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, (list, tuple)):
        return {v for v in value if isinstance(v, str)}
    return set()


def _listed(module: str, names: set[str]) -> bool:
    """PEFT's rule for ``modules_to_save``: the module's name or its last dotted part(s)."""
    return any(module == n or module.endswith("." + n) for n in names)


def _check_float(arr: np.ndarray, key: str, file: Path) -> None:
    if arr.dtype.kind != "f":
        raise AdapterFormatError(f"{file}: tensor {key!r} has dtype {arr.dtype}, expected a "
                                 "float")
    if not np.all(np.isfinite(arr)):
        raise AdapterFormatError(f"{file}: tensor {key!r} has non-finite values (NaN or Inf): "
                                 "the adapter diverged in training; retrain or re-save it")


def _read_lora(peft: PeftAdapter, tensors: dict[str, np.ndarray], cfg_file: Path,
               weights_file: Path) -> None:
    cfg = peft.config
    for option, what in REFUSED_LORA_OPTIONS.items():
        if cfg.get(option):
            raise AdapterFormatError(
                f"{cfg_file}: {option}={cfg[option]!r} ({what}) computes more than W + s B A; "
                f"edgeadapt imports plain LoRA and rsLoRA (merge it with PEFT's "
                f"merge_and_unload and export that model instead)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterFormatError(
            f"{cfg_file}: init_lora_weights={init!r} rewrote the base weights when the adapter "
            "was made, so it does not fit the original base; save it with PEFT's "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain "
            "LoRA of the original base")
    if cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"{cfg_file}: bias={cfg['bias']!r} trains base biases, "
                                 "which edgeadapt does not carry; retrain with bias='none'")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            hint = (" (a LoRA variant or an embedding / bias tensor edgeadapt does not import)"
                    if _LORA_OTHER.fullmatch(key) else "")
            raise AdapterFormatError(f"{weights_file}: unexpected tensor {key!r}{hint}; "
                                     "edgeadapt imports lora_A / lora_B of nn.Linear layers")
        parts.setdefault(m["module"], {})[m["part"]] = arr
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    for module, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise AdapterFormatError(f"{weights_file}: module {module!r} has "
                                     f"{sorted(p)} but needs both lora_A and lora_B")
        A, B = p["lora_A"], p["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
            raise AdapterFormatError(
                f"{weights_file}: module {module!r}: lora_A {list(A.shape)} and lora_B "
                f"{list(B.shape)} are not (r, in) and (out, r) of one rank r (a LoRA of "
                "a non-Linear layer?)")
        for part, arr in p.items():
            _check_float(arr, f"{KEY_PREFIX}{module}.{part}.weight", weights_file)
        s = _lora_scaling(cfg, module, int(A.shape[0]), cfg_file)
        A64, B64 = A.astype(np.float64), B.astype(np.float64)
        if fan_in_fan_out:  # the layer stores (in, out): its delta is (B A)^T = A^T B^T
            delta = LoraDelta(A=B64.T.astype(np.float32), B=(A64.T * s).astype(np.float32))
        else:
            delta = LoraDelta(A=A.astype(np.float32), B=(B64 * s).astype(np.float32))
        peft.targets[module] = delta
        peft.scaling[module] = s


def _pattern_key(patterns: dict, module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key PEFT applies to ``module``
    (peft.utils.other.get_pattern_key: the first key matching ``(.*\\.)?(key)$``)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _lora_scaling(cfg: dict[str, Any], module: str, rank: int, cfg_file: Path) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with use_rslora) of ``module``, as PEFT computes it
    (absent options take PEFT's defaults: r 8, lora_alpha 8)."""
    def number(value: Any, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value) or value <= 0:
            raise AdapterFormatError(f"{cfg_file}: {what} for {module!r} is {value!r}, not a "
                                     "positive number")
        return float(value)

    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not isinstance(alphas, dict):
        raise AdapterFormatError(f"{cfg_file}: rank_pattern and alpha_pattern must be objects")
    r_key, a_key = _pattern_key(ranks, module), _pattern_key(alphas, module)
    r = number(ranks[r_key] if r_key is not None else cfg.get("r", 8), "r")
    if r != rank:
        raise AdapterFormatError(f"{cfg_file}: r is {r:g} for {module!r} but its lora_A has "
                                 f"rank {rank}: the config does not belong to these weights")
    alpha = number(alphas[a_key] if a_key is not None else cfg.get("lora_alpha", 8),
                   "lora_alpha")
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _read_shira(peft: PeftAdapter, tensors: dict[str, np.ndarray], cfg_file: Path,
                weights_file: Path) -> None:
    if peft.config.get("fan_in_fan_out"):
        raise AdapterFormatError(f"{cfg_file}: fan_in_fan_out=True; PEFT's SHiRA adapts "
                                 "nn.Linear layers only, which never have it")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = _SHIRA_KEY.fullmatch(key)
        if m is None:
            raise AdapterFormatError(f"{weights_file}: unexpected tensor {key!r}; a SHiRA "
                                     "adapter holds shira_weight and shira_indices")
        parts.setdefault(m["module"], {})[m["part"]] = arr
    for module, p in sorted(parts.items()):
        if set(p) != {"shira_weight", "shira_indices"}:
            raise AdapterFormatError(f"{weights_file}: module {module!r} has {sorted(p)} but "
                                     "needs both shira_weight and shira_indices")
        values, idx = p["shira_weight"], p["shira_indices"]
        key = f"{KEY_PREFIX}{module}.shira_indices"
        if values.ndim != 1 or idx.shape != (2, values.shape[0]):
            raise AdapterFormatError(f"{weights_file}: module {module!r}: shira_weight "
                                     f"{list(values.shape)} and shira_indices "
                                     f"{list(idx.shape)} are not (K,) and (2, K)")
        _check_float(values, f"{KEY_PREFIX}{module}.shira_weight", weights_file)
        # PEFT writes int32; on Windows float32 holding whole numbers (it casts back on load)
        if idx.dtype.kind == "f" and not np.all(np.isfinite(idx) & (idx == np.round(idx))):
            raise AdapterFormatError(f"{weights_file}: {key!r} holds non-integer indices")
        if idx.dtype.kind not in "iuf":
            raise AdapterFormatError(f"{weights_file}: {key!r} has dtype {idx.dtype}, "
                                     "expected integers")
        idx = idx.astype(np.int64)
        if idx.size and int(idx.min()) < 0:
            raise AdapterFormatError(f"{weights_file}: {key!r} holds negative indices")
        peft.targets[module] = CooDelta(rows=idx[0].copy(), cols=idx[1].copy(),
                                        values=values.astype(np.float32))


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


def write_peft(out: str | Path, adapter: Adapter, base_model: str | None) -> Path:
    """Write ``adapter`` (LoRA, pruned SoRA as LoRA, or SHiRA) as a PEFT adapter directory
    that ``PeftModel.from_pretrained(base, out)`` loads; returns ``out``.

    An adapter read from PEFT (``meta["peft"]``) is written back with its own config, module
    names and unfolded ``lora_B`` (``B / scaling``: exact where the scaling is a power of two).
    Others get one of their own: LoRA with each module's rank as ``r`` and ``lora_alpha`` (so
    PEFT's scaling is 1 and ``lora_B`` carries edgeadapt's folded alpha / r), SHiRA with
    ``r = max ceil(K / (out + in))`` and each mask padded with zero values to the ``r (out +
    in)`` entries PEFT's SHiRA layer holds. A classifier head becomes ``modules_to_save``
    with a zero bias. SiRA has no PEFT equivalent (ConfigError).
    """
    out = Path(out)
    if adapter.method not in ("lora", "sora", "shira"):
        raise ConfigError(f"a {adapter.method} adapter has no PEFT equivalent (SiRA: routed "
                          "LoRA experts, run unfused); convert LoRA, SoRA or SHiRA adapters")
    origin = adapter.meta.get("peft") if isinstance(adapter.meta.get("peft"), dict) else None
    if origin is not None and origin.get("peft_type") != (
            "SHIRA" if adapter.method == "shira" else "LORA"):
        origin = None
    modules = (origin or {}).get("modules") or {}
    targets = {n: _scaled(d, adapter.scale) for n, d in adapter.targets.items()
               if not (isinstance(d, LoraDelta) and d.rank == 0)}  # SoRA: every rank pruned
    if not targets:
        raise AdapterFormatError("the adapter changes no weight: nothing to write")
    key_of = {n: KEY_PREFIX + modules.get(n, n.removesuffix(".weight")) for n in targets}
    if adapter.method == "shira":
        tensors, config = _shira_peft(targets, adapter.shapes, key_of, origin)
    else:
        tensors, config = _lora_peft(targets, key_of, origin)
    heads = sorted(adapter.head)
    for name in heads:
        key = KEY_PREFIX + modules.get(name, name).removesuffix(".weight")
        h = np.ascontiguousarray(adapter.head[name], dtype=np.float32)
        tensors[f"{key}.weight"] = h
        tensors[f"{key}.bias"] = np.zeros(h.shape[0], dtype=np.float32)
    if heads:
        config["modules_to_save"] = sorted({n.removesuffix(".weight") for n in heads})
    if origin is None or "base_model_name_or_path" not in config:
        config["base_model_name_or_path"] = base_model
    _write_dir(out, tensors, config)
    return out


def _scaled(delta: LoraDelta | ShiraDelta, scale: float) -> LoraDelta | ShiraDelta:
    """The delta at the adapter's default strength (PEFT has none: it is folded in)."""
    if scale == 1.0:
        return delta
    if isinstance(delta, LoraDelta):
        return LoraDelta(A=delta.A, B=(delta.B * np.float32(scale)).astype(np.float32))
    return ShiraDelta(indices=delta.indices,
                      values=(delta.values * np.float32(scale)).astype(np.float32))


def _lora_peft(targets: dict, key_of: dict[str, str], origin: dict | None
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    tensors: dict[str, np.ndarray] = {}
    if origin is not None:
        scaling = origin.get("scaling") or {}
        for n, d in targets.items():
            s = float(scaling.get(n, 1.0))
            tensors[f"{key_of[n]}.lora_A.weight"] = np.ascontiguousarray(d.A, np.float32)
            tensors[f"{key_of[n]}.lora_B.weight"] = (d.B.astype(np.float64) / s
                                                     ).astype(np.float32)
        return tensors, dict(origin.get("config") or {})
    ranks = {n: d.rank for n, d in targets.items()}
    r = max(ranks.values())
    pattern = {re.escape(key_of[n].removeprefix(KEY_PREFIX)): k for n, k in ranks.items()
               if k != r}
    for n, d in targets.items():
        tensors[f"{key_of[n]}.lora_A.weight"] = np.ascontiguousarray(d.A, np.float32)
        tensors[f"{key_of[n]}.lora_B.weight"] = np.ascontiguousarray(d.B, np.float32)
    config = {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": r,
              "rank_pattern": pattern, "alpha_pattern": dict(pattern), "use_rslora": False,
              "fan_in_fan_out": False, "bias": "none", "lora_dropout": 0.0,
              "init_lora_weights": True, "inference_mode": True,
              "target_modules": sorted(k.removeprefix(KEY_PREFIX) for k in key_of.values())}
    return tensors, config


def _shira_peft(targets: dict, shapes: dict, key_of: dict[str, str], origin: dict | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if origin is not None:
        config = dict(origin.get("config") or {})
        r = config.get("r")
    else:
        r = max(-(-d.indices.size // (shapes[n][0] + shapes[n][1]))
                for n, d in targets.items())
        config = {"peft_type": "SHIRA", "task_type": None, "r": r, "mask_type": "random",
                  "random_seed": 0, "fan_in_fan_out": False, "init_weights": True,
                  "inference_mode": True,
                  "target_modules": sorted(k.removeprefix(KEY_PREFIX) for k in key_of.values())}
    tensors: dict[str, np.ndarray] = {}
    for n, d in targets.items():
        out_f, in_f = shapes[n]
        want = int(r) * (out_f + in_f) if isinstance(r, int) else d.indices.size
        if want > out_f * in_f or want < d.indices.size:
            raise AdapterFormatError(
                f"SHiRA target {n}: PEFT's SHiRA holds r (out + in) = {want} entries of a "
                f"{[out_f, in_f]} weight, this adapter {d.indices.size}: not representable")
        flat, values = _pad(np.asarray(d.indices, np.int64),
                            np.asarray(d.values, np.float32), want, out_f * in_f)
        tensors[f"{key_of[n]}.shira_weight"] = values
        tensors[f"{key_of[n]}.shira_indices"] = np.stack([flat // in_f, flat % in_f]
                                                         ).astype(np.int32)
    return tensors, config


def _pad(flat: np.ndarray, values: np.ndarray, k: int, numel: int
         ) -> tuple[np.ndarray, np.ndarray]:
    """``flat`` (sorted) plus the ``k - len(flat)`` smallest positions not in it, with value 0,
    all sorted: the same delta with PEFT's count of entries."""
    extra = k - flat.size
    if extra == 0:
        return flat, values
    free = np.setdiff1d(np.arange(min(numel, flat.size + extra), dtype=np.int64), flat,
                        assume_unique=True)[:extra]
    merged = np.concatenate([flat, free])
    order = np.argsort(merged, kind="stable")
    return merged[order], np.concatenate([values, np.zeros(extra, np.float32)])[order]


def _write_dir(out: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())},
                metadata={"format": "pt"})
    atomic_write_bytes(out / WEIGHTS_FILE, [data])
    text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(out / CONFIG_FILE, [text.encode()])
