"""The generating cases of one backend: one live runtime per case, each decoding through the
runtime's public API (:class:`~.decoding.RuntimeCase`).

- ``base``: a live runtime never switched (the decoder reads the live weights as graph inputs in
  every mode: there is no all-constant decoder; genai's ``base`` is the packed comparison);
- ``shira-fused`` / ``lora-fused``: live runtimes with the run's first SHiRA adapter / its
  equal-parameter LoRA fused in place;
- ``lora-unfused`` / ``sira-unfused``: the first unfused adapter of that method (a graph
  variant), kept where the runtime generates with it (the variant's decoder); where it refuses
  (SwitchError: a variant without a decoder, a backend without variant decoders) the case is
  listed under ``skipped`` with its message.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import numpy as np

from edgeadapt.bench.backends import Target
from edgeadapt.bench.cases import load_runtime
from edgeadapt.bench.generation.decoding import RuntimeCase, ignore_end_of_turn
from edgeadapt.bench.options import BenchContext
from edgeadapt.errors import SwitchError
from edgeadapt.runtime import Runtime, get_backend

#: unfused case -> the adapter method it runs
UNFUSED = {"lora-unfused": "lora", "sira-unfused": "sira"}


@dataclass
class BackendCases:
    """What :func:`backend_cases` built for one backend: case -> (case, adapter name), the
    SHiRA runtime's forward output before its first switch (the restore check's reference),
    skips, the threads its runtimes run with and how live mode reads the live weights."""

    cases: dict[str, tuple[RuntimeCase, str | None]]
    shira_base_out: np.ndarray
    skipped: list[dict]
    threads: int | None
    live_form: str

    def runtime(self, case: str) -> Runtime:
        return self.cases[case][0].rt


def no_decoder(target: Target) -> str | None:
    """Why ``target``'s backend cannot generate at all (no ``open_decoder``), or None."""
    backend = get_backend(target.backend)
    if getattr(backend, "open_decoder", None) is None:
        return f"backend {backend.name!r} has no KV-cache decoder yet (open_decoder)"
    return None


def _runtime(ctx: BenchContext, target: Target, adapter: str | None) -> Runtime:
    rt = load_runtime(ctx, target, "live")
    ignore_end_of_turn(rt)
    if adapter is not None:
        rt.switch(adapter)
    return rt


def backend_cases(ctx: BenchContext, target: Target, check_inputs: dict[str, np.ndarray],
                  probe: np.ndarray) -> BackendCases:
    """The cases of ``target`` (module docstring). ``check_inputs``: the forward inputs of the
    restore check; ``probe``: a prompt an unfused case must generate from to be kept.
    ConfigError where the backend has no decoder on this device (from the first runtime's
    ``conversation()``)."""
    aset = ctx.adapters
    where = target.fields()
    base = _runtime(ctx, target, None)
    base.conversation()  # opens the decoder: ConfigError for a device it does not run on
    shira = _runtime(ctx, target, None)
    shira_out = shira.store.run(check_inputs)
    shira.switch(aset.of("shira")[0])
    cases = {"base": (RuntimeCase(base), None),
             "shira-fused": (RuntimeCase(shira), aset.of("shira")[0]),
             "lora-fused": (RuntimeCase(_runtime(ctx, target, aset.of("lora")[0])),
                            aset.of("lora")[0])}
    skipped = []
    for case, method in UNFUSED.items():
        names = aset.of(method, fused=False)
        if not names:
            skipped.append({**where, "what": f"generate {case}",
                            "reason": f"the bundle has no {method} graph variant (python -m "
                                      "edgeadapt.bench.prepare adds one)"})
            continue
        rt = _runtime(ctx, target, names[0])
        try:
            rt.generate(probe, max_new_tokens=1)
        except SwitchError as exc:
            skipped.append({**where, "what": f"generate {case}", "reason": str(exc)})
            del rt
            gc.collect()
            continue
        cases[case] = (RuntimeCase(rt), names[0])
    threads = ctx.opts.threads if base.store.threads is None else base.store.threads
    return BackendCases(cases, shira_out, skipped, threads, base.live_form)
