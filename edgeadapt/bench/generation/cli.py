"""The options ``edgeadapt bench`` takes for its generation rows (``--generate`` and the
``--prompt-tokens`` ... ``--genai-dir`` set), and the :class:`GenerateOptions` they make."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from edgeadapt.bench.cli_values import positive_ints
from edgeadapt.bench.generation.options import GenerateOptions

_DEFAULTS = GenerateOptions()


def _csv(default: list[int]) -> str:
    return ",".join(str(v) for v in default)


_OPTIONS = [
    click.option("--generate", is_flag=True,
                 help="Measure generation instead of the forward pass (a bundle exported with "
                      "--generate): time to first token, decode steps, the switch between "
                      "requests and under load, against onnxruntime-genai and transformers."),
    click.option("--prompt-tokens", default=_csv(_DEFAULTS.prompt_tokens), show_default=True,
                 help="--generate: prompt lengths of the time-to-first-token rows."),
    click.option("--contexts", default=_csv(_DEFAULTS.contexts), show_default=True,
                 help="--generate: positions in the cache when decode steps are timed."),
    click.option("--decode-steps", default=_DEFAULTS.decode_steps, show_default=True,
                 type=click.IntRange(min=1), help="--generate: timed steps per case, context."),
    click.option("--ttft-repeats", default=_DEFAULTS.ttft_repeats, show_default=True,
                 type=click.IntRange(min=1),
                 help="--generate: timed first tokens per case and prompt length."),
    click.option("--requests", default=_DEFAULTS.requests, show_default=True,
                 type=click.IntRange(min=1),
                 help="--generate: timed requests of the switch between requests."),
    click.option("--reply-tokens", default=_DEFAULTS.reply_tokens, show_default=True,
                 type=click.IntRange(min=1), help="--generate: tokens of a request's answer."),
    click.option("--load-switches", default=_DEFAULTS.load_switches, show_default=True,
                 type=click.IntRange(min=1),
                 help="--generate: timed switches while two threads decode."),
    click.option("--load-interval-ms", default=_DEFAULTS.load_interval_ms, show_default=True,
                 type=click.FloatRange(min=0), help="--generate: pause before each of them."),
    click.option("--parity-tokens", default=_DEFAULTS.parity_tokens, show_default=True,
                 type=click.IntRange(min=1),
                 help="--generate: greedy tokens compared with transformers before timing."),
    click.option("--genai-dir", type=click.Path(file_okay=False), default=None,
                 help="--generate: where onnxruntime-genai's models are built once and reused "
                      "(default: rebuilt in the run's scratch directory)."),
]


def generate_options(command: Callable) -> Callable:
    """Add the options above to ``command``."""
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def options_of(prompt_tokens: str, contexts: str, decode_steps: int, ttft_repeats: int,
               requests: int, reply_tokens: int, load_switches: int, load_interval_ms: float,
               parity_tokens: int, genai_dir: str | None) -> GenerateOptions:
    """The :class:`GenerateOptions` of the options' values (click.BadParameter for a list that
    is not positive integers)."""
    return GenerateOptions(
        prompt_tokens=positive_ints(prompt_tokens), contexts=positive_ints(contexts),
        decode_steps=decode_steps, ttft_repeats=ttft_repeats, requests=requests,
        reply_tokens=reply_tokens, load_switches=load_switches, load_interval_ms=load_interval_ms,
        parity_tokens=parity_tokens, genai_dir=Path(genai_dir) if genai_dir else None)
