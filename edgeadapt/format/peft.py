"""Hugging Face PEFT adapter directories: read a PEFT LoRA or SHiRA adapter (this module),
match it to a bundle as an edgeadapt :class:`~edgeadapt.format.types.Adapter`
(:mod:`edgeadapt.format.peft_match`), write an Adapter as a PEFT adapter
(:mod:`edgeadapt.format.peft_write`).

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
shapes, finite values, options edgeadapt cannot reproduce), then
:func:`edgeadapt.format.peft_match.peft_to_adapter` matches it to a bundle's live weights (names,
shapes, index ranges, base model name): PEFT stores no hash of the base, so what can be checked
is checked and the adapter takes the bundle's weight hashes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import deserialize

from edgeadapt.errors import (
    AdapterFormatError,
)
from edgeadapt.format.codecs import bf16_bits_to_f32
from edgeadapt.format.container import read_json_object
from edgeadapt.format.types import LoraDelta

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
    def unexpected(key: str) -> str:
        hint = (" (a LoRA variant or an embedding / bias tensor edgeadapt does not import)"
                if _LORA_OTHER.fullmatch(key) else "")
        return f"{hint}; edgeadapt imports lora_A / lora_B of nn.Linear layers"

    parts = _by_module(tensors, _LORA_KEY, weights_file, unexpected)
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


def _by_module(tensors: dict[str, np.ndarray], pattern: re.Pattern, weights_file: Path,
               unexpected: Callable[[str], str]) -> dict[str, dict[str, np.ndarray]]:
    """The tensors grouped as {module: {part: array}} by ``pattern``'s ``module`` and ``part``
    groups; AdapterFormatError for a key it does not match (``unexpected(key)``: the rest of
    the message)."""
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        m = pattern.fullmatch(key)
        if m is None:
            raise AdapterFormatError(f"{weights_file}: unexpected tensor {key!r}"
                                     f"{unexpected(key)}")
        parts.setdefault(m["module"], {})[m["part"]] = arr
    return parts


def _read_shira(peft: PeftAdapter, tensors: dict[str, np.ndarray], cfg_file: Path,
                weights_file: Path) -> None:
    if peft.config.get("fan_in_fan_out"):
        raise AdapterFormatError(f"{cfg_file}: fan_in_fan_out=True; PEFT's SHiRA adapts "
                                 "nn.Linear layers only, which never have it")
    parts = _by_module(tensors, _SHIRA_KEY, weights_file,
                       lambda key: "; a SHiRA adapter holds shira_weight and shira_indices")
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
