"""ExecuTorch export: the contract, branch variants against the PyTorch reference, and the
verification catching stale (packed) weights.

Exports of a one-block Llama take tens of seconds on a loaded 2-core machine, so the
branch-variant exports and the stale-weight check are marked slow. The default run still lowers
the base program once per live form (three export_pte calls in
test_live_forms_export_edit_and_delegate) and covers the bundle export through
tests/test_runtime_executorch.py.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")

from edgeadapt.adapters import apply_adapter_torch  # noqa: E402
from edgeadapt.errors import ConfigError, ExportError  # noqa: E402
from edgeadapt.export.executorch import (  # noqa: E402
    check_static_shapes,
    export_pte,
    pte_file_names,
    static_shapes,
    variant_name,
)
from edgeadapt.format.types import Adapter, LoraDelta, SiraBranch  # noqa: E402
from edgeadapt.models import target_weight_names as twn  # noqa: E402
from edgeadapt.numeric import rel_error as rel_err  # noqa: E402
from edgeadapt.runtime.backends.executorch.store import ExecutorchStore  # noqa: E402
from tests.test_runtime_executorch import (  # noqa: E402
    inputs_of,
    one_block_llama,
    torch_logits,
)


def test_variant_names_and_files():
    assert variant_name(None) is None
    assert pte_file_names(None) == ("model.pte", "model.const.pte")
    assert pte_file_names(("lora", 8))[0] == "model.lora-r8.pte"
    assert variant_name(("sira", 4, 2, 2, 1.5)) == "sira-e4-r2-k2-cf1.5"
    for bad in [("lora",), ("lora", 0), ("sira", 2, 2, 3, 1.0), ("sira", 4, 2, 2, -1.0),
                ("dora", 4)]:
        with pytest.raises(ConfigError):
            variant_name(bad)


def test_bad_live_weights_rejected(tmp_path):
    lm = one_block_llama()
    for bad in [[], ["model.layers.0.self_attn.nope.weight"], ["model.norm.weight"]]:
        with pytest.raises(ConfigError):
            export_pte(lm, tmp_path, bad)


def _store(out, result):
    w = result["weights"]
    return ExecutorchStore(out, result["section"], {k: v["buffer"] for k, v in w.items()},
                           {k: tuple(v["shape"]) for k, v in w.items()})


@pytest.mark.slow
def test_all_constant_partition_is_caught_as_stale(tmp_path):
    """Stock XNNPACK partition packs the weight buffers at load: edits through get_attribute are
    silently ignored. The export's verification must notice and refuse. (The ``linear`` form:
    in ``weight-left`` the weight is no GEMM's right operand, so nothing would be packed.)"""
    lm = one_block_llama()
    live = twn(lm.model, "qv")
    with pytest.raises(ExportError, match="mutable"):
        export_pte(lm, tmp_path, live, max_batch=2, max_seq=4, repack=False,
                   partition="all-constant", live_form="linear")
    result = export_pte(lm, tmp_path, live, max_batch=2, max_seq=4, repack=False,
                        partition="all-constant", verify=False, live_form="linear")
    # The buffers still exist (shared with the touch method), but forward's delegate packed a
    # copy: an edit through get_attribute is silently ignored.
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(tmp_path / result["section"]["file"])
    forward = program.load_method("forward")
    touch = program.load_method(result["section"]["methods"]["touch"])
    inp = torch.from_numpy(inputs_of(lm, 1, 4)["input_ids"])
    before = forward.execute([inp])[0].clone()
    for info in result["weights"].values():
        touch._method.get_attribute(info["buffer"]).mul_(3.0)
    assert torch.equal(forward.execute([inp])[0], before)      # stale: the edit was ignored


def test_weight_left_linear_is_the_linear():
    from edgeadapt.export.executorch_live_form import WeightLeftLinear, apply_live_form

    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    x = torch.randn(2, 5, 12)
    got = WeightLeftLinear(lin)(x)
    assert got.shape == (2, 5, 8)
    assert torch.allclose(got, x @ lin.weight.T + lin.bias, atol=1e-6)
    plain = torch.nn.Linear(12, 8, bias=False)
    assert torch.allclose(WeightLeftLinear(plain)(x[0]), x[0] @ plain.weight.T, atol=1e-6)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ConfigError):
        apply_live_form(model, ["1"], "weight-left")  # not a linear
    with pytest.raises(ConfigError):
        apply_live_form(model, ["0"], "diagonal")


# own-kernel is the default form (with a compiler); the other two, 80 s of export, run in
# make test-slow
@pytest.mark.parametrize("form", [pytest.param("linear", marks=pytest.mark.slow),
                                  pytest.param("weight-left", marks=pytest.mark.slow),
                                  "own-kernel"])
def test_live_forms_export_edit_and_delegate(tmp_path, form):
    """Every form of the live linears: verified against PyTorch before and after edits through
    get_attribute (inside export_pte), every GEMM inside an XNNPACK delegate, and a SHiRA edit
    through the store matching the PyTorch model with the same adapter."""
    from tests.test_runtime_executorch import reference, sparse_adapter, write_sparse

    lm = one_block_llama()
    live = twn(lm.model, "qv")
    result = export_pte(lm, tmp_path, live, max_batch=2, max_seq=4, repack=False, live_form=form)
    assert result["section"]["live_form"] == form
    assert result["section"]["undelegated_gemms"] == 0
    assert max(result["verify"].values()) <= 1e-4
    store = _store(tmp_path, result)
    ad = sparse_adapter(lm)
    write_sparse(store, ad)
    inp = inputs_of(lm, 2, 3)
    assert rel_err(store.run(inp), torch_logits(reference(lm, ad), inp)) <= 1e-4
    with pytest.raises(ConfigError):
        export_pte(lm, tmp_path, live, repack=False, live_form="diagonal")


def _branch_reference(lm, adapter):
    ref = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    apply_adapter_torch(ref.model, adapter)
    return ref


@pytest.mark.slow
def test_lora_branch_variant_matches_fused_torch(tmp_path):
    lm = one_block_llama()
    live = twn(lm.model, "qv")
    r_max, r = 4, 3                   # the runtime zero-pads ranks below the exported one
    result = export_pte(lm, tmp_path, live, ("lora", r_max), max_batch=2, max_seq=8)
    assert result["section"]["repack"] is None
    store = _store(tmp_path, result)
    inp = inputs_of(lm, 2, 8)
    assert rel_err(store.run(inp), torch_logits(lm, inp)) <= 1e-4   # zero branch = base
    rng = np.random.default_rng(0)
    targets, shapes = {}, {}
    for w in live:
        out, n_in = lm.model.get_parameter(w).shape
        A = rng.standard_normal((r, n_in)).astype(np.float32) * 0.2
        B = rng.standard_normal((out, r)).astype(np.float32) * 0.2
        targets[w], shapes[w] = LoraDelta(A, B), (out, n_in)
        t = store.branch_tensors()[w]
        t["lora_A"][...] = 0
        t["lora_B"][...] = 0
        t["lora_A"][:r] = A
        t["lora_B"][:, :r] = B
    ref = _branch_reference(lm, Adapter("lora", targets, shapes, {}))
    assert rel_err(store.run(inp), torch_logits(ref, inp)) <= 1e-4
    assert rel_err(torch_logits(lm, inp), torch_logits(ref, inp)) > 1e-2


def _random_sira(lm, store, live, E, r, k, cf, seed=1):
    """Random SiRA branches written into ``store`` and the PyTorch reference carrying them."""
    rng = np.random.default_rng(seed)
    targets, shapes = {}, {}
    for w in live:
        out, n_in = lm.model.get_parameter(w).shape
        br = SiraBranch(router=rng.standard_normal((E, n_in)).astype(np.float32),
                        A=rng.standard_normal((E, r, n_in)).astype(np.float32) * 0.2,
                        B=rng.standard_normal((E, out, r)).astype(np.float32) * 0.2,
                        top_k=k, capacity_factor=cf)
        targets[w], shapes[w] = br, (out, n_in)
        t = store.branch_tensors()[w]
        t["sira_router"][...], t["sira_A"][...], t["sira_B"][...] = br.router, br.A, br.B
    return _branch_reference(lm, Adapter("sira", targets, shapes, {}))


@pytest.mark.slow
def test_sira_branch_variant_matches_torch(tmp_path):
    lm = one_block_llama()
    live = twn(lm.model, "qv")
    E, r, k, cf = 4, 2, 2, 1.0
    result = export_pte(lm, tmp_path, live, ("sira", E, r, k, cf), max_batch=2, max_seq=8)
    store = _store(tmp_path, result)
    ref = _random_sira(lm, store, live, E, r, k, cf)
    assert sorted(result["section"]["methods"]["static"]) == ["1x1", "1x8", "2x8"]
    with pytest.raises(ConfigError):               # static shapes only
        store.run(inputs_of(lm, 1, 5))
    for shape in [(1, 1), (2, 8), (1, 8)]:        # capacity depends on the token count
        inp = inputs_of(lm, *shape)
        assert rel_err(store.run(inp), torch_logits(ref, inp)) <= 1e-4, shape
    assert rel_err(torch_logits(lm, inp), torch_logits(ref, inp)) > 1e-2


@pytest.mark.slow
def test_sira_variant_with_chosen_static_shapes(tmp_path):
    """``static=``: the program has exactly the asked methods (the export-time verification
    runs on them), they match PyTorch, and any other shape is refused."""
    lm = one_block_llama()
    live = twn(lm.model, "qv")
    E, r, k, cf = 3, 2, 2, 1.25
    result = export_pte(lm, tmp_path, live, ("sira", E, r, k, cf), max_batch=2, max_seq=8,
                        static=[(2, 5), (2, 5)])
    assert result["section"]["methods"]["static"] == {"2x5": "forward_2x5"}
    assert result["verify"]["base"] <= 1e-4
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(tmp_path / result["section"]["file"])
    assert set(program.method_names) == {"forward_2x5", "touch"}
    store = _store(tmp_path, result)
    ref = _random_sira(lm, store, live, E, r, k, cf, seed=3)
    inp = inputs_of(lm, 2, 5)
    assert rel_err(store.run(inp), torch_logits(ref, inp)) <= 1e-4
    assert rel_err(torch_logits(lm, inp), torch_logits(ref, inp)) > 1e-2
    for other in [(1, 5), (2, 8), (1, 1)]:
        with pytest.raises(ConfigError):
            store.run(inputs_of(lm, *other))


def test_static_shapes_are_validated_before_lowering(tmp_path):
    lm = one_block_llama()
    live = twn(lm.model, "qv")
    sira = ("sira", 2, 1, 1, 1.0)
    for bad in [[], [(3, 8)], [(1, 9)], [(0, 4)], [(1,)], [(True, 4)], 5]:
        with pytest.raises(ConfigError):
            export_pte(lm, tmp_path, live, sira, max_batch=2, max_seq=8, static=bad)
    for branch in [None, ("lora", 2)]:            # dynamic-shape programs take no shapes
        with pytest.raises(ConfigError, match="SiRA"):
            export_pte(lm, tmp_path, live, branch, max_batch=2, max_seq=8, static=[(1, 8)])
    assert check_static_shapes([(2, 8), (1, 1), (2, 8)], 2, 8) == [(1, 1), (2, 8)]
    assert check_static_shapes(static_shapes(8, 64), 8, 64) == [(1, 1), (1, 64), (8, 64)]
