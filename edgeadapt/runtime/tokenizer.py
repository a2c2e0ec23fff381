"""The model's own tokenizer on the device: the bundle's ``tokenizer.json`` read by the
``tokenizers`` library (Rust, no torch, no transformers), and the incremental detokenisation a
stream needs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeadapt.errors import BundleError, MissingPackageError

#: what ``decode`` gives for bytes that do not yet form a whole UTF-8 character
INCOMPLETE = "\ufffd"


class Tokenizer:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` with the model's tokenizer.json."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as exc:
            raise MissingPackageError("text prompts need the tokenizers library: "
                                      "pip install tokenizers") from exc
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for bad files
            raise BundleError(f"{path}: not a readable tokenizer.json: {exc}") from exc
        self.path = path

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce (with its added tokens)."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Token ids of ``text``; ``special``: let the tokenizer add its special tokens (a
        BOS where it has one), as at the start of a conversation."""
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens (end of turn, ...) left out."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token(self, token_id: int | None) -> str | None:
        """The text of one token as the vocabulary spells it (``"<|im_end|>"``), or None (for
        None or an id the tokenizer lacks): what a chat template calls ``eos_token``."""
        return None if token_id is None else self._tok.id_to_token(int(token_id))


class Detokenizer:
    """The text of a growing list of token ids, decoding only the tokens since the last whole
    character (the incremental scheme of vLLM and transformers' streamers): ``add`` costs the
    same at the 1,000th token as at the first, where decoding the whole reply each token grows
    with it (a 100-token reply: 34 us a token on SmolLM2's tokenizer).

    ``text`` holds whole characters only: with ``prefix`` the ids from the offset of the last
    commit, ``decode(prefix + new) = decode(prefix) + piece`` and the piece is committed once it
    does not end in an incomplete character (:data:`INCOMPLETE`). Decoding from the previous
    commit's start, not its end, keeps decoders that treat a sequence's first token apart (a
    leading space stripped) from changing the piece. ``text`` is a prefix of
    ``decode(ids)``, equal to it once the ids end on a whole character (for ids whose bytes form
    UTF-8: byte fallback turns every byte of an invalid run into a replacement character, earlier
    ones included, which no stream can have handed out; the reply's final text is the whole
    decode)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._start = self._read = 0  # ids[_start:_read]: the prefix the next piece follows
        self._prefix = ""  # decode(ids[_start:_read])

    def add(self, token: int) -> str:
        """Append ``token``; the text of whole characters so far."""
        self.ids.append(token)
        window = self._tok.decode(self.ids[self._start:])
        if len(window) > len(self._prefix) and not window.endswith(INCOMPLETE):
            self.text += window[len(self._prefix):]
            self._start, self._read = self._read, len(self.ids)
            self._prefix = self._tok.decode(self.ids[self._start:self._read])
        return self.text
