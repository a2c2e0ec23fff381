"""``edgeadapt chat BUNDLE`` on tiny SmolLM2 (q/v live, byte tokenizer, SHiRA adapters s1, s2):
each reply equals ``rt.generate`` of the same context on a separate runtime under the same
adapters (switched with /adapter, /fuse); bad commands and unknown adapters print one error line
and the loop goes on; the bundle's chat template is rendered as transformers renders it, and
one that cannot be used falls back to plain text turns, said once."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from runtime_reference import random_adapters, register_adapters  # noqa: E402
from test_generate_onnxruntime import _byte_tokenizer  # noqa: E402

from edgeadapt.cli import main  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.format import read_manifest, write_manifest  # noqa: E402
from edgeadapt.models import load_model  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402
from edgeadapt.runtime.chat_template import Chat, ChatTemplate  # noqa: E402
from edgeadapt.runtime.tokenizer import Tokenizer  # noqa: E402

N = 8  # new tokens per reply
SWITCHED = r"\[adapters: {}; switched in \d+\.\d\d ms\]\n"
TEMPLATE = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}"
            "{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}{{ bos_token }}assistant: {% endif %}")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("chat")
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    lm.tokenizer = _byte_tokenizer()
    export_base(lm, out, backends="onnxruntime", targets="qv", generate=True, max_context=96)
    manifest = read_manifest(out)
    names = sorted(manifest.weights)
    s1, s2, _ = random_adapters(lm, names, names[:2], seed=1)
    register_adapters(out, manifest, {"s1": s1, "s2": s2})
    return out


def _chat(bundle, lines: str, *args: str):
    res = CliRunner().invoke(main, ["chat", str(bundle), "--max-new-tokens", str(N),
                                    "--threads", "1", *args], input=lines)
    assert res.exit_code == 0, (res.output, res.exception)
    assert "Traceback" not in res.output
    return res


def _reference(bundle, adapters, prompt):
    """``rt.generate`` on a runtime of its own, ``adapters`` switched in first."""
    rt = load(bundle, mode="live", threads=1)
    rt.switch(adapters)
    return rt.generate(prompt, max_new_tokens=N)


def test_session_switches_in_place_and_reports_stats(bundle):
    res = _chat(bundle, "hello\n/adapter s1\nhello\n/adapter none\n/stats\n/quit\nhello\n")
    tok = Tokenizer(bundle / "tokenizer.json")
    first = _reference(bundle, None, "hello")
    # the second turn continues the conversation: "hello", the base reply, "hello" again
    context = tok.encode("hello") + first.ids + tok.encode("hello", special=False)
    second = _reference(bundle, ["s1"], context)
    assert second.ids != _reference(bundle, None, context).ids  # the switch matters
    stats = re.escape(f"[last reply: {len(second.ids)} tokens in ") + r"\d+ ms, \d+\.\d tokens/s"
    want = (re.escape(first.text) + r"\n" + SWITCHED.format("s1") + re.escape(second.text)
            + r"\n" + SWITCHED.format(re.escape("none (base)")) + stats
            + r".*; last switch: \d+\.\d\d ms \(to none \(base\)\); "
            + r"adapters now: none \(base\)\]\n")
    assert re.fullmatch(want, res.stdout), res.stdout  # nothing after /quit
    assert "no chat template in the bundle: plain text turns" in res.stderr


def test_unknown_adapter_and_bad_commands_print_one_line(bundle):
    res = _chat(bundle, "/stats\n/adapter nope\n/bogus\n/fuse s1\n/adapter\n\nhello\n")
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 4, res.stderr
    assert "'nope'" in errors[0] and "s1, s2" in errors[0]
    assert "unknown command /bogus" in errors[1]
    assert "usage: /fuse A B" in errors[2] and "usage: /adapter NAME" in errors[3]
    # the loop went on, under the base, to the end of input (no /quit)
    assert res.stdout == ("[last reply: none yet; last switch: none yet; adapters now: none "
                          f"(base)]\n{_reference(bundle, None, 'hello').text}\n")


def test_fuse_and_reset(bundle):
    res = _chat(bundle, "/fuse s1 s2\nhello\n/reset\nhello\n")
    fused = _reference(bundle, ["s1", "s2"], "hello")
    assert fused.ids != _reference(bundle, ["s1"], "hello").ids
    assert re.fullmatch(SWITCHED.format(re.escape("s1 + s2")) + re.escape(
        f"{fused.text}\n[new conversation]\n{fused.text}\n"), res.stdout), res.stdout


def test_adapter_option_switches_first(bundle):
    res = _chat(bundle, "hello\n", "--adapter", "s2")
    assert res.stdout.endswith(f"\n{_reference(bundle, ['s2'], 'hello').text}\n")


def _with_template(bundle, tmp_path, template: str):
    copy = tmp_path / "templated"
    shutil.copytree(bundle, copy)
    (copy / "chat_template.jinja").write_text(template)
    manifest = read_manifest(copy)
    manifest.extra["generate"]["chat_template"] = "chat_template.jinja"
    write_manifest(copy, manifest)
    return copy, Tokenizer(copy / "tokenizer.json")


def _special_tokens(copy, tok):
    spec = read_manifest(copy).extra["generate"]
    return tok.token(spec["bos_token_id"]), tok.token(spec["eos_token_ids"][0])


def test_template_renders_as_transformers(bundle, tmp_path):
    copy, tok = _with_template(bundle, tmp_path, TEMPLATE)
    hf = _byte_tokenizer()
    hf.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "and?"}]
    bos, eos = _special_tokens(copy, tok)
    mine = ChatTemplate(TEMPLATE, bos, eos).render(messages)
    assert mine == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                          bos_token=bos, eos_token=eos)
    assert mine.endswith("assistant: ") and "user: and?" in mine


def test_chat_applies_the_template(bundle, tmp_path):
    copy, tok = _with_template(bundle, tmp_path, TEMPLATE)
    template = ChatTemplate(TEMPLATE, *_special_tokens(copy, tok))
    res = _chat(copy, "hi\nhow are you\n/adapter s1\nand now\n")
    assert "chat template chat_template.jinja applied" in res.stderr
    messages, replies = [], []
    for line, adapters in (("hi", None), ("how are you", None), ("and now", ["s1"])):
        messages.append({"role": "user", "content": line})
        out = _reference(copy, adapters, tok.encode(template.render(messages), special=False))
        messages.append({"role": "assistant", "content": out.text})
        replies.append(out.text)
    assert re.fullmatch(re.escape(f"{replies[0]}\n{replies[1]}\n") + SWITCHED.format("s1")
                        + re.escape(f"{replies[2]}\n"), res.stdout), res.stdout
    # the plain-text reply differs: the template is what the model saw
    assert replies[0] != _reference(copy, None, "hi").text


def test_template_feeds_only_the_tokens_the_conversation_lacks(bundle, tmp_path):
    """Where the new rendering extends the conversation's tokens, only the rest is sent (the
    cache is kept); otherwise the whole rendering goes to a fresh conversation."""
    copy, tok = _with_template(bundle, tmp_path, TEMPLATE)
    template = ChatTemplate(TEMPLATE, *_special_tokens(copy, tok))
    chat = Chat(load(copy, mode="live", threads=1), template, tok)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "and?"}]
    have = (tok.encode(template.render(messages[:1]), special=False)
            + tok.encode("yo", special=False))
    full = tok.encode(template.render(messages), special=False)
    chat.conversation = SimpleNamespace(tokens=have)
    conv, prompt = chat.feed(messages)
    assert conv is chat.conversation and have + prompt == full and len(prompt) < len(full)
    chat.conversation = SimpleNamespace(tokens=[*have[:-1], have[-1] + 1])  # not a prefix
    conv, prompt = chat.feed(messages)
    assert conv is not chat.conversation and conv.tokens == [] and prompt == full


@pytest.mark.parametrize("broken", ["{% for m in messages %}{{ m.content ",
                                    "{% if messages|length > 1 %}"
                                    "{{ raise_exception('one turn only') }}{% endif %}"
                                    + TEMPLATE])
def test_unusable_template_falls_back_to_plain_turns(bundle, tmp_path, broken):
    """A template that does not compile (said at the start) or fails on the second turn
    (said then): plain text turns from there on, the note given once."""
    copy, tok = _with_template(bundle, tmp_path, broken)
    res = _chat(copy, "hello\nagain\nmore\n")
    assert res.stderr.count("note: chat template") == 1, res.stderr
    assert "plain text turns" in res.stderr and "error:" not in res.stderr
    if "raise_exception" in broken:  # the first turn went through the template
        template = ChatTemplate(TEMPLATE, *_special_tokens(copy, tok))
        context = tok.encode(template.render([{"role": "user", "content": "hello"}]),
                             special=False)
    else:
        context = tok.encode("hello")
    first = _reference(copy, None, context)
    context += first.ids + tok.encode("again", special=False)
    second = _reference(copy, None, context)
    context += second.ids + tok.encode("more", special=False)
    third = _reference(copy, None, context)
    assert res.stdout == f"{first.text}\n{second.text}\n{third.text}\n"


def test_runtime_chat_and_generate_take_messages(bundle, tmp_path):
    """``rt.chat()`` renders each turn with the template (its replies equal ``rt.generate`` of
    the rendered tokens on another runtime, the cache kept between turns), keeps the system
    message, and ``rt.generate(messages)`` is one such turn."""
    from edgeadapt.errors import ConfigError

    copy, tok = _with_template(bundle, tmp_path, TEMPLATE)
    template = ChatTemplate(TEMPLATE, *_special_tokens(copy, tok))
    rt = load(copy, mode="live", threads=1)
    chat = rt.chat(system="be brief")
    first = chat.send("hi", max_new_tokens=N)
    conv = chat.conversation
    rt.switch("s1")
    second = chat.send("more", max_new_tokens=N)
    assert chat.conversation is conv  # extended, not re-rendered into a fresh one
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert first.ids == _reference(copy, None, tok.encode(template.render(messages),
                                                          special=False)).ids
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}]
    want = _reference(copy, ["s1"], tok.encode(template.render(messages), special=False))
    assert second.ids == want.ids and second.reprefills == 1  # re-prefilled under s1
    assert chat.messages == [*messages, {"role": "assistant", "content": second.text}]
    assert rt.generate(messages, max_new_tokens=N).ids == want.ids
    assert [p.token for p in rt.stream(messages, max_new_tokens=N)] == want.ids
    chat.reset()
    assert chat.messages == messages[:1] and chat.conversation.tokens == []
    for bad in ([{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(ConfigError, match="needs a 'role' and a 'content'"):
            rt.generate(bad)
    with pytest.raises(ConfigError, match="no chat template"):
        load(bundle, mode="live", threads=1).chat()
