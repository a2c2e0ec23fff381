"""What a run measures (:class:`BenchOptions`) and what every part of it reads
(:class:`BenchContext`): passed explicitly from the orchestrator (:mod:`edgeadapt.bench.run`) to
the cases, the forward and switch timings and the peers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgeadapt.bench.adapters import AdapterSet
from edgeadapt.format.manifest import Manifest


@dataclass
class BenchOptions:
    """What to measure. ``reload_repeats`` bounds the slow cases (reload, repack switch).

    backends: ``NAME[:DEVICE]`` each (:mod:`edgeadapt.bench.backends`); ``device`` is the device
    of those written without one.
    """

    backends: list[str] = field(default_factory=lambda: ["onnxruntime", "executorch"])
    device: str = "cpu"
    batches: list[int] = field(default_factory=lambda: [1, 8])
    seqs: list[int] = field(default_factory=lambda: [64])
    shapes: list[tuple[int, int]] | None = None  # explicit (batch, seq) pairs override
    repeats: int = 20
    warmup: int = 3
    switch_repeats: int = 50
    reload_repeats: int = 5
    threads: int = 1
    sessions: int = 1  # independent sessions/programs per forward variant, all interleaved
    density: float = 0.01
    lora_rank: int = 16
    peers: bool = True

    def shape_list(self) -> list[tuple[int, int]]:
        """The (batch, seq) shapes timed: ``shapes``, else every batch with every seq."""
        if self.shapes:
            return list(self.shapes)
        return [(b, s) for b in self.batches for s in self.seqs]


@dataclass
class BenchContext:
    """The inputs every part of one run shares; nothing is attached to it along the way.

    bundle: the bundle directory; manifest: its bundle.json as read once; adapters: the
    bundle's adapters plus the synthetic ones (registered on each runtime's in-memory
    manifest); scratch: a directory that lives as long as the run (synthetic adapter files);
    progress: called with 1 after each timed call (e.g. ``tqdm.update``).
    """

    bundle: Path
    manifest: Manifest
    opts: BenchOptions
    adapters: AdapterSet
    scratch: Path
    progress: Callable[[int], object] | None = None
