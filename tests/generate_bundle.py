"""The tiny generate bundle the generation tests share: tiny SmolLM2 (q/v live) with its
KV-cache decoder and a byte-level tokenizer (:func:`byte_tokenizer`), and two SHiRA adapters
that change the greedy tokens: s1 at 5% of every live weight, s2 at 20% of two of them
(:func:`export_generate`). :func:`export_tiny_generate` saves the model as a Hugging Face
directory first and exports from it (the bundle records it, so the bench's PyTorch reference
and onnxruntime-genai's builder start from it)."""

from __future__ import annotations

from pathlib import Path

import torch
from runtime_reference import random_adapters, register_adapters

from edgeadapt.export.bundle import export_base
from edgeadapt.format import read_manifest
from edgeadapt.models import LoadedModel, load_model


def byte_tokenizer(size: int = 512):
    """A byte-level BPE tokenizer of ``size`` tokens (3 special, 256 bytes, merges of two
    lowercase letters), as a transformers fast tokenizer, so that the exporter copies it like a
    real model's and every id of tiny SmolLM2's vocabulary has a text."""
    from string import ascii_lowercase

    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [(a, b) for a in ascii_lowercase for b in ascii_lowercase][: size - len(vocab)]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def export_generate(lm: LoadedModel, out: Path, max_context: int) -> Path:
    """Export ``lm`` (its tokenizer included) to ``out`` with ``--generate`` and register the
    SHiRA adapters s1 and s2 (module docstring); returns ``out``."""
    export_base(lm, out, backends="onnxruntime", targets="qv", generate=True,
                max_context=max_context)
    manifest = read_manifest(out)
    names = sorted(manifest.weights)
    s1, s2, _ = random_adapters(lm, names, names[:2], seed=1)
    register_adapters(out, manifest, {"s1": s1, "s2": s2})
    return out


def export_tiny_generate(root: Path, max_context: int = 96) -> tuple[LoadedModel, Path]:
    """``root/hf`` (tiny SmolLM2 and the byte tokenizer as a Hugging Face directory) and
    ``root/bundle`` exported from it by :func:`export_generate`; returns the model as loaded
    from the directory and the bundle."""
    torch.set_num_threads(1)
    hf = root / "hf"
    load_model("tiny-smollm2", seed=0).model.save_pretrained(hf)
    byte_tokenizer().save_pretrained(hf)
    lm = load_model(str(hf))
    return lm, export_generate(lm, root / "bundle", max_context)
