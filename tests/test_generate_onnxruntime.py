"""Generation on ONNX Runtime (``edgeadapt export base --generate``, ``rt.generate`` / ``stream``
/ ``conversation``) on tiny SmolLM2 with SHiRA adapters switched in place: greedy replies equal
transformers' ``generate`` on the PyTorch model carrying the same adapter; every decode step's
logits equal the full forward's; a switch between turns or during a reply re-prefills (the next
tokens equal a fresh conversation's under the new adapter, never the stale cache's); bad
inputs raise typed errors with nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from cuda_standin import load_device_runtime  # noqa: E402
from generate_bundle import (  # noqa: E402
    assert_argmax_under_s1_or_s2,
    assert_context_limit,
    assert_interleaved_conversations,
    assert_switch_between_turns_reprefills,
    bundle_adapter,
    export_generate,
    generate_while_switching,
    hf_greedy,
)
from generate_bundle import byte_tokenizer as _byte_tokenizer  # noqa: E402 - test_chat_cli too
from runtime_reference import parity, random_adapters, register_adapters  # noqa: E402

from edgeadapt.adapters.reference import reference_model  # noqa: E402
from edgeadapt.cli import main  # noqa: E402
from edgeadapt.errors import BundleError, ConfigError  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.format import read_manifest, write_manifest  # noqa: E402
from edgeadapt.graphs import head as graph_head  # noqa: E402
from edgeadapt.models import forward, load_model  # noqa: E402
from edgeadapt.runtime import get_backend, load  # noqa: E402
from edgeadapt.runtime.backends.onnxruntime import decoder as ort_decoder  # noqa: E402
from edgeadapt.runtime.generate import open_generator  # noqa: E402
from edgeadapt.runtime.sampling import Sampling, sample  # noqa: E402
from edgeadapt.runtime.tokenizer import Tokenizer  # noqa: E402

RTOL = 1e-4
CONTEXT = 96
PROMPT = [17, 301, 44, 9, 250, 77, 130]
DRAW = {"temperature": 1.0, "seed": 7}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny SmolLM2 (q/v live) with its decoder and a byte tokenizer; s1: SHiRA 5% of every
    live weight, s2: SHiRA 20% of two of them. The head (512 x 64 floats) in chunks of at
    most 48 KB, as SmolLM2's 113 MB head is in 16 MB ones: three."""
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    lm.tokenizer = _byte_tokenizer()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graph_head, "CHUNK_BYTES", 48 << 10)
        return lm, export_generate(lm, tmp_path_factory.mktemp("generate"), CONTEXT)


def _hashes(rt):
    return {n: hashlib.sha256(lw.array.tobytes()).hexdigest()
            for n, lw in rt.store.live_weights().items()}


def test_bundle_records_the_decoder(exported):
    lm, bundle = exported
    manifest = read_manifest(bundle)
    gen = manifest.extra["generate"]
    assert gen["max_context"] == CONTEXT and gen["vocab_size"] == lm.vocab_size
    assert gen["tokenizer"] == "tokenizer.json" and (bundle / "tokenizer.json").is_file()
    dec = manifest.onnxruntime["decoder"]
    assert dec["parity"]["max_rel_error"] <= RTOL
    assert dec["inputs"]["logits_to_keep"] == "logits_to_keep" and dec["head_chunks"] == 3
    # the decoder reads the base graph's live inputs: same names and layouts, one buffer each
    assert {w: (e["name"], e["layout"]) for w, e in dec["weights"].items()} == {
        w: (e.onnxruntime["name"], e.onnxruntime["layout"]) for w, e in manifest.weights.items()}
    assert (bundle / dec["file"]).is_file()


@pytest.mark.parametrize(("adapter", "mode"), [("s1", "live"), ("s2", "live"), (None, "live"),
                                             ("s1", "live-matmul"), ("s2", "repack")])
def test_greedy_equals_transformers_generate(exported, adapter, mode):
    """live: the decoder reads the blocked32 weights with edgeadapt's kernel where it builds,
    live-matmul through MatMul; repack: the decoder reads the host copy the engine edits."""
    lm, bundle = exported
    rt = load(bundle, mode=mode.split("-")[0], threads=1,
              kernel=False if mode == "live-matmul" else None)
    rt.switch(adapter)
    out = rt.generate(PROMPT, max_new_tokens=40)
    want = hf_greedy(lm, bundle, adapter, PROMPT, 40)
    assert out.ids == want
    assert len(out.ids) >= 32 and out.finish_reason == "length"
    assert out.prompt_tokens == len(PROMPT) and out.reprefills == 0


@pytest.mark.parametrize("where", [
    pytest.param("cuda", marks=pytest.mark.gpu), "standin-torch", "standin-ortvalue"])
def test_the_device_store_decoder_generates_what_transformers_does(exported, where,
                                                                    monkeypatch):
    """The decoder on the device store (CUDA where a GPU is lent; else the store's code on the
    CPU execution provider, its "device" buffers separate copies that only ``commit`` writes):
    greedy replies under s1, s2 and the base equal transformers', a switch between turns
    re-prefills, and the device buffers are what the decoder reads (with the commit cut off,
    a switch leaves its replies at the base's: the host mirrors the engine edits are not)."""
    lm, bundle = exported
    rt = load_device_runtime(bundle, where)
    for adapter in ("s1", "s2", None):
        rt.switch(adapter)
        out = rt.generate(PROMPT, max_new_tokens=32)
        assert out.ids == hf_greedy(lm, bundle, adapter, PROMPT, 32)
    assert_switch_between_turns_reprefills(rt, lm, bundle, PROMPT)
    rt.switch(None)
    base = rt.generate(PROMPT, max_new_tokens=12).ids
    monkeypatch.setattr(rt.store, "commit", lambda changes: None)
    rt.switch("s1")
    assert rt.generate(PROMPT, max_new_tokens=12).ids == base != hf_greedy(
        lm, bundle, "s1", PROMPT, 12)


@pytest.mark.parametrize(("first_capacity", "keep"), [(None, 0), (4, 0), (None, 2), (None, 6)])
def test_decode_step_logits_equal_full_forward(exported, monkeypatch, first_capacity, keep):
    """Under s1: a prefill of 5 tokens, then 20 single-token steps through the cache; each
    position's logits vs the PyTorch full forward of the whole sequence. With a first
    capacity of 4 the cache buffers grow (4 -> 8 -> 16 -> 32) on the way, the held positions
    carried over; between growths each step writes into the same buffers in place. ``keep``
    k >= 1: the graph's head computes the last k positions' logits only (all where k >= the
    step's tokens), and the cache is written as with every position's."""
    if first_capacity is not None:
        monkeypatch.setattr(ort_decoder, "FIRST_CAPACITY", first_capacity)
    lm, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    gen = open_generator(rt.bundle_dir, rt.manifest, get_backend("onnxruntime"), rt.store,
                         device="cpu", threads=1)
    ids = np.random.default_rng(4).integers(5, lm.vocab_size, size=25).astype(np.int64)
    ref = reference_model(lm, [bundle_adapter(bundle, "s1")])
    with torch.no_grad():
        want = forward(ref, {"input_ids": torch.from_numpy(ids[None])}).numpy()[0]
    base = forward(lm, {"input_ids": torch.from_numpy(ids[None])}).detach().numpy()[0]
    logits, cache = gen.decoder.step(ids[None, :5], gen.decoder.empty_cache(1), keep=keep)
    kept = min(keep, 5) or 5
    assert logits.shape == (1, kept, lm.vocab_size)
    assert parity(logits[0], want[5 - kept:5]) <= RTOL
    capacities = {cache.capacity}
    for bad in (-1, 1.5, True):  # refused before the run: the cache unchanged
        with pytest.raises(ConfigError, match="keep"):
            gen.decoder.step(ids[None, 5:6], cache, keep=bad)
    assert cache.length == 5
    for i in range(5, ids.size):
        buffer = cache.arrays[0]
        logits, cache = gen.decoder.step(ids[None, i:i + 1], cache, keep=keep)
        assert cache.length == i + 1 <= cache.capacity and logits.shape[1] == 1
        if cache.capacity in capacities:
            assert cache.arrays[0] is buffer and buffer[0, :, i].any()  # written in place
        capacities.add(cache.capacity)
        assert parity(logits[0, 0], want[i]) <= RTOL, i
        assert parity(logits[0, 0], base[i]) > 100 * RTOL  # the adapter changes it


def test_interleaved_conversations_keep_their_own_feeds(exported):
    """Two conversations on one runtime stream token by token in turn from one thread (each
    one-token step binds its own cache's feeds and logits: the other's step between must not
    reach them), then take a second turn each: every reply equals transformers' on that
    conversation's own context."""
    lm, bundle = exported
    assert_interleaved_conversations(load(bundle, mode="live", threads=1), lm, bundle, PROMPT,
                                     [(0, [40]), (1, [42, 43]), (0, [41])], 6)  # 1 and 2 tokens


def test_switch_between_turns_reprefills(exported):
    lm, bundle = exported
    assert_switch_between_turns_reprefills(load(bundle, mode="live", threads=1), lm, bundle,
                                           PROMPT)


def test_switch_during_a_reply_reprefills(exported):
    lm, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    chat = rt.conversation()
    pieces = chat.stream(PROMPT, max_new_tokens=14)
    head = [next(pieces).token for _ in range(4)]
    rt.switch("s2")
    tail = [p.token for p in pieces]
    assert head == hf_greedy(lm, bundle, "s1", PROMPT, 4)
    assert tail == hf_greedy(lm, bundle, "s2", PROMPT + head, 10)
    assert chat.last.ids == head + tail and chat.last.reprefills == 1


def test_a_switch_during_a_prefill_never_waits_and_starts_it_over(exported, monkeypatch):
    """Prefill chunks of 3 tokens, each run optimistically: a switch made while chunk 2 runs
    completes at once (it does not wait for the chunk) and cancels it (ONNX Runtime's run is
    terminated and raises), and the prefill starts over under the new adapter: the reply
    equals transformers' under s2 alone, one rebuild counted."""
    from edgeadapt.runtime import generate as gen_module

    lm, bundle = exported
    monkeypatch.setattr(gen_module, "PREFILL_CHUNK", 3)
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    chat = rt.conversation()
    decoder = rt.conversation()._gen.decoder
    step, calls, terminated = decoder.step, [], []

    def spy(ids, cache, window, **keep):
        calls.append((ids.shape[1], rt.active))
        if len(calls) == 2:  # chunk 2 is running: another thread switches, not waiting
            switcher = threading.Thread(target=rt.switch, args=("s2",))
            switcher.start()
            switcher.join(timeout=30)
            assert not switcher.is_alive()
        try:
            return step(ids, cache, window, **keep)
        except Exception as exc:
            terminated.append(str(exc))
            raise

    monkeypatch.setattr(decoder, "step", spy)
    out = chat.send(PROMPT, max_new_tokens=4)  # 7 tokens: chunks of 3, 3, 1
    assert [c[1] for c in calls[:3]] == [("s1",), ("s1",), ("s2",)]
    assert [c[0] for c in calls[:5]] == [3, 3, 3, 3, 1]  # chunk 2 torn: the prefill again
    assert out.ids == hf_greedy(lm, bundle, "s2", PROMPT, 4) and out.reprefills == 1
    assert len(terminated) == 1 and "terminate" in terminated[0]


def test_switches_faster_than_a_step_cannot_starve_a_conversation(exported, monkeypatch):
    """Steps slowed to 5 ms while another thread switches s1 <-> s2 every 0.5 ms: every
    optimistic step is torn, so after RESTARTS_BEFORE_HOLDING rebuilds the conversation feeds
    under the lock held shared (the switches wait) and the reply completes; each token is
    the argmax under s1 or s2 of its context."""
    lm, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    decoder = rt.conversation()._gen.decoder
    step = decoder.step

    def slow(ids, cache, *window, **keep):
        threading.Event().wait(0.005)
        return step(ids, cache, *window, **keep)

    monkeypatch.setattr(decoder, "step", slow)
    stop, flips = threading.Event(), []

    def flip() -> None:
        while not stop.is_set():
            rt.switch("s2" if len(flips) % 2 == 0 else "s1")
            flips.append(1)
            threading.Event().wait(0.0005)

    switcher = threading.Thread(target=flip)
    switcher.start()
    result = []
    talker = threading.Thread(target=lambda: result.append(rt.generate(PROMPT,
                                                                       max_new_tokens=6)))
    talker.start()
    talker.join(timeout=120)
    stop.set()
    switcher.join()
    assert not talker.is_alive() and len(result) == 1, "the conversation starved"
    out = result[0]
    assert len(out.ids) == 6 and out.reprefills >= 2 and len(flips) > 10
    assert_argmax_under_s1_or_s2(lm, bundle, [(list(PROMPT), out)])


def test_conversations_generate_while_another_thread_switches(exported):
    """Two threads generate greedy replies while the main thread switches s1 <-> s2 every
    millisecond: each token is the argmax under s1 or under s2 of its whole context (a step
    never mixes states, never continues a stale cache), and switches did land mid-reply."""
    lm, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    replies, flips = generate_while_switching(rt, lm.vocab_size, replies=6, new_tokens=12)
    assert len(replies) >= 12 and flips >= 4
    assert sum(out.reprefills for _, out in replies) > 0
    assert_argmax_under_s1_or_s2(lm, bundle, replies)


def test_text_prompts_stream_and_stop(exported):
    """Sampled (seeded, so each call draws the same tokens) for a text of many characters."""
    _, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    tok = Tokenizer(bundle / "tokenizer.json")
    assert tok.vocab_size == 512
    out = rt.generate("Hello, world", max_new_tokens=24, **DRAW)
    assert out.prompt_tokens == len(tok.encode("Hello, world")) < 12  # "el" merged
    assert out.text == tok.decode(out.ids) and len(out.text) >= 8
    pieces = list(rt.stream("Hello, world", max_new_tokens=24, **DRAW))
    assert [p.token for p in pieces] == out.ids
    assert "".join(p.text for p in pieces) == out.text
    clean = [i for i in range(1, len(out.text) - 2) if "\ufffd" not in out.text[i:i + 2]]
    assert clean, out.text
    stop = out.text[clean[0]:clean[0] + 2]
    cut = rt.generate("Hello, world", max_new_tokens=24, **DRAW, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == out.text[:out.text.find(stop)]
    assert cut.ids == out.ids[:len(cut.ids)]
    streamed = list(rt.stream("Hello, world", max_new_tokens=24, **DRAW, stop=stop))
    assert "".join(p.text for p in streamed) == cut.text


def test_sampling_is_seeded(exported):
    _, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    a = rt.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=3)
    assert a.ids == rt.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.95,
                                seed=3).ids
    greedy = rt.generate(PROMPT, max_new_tokens=12).ids
    assert rt.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_k=1, seed=5).ids == greedy
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    rng = np.random.default_rng(0)
    assert {sample(logits, Sampling(temperature=1.0, top_p=1e-6), rng) for _ in range(20)} == {1}
    drawn = {sample(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert drawn == {1, 2}


def test_allowed_tokens_constrain_the_reply(exported):
    """Greedy with ``allowed``: each token is the likeliest of the allowed set under the full
    logits (checked on the PyTorch model step by step); a draw stays inside the set."""
    lm, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    free = rt.generate(PROMPT, max_new_tokens=6).ids
    allowed = [t + 1 for t in free[:2]] + [7, 300]  # the free reply's tokens are not allowed
    out = rt.generate(PROMPT, max_new_tokens=6, allowed=allowed)
    context = list(PROMPT)
    for token in out.ids:
        with torch.no_grad():
            logits = forward(lm, {"input_ids": torch.tensor([context])})[0, -1].numpy()
        assert token == allowed[int(np.argmax(logits[allowed]))]
        context.append(token)
    drawn = rt.generate(PROMPT, max_new_tokens=8, allowed=[5, 9], temperature=1.0, seed=2).ids
    assert set(drawn) <= {5, 9}
    assert sample(np.array([0.0, 3.0, 2.9]), Sampling(allowed=(0, 2)), None) == 2
    for bad, match in (([], "allowed="), ([1.5], "allowed="), ([10**6], "outside the model")):
        with pytest.raises(ConfigError, match=match):
            rt.generate(PROMPT, allowed=bad)


def test_context_limit(exported):
    _, bundle = exported
    assert_context_limit(load(bundle, mode="live", threads=1), CONTEXT)


def test_bad_inputs_change_nothing(exported, tmp_path):
    _, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    chat = rt.conversation()
    chat.send(PROMPT, max_new_tokens=3)
    before = (chat.tokens, _hashes(rt), rt.active, rt.lock.epoch)
    bad = [([], {}), ("", {}), ([-1], {}), ([512], {}), ([1.5, 2.0], {}), ([[5, 6]], {}),
           ("x" * 3, {"bogus": 1}), (list(range(5, 5 + CONTEXT)), {}),
           ([5], {"max_new_tokens": 0}), ([5], {"max_new_tokens": True}),
           ([5], {"max_new_tokens": 2.0}), ([5], {"temperature": -1.0}),
           ([5], {"temperature": float("nan")}), ([5], {"top_k": 0}), ([5], {"top_p": 0.0}),
           ([5], {"top_p": 1.5}), ([5], {"seed": -1}), ([5], {"stop": [""]})]
    for prompt, options in bad:
        with pytest.raises(ConfigError):
            chat.send(prompt, **options)
        with pytest.raises(ConfigError):
            rt.stream(prompt, **options)  # refused before the first piece is asked for
    assert (chat.tokens, _hashes(rt), rt.active, rt.lock.epoch) == before
    # the conversation goes on as if nothing had been tried
    again = rt.conversation()
    again.send(PROMPT, max_new_tokens=3)
    assert chat.send([40], max_new_tokens=5).ids == again.send([40], max_new_tokens=5).ids

    for kind, edit in (("classifier", lambda m: setattr(m, "kind", "classifier")),
                       ("no-decoder", lambda m: m.extra.pop("generate"))):
        copy = tmp_path / kind
        shutil.copytree(bundle, copy)
        manifest = read_manifest(copy)
        edit(manifest)
        write_manifest(copy, manifest)
        with pytest.raises(BundleError):
            load(copy, mode="live", threads=1).generate([5])


def test_export_refuses_bad_generate_options(tmp_path):
    with pytest.raises(ConfigError, match="causal"):
        export_base("tiny-minilm", tmp_path / "a", backends="onnxruntime", generate=True)
    with pytest.raises(ConfigError, match="max-context"):
        export_base("tiny-smollm2", tmp_path / "b", backends="onnxruntime", generate=True,
                    max_context=10_000)
    with pytest.raises(ConfigError, match="needs --generate"):
        export_base("tiny-smollm2", tmp_path / "c", backends="onnxruntime", max_context=64)
    assert not (tmp_path / "b" / "bundle.json").exists()


def test_cli_streams_the_reply(exported):
    _, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s1")
    want = rt.generate("Hi there", max_new_tokens=8)
    res = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "Hi there",
                                    "--adapter", "s1", "--max-new-tokens", "8",
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(want.text)
    assert "8 tokens" in res.stderr and "adapters: s1" in res.stderr
    # --device reaches load(): an unknown device is refused before anything is generated
    res = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "Hi there",
                                    "--device", "tpu"])
    assert res.exit_code == 2 and "tpu" in res.stderr and res.stdout == ""


def test_generation_imports_no_torch(exported, tmp_path):
    _, bundle = exported
    rt = load(bundle, mode="live", threads=1)
    rt.switch("s2")
    want = rt.generate("Hello", max_new_tokens=12)
    code = f"""
import json, sys
sys.modules['torch'] = None
from edgeadapt.runtime import load
rt = load({str(bundle)!r}, mode='live', threads=1)
rt.switch('s2')
out = rt.generate('Hello', max_new_tokens=12)
print(json.dumps({{"ids": out.ids, "text": out.text,
                  "torch": sys.modules.get('torch') is not None}}))
"""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"ids": want.ids, "text": want.text, "torch": False}


def test_a_real_tokenizer_travels_torch_free(tmp_path):
    """SmolLM2's own tokenizer (where its converted copy is cached): the exporter writes its
    tokenizer.json and chat template; the runtime's tokenizer encodes and decodes as
    transformers does."""
    from edgeadapt.export.decoder import write_tokenizer
    from edgeadapt.models import cache_dir

    source = cache_dir() / "smollm2-135m-instruct-fp32"
    if not (source / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not converted here (edgeadapt.models.smollm2_fp32_dir)")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(source)
    entries = write_tokenizer(hf, tmp_path)
    assert entries == {"tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja"}
    assert (tmp_path / "chat_template.jinja").read_text() == hf.chat_template
    tok = Tokenizer(tmp_path / "tokenizer.json")
    text = "Once upon a time, an adapter was switched in place: ça marche 🎉."
    ids = hf(text)["input_ids"]
    assert tok.encode(text) == ids
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.vocab_size == len(hf)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(tmp_path):
    """The real SmolLM2-135M (q/v live, --generate, context 256): 32 greedy tokens of a text
    prompt under a SHiRA adapter and under the base equal transformers' ``generate``."""
    from edgeadapt.errors import MissingPackageError

    torch.set_num_threads(2)
    try:
        lm = load_model("smollm2", seed=0)
    except MissingPackageError as exc:
        pytest.skip(str(exc))
    export_base(lm, tmp_path, backends="onnxruntime", targets="qv", generate=True,
                max_context=256)
    manifest = read_manifest(tmp_path)
    assert manifest.extra["generate"]["chat_template"] == "chat_template.jinja"
    names = sorted(manifest.weights)
    s1, _, _ = random_adapters(lm, names, names[:2], seed=1)
    register_adapters(tmp_path, manifest, {"s1": s1})
    rt = load(tmp_path, mode="live", threads=2)
    prompt = lm.tokenizer("The capital of France is")["input_ids"]
    for adapter in (None, "s1"):
        rt.switch(adapter)
        out = rt.generate("The capital of France is", max_new_tokens=32)
        assert out.prompt_tokens == len(prompt)
        assert out.ids == hf_greedy(lm, tmp_path, adapter, prompt, 32), adapter
