"""``edgeadapt.runtime.load(bundle)`` -> :class:`Runtime`: switch adapters in place, run.

    rt = load("bundle/", backend="onnxruntime", device="cpu", mode="auto")
    rt.switch("sentiment")                              # fused, in place
    rt.switch(["sentiment", "politics"], scales=[1.0, 0.5])
    rt.switch(None)                                     # the base, bit for bit
    rt.switch("sira_adapter")      # an adapter with a graph variant: unfused, branches as inputs
    logits = rt.run(input_ids=ids, attention_mask=mask)

The backend is looked up in the registry (:mod:`edgeadapt.runtime.backends`); the ONNX Runtime
path imports no torch. Errors are typed (edgeadapt.errors) and a refused switch leaves the
weights exactly as they were.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.errors import ConfigError, MissingPackageError, UnknownNameError
from edgeadapt.format.manifest import Manifest, manifest_path, read_manifest
from edgeadapt.runtime.backends import Backend, get_backend
from edgeadapt.runtime.bundle_adapters import BundleAdapters, head_only
from edgeadapt.runtime.engine import SwitchEngine
from edgeadapt.runtime.inputs import check_inputs, switch_names, switch_scales
from edgeadapt.runtime.locks import ReadWriteLock
from edgeadapt.runtime.policy import auto_mode
from edgeadapt.runtime.prepared import PreparedAdapter
from edgeadapt.runtime.store import WeightStore
from edgeadapt.runtime.unfused import PreparedBranches, VariantRoute

if TYPE_CHECKING:
    from edgeadapt.runtime.chat_template import Chat, ChatTemplate
    from edgeadapt.runtime.generate import Conversation, Generation, Generator, Piece

MODES = ("live", "repack", "auto")


class Runtime:
    """A loaded bundle whose live weights are switched in place. Thread-safe: ``run`` may be
    called from many threads while another thread switches; a run sees the old or the new
    adapter set, never a mixture (one :class:`~edgeadapt.runtime.locks.ReadWriteLock`, shared
    with the engine, orders them).

    Adapters whose bundle entry names a graph ``variant`` (SiRA; LoRA / SoRA exported with
    ``unfused=True``) run *unfused*: the switch returns fused weights to the base, binds the
    adapter's branch tensors to the variant's route (the backend's ``open_variant``, created
    once, on first use) and routes ``run`` through it until the next switch.
    """

    def __init__(self, bundle_dir: Path, manifest: Manifest, store: WeightStore,
                 backend: Backend, device: str, mode: str, mode_reason: str,
                 verify_base: bool = True, threads: int | None = None) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.store = store
        self.backend = backend.name
        self._backend = backend
        self.device = device
        self.fused_mode = mode
        self.mode_reason = mode_reason
        self.threads = threads
        #: how live mode reads the live weights (the auto policy's key: runtime/policy.json)
        self.live_form = backend.live_form(manifest, store.kernel)
        self.lock = ReadWriteLock()
        self.engine = SwitchEngine(store, verify_base=verify_base, lock=self.lock,
                                   write_threads=threads)
        self._adapters = BundleAdapters(bundle_dir, manifest, self.engine, backend.section)
        self._variants: dict[str, VariantRoute] = {}  # key -> route, created by switches
        self._route: VariantRoute | None = None
        self._route_active: tuple[tuple[str, float], ...] = ()
        self._generator: Generator | None = None  # opened by the first conversation
        self._template: ChatTemplate | None = None  # the chat template, opened on first use

    # -- queries ---------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters registered in the bundle."""
        return self._adapters.names

    @property
    def active(self) -> tuple[str, ...]:
        """Names of the adapters applied now, in switch order; () for the base model."""
        return tuple(name for name, _ in self.active_scales)

    @property
    def active_scales(self) -> tuple[tuple[str, float], ...]:
        return self._route_active if self._route is not None else self.engine.active

    @property
    def route(self) -> VariantRoute | None:
        """The graph variant runs go through now (an unfused adapter is active), or None."""
        return self._route

    @property
    def active_variant(self) -> str | None:
        """Key of the graph variant runs go through (an unfused adapter is active), or None."""
        route = self._route
        return None if route is None else route.key

    @property
    def mode(self) -> str:
        """``"unfused"`` while an unfused adapter is active, else the fused mode in use
        (``"live"`` or ``"repack"``, see ``mode_reason``)."""
        return "unfused" if self._route is not None else self.fused_mode

    def is_unfused(self, name: str) -> bool:
        """Whether adapter ``name`` runs unfused (its bundle entry names a graph variant)."""
        return self._adapters.is_unfused(name)

    def live_weights(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The live weights as runs see them now (the active fused adapters applied), for
        checking exactness: weight name -> read-only float32 copy in PyTorch layout (out, in),
        whatever the backend's layout (a quantized weight's codes times their scales).
        ``names``: a subset (default: every live weight, task
        heads included). Copies, taken between switches: editing one cannot reach the
        backend, whose live arrays only the switch engine writes."""
        live = self.store.live_weights()
        unknown = [n for n in (names or ()) if n not in live]
        if unknown:
            raise UnknownNameError(f"live_weights: {unknown[:3]} are not live weights of this "
                                   f"bundle (e.g. {sorted(live)[:2]})")
        with self.lock.shared():
            out = {n: np.array(live[n].dequantized(), dtype=np.float32, copy=True)
                   for n in (live if names is None else names)}
        for arr in out.values():
            arr.flags.writeable = False
        return out

    @property
    def saturated(self) -> dict[str, int]:
        """Quantized bundles: per live weight, how many entries of the active fused adapters
        needed a code outside the grid's range and were clamped to it ({} when none;
        docs/quantized.md)."""
        return dict(self.engine.saturated)

    def restore_memory_bytes(self) -> int:
        """Extra memory held now to restore the base exactly (see docs/runtime.md)."""
        return self.engine.restore_memory_bytes()

    def plan_cache_bytes(self) -> int:
        """Memory held by cached switch plans (docs/runtime.md, "Switch plan cache")."""
        return self.engine.plan_cache_bytes()

    # -- verbs -----------------------------------------------------------------------------

    def prepare(self, name: str) -> PreparedAdapter:
        """Read, validate and map adapter ``name`` (cached; switching prepares on demand)."""
        return self._adapters.fused(name)

    def prepare_unfused(self, name: str) -> PreparedBranches:
        """Read and validate unfused adapter ``name`` against its graph variant (cached)."""
        return self._adapters.unfused(name)

    def switch(self, names: str | Sequence[str] | None,
               scales: float | Sequence[float] | None = None) -> None:
        """Make ``names`` the active adapters (fused, added together), or the base for None.

        scales: one per name (or one number for a single name); default each adapter's own
        scale. ``W = W0 + sum_k scales[k] * delta_k`` for every touched weight.
        Raises UnknownNameError, AdapterFormatError / FingerprintMismatchError,
        TargetMismatchError, SwitchError; on any error the weights are untouched.
        """
        names = switch_names(names)
        scale_list = switch_scales(scales, len(names))
        unfused = [n for n in names if self.is_unfused(n)]
        if unfused and len(names) != 1:
            raise ConfigError(f"switch: adapter(s) {unfused} run unfused (graph variant) and can "
                              f"only be active alone; got {names}")
        with self.lock.update():  # one switch at a time; runs go on until the write
            if unfused:
                self._switch_unfused(names[0], scale_list[0])
                return
            preps = [self.prepare(n) for n in names]
            pairs = [(p, p.scale if s is None else s) for p, s in
                     zip(preps, scale_list, strict=True)]
            # leaving a variant: the base graph again, atomically with the fused write
            self.engine.switch(pairs, then=None if self._route is None else self._set_route)

    def _switch_unfused(self, name: str, scale: float | None) -> None:
        pb = self.prepare_unfused(name)
        route = self._variants.get(pb.variant)  # only switches (serialised) create routes
        if route is None:
            route = self._variants[pb.variant] = self._backend.open_variant(
                self.bundle_dir, self.manifest, pb.variant, self.store, device=self.device,
                threads=self.threads)
        s = pb.scale if scale is None else float(scale)
        feeds = pb.feeds(s)
        route.check_branches(feeds, pb.head)  # before the engine leaves the fused adapters
        head = [(self.engine.prepare(head_only(pb), name), 1.0)] if pb.head else []

        def enter() -> None:
            route.set_branches(feeds, pb.head)
            self._set_route(route, ((name, s),))

        self.engine.switch(head, then=enter)  # fused edits back to base (the head, if any, on)

    def _set_route(self, route: VariantRoute | None = None,
                   active: tuple[tuple[str, float], ...] = ()) -> None:
        self._route, self._route_active = route, active

    def run(self, **inputs: np.ndarray) -> np.ndarray:
        """One forward pass with the active adapters; numpy arrays in, logits out. The inputs
        are checked against the bundle's (:func:`edgeadapt.runtime.inputs.check_inputs`:
        names, dtypes, shapes, token id range) first; ConfigError if they do not fit."""
        inputs = check_inputs(self.manifest.inputs, inputs)
        with self.lock.shared():
            route = self._route
            return self.store.run(inputs) if route is None else route.run(inputs)

    # -- generation (causal-LM bundles exported with --generate: runtime/generate.py) ----------

    def conversation(self) -> Conversation:
        """A new conversation with its own KV cache (:class:`edgeadapt.runtime.generate.
        Conversation`); the decoder is opened on first use. BundleError for a bundle that
        cannot generate, ConfigError for a backend or device without a decoder."""
        from edgeadapt.runtime.generate import Conversation, open_generator

        with self.lock.update():  # opened once; switches wait meanwhile
            if self._generator is None:
                self._generator = open_generator(
                    self.bundle_dir, self.manifest, self._backend, self.store,
                    device=self.device, threads=self.threads)
        return Conversation(self, self._generator)

    def generate(self, prompt: str | Sequence[int] | np.ndarray | Sequence[dict],
                 **options: object) -> Generation:
        """The reply to ``prompt`` in a fresh conversation under the adapters active now:
        text or token ids as given, or a list of chat messages ({"role", "content"}) rendered
        with the bundle's chat template. Options: max_new_tokens, temperature (0: greedy),
        top_k, top_p, seed, stop (:class:`edgeadapt.runtime.sampling.Sampling`)."""
        return self.conversation().send(self._as_tokens(prompt), **options)

    def stream(self, prompt: str | Sequence[int] | np.ndarray | Sequence[dict],
               **options: object) -> Iterator[Piece]:
        """:meth:`generate` as an iterator of pieces (token id and the text it completes)."""
        return self.conversation().stream(self._as_tokens(prompt), **options)

    def chat(self, system: str | None = None) -> Chat:
        """A conversation of messages, each turn rendered with the bundle's chat template
        (:class:`edgeadapt.runtime.chat_template.Chat`); ConfigError for a bundle without a
        template or tokenizer, ChatTemplateError for a template that does not render here."""
        from edgeadapt.runtime.chat_template import Chat

        self.conversation()  # opens the generator (tokenizer) once
        return Chat(self, self._chat_template(), self._generator.tokenizer, system)

    def _chat_template(self) -> ChatTemplate:
        from edgeadapt.runtime.chat_template import open_template

        spec, tokenizer = self._generator.spec, self._generator.tokenizer
        if spec.chat_template is None or tokenizer is None:
            raise ConfigError(f"{self.bundle_dir}: the bundle has no chat template and "
                              "tokenizer (chat_template.jinja, tokenizer.json); give text or "
                              "token ids")
        if self._template is None:
            self._template = open_template(self.bundle_dir, spec, tokenizer)
        return self._template

    def _as_tokens(self, prompt: object) -> object:
        """Chat messages rendered with the template and tokenized; anything else as given."""
        from edgeadapt.runtime.chat_template import check_messages, is_messages

        if not is_messages(prompt):
            return prompt
        self.conversation()
        text = self._chat_template().render(check_messages(prompt))
        return self._generator.tokenizer.encode(text, special=False)


def load(bundle_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
         mode: str = "auto", threads: int | None = None, runs_per_switch: float | None = None,
         batch: int | None = None, verify_base: bool = True, kernel: bool | None = None
         ) -> Runtime:
    """Load a bundle for in-place adapter switching.

    backend: a registered backend (:func:`edgeadapt.runtime.backends.backend_names`):
        "onnxruntime" (no torch needed) or "executorch".
    device: one of the backend's devices: "cpu", or "cuda" (ONNX Runtime with the CUDA
        execution provider; live mode).
    mode: "live" (live weights edited where the kernels read them; unpacked), "repack" (edit a
        host copy, rebuild so every weight is packed; a rebuild per switch) or "auto"
        (:func:`edgeadapt.runtime.policy.choose_mode` from ``runs_per_switch`` and ``batch``;
        repack where live mode cannot run here, e.g. an ExecuTorch own-kernel program whose
        kernel cannot be built; ``rt.mode_reason`` says why).
    threads: intra-op threads (None: the backend's default). ExecuTorch has one threadpool
        per process: it is resized only while no other ExecuTorch runtime is loaded
        (:func:`edgeadapt.runtime.backends.executorch.store.use_threads`).
    verify_base: hash the live weights against bundle.json's sha256 at load.
    kernel: ONNX Runtime on the CPU, live mode: read the blocked32 live weights with
        edgeadapt's own kernel (``edgeadapt.BlockedMatMul``, no per-call copy of the weight)
        instead of MatMul. None: where it can be built here (C++ compiler and ONNX Runtime's
        headers, :mod:`edgeadapt.runtime.backends.onnxruntime.kernel`); True: ConfigError if it
        cannot be; False: never. ``rt.live_form`` says which form live mode reads.
    """
    manifest = read_manifest(bundle_dir)
    bundle = manifest_path(bundle_dir).parent  # bundle/ or bundle/bundle.json
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    impl = get_backend(backend)
    if device not in impl.devices:
        raise ConfigError(f"device {device!r}: backend {impl.name!r} runs on "
                          f"{' or '.join(repr(d) for d in impl.devices)}")
    missing = impl.unavailable()
    if missing is not None:
        raise MissingPackageError(missing)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
            raise ConfigError(f"threads={threads!r}: a whole number >= 1, or None for the "
                              "backend's default")
        threads = int(threads)
    use_kernel = impl.use_kernel(manifest, device, mode, kernel)
    if mode == "auto":
        chosen, reason = auto_mode(impl, manifest, device, impl.live_form(manifest, use_kernel),
                                   runs_per_switch, batch)
    else:
        chosen, reason = mode, "requested"
    store = impl.open_store(bundle, manifest, device=device, mode=chosen, threads=threads,
                            kernel=use_kernel)
    return Runtime(bundle, manifest, store, impl, device, chosen, reason, verify_base, threads)
