"""Property test on ExecuTorch (issue 5): random sequences of switches among SHiRA adapters (two
fused with scales), a LoRA and None end with every live buffer of the loaded program
bit-identical to the original PyTorch weights, and the output after the last switch equals the
PyTorch model carrying the same adapters (``apply_adapter_torch``, tests/runtime_reference.py).

Live mode: the buffers are read back through the program (a fresh ``get_attribute`` per
buffer), not through the arrays the engine writes. Repack mode: the host copy of the constant
program that each switch reloads (and the output, bit for bit). The bundle holds a one-block
Llama (the architecture of tiny-smollm2, the cheapest to lower), exported once per session
with tests/test_runtime_executorch.py (``shared_bundle``).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from runtime_reference import (  # noqa: E402
    example_pair,
    parity,
    random_adapters,
    requested,
    torch_reference,
)
from test_runtime_executorch import shared_bundle  # noqa: E402

from edgeadapt.format import (  # noqa: E402
    Adapter,
    AdapterEntry,
    read_manifest,
    write_adapter,
    write_manifest,
)
from edgeadapt.runtime import load  # noqa: E402

RTOL = 1e-4
NAMES = ("a", "b", "l")


def _adapters(lm, names: list[str], seed: int = 1) -> dict[str, Adapter]:
    """SHiRA a (5%, every live weight), SHiRA b (20%, half of them: overlaps a), LoRA l (rank 2,
    every other weight)."""
    a, b, lora = random_adapters(lm, names, names[: len(names) // 2], seed)
    return {"a": a, "b": b, "l": lora}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    lm, out = shared_bundle(tmp_path_factory)  # exported once per session
    manifest = read_manifest(out)
    (out / "adapters").mkdir(exist_ok=True)
    for name, ad in _adapters(lm, sorted(manifest.weights)).items():
        write_adapter(out / "adapters" / f"{name}.eadp", ad, value_dtype="float32")
        manifest.adapters[name] = AdapterEntry(file=f"adapters/{name}.eadp", method=ad.method)
    write_manifest(out, manifest)
    return lm, out


def program_buffers(rt) -> dict[str, np.ndarray]:
    """Every live weight as the loaded program holds it, read back through a fresh
    ``get_attribute`` of its mutable buffer (torch layout, copied)."""
    return {w: rt.store.read_back(w) for w in rt.manifest.weights}


def test_buffers_read_back_alias_the_engine_arrays(bundle):
    """The read-back is the program's memory: an edit through the engine's array shows in it
    (so the property test below reads what the kernels read, not a stale copy)."""
    _, path = bundle
    rt = load(path, backend="executorch", mode="live")
    w, lw = next(iter(rt.store.live_weights().items()))
    lw.array.reshape(-1)[0] += 1.0
    assert program_buffers(rt)[w].reshape(-1)[0] == lw.array.reshape(-1)[0]
    lw.array.reshape(-1)[0] -= 1.0


step = st.one_of(st.none(), st.lists(st.sampled_from(NAMES), min_size=1, max_size=3,
                                     unique=True))


def held_weights(rt) -> dict[str, np.ndarray]:
    """Live mode: :func:`program_buffers`. Repack mode (all-constant program, nothing to read
    back): the host copy of the program the next reload packs, in torch layout."""
    if rt.mode == "live":
        return program_buffers(rt)
    return {w: lw.torch_view().copy() for w, lw in rt.store.live_weights().items()}


@pytest.mark.parametrize("mode", ["live", "repack"])
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(step, st.lists(st.sampled_from([1.0, 0.5, -2.0]),
                                               min_size=3, max_size=3)),
                      min_size=1, max_size=6))
def test_random_switches_end_bit_exact_on_executorch(bundle, mode, steps):
    lm, path = bundle
    t_in, np_in = example_pair(lm)
    rt = load(path, backend="executorch", mode=mode)
    assert rt.mode == mode
    originals = {w: lm.model.get_parameter(w).detach().numpy() for w in rt.manifest.weights}
    base = rt.run(**np_in)
    for names, scales in steps:
        rt.switch(names, None if names is None else scales[: len(names)])
    # after the last switch: the PyTorch model with the adapters and scales it asked for
    names, scales = steps[-1]
    expected = requested(path, names, None if names is None else scales[: len(names)])
    assert rt.active_scales == expected, steps
    want = torch_reference(lm, path, expected, t_in)
    got = rt.run(**np_in)
    assert parity(got, want) <= RTOL, steps
    if rt.active:
        assert parity(got, base) > 10 * parity(got, want), steps  # the adapters matter
    rt.switch(None)
    for w, buf in held_weights(rt).items():
        assert buf.dtype == originals[w].dtype and np.array_equal(buf, originals[w]), (w, steps)
    assert np.array_equal(rt.run(**np_in), base)


def test_property_check_can_fail(bundle):
    """The two checks above catch a switch that does not restore exactly: adding then
    subtracting a delta (the way the engine must not restore) leaves float residue."""
    lm, path = bundle
    rt = load(path, backend="executorch", mode="live")
    originals = {w: lm.model.get_parameter(w).detach().numpy() for w in rt.manifest.weights}
    lw = next(iter(rt.store.live_weights().values()))
    v = np.float32(0.1) * np.arange(1, lw.array.size + 1, dtype=np.float32).reshape(
        lw.array.shape) / np.float32(lw.array.size)
    lw.array[...] += v
    lw.array[...] -= v
    assert not all(np.array_equal(b, originals[w]) for w, b in program_buffers(rt).items())
