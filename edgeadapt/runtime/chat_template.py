"""Chat templates without transformers, and conversations of messages rendered with them
(torch-free; docs/generate.md).

    rt = edgeadapt.runtime.load("bundle/")             # a bundle with chat_template.jinja
    chat = rt.chat(system="You are terse.")
    chat.send("Hi").text; chat.send("And you?").text  # each turn rendered with the template
    rt.generate([{"role": "user", "content": "Hi"}])   # one reply to a message list

A bundle's chat template (``generate.chat_template``, the model's own, copied by the exporter)
is rendered with jinja2 as transformers renders it: a sandboxed environment with
``trim_blocks``, ``lstrip_blocks`` and loop controls, the globals ``raise_exception`` and
``strftime_now``, the ``tojson`` filter, ``bos_token`` / ``eos_token`` from the bundle's ids;
``add_generation_prompt=True``; the text tokenized without added special tokens (the template
writes them).

:class:`Chat` renders the *whole* message list each turn and feeds its conversation only the
tokens after those it already holds, so the KV cache is kept; where the new rendering does not
extend them (a reply whose text re-tokenizes differently, a template that rewrites earlier
turns) the whole rendering goes to a fresh conversation (one full prefill, the same context).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from edgeadapt.errors import ConfigError, MissingPackageError
from edgeadapt.runtime.generate import Conversation, Generation, GenerationSpec, Piece
from edgeadapt.runtime.tokenizer import Tokenizer

Message = dict[str, str]


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


def is_messages(prompt: object) -> bool:
    """True for a chat prompt: a non-empty list of {"role", "content"} dicts."""
    return (isinstance(prompt, list | tuple) and bool(prompt)
            and all(isinstance(m, dict) for m in prompt))


def check_messages(messages: object) -> list[Message]:
    """``messages`` as a list of {"role": str, "content": str} dicts; ConfigError naming the
    first bad one."""
    if not is_messages(messages):
        raise ConfigError("chat: messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not (isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ConfigError(f"chat: message {i} {m!r} needs a 'role' and a 'content' string")
    return [dict(m) for m in messages]


class Chat:
    """Turns of messages on one runtime, rendered with the bundle's chat template
    (``rt.chat()``; module docstring). ``messages``: the system message if any, each user
    turn and each reply (role ``assistant``); ``conversation``: the token-level conversation
    underneath (its ``tokens``, ``last``). A switch between turns re-prefills as for any
    conversation. ``send`` / ``stream`` raise ChatTemplateError where the template fails on
    the new message list (nothing changed)."""

    def __init__(self, runtime: object, template: ChatTemplate, tokenizer: Tokenizer,
                 system: str | None = None) -> None:
        self._rt, self.template, self.tokenizer = runtime, template, tokenizer
        self._system = system
        self.reset()

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.conversation: Conversation = self._rt.conversation()
        self.messages: list[Message] = ([] if self._system is None
                                        else [{"role": "system", "content": self._system}])

    def send(self, text: str, **options: object) -> Generation:
        """The reply to user turn ``text`` (options as for ``rt.generate``)."""
        for _ in self.stream(text, **options):
            pass
        assert self.conversation.last is not None
        return self.conversation.last

    def stream(self, text: str, **options: object) -> Iterator[Piece]:
        """:meth:`send` as an iterator of pieces; the turn and its reply join ``messages``
        once it is exhausted. The template, prompt and options are checked here."""
        if not isinstance(text, str) or not text:
            raise ConfigError("chat: a turn is a non-empty string")
        messages = [*self.messages, {"role": "user", "content": text}]
        conv, feed = self.feed(messages)
        return self._turn(conv, messages, conv.stream(feed, **options))

    def feed(self, messages: list[Message]) -> tuple[Conversation, list[int]]:
        """The conversation that continues with ``messages`` and the tokens to send it: the
        rendering's tokens after those the current conversation holds, or a fresh
        conversation and the whole rendering where it does not extend them."""
        ids = self.tokenizer.encode(self.template.render(messages), special=False)
        have = self.conversation.tokens
        if len(ids) > len(have) and ids[:len(have)] == have:
            return self.conversation, ids[len(have):]
        return self._rt.conversation(), ids

    def _turn(self, conv: Conversation, messages: list[Message], pieces: Iterator[Piece]
              ) -> Iterator[Piece]:
        yield from pieces
        self.conversation = conv
        self.messages = [*messages, {"role": "assistant", "content": conv.last.text or ""}]
