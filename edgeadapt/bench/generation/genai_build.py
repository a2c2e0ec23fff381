"""The onnxruntime-genai peer's models, built once with genai's own model builder and reused.

onnxruntime-genai is optional (its wheel declares the CPU ``onnxruntime``, whose files would
overwrite onnxruntime-gpu's: ``pip install --no-deps onnxruntime-genai==0.18.0``). Its builder
takes a Hugging Face directory::

    python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p fp32 -e cpu \\
        [--extra_options adapter_path=PEFT_DIR]

- ``base/``: the model as genai ships it (GroupQueryAttention, packed QKV, every weight a
  constant).
- ``lora/``: built with the run's LoRA as a PEFT directory (:func:`edgeadapt.format.peft_write.
  write_peft`), which bakes the LoRA MatMuls into the graph; their A and B initializers are then
  turned into *required* graph inputs and written to ``lora.onnx_adapter``, which genai's
  multi-LoRA API (``og.Adapters``, ``Generator.set_active_adapter``) feeds on every run. Without
  the adapter active the graph cannot run, so a run of it always reads the adapter's tensors.

Both ``genai_config.json`` get the run's intra-op threads and spinning off (genai takes unknown
``session_options`` keys as ONNX Runtime config entries). A stamp file names what a directory was
built from (the Hugging Face directory's config and weight sizes, the LoRA's hash); a directory
whose stamp differs is rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.bench.ort_adapter import write_adapter_params
from edgeadapt.errors import ExportError, MissingPackageError
from edgeadapt.format.manifest import Manifest, model_location
from edgeadapt.format.peft_write import write_peft
from edgeadapt.format.types import Adapter

GENAI_PIP = "pip install --no-deps onnxruntime-genai==0.18.0"
ADAPTER_FILE = "lora.onnx_adapter"
#: the int4 peer's block: edgeadapt's int4 grid (edgeadapt/format/quant.py)
INT4_BLOCK = 32
STAMP = "edgeadapt-genai.json"
_LORA_TENSORS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class GenaiModels:
    """Built genai model directories: ``base``; ``lora`` and its adapter file (None without a
    LoRA); ``lora_params``: the values the adapter holds (its A and B tensors together)."""

    base: Path
    lora: Path | None = None
    adapter_file: Path | None = None
    lora_params: int = 0


def genai_missing() -> str | None:
    """Why the genai peer cannot run here (the package is not installed), or None."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return f"onnxruntime-genai is not installed (optional peer: {GENAI_PIP})"
    return None


def hf_dir(manifest: Manifest, bundle: Path) -> Path | None:
    """The Hugging Face directory the bundle's model comes from: a local model directory as
    the bundle records it, SmolLM2's fp32 copy for ``smollm2`` (made once from the GGUF), else
    None (genai's builder needs a directory)."""
    where = Path(model_location(manifest, bundle))
    if (where / "config.json").is_file():
        return where
    if manifest.model == "smollm2":
        from edgeadapt.models.registry import smollm2_fp32_dir

        return smollm2_fp32_dir()
    return None


def prepare_genai(source: Path, out: Path, lora: Adapter | None, threads: int,
                  precision: str = "fp32") -> GenaiModels:
    """Build (or reuse) genai's CPU models of the Hugging Face directory ``source`` under
    ``out``: ``base`` and, for ``lora``, the multi-LoRA model and its adapter file (module
    docstring); each config set to ``threads`` intra-op threads, spinning off. ``precision``:
    the builder's ``-p`` (``fp32``; ``int4``: its MatMulNBits model, blocks of 32, in
    ``int4-base`` / ``int4-lora``). ExportError where genai's builder fails,
    MissingPackageError where genai is not installed."""
    missing = genai_missing()
    if missing is not None:
        raise MissingPackageError(missing)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "" if precision == "fp32" else f"{precision}-"
    quant = [] if precision == "fp32" else [f"int4_block_size={INT4_BLOCK}",
                                             "int4_is_symmetric=true"]
    tag = {} if precision == "fp32" else {"precision": precision}
    builds = [_Build(out / f"{prefix}base", _stamp(source, tag),
                     ["-p", precision, *(["--extra_options", *quant] if quant else [])])]
    if lora is not None:
        peft_dir = out / "lora-peft"
        write_peft(peft_dir, lora, str(source))
        digest = hashlib.sha256((peft_dir / "adapter_model.safetensors").read_bytes()).hexdigest()
        builds.append(_Build(out / f"{prefix}lora",
                             _stamp(source, {"adapter_sha256": digest, **tag}),
                             ["-p", precision, "--extra_options", f"adapter_path={peft_dir}",
                              *quant], _extract_lora))
    _build(source, out / "cache", [b for b in builds if not b.fresh()])
    for b in builds:
        _configure(b.target, threads)
    if lora is None:
        return GenaiModels(builds[0].target)
    params = int(sum(d.A.size + d.B.size for d in lora.targets.values()))
    return GenaiModels(builds[0].target, builds[1].target, builds[1].target / ADAPTER_FILE,
                       params)


def _stamp(source: Path, extra: dict) -> dict:
    """What a built directory depends on: the source's config and weight file sizes, genai's
    version, and ``extra`` (the LoRA's hash)."""
    import onnxruntime_genai

    weights = {p.name: p.stat().st_size for p in sorted(source.glob("*.safetensors"))}
    config = hashlib.sha256((source / "config.json").read_bytes()).hexdigest()
    return {"source": str(source.resolve()), "config_sha256": config, "weights": weights,
            "genai": getattr(onnxruntime_genai, "__version__", "?"), **extra}


@dataclass
class _Build:
    """A model directory genai's builder writes (``args``: its extra arguments), which
    ``finish`` then edits; reused where its stamp matches (written last: a build that stopped
    half-way is redone)."""

    target: Path
    stamp: dict
    args: list[str]
    finish: Callable[[Path], None] | None = None

    @property
    def tmp(self) -> Path:
        return self.target.with_name(self.target.name + ".building")

    def fresh(self) -> bool:
        stamp = self.target / STAMP
        return stamp.is_file() and json.loads(stamp.read_text()) == self.stamp


#: runs genai's builder as ``python -m onnxruntime_genai.models.builder ARGS`` for each ARGS
#: in one process (its imports are paid once)
_DRIVER = ("import json, runpy, sys\n"
           "for argv in json.loads(sys.argv[1]):\n"
           "    sys.argv = ['builder', *argv]\n"
           "    runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')\n")


def _build(source: Path, cache: Path, builds: list[_Build]) -> None:
    """Run genai's builder for ``builds`` (one process), then finish, stamp and move each
    into place; ExportError with the builder's last lines where it fails."""
    if not builds:
        return
    argvs = []
    for b in builds:
        shutil.rmtree(b.tmp, ignore_errors=True)
        shutil.rmtree(b.target, ignore_errors=True)
        argvs.append(["-i", str(source), "-o", str(b.tmp), "-e", "cpu", "-c", str(cache),
                      *b.args])
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argvs)],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for b in builds:
        if proc.returncode != 0 or not (b.tmp / "genai_config.json").is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ExportError(f"onnxruntime-genai's model builder failed on {source} (exit "
                              f"{proc.returncode}): {' | '.join(tail)}")
        if b.finish is not None:
            b.finish(b.tmp)
        (b.tmp / STAMP).write_text(json.dumps(b.stamp, indent=1))
        b.tmp.replace(b.target)


def _configure(model_dir: Path, threads: int) -> None:
    """genai_config.json: ``threads`` intra-op threads, spinning off (several sessions and
    peers share the cores; an idle session's spinning threads would slow the timed one)."""
    path = model_dir / "genai_config.json"
    config = json.loads(path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = int(threads)
    options["session.intra_op.allow_spinning"] = "0"
    options["session.inter_op.allow_spinning"] = "0"
    path.write_text(json.dumps(config, indent=4))


def _extract_lora(model_dir: Path) -> None:
    """The builder's LoRA A / B initializers -> required graph inputs of ``model.onnx`` and
    their values -> ``lora.onnx_adapter`` (the other initializers keep their external data).
    In an int4 model the builder quantized the LoRA's MatMuls too: their packed codes and
    scales are the adapter's tensors, as a genai user of that model gets them."""
    import onnx
    from onnx import helper, numpy_helper

    path = model_dir / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    params: dict[str, np.ndarray] = {}
    types: dict[str, int] = {}
    keep = []
    for init in model.graph.initializer:
        if any(tag in init.name for tag in _LORA_TENSORS):
            params[init.name] = numpy_helper.to_array(init, str(model_dir))
            types[init.name] = init.data_type  # an int4 model's are packed uint8 + scales
        else:
            keep.append(init)
    if not params:
        raise ExportError(f"{path}: genai's builder wrote no LoRA tensors (names with "
                          f"{' or '.join(_LORA_TENSORS)}); cannot make a multi-LoRA adapter")
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(
        helper.make_tensor_value_info(name, types[name], list(value.shape))
        for name, value in params.items())
    write_adapter_params(model_dir / ADAPTER_FILE, params)
    onnx.save(model, str(path))
