"""The interface between the switch engine and a backend (numpy only, no torch).

A backend hands the engine a :class:`WeightStore`: for every *live* weight (one an adapter may
touch) a :class:`LiveWeight`, a writable numpy array aliasing the buffer the backend computes
with, plus its layout; and two hooks, ``run`` and ``commit``. :class:`ArrayStore` is the plain
numpy store the tests check the engine and the other stores against.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgeadapt.errors import SwitchError
from edgeadapt.format import nibbles
from edgeadapt.format.layout import (
    AS_IS,
    BLOCKED,
    LAYOUTS,
    backend_index,
    backend_shape,
    to_backend,
    to_torch,
    torch_index,
)
from edgeadapt.format.quant import Grid
from edgeadapt.runtime.pages import arena_copies
from edgeadapt.runtime.scatter import scatter, scatter_nibbles


@dataclass
class Codes:
    """How a quantized live weight's array holds it (:mod:`edgeadapt.format.quant`): int8
    codes on ``grid`` with ``scales``, the ``(out, in // G)`` float32 scales in PyTorch layout
    (never edited: a switch re-quantizes onto them). ``name``: the scales' graph input (None
    where the backend takes them otherwise); ``array``: the scales as the backend holds
    them (the weight's layout), bound beside the codes."""

    grid: Grid
    scales: np.ndarray
    name: str | None = None
    array: np.ndarray | None = None
    codes_sha256: str | None = None


@dataclass
class LiveWeight:
    """One live weight as the backend holds it.

    array: writable, C-contiguous numpy array aliasing the backend's buffer (edits must be seen
        by the next ``run`` after ``commit``); shape ``layout.backend_shape(shape, layout)``.
    shape: PyTorch shape (out, in).
    sha256: expected sha256 of the base weight (fp32, torch layout) from bundle.json, or None to
        skip the fingerprint check.
    codes: for a quantized weight, its grid and scales (:class:`Codes`); ``array`` then holds
        int8 codes, and a switch writes codes re-quantized from the dequantized values.
    packed: int4 codes two per byte (:mod:`edgeadapt.format.nibbles`): ``array`` is the packed
        uint8 buffer of the layout's blocks of 32 codes (``nibbles.block_shape``):
        ``(out/32, in, 16)`` blocked32 (ONNX Runtime), ``(out, in/32, 16)`` as-is
        (ExecuTorch). Positions stay code indices of the layout; read and write the codes
        through :meth:`gather`, :meth:`scatter`, :meth:`read` and :meth:`write`, which every
        store form answers alike.
    """

    name: str
    array: np.ndarray
    layout: str
    shape: tuple[int, int]
    sha256: str | None = None
    codes: Codes | None = None
    packed: bool = False

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout {self.layout!r} not in {LAYOUTS}")
        want = backend_shape(self.shape, self.layout)
        if self.packed:
            if self.codes is None or self.codes.grid.bits != 4:
                raise ValueError(f"{self.name}: only int4 codes pack two per byte")
            want = nibbles.packed_shape(nibbles.block_shape(self.shape, self.layout))
        if tuple(self.array.shape) != want:
            raise ValueError(f"{self.name}: buffer shape {self.array.shape} != {want}")
        if not (self.array.flags.c_contiguous and self.array.flags.writeable):
            raise ValueError(f"{self.name}: buffer must be C-contiguous and writable")
        if self.codes is not None:
            dtype = np.uint8 if self.packed else np.int8
            if self.array.dtype != dtype:
                raise ValueError(f"{self.name}: quantized codes must be {np.dtype(dtype)}, not "
                                 f"{self.array.dtype}")
            self.codes.grid.check_scales(self.codes.scales, self.shape, self.name)

    @property
    def size(self) -> int:
        """Elements (codes) the weight holds: ``out * in``."""
        return self.shape[0] * self.shape[1]

    @property
    def dtype(self) -> np.dtype:
        """The dtype of its elements as :meth:`gather` and :meth:`read` return them."""
        return np.dtype(np.int8) if self.packed else self.array.dtype

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """The elements (codes, for a quantized weight) at backend flat indices ``idx``."""
        flat = self.array.reshape(-1)
        return nibbles.gather(flat, idx) if self.packed else flat[idx]

    def scatter(self, idx: np.ndarray, vals: np.ndarray, native: bool = True) -> None:
        """``W[idx] = vals`` at sorted backend flat indices (:mod:`edgeadapt.runtime.scatter`)."""
        flat = self.array.reshape(-1)
        (scatter_nibbles if self.packed else scatter)(flat, idx, vals, native)

    def read(self) -> np.ndarray:
        """A copy of the whole weight in its backend layout (codes unpacked)."""
        if self.packed:
            return nibbles.unpack(self.array).reshape(backend_shape(self.shape, self.layout))
        return self.array.copy()

    def write(self, full: np.ndarray) -> None:
        """Overwrite the whole weight with ``full`` (backend layout, codes unpacked)."""
        if self.packed:
            nibbles.pack(np.asarray(full).reshape(nibbles.block_shape(self.shape, self.layout)),
                         out=self.array)
        else:
            np.copyto(self.array, full)

    def entry_scales(self, indices: np.ndarray) -> np.ndarray:
        """The scale of each entry at backend flat ``indices`` (quantized weights only)."""
        assert self.codes is not None
        return self.codes.grid.scale_at(self.codes.scales, self.shape,
                                        torch_index(indices, self.shape, self.layout))

    def dequantized(self) -> np.ndarray:
        """The weight's values (out, in) float32: the array itself, or its codes times their
        scales."""
        w = self.torch_weight()
        return w if self.codes is None else self.codes.grid.dequantize(w, self.codes.scales)

    def torch_view(self) -> np.ndarray:
        """The weight in PyTorch layout (out, in) as a writable view of the buffer (as-is and
        transposed layouts only; blocked32 has no such view: use :meth:`torch_weight`)."""
        if self.packed:
            raise ValueError(f"{self.name}: packed int4 codes have no (out, in) view")
        if self.layout == BLOCKED:
            raise ValueError(f"{self.name}: a {BLOCKED} buffer has no (out, in) view")
        return to_torch(self.array, self.shape, self.layout)

    def torch_weight(self) -> np.ndarray:
        """The weight in PyTorch layout (out, in), for reading: a view, or a copy (blocked32,
        packed codes unpacked)."""
        return to_torch(self.read() if self.packed else self.array, self.shape, self.layout)


class WeightStore(ABC):
    """What a backend supplies to the engine. Implementations: ONNX Runtime, ExecuTorch, numpy.

    The engine calls ``run`` with the readers lock held shared and ``commit`` with it held
    exclusive, right after writing into the arrays of ``live_weights()``.
    """

    #: whether one of edgeadapt's own kernels (``runtime/kernels/``) reads the live weights in
    #: place; stores that load one set it (the ``own-kernel`` live form)
    kernel: bool = False
    #: intra-op threads the backend runs with (None: its default, not known to the store)
    threads: int | None = None
    #: bytes of live buffers the store moved to huge pages at load (None: it does not try)
    collapsed_bytes: int | None = None

    @abstractmethod
    def live_weights(self) -> dict[str, LiveWeight]:
        """Torch weight name -> :class:`LiveWeight`; the same arrays for the store's lifetime."""

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One forward pass with the current weights; numpy in, numpy out."""

    def commit(self, changes: dict[str, np.ndarray | None]) -> None:  # noqa: B027 - optional hook
        """Make the edits visible to the backend (no-op when the arrays are read directly).

        changes: weight name -> sorted int64 *backend* flat indices written, or None when the
        whole array was rewritten. Repack stores rebuild their session/program here; device
        stores copy the changed values to the device.
        """


def to_backend_index(indices: np.ndarray, shape: tuple[int, int], layout: str) -> np.ndarray:
    """Map torch flat indices ``r * in + c`` of an (out, in) weight to backend flat indices
    (:func:`edgeadapt.format.layout.backend_index`)."""
    return backend_index(indices, shape, layout)


class ArrayStore(WeightStore):
    """A plain numpy store: the reference backend for tests and for checking other stores.

    weights: torch name -> (out, in) float array (copied into the backend layout).
    forward: optional callable(inputs, weights) -> np.ndarray for ``run``.
    arena: copy the weights into one allocation, back to back, as ONNX Runtime's live store
    does (:func:`edgeadapt.runtime.pages.arena_copies`), instead of one array each.
    """

    def __init__(self, weights: dict[str, np.ndarray], layouts: dict[str, str] | None = None,
                 sha256: dict[str, str] | None = None, forward=None, arena: bool = False
                 ) -> None:
        layouts = layouts or {}
        sha256 = sha256 or {}
        arrays = {name: to_backend(np.asarray(w), layouts.get(name, AS_IS))
                  for name, w in weights.items()}
        arrays = arena_copies(arrays) if arena else {n: a.copy() for n, a in arrays.items()}
        self._live = {name: LiveWeight(name, arrays[name], layouts.get(name, AS_IS),
                                       tuple(np.shape(w)), sha256.get(name))
                      for name, w in weights.items()}
        self._forward = forward
        self.commits: list[dict[str, np.ndarray | None]] = []

    def live_weights(self) -> dict[str, LiveWeight]:
        return self._live

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if self._forward is None:
            raise SwitchError("this ArrayStore has no forward function")
        return self._forward(inputs, {n: lw.torch_weight() for n, lw in self._live.items()})

    def commit(self, changes: dict[str, np.ndarray | None]) -> None:
        self.commits.append(changes)
