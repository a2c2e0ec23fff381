"""What a generation benchmark measures (:class:`GenerateOptions`), checked against the bundle's
decoder before anything loads (:meth:`GenerateOptions.check`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeadapt.errors import ConfigError


@dataclass
class GenerateOptions:
    """The generation rows' sizes and counts (the run's backends, threads, warm-up calls, SHiRA
    density and peers come from :class:`edgeadapt.bench.options.BenchOptions`).

    prompt_tokens: prompt lengths of the time-to-first-token rows. contexts: positions already
    in the cache when the decode steps are timed. decode_steps: timed decode steps per case and
    context (after the run's ``warmup`` untimed ones). ttft_repeats: timed first tokens per
    case and prompt length. requests: timed requests of the switch between requests, each a
    switch then a ``reply_tokens``-token answer to a ``prompt_tokens[0]``-token prompt.
    load_switches: timed switches while two threads decode, one every ``load_interval_ms``.
    parity_tokens: greedy tokens compared with transformers before timing. genai_dir: where the
    onnxruntime-genai models are built once and reused (None: the run's scratch directory).
    """

    prompt_tokens: list[int] = field(default_factory=lambda: [64, 256])
    contexts: list[int] = field(default_factory=lambda: [128, 1024])
    decode_steps: int = 32
    ttft_repeats: int = 5
    requests: int = 20
    reply_tokens: int = 64
    load_switches: int = 50
    load_interval_ms: float = 100.0
    parity_tokens: int = 8
    genai_dir: Path | None = None

    def positions(self, warmup: int) -> int:
        """The most positions one conversation of the run holds (prompt and reply together)."""
        steps = warmup + self.decode_steps + 1
        return max(max(self.contexts) + steps, max(self.prompt_tokens) + self.reply_tokens,
                   self.prompt_tokens[0] + max(self.parity_tokens, self.reply_tokens))

    def check(self, max_context: int, warmup: int) -> None:
        """ConfigError naming the option when a count is below 1, or when a conversation of the
        run would not fit the bundle's ``max_context``."""
        counts = {"decode_steps": self.decode_steps, "ttft_repeats": self.ttft_repeats,
                  "requests": self.requests, "reply_tokens": self.reply_tokens,
                  "load_switches": self.load_switches, "parity_tokens": self.parity_tokens}
        low = [k for k, v in counts.items() if v < 1]
        if low or not self.prompt_tokens or not self.contexts \
                or min(self.prompt_tokens + self.contexts) < 1:
            raise ConfigError(f"generation bench: {low or 'prompt_tokens / contexts'} must be "
                              ">= 1")
        if self.load_interval_ms < 0:
            raise ConfigError("generation bench: load_interval_ms must be >= 0")
        need = self.positions(warmup)
        if need >= max_context:
            raise ConfigError(
                f"generation bench: a conversation would hold {need} positions (context "
                f"{max(self.contexts)} + {warmup} warm-up + {self.decode_steps} timed steps, or "
                f"a {max(self.prompt_tokens)}-token prompt + {self.reply_tokens}-token reply); "
                f"the bundle's decoder takes at most {max_context}: choose smaller --contexts / "
                "--prompt-tokens, or export with a larger --max-context")
