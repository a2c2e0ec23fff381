"""``edgeadapt chat BUNDLE``: an interactive conversation on one loaded runtime, adapters
switched in place between turns (torch-free; docs/generate.md).

Each line read from stdin is a user turn of one :class:`~edgeadapt.runtime.generate.
Conversation`, its reply streamed to stdout; lines starting with ``/`` are commands
(``/help``). A bad command, an unknown adapter or a refused prompt prints one ``error: ...``
line on stderr and the loop goes on. Where the bundle carries a chat template
(``generate.chat_template``) the turns go through a :class:`~edgeadapt.runtime.chat_template.
Chat` (the whole message list rendered each turn, only the missing tokens fed). A template that
cannot be compiled or rendered falls back to plain text turns (the lines as typed, on the same
conversation), said once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click

from edgeadapt.errors import ConfigError, EdgeAdaptError, MissingPackageError
from edgeadapt.runtime.chat_template import Chat, ChatTemplate, ChatTemplateError, open_template
from edgeadapt.runtime.cli import BACKEND_HELP, DEVICE_HELP, decoder_backend
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


@dataclass
class Stats:
    """The last reply's tokens and times (seconds) and the last switch's (ms)."""

    reply_tokens: int = 0
    reply_s: float = 0.0
    first_token_s: float = 0.0
    switch_ms: float | None = None
    switch_to: tuple[str, ...] = ()


class ChatSession:
    """The loop's state: one runtime, its chat (with a template) or plain conversation, and
    the stats. ``handle(line)`` does one line; False once the chat should end."""

    def __init__(self, rt: object, tokenizer: Tokenizer, template: ChatTemplate | None,
                 options: dict, out: Callable[..., None], err: Callable[[str], None]) -> None:
        self.rt, self.options, self.out, self.err = rt, options, out, err
        self.chat = None if template is None else Chat(rt, template, tokenizer)
        self._plain = rt.conversation() if self.chat is None else None  # turns without one
        self.stats = Stats()

    @property
    def conv(self) -> object:
        """The conversation the turns go to: the chat's, or the plain one."""
        return self._plain if self.chat is None else self.chat.conversation

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
                if self.chat is not None:
                    self.chat.reset()
                else:
                    self._plain = self.rt.conversation()
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
        try:
            pieces = self._pieces(line)
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
        out = self.conv.last
        self.stats.reply_tokens, self.stats.reply_s = len(out.ids), total
        self.stats.first_token_s = first or 0.0

    def _pieces(self, line: str) -> object:
        """The reply's stream: through the chat template, or the line as plain text (also from
        the turn on which the template first fails, on the same conversation)."""
        if self.chat is not None:
            try:
                return self.chat.stream(line, **self.options)
            except ChatTemplateError as exc:
                self._plain, self.chat = self.chat.conversation, None
                self.err(f"note: {exc}; plain text turns from now on")
        return self.conv.stream(line, **self.options)


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
@click.option("--backend", default=None, help=BACKEND_HELP)
@click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP)
def chat_cmd(bundle: str, adapters: tuple[str, ...], max_new_tokens: int, temperature: float,
             top_k: int | None, top_p: float | None, seed: int | None,
             threads: int | None, backend: str | None, device: str) -> None:
    """Chat with the bundle's decoder (exported with --generate): each line of stdin is a user
    turn, its reply streamed to stdout; /adapter NAME, /adapter none and /fuse A B switch in
    place between turns, /stats, /reset, /help, /quit. Uses the bundle's chat template where
    it has one."""
    from edgeadapt.runtime import load

    rt = load(bundle, backend=decoder_backend(bundle, backend), device=device, mode="live",
              threads=threads)
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
