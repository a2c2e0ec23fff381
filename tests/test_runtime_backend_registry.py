"""A backend added from outside the package: the numpy ``ArrayStore`` registered as backend
"array-test" (everything it needs is in this module plus the one ``register_backend`` call, as
docs/design.md, "Adding a backend", describes). ``runtime.load(..., backend="array-test")``
loads a toy bundle and switches; every output is checked against an independent reference: the
original weights plus each adapter's delta added by hand in float64 numpy. Torch-free."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from runtime_toy import toy_forward, toy_weights, write_toy_bundle
from safetensors.numpy import load_file

import edgeadapt.runtime as runtime
from edgeadapt.errors import ConfigError, SwitchError, UnknownNameError
from edgeadapt.format import Adapter, LoraDelta, ShiraDelta, write_adapter
from edgeadapt.format.fingerprint import weight_sha256
from edgeadapt.format.layout import to_torch
from edgeadapt.format.manifest import Manifest
from edgeadapt.runtime import ArrayStore, WeightStore

DIMS = [12, 16, 16, 5]
NAMES = [f"layers.{i}.weight" for i in range(len(DIMS) - 1)]


class ArrayBackend:
    """The plain numpy store as a backend: the live weights from the bundle's live-weights file
    (in the layout bundle.json records, so the engine's layout mapping is exercised), the toy
    MLP's forward in numpy. Live mode on the CPU; no kernel, no graph variants."""

    name = "array-test"
    devices = ("cpu",)
    section = "onnxruntime"  # the bundle section whose live-weights file it reads
    default_live_form = "numpy"

    def unavailable(self) -> str | None:
        return None

    def use_kernel(self, manifest: Manifest, device: str, mode: str, kernel: bool | None
                   ) -> bool:
        if kernel:
            raise ConfigError("array-test has no kernel")
        return False

    def live_form(self, manifest: Manifest, kernel: bool) -> str:
        return "numpy"

    def live_blocker(self, manifest: Manifest) -> str | None:
        return None

    def open_store(self, bundle_dir: Path, manifest: Manifest, *, device: str, mode: str,
                   threads: int | None, kernel: bool) -> WeightStore:
        if mode != "live":
            raise ConfigError(f"array-test runs mode='live' only, not {mode!r}")
        stored = load_file(str(bundle_dir / manifest.onnxruntime["live_weights"]))
        weights, layouts, sha = {}, {}, {}
        for name, entry in manifest.weights.items():
            layouts[name] = entry.onnxruntime["layout"]
            weights[name] = to_torch(stored[entry.onnxruntime["name"]], entry.shape, layouts[name])
            sha[name] = entry.sha256
        return ArrayStore(weights, layouts, sha,
                          forward=lambda inputs, w: toy_forward(inputs["x"], w).astype(np.float32))

    def open_variant(self, bundle_dir, manifest, key, store, *, device, threads):
        raise SwitchError("array-test runs no graph variants")


def _adapters(w0: dict[str, np.ndarray]) -> dict[str, Adapter]:
    rng = np.random.default_rng(7)
    sha = {n: weight_sha256(w) for n, w in w0.items()}
    shapes = {n: w.shape for n, w in w0.items()}

    def shira(names, density):
        targets = {}
        for n in names:
            idx = np.sort(rng.choice(w0[n].size, int(density * w0[n].size), replace=False))
            targets[n] = ShiraDelta(idx.astype(np.int64),
                                    (0.3 * rng.standard_normal(idx.size)).astype(np.float32))
        return Adapter("shira", targets, {n: shapes[n] for n in names}, {n: sha[n] for n in names})

    lora = {n: LoraDelta((0.2 * rng.standard_normal((2, w0[n].shape[1]))).astype(np.float32),
                         (0.2 * rng.standard_normal((w0[n].shape[0], 2))).astype(np.float32))
            for n in NAMES[::2]}
    return {"a": shira(NAMES[:2], 0.1), "b": shira(NAMES[1:], 0.3),
            "c": Adapter("lora", lora, {n: shapes[n] for n in lora}, {n: sha[n] for n in lora})}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("array_backend")
    w0 = toy_weights(DIMS, seed=0)
    adapters = _adapters(w0)
    (out / "adapters").mkdir()
    for name, ad in adapters.items():
        write_adapter(out / "adapters" / f"{name}.eadp", ad, value_dtype="float32")
    write_toy_bundle(out, w0, NAMES, {n: (f"adapters/{n}.eadp", ad.method)
                                      for n, ad in adapters.items()})
    return out, w0, adapters


@pytest.fixture()
def registered():
    backend = runtime.register_backend(ArrayBackend())
    yield backend
    runtime.backends.unregister_backend(backend.name)


def reference(w0, adapters, active, x) -> np.ndarray:
    """The toy MLP on the original weights plus ``sum_k s_k * delta_k``, by hand in float64."""
    w = {n: v.astype(np.float64) for n, v in w0.items()}
    for name, s in active:
        for t, d in adapters[name].targets.items():
            if isinstance(d, ShiraDelta):
                w[t].reshape(-1)[d.indices] += s * d.values.astype(np.float64)
            else:
                w[t] += s * (d.B.astype(np.float64) @ d.A.astype(np.float64))
    return toy_forward(x, w)


def test_a_registered_backend_loads_and_switches(toy, registered):
    bundle, w0, adapters = toy
    assert "array-test" in runtime.BACKENDS and runtime.get_backend("array-test") is registered
    rt = runtime.load(bundle, backend="array-test")
    assert isinstance(rt.store, ArrayStore)
    assert (rt.backend, rt.mode, rt.live_form) == ("array-test", "live", "numpy")
    x = np.random.default_rng(1).standard_normal((4, DIMS[0])).astype(np.float32)
    base = rt.run(x=x)
    np.testing.assert_allclose(base, reference(w0, adapters, [], x), rtol=1e-5, atol=1e-5)
    before = {n: lw.array.copy() for n, lw in rt.store.live_weights().items()}
    for names, scales in [("a", None), (["a", "c"], [1.0, -0.5]), (["b", "c", "a"], 0.5),
                          ("c", None), (None, None)]:
        if isinstance(scales, float):
            scales = [scales] * len(names)
        rt.switch(names, scales)
        active = [] if names is None else list(zip(
            [names] if isinstance(names, str) else names,
            scales or [1.0] * (1 if isinstance(names, str) else len(names)), strict=True))
        assert rt.active_scales == tuple(active)
        np.testing.assert_allclose(rt.run(x=x), reference(w0, adapters, active, x),
                                   rtol=1e-5, atol=1e-5, err_msg=str(names))
    assert all(np.array_equal(lw.array, before[n]) for n, lw in rt.store.live_weights().items())
    assert np.array_equal(rt.run(x=x), base)  # back at the base, bit for bit
    assert len(rt.store.commits) == 5  # the engine committed each switch to the store


def test_the_backend_is_gone_once_unregistered(toy):
    bundle, _, _ = toy
    backend = runtime.register_backend(ArrayBackend())
    runtime.backends.unregister_backend(backend.name)
    assert "array-test" not in runtime.BACKENDS
    with pytest.raises(UnknownNameError, match="choose one of onnxruntime, executorch"):
        runtime.load(bundle, backend="array-test")


def test_register_refuses_incomplete_or_clashing_backends(registered):
    class Half:
        name, devices = "half", ("cpu",)

    with pytest.raises(ConfigError, match="lacks"):
        runtime.register_backend(Half())
    with pytest.raises(ConfigError, match="registered already"):
        runtime.register_backend(ArrayBackend())
    assert runtime.register_backend(registered) is registered  # the same object again: fine
    other = ArrayBackend()
    assert runtime.register_backend(other, replace=True) is runtime.get_backend("array-test")


def test_load_checks_the_backends_devices_and_kernel(toy, registered):
    bundle, _, _ = toy
    with pytest.raises(ConfigError, match="runs on 'cpu'"):
        runtime.load(bundle, backend="array-test", device="cuda")
    with pytest.raises(ConfigError, match="no kernel"):
        runtime.load(bundle, backend="array-test", kernel=True)
    with pytest.raises(ConfigError, match="live' only"):
        runtime.load(bundle, backend="array-test", mode="repack")
