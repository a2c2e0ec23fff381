"""``bundle.json``: the versioned manifest of a deployment bundle (schema: docs/design.md,
checks: docs/format.md §5). Written by export, read by the runtime; problems raise BundleError.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from edgeadapt.errors import BundleError
from edgeadapt.format.container import atomic_write_bytes
from edgeadapt.format.fingerprint import fingerprint as _fingerprint
from edgeadapt.format.types import METHODS

MANIFEST_NAME = "bundle.json"
FORMAT_NAME = "edgeadapt-bundle"
FORMAT_VERSION = 2
#: version 1 named the ONNX Runtime sections "onnx"; read, they are renamed (:func:`_upgrade`)
V1_SECTION_NAMES = {"onnx": "onnxruntime"}
KINDS = ("classifier", "causal-lm")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KNOWN = {"format", "version", "model", "model_config_sha256", "kind", "fingerprint",
          "targets_spec", "inputs", "weights", "onnxruntime", "executorch", "adapters",
          "variants", "heads"}


@dataclass
class WeightEntry:
    """One adaptable base weight: torch layout ``shape`` (out, in), dtype, sha256 of its fp32
    bytes, and where each backend keeps it (``onnxruntime``: {"name", "layout"};
    ``executorch``: {"buffer"}), None for a backend not exported."""

    shape: tuple[int, int]
    dtype: str
    sha256: str
    onnxruntime: dict | None = None
    executorch: dict | None = None

    def to_dict(self) -> dict:
        d: dict = {"shape": list(self.shape), "dtype": self.dtype, "sha256": self.sha256}
        if self.onnxruntime is not None:
            d["onnxruntime"] = self.onnxruntime
        if self.executorch is not None:
            d["executorch"] = self.executorch
        return d


@dataclass
class AdapterEntry:
    """A registered adapter: ``file`` relative to the bundle, its method, and the graph
    ``variant`` it needs (None: the base graphs; else a key of Manifest.variants)."""

    file: str
    method: str
    variant: str | None = None
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d: dict = {"file": self.file, "method": self.method}
        if self.variant is not None:
            d["variant"] = self.variant
        return {**d, **self.info}


@dataclass
class Manifest:
    """The parsed, validated ``bundle.json``.

    variants: key (see :func:`variant_key`) -> {"branch": {...}, "dir": "variants/<key>",
    "onnxruntime": section, "executorch": section,
    "weights": {name: {"onnxruntime": ..., "executorch": ...}}}
    for graphs that carry unfused branches (SiRA; unfused LoRA).
    heads: names in ``weights`` that are a classifier's task head: live like the adaptable
    weights, but replaced by an adapter's head rather than changed by a delta.
    model: a registry name (``smollm2``), or a local model directory: relative to the bundle
    directory (``./x``, ``../x``) where ``model_config_sha256`` (sha256 of the directory's
    config.json bytes) is recorded, else as written (older bundles: absolute). Where to load
    it from: :func:`model_location`.
    """

    model: str
    kind: str
    targets_spec: str
    weights: dict[str, WeightEntry]
    inputs: list[dict] = field(default_factory=list)
    onnxruntime: dict | None = None
    executorch: dict | None = None
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    variants: dict[str, dict] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    version: int = FORMAT_VERSION
    model_config_sha256: str | None = None

    @property
    def fingerprint(self) -> str:
        """sha256 over the adaptable weights' hashes (edgeadapt.format.fingerprint)."""
        return _fingerprint({n: w.sha256 for n, w in self.weights.items()})

    def to_dict(self) -> dict:
        d: dict = {"format": FORMAT_NAME, "version": self.version, "model": self.model}
        if self.model_config_sha256 is not None:
            d["model_config_sha256"] = self.model_config_sha256
        d |= {"kind": self.kind, "fingerprint": self.fingerprint,
                   "targets_spec": self.targets_spec, "inputs": self.inputs,
                   "weights": {n: w.to_dict() for n, w in self.weights.items()}}
        if self.onnxruntime is not None:
            d["onnxruntime"] = self.onnxruntime
        if self.executorch is not None:
            d["executorch"] = self.executorch
        d["adapters"] = {n: a.to_dict() for n, a in self.adapters.items()}
        d["variants"] = self.variants
        if self.heads:
            d["heads"] = list(self.heads)
        return {**d, **self.extra}


def variant_key(branch: tuple) -> str:
    """Name of a graph variant: ``("sira", E, r, top_k, cf)`` -> ``"sira-e4-r8-k2-c1.25"``,
    ``("lora", r)`` -> ``"lora-r8"``."""
    if branch and branch[0] == "sira" and len(branch) == 5:
        _, e, r, k, cf = branch
        return f"sira-e{int(e)}-r{int(r)}-k{int(k)}-c{float(cf):g}"
    if branch and branch[0] == "lora" and len(branch) == 2:
        return f"lora-r{int(branch[1])}"
    raise BundleError(f"unknown graph branch {branch!r}; expected ('sira', E, r, top_k, "
                      "capacity_factor) or ('lora', r)")


def model_location(manifest: Manifest, bundle: str | os.PathLike) -> str:
    """Where to load the base of the bundle at ``bundle`` (its directory or bundle.json) from,
    for ``edgeadapt.models.load_model``: a registry name as recorded; a model directory
    recorded relative to the bundle (bundles with ``model_config_sha256``) joined to the
    bundle's directory; anything else (an absolute path, an older bundle's path) as recorded.
    Whether the directory is there is the caller's check."""
    model = manifest.model
    if manifest.model_config_sha256 is None or PurePosixPath(model).is_absolute() \
            or os.path.isabs(model):
        return model
    root = manifest_path(bundle).parent.resolve()
    return os.path.normpath(root / PurePosixPath(model))


def manifest_path(path: str | os.PathLike) -> Path:
    """``bundle/`` or ``bundle/bundle.json`` -> the manifest file's path."""
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() or p.suffix != ".json" else p


def write_manifest(path: str | os.PathLike, manifest: Manifest) -> Path:
    """Validate and write ``manifest`` atomically to ``path`` (bundle dir or json file)."""
    out = manifest_path(path)
    data = manifest.to_dict()
    _validate(data, out)  # never write what the reader would refuse
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    atomic_write_bytes(out, [text.encode()])
    return out


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate ``bundle.json`` (path: the bundle directory or the file)."""
    p = manifest_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(f"{p}: no bundle manifest here; create one with "
                          "`edgeadapt export base`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{p}: cannot read: {exc}") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{p}: not valid JSON: {exc}") from None
    return _validate(data, p)


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _validate(data: object, p: Path) -> Manifest:
    def fail(msg: str) -> BundleError:
        return BundleError(f"{p}: {msg}")

    if not isinstance(data, dict):
        raise fail("manifest is not a JSON object")
    if data.get("format") != FORMAT_NAME:
        raise fail(f"format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail(f"version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise fail(f"version {version} was written by a newer edgeadapt (this one reads up to "
                   f"{FORMAT_VERSION})")
    if version < FORMAT_VERSION:
        data = _upgrade(data)
    for key in ("model", "targets_spec"):
        if not isinstance(data.get(key), str):
            raise fail(f"{key!r} missing or not a string")
    config_sha = data.get("model_config_sha256")
    if config_sha is not None and (not isinstance(config_sha, str)
                                   or not _HEX64.fullmatch(config_sha)):
        raise fail(f"model_config_sha256 {config_sha!r} is not 64 lowercase hex digits")
    if data.get("kind") not in KINDS:
        raise fail(f"kind {data.get('kind')!r} not one of {KINDS}")
    inputs = data.get("inputs", [])
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise fail("inputs must be a list of objects")
    for key in ("seed", "num_labels"):  # export_base's extras; export_adapter reloads with them
        if data.get(key) is not None and (isinstance(data[key], bool)
                                          or not isinstance(data[key], int)):
            raise fail(f"{key!r} must be an integer or null, not {data[key]!r}")
    section = data.get("executorch")
    for key in ("max_batch", "max_seq"):
        if isinstance(section, dict) and key in section and (
                isinstance(section[key], bool) or not isinstance(section[key], int)
                or section[key] < 1):
            raise fail(f"executorch {key!r} must be a positive integer, not {section[key]!r}")
    raw_weights = data.get("weights")
    if not isinstance(raw_weights, dict):
        raise fail("weights missing or not an object")
    weights = {}
    for name, w in raw_weights.items():
        weights[name] = _weight(name, w, fail)
    for key in ("onnxruntime", "executorch"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise fail(f"{key!r} section is not an object")
    variants = data.get("variants", {})
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise fail("variants must map keys to objects")
    for key, v in variants.items():
        if "dir" in v:
            _relative(v["dir"], f"variant {key!r} dir", fail)
    heads = data.get("heads", [])
    if not isinstance(heads, list) or not all(isinstance(h, str) and h in weights for h in heads):
        raise fail("heads must be a list of names from weights")
    raw_adapters = data.get("adapters", {})
    if not isinstance(raw_adapters, dict):
        raise fail("adapters is not an object")
    adapters = {}
    for name, a in raw_adapters.items():
        if not isinstance(a, dict):
            raise fail(f"adapter {name!r} entry is not an object")
        if a.get("method") not in METHODS:
            raise fail(f"adapter {name!r}: unknown method {a.get('method')!r}")
        _relative(a.get("file"), f"adapter {name!r} file", fail)
        variant = a.get("variant")
        if variant is not None and variant not in variants:
            raise fail(f"adapter {name!r} needs graph variant {variant!r}, not in the bundle")
        info = {k: v for k, v in a.items() if k not in ("file", "method", "variant")}
        adapters[name] = AdapterEntry(file=a["file"], method=a["method"], variant=variant,
                                      info=info)
    m = Manifest(model=data["model"], kind=data["kind"], targets_spec=data["targets_spec"],
                 weights=weights, inputs=inputs, onnxruntime=data.get("onnxruntime"),
                 executorch=data.get("executorch"), adapters=adapters, variants=variants,
                 heads=heads, extra={k: v for k, v in data.items() if k not in _KNOWN},
                 version=FORMAT_VERSION,  # an older file is upgraded as it is read
                 model_config_sha256=config_sha)
    if data.get("fingerprint") != m.fingerprint:
        raise fail("fingerprint does not match the weights' sha256 (edited or corrupt manifest)")
    return m


def _upgrade(data: dict) -> dict:
    """A version-1 manifest in version 2's names: each backend's sections are keyed by the
    backend (``onnxruntime``, ``executorch``), where version 1 wrote ``onnx`` for ONNX Runtime's
    (top level, per weight, per graph variant and per variant weight). Nothing else changed."""
    def renamed(d: object) -> object:
        if not isinstance(d, dict):
            return d
        return {V1_SECTION_NAMES.get(k, k): v for k, v in d.items()}

    data = renamed(data)
    if isinstance(data.get("weights"), dict):
        data["weights"] = {n: renamed(w) for n, w in data["weights"].items()}
    if isinstance(data.get("variants"), dict):
        data["variants"] = {k: _upgrade_variant(renamed(v))
                            for k, v in data["variants"].items()}
    return data


def _upgrade_variant(v: object) -> object:
    if isinstance(v, dict) and isinstance(v.get("weights"), dict):
        v["weights"] = {n: {V1_SECTION_NAMES.get(k, k): e for k, e in w.items()}
                        if isinstance(w, dict) else w for n, w in v["weights"].items()}
    return v


def _weight(name: str, w: object, fail) -> WeightEntry:
    if not isinstance(w, dict):
        raise fail(f"weight {name!r} entry is not an object")
    shape = w.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
            or math.prod(shape) > 2**48):
        raise fail(f"weight {name!r}: shape {shape!r} is not [out, in]")
    if not isinstance(w.get("dtype"), str):
        raise fail(f"weight {name!r}: dtype missing")
    if not isinstance(w.get("sha256"), str) or not _HEX64.fullmatch(w["sha256"]):
        raise fail(f"weight {name!r}: sha256 is not 64 lowercase hex digits")
    for key in ("onnxruntime", "executorch"):
        if w.get(key) is not None and not isinstance(w[key], dict):
            raise fail(f"weight {name!r}: {key!r} entry is not an object")
    return WeightEntry(shape=(shape[0], shape[1]), dtype=w["dtype"], sha256=w["sha256"],
                       onnxruntime=w.get("onnxruntime"), executorch=w.get("executorch"))


def _relative(value: object, what: str, fail) -> None:
    if not isinstance(value, str) or not value:
        raise fail(f"{what} missing")
    pp = PurePosixPath(value)
    if pp.is_absolute() or ".." in pp.parts or "\\" in value:
        raise fail(f"{what} {value!r} must be a relative path inside the bundle")
