"""Torch-free adapter payloads and files: the ``.eadp`` adapter file and ``bundle.json``.

Spec: docs/format.md. Nothing here imports torch (the ONNX Runtime path depends on it).
"""

from edgeadapt.format.adapter_file import (
    FORMAT_VERSION,
    VALUE_DTYPES,
    check_against_manifest,
    read_adapter,
    write_adapter,
)
from edgeadapt.format.fingerprint import fingerprint, weight_sha256
from edgeadapt.format.manifest import (
    AdapterEntry,
    Manifest,
    WeightEntry,
    read_manifest,
    variant_key,
    write_manifest,
)
from edgeadapt.format.types import METHODS, Adapter, LoraDelta, ShiraDelta, SiraBranch

__all__ = [
    "FORMAT_VERSION", "METHODS", "VALUE_DTYPES", "Adapter", "AdapterEntry", "LoraDelta",
    "Manifest", "ShiraDelta", "SiraBranch", "WeightEntry", "check_against_manifest",
    "fingerprint", "read_adapter", "read_manifest", "variant_key", "weight_sha256",
    "write_adapter", "write_manifest",
]
