"""Which nn.Linear layers an adapter targets: presets or a regular expression over module names.

Presets (matched against the module's full dotted name):
- ``qv``   attention query and value projections (the default: cheapest live weights)
- ``attn`` query, key, value and attention output projections
- ``all``  every nn.Linear inside the transformer blocks (not heads, poolers or embeddings)
"""

from __future__ import annotations

import re
from collections.abc import Collection

from torch import nn

from edgeadapt.errors import ConfigError
from edgeadapt.format.quant import Grid, grid, live_grid

PRESETS = {
    "qv": r"\.(attention\.self\.(query|value)|self_attn\.(q_proj|v_proj))$",
    "attn": r"\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|self_attn\.(q_proj|k_proj|v_proj|o_proj))$",
    "all": r"\.(layer|layers)\.\d+\.",
}


def resolve_targets(model: nn.Module, spec: str) -> list[str]:
    """Module names of the nn.Linear layers selected by ``spec`` (a preset or a regex), in
    model order. Raises ConfigError if the regex is invalid or selects nothing."""
    pattern = PRESETS.get(spec, spec)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"--targets {spec!r} is not a valid regular expression: {exc}") from exc
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [n for n in linears if regex.search(n)]
    if not chosen:
        examples = ", ".join(linears[:4])
        raise ConfigError(
            f"--targets {spec!r} matches no nn.Linear layer; presets: {', '.join(PRESETS)}; "
            f"module names look like: {examples}"
        )
    return chosen


def target_weight_names(model: nn.Module, spec: str) -> list[str]:
    """The base weight names (``<module>.weight``) of :func:`resolve_targets`."""
    return [f"{name}.weight" for name in resolve_targets(model, spec)]


def head_weight_names(lm_model: nn.Module, kind: str) -> list[str]:
    """A classifier's task-head matrices: the 2-D parameters outside the pretrained backbone
    (``base_model_prefix``), e.g. ``["classifier.weight"]`` for MiniLM. Causal LMs have none
    (the generative classifier reads the LM head). Head biases stay at their zero init, so a
    task head is carried as these matrices alone (edgeadapt.format.types.Adapter.head)."""
    if kind != "classifier":
        return []
    prefix = getattr(lm_model, "base_model_prefix", "") + "."
    return [n for n, p in lm_model.named_parameters() if not n.startswith(prefix) and p.dim() == 2]


def quantized_weight_names(lm_model: nn.Module, kind: str) -> list[str]:
    """The weights a quantized bundle (``--weights int8|int4``) holds on a grid: every
    nn.Linear inside the transformer blocks (the ``all`` preset) and, for a causal LM, the LM
    head (as onnxruntime-genai's int4 models quantize it; a tied head is quantized as its own
    copy, the embedding table stays fp32). Poolers and task heads stay fp32."""
    names = target_weight_names(lm_model, "all")
    head = _lm_head_weight(lm_model, kind)
    if head is not None:
        names.append(head)
    return names


def _lm_head_weight(lm_model: nn.Module, kind: str) -> str | None:
    head = lm_model.get_output_embeddings() if kind == "causal-lm" else None
    if head is None:
        return None
    return next(f"{n}.weight" for n, m in lm_model.named_modules() if m is head)


def quantized_weight_grids(lm_model: nn.Module, kind: str, precision: str,
                           names: list[str] | None = None, live: Collection[str] = ()
                           ) -> dict[str, Grid]:
    """The grid of each weight a ``precision`` bundle quantizes (``names``, default
    :func:`quantized_weight_names`): ``precision``'s, except a causal LM's head where the grid
    names another for it (``Grid.head``: int4-affine's head is int8) and the ``live`` weights
    (the bundle's ``--targets``) where it names another for them (``Grid.live``:
    int4-affine-live8's live weights are int8). A head that is live takes the live grid."""
    g = grid(precision)
    head = _lm_head_weight(lm_model, kind) if g.head else None
    names = quantized_weight_names(lm_model, kind) if names is None else names
    live_set, on_live = (set(live), live_grid(precision)) if g.live else (set(), g)
    return {n: on_live if n in live_set else grid(g.head) if n == head else g for n in names}
