"""``edgeadapt chat BUNDLE``: an interactive conversation on one loaded runtime, adapters
switched in place between turns (torch-free; docs/generate.md).

Each line read from stdin is a user turn of one :class:`~edgeadapt.runtime.generate.
Conversation`, its reply streamed to stdout; lines starting with ``/`` are commands
(``/help``). A bad command, an unknown adapter or a refused prompt prints one ``error: ...``
line on stderr and the loop goes on. Where the bundle carries a chat template
(``generate.chat_template``) it is rendered with jinja2 as transformers renders it (sandboxed,
``trim_blocks``, ``lstrip_blocks``), the whole message list each turn; the conversation is fed
only the tokens after those it already holds (its cache is kept), or the whole rendering in a
fresh conversation where the new rendering does not extend the old one. A template that cannot
be compiled or rendered falls back to plain text turns (the lines as typed), said once.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import click

from edgeadapt.errors import ConfigError, EdgeAdaptError, MissingPackageError
from edgeadapt.runtime.generate import GenerationSpec
from edgeadapt.runtime.tokenizer import Tokenizer
from edgeadapt.timer import stopwatch

HELP = """commands:
  /adapter NAME   switch to adapter NAME in place (/adapter none: the base model)
  /fuse A B ...   switch to adapters A and B fused together
  /stats          tokens/s of the last reply, time of the last switch
  /reset          start a new conversation
  /help           this list
  /quit           end the chat (as does the end of input)"""


class ChatTemplateError(ConfigError):
    """The chat template cannot be compiled or rendered here."""


class ChatTemplate:
    """A Hugging Face chat template (jinja) rendered without transformers, with the globals
    and filters transformers gives it (``raise_exception``, ``strftime_now``, ``tojson``)."""

    def __init__(self, source: str, bos_token: str | None = None,
                 eos_token: str | None = None) -> None:
        try:
            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise MissingPackageError("chat templates need jinja2: pip install jinja2") from exc

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except Exception as exc:  # jinja2's TemplateSyntaxError, an unknown tag, ...
            raise ChatTemplateError(f"chat template does not compile: {exc}") from None
        self._tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token))
                        if v is not None}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` ({"role", "content"} dicts); ChatTemplateError where
        the template fails on them (its ``raise_exception``, an undefined name, ...)."""
        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         **self._tokens)
        except Exception as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from None


def open_template(bundle_dir: Path, spec: GenerationSpec, tokenizer: Tokenizer
                  ) -> ChatTemplate:
    """The bundle's chat template, checked by rendering one user message; ChatTemplateError
    (or MissingPackageError without jinja2) where it cannot be used."""
    assert spec.chat_template is not None
    try:
        source = (bundle_dir / spec.chat_template).read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"chat template {spec.chat_template!r} unreadable: {exc}"
                               ) from None
    eos = tokenizer.token(spec.eos_token_ids[0]) if spec.eos_token_ids else None
    template = ChatTemplate(source, tokenizer.token(spec.bos_token_id), eos)
    template.render([{"role": "user", "content": "hello"}])
    return template


@dataclass
class Stats:
    """The last reply's tokens and times (seconds) and the last switch's (ms)."""

    reply_tokens: int = 0
    reply_s: float = 0.0
    first_token_s: float = 0.0
    switch_ms: float | None = None
    switch_to: tuple[str, ...] = ()


class ChatSession:
    """The loop's state: one runtime, its current conversation, the messages so far (for the
    template) and the stats. ``handle(line)`` does one line; False once the chat should end."""

    def __init__(self, rt: object, tokenizer: Tokenizer, template: ChatTemplate | None,
                 options: dict, out: Callable[..., None], err: Callable[[str], None]) -> None:
        self.rt, self.tokenizer, self.template = rt, tokenizer, template
        self.options, self.out, self.err = options, out, err
        self.conv = rt.conversation()
        self.messages: list[dict[str, str]] = []
        self.stats = Stats()

    # -- commands -----------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.reply(line)
            return True
        command, *args = line.split()
        try:
            if command in ("/quit", "/exit"):
                return False
            if command == "/help":
                self.out(HELP)
            elif command == "/adapter" and len(args) == 1:
                self.switch(None if args[0].lower() in ("none", "base") else [args[0]])
            elif command == "/fuse" and len(args) >= 2:
                self.switch(args)
            elif command == "/stats" and not args:
                self.out(self.stats_line())
            elif command == "/reset" and not args:
                self.conv, self.messages = self.rt.conversation(), []
                self.out("[new conversation]")
            elif command in ("/adapter", "/fuse", "/stats", "/reset"):
                raise ConfigError(f"usage: {_usage(command)}")
            else:
                raise ConfigError(f"unknown command {command}; /help lists the commands")
        except EdgeAdaptError as exc:
            self.err(f"error: {exc}")
        return True

    def switch(self, names: list[str] | None) -> None:
        elapsed = stopwatch()
        self.rt.switch(names)
        ms = 1e3 * elapsed()
        self.stats.switch_ms, self.stats.switch_to = ms, tuple(self.rt.active)
        self.out(f"[adapters: {_names(self.rt.active)}; switched in {ms:.2f} ms]")

    def stats_line(self) -> str:
        s = self.stats
        if s.reply_tokens:
            rate = s.reply_tokens / s.reply_s if s.reply_s > 0 else 0.0
            decode = s.reply_s - s.first_token_s
            after = (s.reply_tokens - 1) / decode if s.reply_tokens > 1 and decode > 0 else 0.0
            reply = (f"last reply: {s.reply_tokens} tokens in {1e3 * s.reply_s:.0f} ms, "
                     f"{rate:.1f} tokens/s (first token after {1e3 * s.first_token_s:.0f} ms, "
                     f"then {after:.1f} tokens/s)")
        else:
            reply = "last reply: none yet"
        switch = ("last switch: none yet" if s.switch_ms is None else
                  f"last switch: {s.switch_ms:.2f} ms (to {_names(s.switch_to)})")
        return f"[{reply}; {switch}; adapters now: {_names(self.rt.active)}]"

    # -- turns --------------------------------------------------------------------------------

    def reply(self, line: str) -> None:
        messages = [*self.messages, {"role": "user", "content": line}]
        try:
            conv, prompt = self._prompt(messages, line)
            pieces = conv.stream(prompt, **self.options)
        except EdgeAdaptError as exc:
            self.err(f"error: {exc}" + (" (/reset starts a new conversation)"
                                        if "context would hold" in str(exc) else ""))
            return
        elapsed, first = stopwatch(), None
        try:
            for piece in pieces:
                first = elapsed() if first is None else first
                self.out(piece.text, nl=False)
        except EdgeAdaptError as exc:
            self.out("")
            self.err(f"error: {exc}")
            return
        except KeyboardInterrupt:
            self.out("\n[interrupted]")
            return
        total = elapsed()
        self.out("")
        out = conv.last
        self.conv = conv
        self.messages = [*messages, {"role": "assistant", "content": out.text or ""}]
        self.stats.reply_tokens, self.stats.reply_s = len(out.ids), total
        self.stats.first_token_s = first or 0.0

    def _prompt(self, messages: list[dict[str, str]], line: str) -> tuple[object, object]:
        """The conversation to send to and what to send: the line as text (no template), or
        the template's tokens the current conversation lacks; a fresh conversation with the
        whole rendering where it does not extend the current one."""
        if self.template is not None:
            try:
                text = self.template.render(messages)
            except ChatTemplateError as exc:
                self.template = None
                self.err(f"note: {exc}; plain text turns from now on")
            else:
                ids = self.tokenizer.encode(text, special=False)
                have = self.conv.tokens
                if len(ids) > len(have) and ids[:len(have)] == have:
                    return self.conv, ids[len(have):]
                return self.rt.conversation(), ids
        return self.conv, line


def _names(active: tuple[str, ...] | list[str]) -> str:
    return " + ".join(active) or "none (base)"


def _usage(command: str) -> str:
    return {"/adapter": "/adapter NAME (or /adapter none)", "/fuse": "/fuse A B [C ...]",
            "/stats": "/stats", "/reset": "/reset"}[command]


@click.command("chat")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--adapter", "adapters", multiple=True,
              help="adapter to switch to first (repeat to fuse several); default: the base")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="per reply")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="each reply's draw")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="intra-op threads (default: the backend's)")
def chat_cmd(bundle: str, adapters: tuple[str, ...], max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, seed: int | None,
             threads: int | None) -> None:
    """Chat with the bundle's decoder (exported with --generate): each line of stdin is a user
    turn, its reply streamed to stdout; /adapter NAME, /adapter none and /fuse A B switch in
    place between turns, /stats, /reset, /help, /quit. Uses the bundle's chat template where
    it has one."""
    from edgeadapt.runtime import load

    rt = load(bundle, backend="onnxruntime", mode="live", threads=threads)
    spec = GenerationSpec.of(rt.manifest)
    if spec.tokenizer is None:
        raise ConfigError(f"chat needs the bundle's tokenizer; {bundle} has none (give token "
                          "ids to `rt.generate` instead)")
    tokenizer = Tokenizer(rt.bundle_dir / spec.tokenizer)
    err = lambda text: click.echo(text, err=True)  # noqa: E731
    template, how = None, "no chat template in the bundle: plain text turns"
    if spec.chat_template is not None:
        try:
            template = open_template(Path(rt.bundle_dir), spec, tokenizer)
            how = f"chat template {spec.chat_template} applied"
        except (ChatTemplateError, MissingPackageError) as exc:
            how = f"note: {exc}; plain text turns"
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
               "top_p": top_p, "seed": seed}
    session = ChatSession(rt, tokenizer, template, options, click.echo, err)
    if adapters:
        session.switch(list(adapters))
    err(f"[chat with {bundle}: adapters {', '.join(rt.adapters) or '(none)'}; {how}; "
        "/help lists the commands]")
    try:
        for line in iter(sys.stdin.readline, ""):
            if not session.handle(line):
                break
    except KeyboardInterrupt:
        click.echo()
    sys.stdout.flush()
