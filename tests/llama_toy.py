"""A one-block Llama for the tests that export a causal LM: tiny-smollm2's architecture with
one block and a 128-token vocabulary, cheaper to lower for ExecuTorch (a test helper, not part
of the package)."""

from __future__ import annotations

import torch

from edgeadapt.models import LoadedModel


def one_block_llama(seed: int = 0, hidden: int = 32) -> LoadedModel:
    """A 1-block Llama (hidden 32; MLP 2 x hidden): the same architecture as tiny-smollm2,
    cheaper to lower."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, name="one-block-llama", kind="causal-lm")
