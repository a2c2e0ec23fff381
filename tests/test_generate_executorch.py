"""Generation on ExecuTorch (``edgeadapt export base --backends executorch --generate``,
``load(backend="executorch").generate`` / ``stream`` / ``conversation``) on tiny SmolLM2 with
SHiRA adapters switched in place: the decoder is a method of the live program reading the same
buffers as ``forward``; greedy replies equal transformers' ``generate`` on the PyTorch model
carrying the same adapter; every decode step's logits equal the full forward's; a switch
between turns re-prefills; conversations interleaved on one runtime each keep their own
context (the program's one cache moved out and in); bad inputs raise typed errors with nothing
changed. The program runs on edgeadapt's native runner where it builds: its outputs equal
ExecuTorch's Python runtime's bit for bit, and a switch does not wait for a decode step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from click.testing import CliRunner  # noqa: E402
from generate_bundle import (  # noqa: E402
    assert_argmax_under_s1_or_s2,
    assert_context_limit,
    assert_interleaved_conversations,
    assert_switch_between_turns_reprefills,
    assert_text_greedy_equals_transformers,
    bundle_adapter,
    byte_tokenizer,
    export_generate,
    generate_while_switching,
    hf_greedy,
)
from runtime_reference import parity  # noqa: E402

from edgeadapt.adapters.reference import reference_model  # noqa: E402
from edgeadapt.cli import main  # noqa: E402
from edgeadapt.errors import BundleError, ConfigError  # noqa: E402
from edgeadapt.export.bundle import export_base  # noqa: E402
from edgeadapt.format import read_manifest  # noqa: E402
from edgeadapt.models import forward, load_model  # noqa: E402
from edgeadapt.runtime import load  # noqa: E402
from edgeadapt.runtime.backends.executorch.decoder import EtDecoder  # noqa: E402
from edgeadapt.runtime.backends.executorch.programs import runner_unavailable  # noqa: E402
from edgeadapt.runtime.backends.executorch.store import open_store  # noqa: E402
from edgeadapt.runtime.engine import SwitchEngine  # noqa: E402

RTOL = 1e-4
CONTEXT = 96
PROMPT = [17, 301, 44, 9, 250, 77, 130]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny SmolLM2 (q/v live, own-kernel live form where a compiler is) exported for
    ExecuTorch alone with its decoder and a byte tokenizer; s1: SHiRA 5% of every live weight,
    s2: SHiRA 20% of two of them."""
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    lm.tokenizer = byte_tokenizer()
    return lm, export_generate(lm, tmp_path_factory.mktemp("generate-et"), CONTEXT,
                               backends="executorch", pte_repack=False)


@pytest.fixture(scope="module")
def rt(exported):
    """One runtime for the module (the program loads once); each test switches first."""
    return load(exported[1], backend="executorch", mode="live", threads=1)


def _decoder(rt) -> EtDecoder:
    return rt.conversation()._gen.decoder


def test_bundle_records_the_decoder_in_the_live_program(exported, rt):
    lm, bundle = exported
    manifest = read_manifest(bundle)
    assert manifest.onnxruntime is None  # exported without ONNX Runtime
    dec = manifest.executorch["decoder"]
    assert dec["method"] == manifest.executorch["methods"]["decode"] == "decode"
    assert dec["parity"]["max_rel_error"] <= RTOL
    assert (dec["max_context"], dec["max_chunk"]) == (CONTEXT, CONTEXT - 1)
    assert dec["inputs"] == ["input_ids", "positions", "keep"]
    # own-kernel live linears: the attention is edgeadapt's kernel too (the greedy and logits
    # tests below run through it); standard ops otherwise
    own = manifest.executorch["live_form"] == "own-kernel"
    assert dec["attention"] == ("kernel" if own else "bmm")
    assert dec["cache"] == [[f"k_cache_{i}", f"v_cache_{i}"] for i in range(dec["layers"])]
    assert manifest.extra["generate"]["max_context"] == CONTEXT
    # one program, one buffer per live weight: decode reads the memory the engine writes
    decode = rt.store.method("decode")
    for w, lw in rt.store.live_weights().items():
        view = rt.store.buffer(manifest.weights[w].executorch["buffer"], decode)
        assert view.ctypes.data == lw.array.ctypes.data, w
    cache = _decoder(rt)._buffers[0]
    assert cache.shape == (1, dec["kv_heads"], CONTEXT, dec["head_dim"])


@pytest.mark.parametrize("adapter", ["s1", "s2", None])
def test_greedy_equals_transformers_generate(exported, rt, adapter):
    lm, bundle = exported
    rt.switch(adapter)
    out = rt.generate(PROMPT, max_new_tokens=40)
    assert out.ids == hf_greedy(lm, bundle, adapter, PROMPT, 40)
    assert len(out.ids) >= 32 and out.finish_reason == "length"
    assert out.prompt_tokens == len(PROMPT) and out.reprefills == 0


def test_decode_step_logits_equal_full_forward(exported, rt):
    """Under s1: a prefill of 5 tokens, then 20 single-token steps through the cache; each
    position's logits vs the PyTorch full forward of the whole sequence."""
    lm, bundle = exported
    rt.switch("s1")
    decoder = _decoder(rt)
    ids = np.random.default_rng(4).integers(5, lm.vocab_size, size=25).astype(np.int64)
    ref = reference_model(lm, [bundle_adapter(bundle, "s1")])
    with torch.no_grad():
        want = forward(ref, {"input_ids": torch.from_numpy(ids[None])}).numpy()[0]
        base = forward(lm, {"input_ids": torch.from_numpy(ids[None])}).numpy()[0]
    logits, cache = decoder.step(ids[None, :5], decoder.empty_cache(1))
    assert parity(logits[0], want[:5]) <= RTOL
    last, _ = decoder.step(ids[None, :5], decoder.empty_cache(1), keep=2)  # the last two only
    assert last.shape == (1, 2, lm.vocab_size) and parity(last[0], want[3:5]) <= RTOL
    # the program itself computes the kept positions only (keep's length), not the decoder
    raw = decoder.method.execute([ids[None, :5], np.arange(5), np.zeros(2, np.int64)])[0]
    np.testing.assert_array_equal(raw, last)
    with pytest.raises(ConfigError, match="keep"):  # refused before the run
        decoder.step(ids[None, 5:6], cache, keep=-1)
    assert cache.valid and cache.length == 5
    for i in range(5, ids.size):
        logits, cache = decoder.step(ids[None, i:i + 1], cache, keep=i % 2)
        assert cache.length == i + 1 and logits.shape == (1, 1, lm.vocab_size)
        assert parity(logits[0, 0], want[i]) <= RTOL, i
        assert parity(logits[0, 0], base[i]) > 100 * RTOL  # the adapter changes it


def test_switch_between_turns_reprefills(exported, rt):
    assert_switch_between_turns_reprefills(rt, *exported, PROMPT)


def test_interleaved_conversations_keep_their_own_context(exported, rt):
    """Two conversations stream their replies token by token in turn (every step moves the
    other's cache out and this one's in), then take a second turn each: every reply equals
    transformers' on that conversation's own context."""
    lm, bundle = exported
    assert_interleaved_conversations(rt, lm, bundle, PROMPT, [(0, [40, 41]), (1, [42]),
                                                              (0, [43])], 8)


def test_conversations_generate_while_another_thread_switches(exported, rt):
    """Two threads generate greedy replies while the main thread switches s1 <-> s2: each
    token is the argmax under s1 or under s2 of its whole context (a step never mixes states
    nor continues a stale cache, and never reads the other conversation's cache). On the native
    runner the steps run optimistically (a switch writes while they run)."""
    lm, bundle = exported
    assert _decoder(rt).optimistic == (runner_unavailable() is None) == rt.store.releases_gil
    rt.switch("s1")
    replies, flips = generate_while_switching(rt, lm.vocab_size, replies=4, new_tokens=10)
    assert len(replies) >= 8 and flips >= 4
    assert_argmax_under_s1_or_s2(lm, bundle, replies)


def test_runner_equals_the_python_runtime_bit_for_bit(exported, rt):
    """The bundle's live program (XNNPACK delegate; edgeadapt's own kernel in the own-kernel
    live form) loaded by edgeadapt's native runner and by ExecuTorch's Python runtime: the
    forward at several shapes and a prefill then decode steps give the same bits, under the
    base and after the same in-place switch to s1 on each, where both equal the PyTorch model
    carrying s1. Only the runner's decoder is optimistic."""
    if runner_unavailable() is not None:
        pytest.skip(f"native runner unavailable: {runner_unavailable()}")
    lm, bundle = exported
    manifest = read_manifest(bundle)
    raw = (bundle / manifest.executorch["file"]).read_bytes()
    assert b"XnnpackBackend" in raw
    if manifest.executorch["live_form"] == "own-kernel":
        assert b"edgeadapt::live_linear" in raw
    stores = [open_store(bundle, manifest.to_dict(), native=native) for native in (True, False)]
    assert [s.releases_gil for s in stores] == [True, False]
    decoders = [EtDecoder(s, manifest.executorch["decoder"]) for s in stores]
    assert [d.optimistic for d in decoders] == [True, False]
    rng = np.random.default_rng(7)
    feeds = [{"input_ids": rng.integers(5, lm.vocab_size, (b, s)).astype(np.int64)}
             for b, s in ((1, 1), (2, 7), (manifest.executorch["max_batch"], 20))]
    ids = rng.integers(5, lm.vocab_size, (1, 9)).astype(np.int64)

    def outputs(store, decoder) -> list[np.ndarray]:
        got = [store.run(f) for f in feeds]
        logits, cache = decoder.step(ids[:, :5], decoder.empty_cache(1))
        got.append(logits)
        for i in range(5, ids.shape[1]):
            logits, cache = decoder.step(ids[:, i:i + 1], cache)
            got.append(logits)
        return got

    for adapter in (None, "s1"):
        if adapter:
            for store in stores:
                engine = SwitchEngine(store)
                engine.switch([(engine.prepare(bundle_adapter(bundle, adapter), adapter), 1.0)])
        native, python = (outputs(s, d) for s, d in zip(stores, decoders, strict=True))
        for a, b in zip(native, python, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), adapter
    with torch.no_grad():
        ref = reference_model(lm, [bundle_adapter(bundle, "s1")])
        want = forward(ref, {"input_ids": torch.from_numpy(feeds[1]["input_ids"])}).numpy()
    assert parity(native[1], want) <= RTOL


def test_a_switch_during_a_decode_step_does_not_wait_for_it(exported, rt, monkeypatch):
    """On the native runner a conversation's decode step runs optimistically: a switch while
    a step is held midway returns without waiting for it; the step is dropped and the reply
    goes on under the new adapter from a re-prefilled cache: s1's first tokens, then s2's
    greedy continuation of that context (transformers' on the PyTorch model)."""
    import threading

    if not rt.store.releases_gil:
        pytest.skip(f"native runner unavailable: {runner_unavailable()}")
    lm, bundle = exported
    decoder = _decoder(rt)
    held, release, resumed = threading.Event(), threading.Event(), threading.Event()
    real, calls, k = decoder.method, [0], 3  # the 4th run (feeding token 3) is held

    class HeldMethod:
        def execute(self, inputs):
            calls[0] += 1
            if calls[0] == k + 1:
                held.set()
                release.wait(20)
                resumed.set()
            return real.execute(inputs)

    monkeypatch.setattr(decoder, "method", HeldMethod())
    rt.switch("s1")
    out: list = []
    talk = threading.Thread(target=lambda: out.append(rt.generate(PROMPT, max_new_tokens=12)))
    talk.start()
    assert held.wait(30)
    rt.switch("s2")  # must not wait for the held step (else it waits until release times out)
    switched_while_held = not resumed.is_set()
    release.set()
    talk.join()
    assert switched_while_held and calls[0] >= k + 2
    first = hf_greedy(lm, bundle, "s1", PROMPT, 12)
    want = first[:k] + hf_greedy(lm, bundle, "s2", PROMPT + first[:k], 12 - k)
    assert want != first  # the switch changes the reply
    assert out[0].ids == want and out[0].reprefills == 1


def test_context_limit(rt):
    rt.switch(None)
    assert_context_limit(rt, CONTEXT)


def test_bad_inputs_change_nothing(exported, rt):
    _, bundle = exported
    rt.switch("s1")
    chat = rt.conversation()
    chat.send(PROMPT, max_new_tokens=3)
    weights = lambda: {n: w.tobytes() for n, w in rt.live_weights().items()}  # noqa: E731
    before = (chat.tokens, weights(), rt.active, rt.lock.epoch)
    bad = [([], {}), ("", {}), ([-1], {}), ([512], {}), ([[5, 6]], {}),
           (list(range(5, 5 + CONTEXT)), {}), ([5], {"max_new_tokens": 0}),
           ([5], {"temperature": -1.0}), ([5], {"bogus": 1})]
    for prompt, options in bad:
        with pytest.raises(ConfigError):
            chat.send(prompt, **options)
    # the decoder itself: another decoder's or a superseded cache, too many or too long ids,
    # batch 2: typed errors, nothing run
    decoder = _decoder(rt)
    cache = decoder.empty_cache(1)
    _, later = decoder.step(np.array([[5, 6, 7]]), cache)
    _, other = decoder.step(np.array([[8]]), cache)  # from the earlier cache: `later` superseded
    decoder.step(np.array([[9, 10, 11, 12]]), other)  # longer again: `later` stays superseded
    for ids, c in ((np.array([[5]]), later), (np.array([[5]]), object()),
                   (np.zeros((1, CONTEXT), np.int64), decoder.empty_cache(1)),
                   (np.zeros((2, 3), np.int64), decoder.empty_cache(1)),
                   (np.zeros(3, np.int64), decoder.empty_cache(1))):
        with pytest.raises(ConfigError):
            decoder.step(ids, c)
    with pytest.raises(ConfigError, match="batch 1"):
        decoder.empty_cache(2)
    with pytest.raises(ConfigError, match="mode='live'"):
        EtDecoder(SimpleNamespace(mode="repack"), read_manifest(bundle).executorch["decoder"])
    assert (chat.tokens, weights(), rt.active, rt.lock.epoch) == before
    # the conversation goes on as if nothing had been tried
    again = rt.conversation()
    again.send(PROMPT, max_new_tokens=3)
    assert chat.send([40], max_new_tokens=5).ids == again.send([40], max_new_tokens=5).ids


def test_weight_left_bundle_decodes_with_standard_op_attention(exported, tmp_path):
    """A bundle whose live linears are not edgeadapt's kernel (``weight-left``, what the export
    falls back to without a compiler) keeps the standard-ops attention (``bmm`` over the held
    positions): under s1 its greedy reply equals transformers', and a prefill then single
    steps give the full forward's logits at every position."""
    lm, _ = exported
    bundle = export_generate(lm, tmp_path / "wl", CONTEXT, backends="executorch",
                             pte_repack=False, pte_live_form="weight-left")
    manifest = read_manifest(bundle)
    assert manifest.executorch["live_form"] == "weight-left"
    assert manifest.executorch["decoder"]["attention"] == "bmm"
    runtime = load(bundle, backend="executorch", mode="live", threads=1)
    runtime.switch("s1")
    assert runtime.generate(PROMPT, max_new_tokens=32).ids == hf_greedy(lm, bundle, "s1",
                                                                        PROMPT, 32)
    ids = np.random.default_rng(6).integers(5, lm.vocab_size, size=12).astype(np.int64)
    with torch.no_grad():
        want = forward(reference_model(lm, [bundle_adapter(bundle, "s1")]),
                       {"input_ids": torch.from_numpy(ids[None])}).numpy()[0]
    decoder = _decoder(runtime)
    logits, cache = decoder.step(ids[None, :5], decoder.empty_cache(1))
    assert parity(logits[0], want[:5]) <= RTOL
    for i in range(5, ids.size):
        logits, cache = decoder.step(ids[None, i:i + 1], cache)
        assert parity(logits[0, 0], want[i]) <= RTOL, i


def test_export_refuses_a_context_too_small_for_the_decoder(tmp_path):
    with pytest.raises(ConfigError, match="from 8"):
        export_base("tiny-smollm2", tmp_path / "a", backends="executorch", generate=True,
                    max_context=4)
    assert not (tmp_path / "a" / "bundle.json").exists()


def test_cli_generate_and_chat(exported, rt):
    _, bundle = exported
    rt.switch("s1")
    want = rt.generate("Hi there", max_new_tokens=8)
    res = CliRunner().invoke(main, ["generate", str(bundle), "--prompt", "Hi there",
                                    "--adapter", "s1", "--max-new-tokens", "8",
                                    "--threads", "1"])  # the bundle's only decoder: executorch
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(want.text) and "adapters: s1" in res.stderr
    rt.switch("s2")
    reply = rt.generate("Hello", max_new_tokens=6).text
    res = CliRunner().invoke(main, ["chat", str(bundle), "--backend", "executorch",
                                    "--max-new-tokens", "6", "--threads", "1"],
                             input="/adapter s2\nHello\n/quit\n")
    assert res.exit_code == 0, res.output
    assert reply in res.stdout
    with pytest.raises(BundleError):  # no ONNX Runtime files in this bundle
        load(bundle, backend="onnxruntime", mode="live").generate([5])


@pytest.mark.slow
def test_both_backends_export_their_decoders(tmp_path):
    """``--backends executorch,onnxruntime --generate``: each section has its decoder, and both
    runtimes give transformers' greedy reply under s1."""
    torch.set_num_threads(1)
    lm = load_model("tiny-smollm2", seed=0)
    lm.tokenizer = byte_tokenizer()
    bundle = export_generate(lm, tmp_path, CONTEXT, backends="executorch,onnxruntime",
                             pte_repack=False)
    manifest = read_manifest(bundle)
    assert manifest.executorch["decoder"]["parity"]["max_rel_error"] <= RTOL
    assert manifest.onnxruntime["decoder"]["parity"]["max_rel_error"] <= RTOL
    want = hf_greedy(lm, bundle, "s1", PROMPT, 32)
    for backend in ("executorch", "onnxruntime"):
        runtime = load(bundle, backend=backend, mode="live", threads=1)
        runtime.switch("s1")
        assert runtime.generate(PROMPT, max_new_tokens=32).ids == want, backend


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate(tmp_path):
    """The real SmolLM2-135M (q/v live, --generate, context 1100: room for the decode
    measurements of docs/generate.md on the same bundle) on ExecuTorch: 32 greedy tokens of a
    text prompt under a SHiRA adapter and under the base equal transformers' ``generate``."""
    from edgeadapt.errors import MissingPackageError

    torch.set_num_threads(2)
    try:
        lm = load_model("smollm2", seed=0)
    except MissingPackageError as exc:
        pytest.skip(str(exc))
    export_generate(lm, tmp_path, 1100, backends="executorch", pte_repack=False)
    runtime = load(tmp_path, backend="executorch", mode="live", threads=2)
    assert_text_greedy_equals_transformers(runtime, lm, tmp_path, "The capital of France is",
                                           32, (None, "s1"))
