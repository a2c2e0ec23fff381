"""Parity before timing, for generation: the greedy tokens of every case equal transformers'
greedy ``generate`` on the PyTorch model carrying the same adapter
(:func:`edgeadapt.adapters.reference.reference_greedy`), else ParityError and nothing is
timed. So genai's base tokens equal edgeadapt's base tokens, both equal the model's.

The reference and genai stop on the model's end-of-turn token, edgeadapt's timed runtimes do
not (:func:`.decoding.ignore_end_of_turn`): the tokens both sides gave are compared, at least
one. genai's LoRA case is also compared on its logits after the prompt (``max |got - want| /
max |want|`` <= 1e-3, the forward bench's rule): a LoRA too small to change a greedy token
still has to be there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgeadapt.adapters.reference import reference_greedy, reference_logits
from edgeadapt.bench.adapters import AdapterSet
from edgeadapt.bench.generation.decoding import DecodeCase
from edgeadapt.bench.parity import check_parity
from edgeadapt.errors import ParityError
from edgeadapt.models import LoadedModel


class TokenParity:
    """The greedy reference tokens (cached per adapter) for ``prompt`` and the checks' rows;
    ``eos_token_ids``: the bundle's end-of-turn tokens, where the reference stops."""

    def __init__(self, lm: LoadedModel, adapters: AdapterSet, prompt: np.ndarray, n: int,
                 eos_token_ids: Sequence[int]) -> None:
        self.lm, self.aset, self.prompt, self.n = lm, adapters, prompt, n
        self.eos = list(eos_token_ids)
        self.rows: list[dict] = []
        self._tokens: dict[str | None, list[int]] = {}

    def _adapter(self, name: str | None):
        return None if name is None else self.aset.adapters[name]

    def reference(self, adapter: str | None) -> list[int]:
        """transformers' greedy tokens with ``adapter`` (None: the base)."""
        if adapter not in self._tokens:
            self._tokens[adapter] = reference_greedy(self.lm, self._adapter(adapter),
                                                     self.prompt.tolist(), self.n, self.eos)
        return self._tokens[adapter]

    def check(self, where: dict, case: str, subject: DecodeCase, adapter: str | None) -> None:
        """ParityError unless ``subject``'s greedy tokens equal the reference's (module
        docstring); records the row."""
        got = subject.greedy(self.prompt, self.n)
        want = self.reference(adapter)
        common = min(len(got), len(want))
        if not common or got[:common] != want[:common]:
            raise ParityError(
                f"{where['backend']}:{where['device']} {case}: greedy tokens {got} differ from "
                f"transformers' {want} on the PyTorch model carrying {adapter or 'no adapter'}; "
                "refusing to time it — a stale weight or a broken decoder would look fast and "
                "be wrong")
        self.rows.append({**where, "case": case, "check": "greedy-tokens", "adapter": adapter,
                          "tokens": common, "reference": "transformers", "equal": True})

    def check_logits(self, where: dict, case: str, logits: np.ndarray, adapter: str | None
                     ) -> None:
        """ParityError unless ``logits`` (the prompt's last position) match the PyTorch
        reference carrying ``adapter``; records the row."""
        want = reference_logits(self.lm, self._adapter(adapter),
                                {"input_ids": self.prompt[None]})[0, -1]
        err = check_parity(logits, want, f"{where['backend']}:{where['device']} {case} logits")
        self.rows.append({**where, "case": case, "check": "prompt-logits", "adapter": adapter,
                          "max_rel_error": err, "reference": "transformers"})
