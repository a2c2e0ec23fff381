"""The stream's incremental detokenisation (runtime/tokenizer.py, ``Detokenizer``) against the
tokenizer's decode of the whole id list: after every token its text is a prefix of the whole
decode with no incomplete character, and equal to it wherever the ids end on a whole one."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.runtime.tokenizer import INCOMPLETE, Detokenizer, Tokenizer
from tests.generate_bundle import byte_tokenizer


def _check(tok: Tokenizer, ids: list[int]) -> int:
    """Feed ``ids`` one by one; returns how often the text equalled the whole decode."""
    detok, equal = Detokenizer(tok), 0
    for n, token in enumerate(ids, 1):
        text = detok.add(token)
        whole = tok.decode(ids[:n])
        assert whole.startswith(text), (n, text, whole)
        assert not text.endswith(INCOMPLETE)
        if not whole.endswith(INCOMPLETE):
            assert text == whole, (n, text, whole)
            equal += 1
    return equal


def _metaspace(tmp_path):
    """A SentencePiece-style tokenizer (Metaspace: a word's leading space is a "▁" that the
    decoder strips at the start of a sequence, byte fallback for characters outside the
    vocabulary): decoding a window that starts mid-reply must not drop a space."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    vocab += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    vocab += [(w, -1.0) for w in ["▁", "▁a", "▁the", "▁cat", "s", "at", "▁sat", "▁on", "t"]]
    raw = RawTokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "▁")
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    raw.add_special_tokens(["<unk>", "<s>", "</s>"])
    path = tmp_path / "metaspace.json"
    raw.save(str(path))
    return Tokenizer(path)


def test_byte_level_random_ids(tmp_path):
    byte_tokenizer().save_pretrained(tmp_path)
    tok = Tokenizer(tmp_path / "tokenizer.json")
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = [int(i) for i in rng.integers(0, tok.vocab_size, 60)]
        _check(tok, ids)
    # a four-byte character split over four tokens, then ASCII: text waits for the whole one
    ids = tok.encode("🎉a", special=False)
    assert len(ids) == 5
    detok = Detokenizer(tok)
    assert [detok.add(t) for t in ids] == ["", "", "", "🎉", "🎉a"]


def test_metaspace_keeps_spaces_after_the_first_token(tmp_path):
    tok = _metaspace(tmp_path)
    ids = tok.encode(" the cat sat on a mat ça", special=False)
    assert tok.decode(ids) == "the cat sat on a mat ça"
    assert _check(tok, ids) >= len(ids) - 2  # "ç" is two byte tokens
    # random words and whole characters (random byte tokens need not form UTF-8, and byte
    # fallback then turns *every* byte of the run into a replacement character, earlier ones too)
    rng = np.random.default_rng(1)
    pieces = [[int(i)] for i in range(3 + 256, tok.vocab_size)]
    pieces += [tok.encode(c, special=False) for c in "ç🎉x"]
    _check(tok, [i for k in rng.integers(0, len(pieces), 80) for i in pieces[k]])


def test_smollm2_tokenizer(tmp_path):
    from edgeadapt.models import cache_dir

    path = cache_dir() / "smollm2-135m-instruct-fp32" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("SmolLM2 is not converted here (edgeadapt.models.smollm2_fp32_dir)")
    tok = Tokenizer(path)
    text = "Once upon a time, an adapter was switched in place: ça marche 🎉. <|im_end|> 你好"
    _check(tok, tok.encode(text, special=False))
    rng = np.random.default_rng(2)
    _check(tok, [int(i) for i in rng.integers(0, tok.vocab_size, 200)])
