"""The adapters a bundle registers, read from their files, validated and mapped once (cached):
fused ones onto the engine's live weights (:class:`~edgeadapt.runtime.prepared.PreparedAdapter`),
unfused ones onto their graph variant's branches
(:class:`~edgeadapt.runtime.unfused.PreparedBranches`). Numpy only, torch-free.

On a quantized base a LoRA / SoRA runs unfused wherever the bundle has a LoRA variant for the
backend, even if registered fused (:meth:`BundleAdapters.variant`); fused, it is re-quantized
into the codes with a warning.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

from edgeadapt.errors import AdapterFormatError, SwitchError, UnknownNameError
from edgeadapt.format.adapter_file import read_adapter
from edgeadapt.format.manifest import AdapterEntry, Manifest
from edgeadapt.format.types import Adapter, LoraDelta
from edgeadapt.runtime.engine import SwitchEngine
from edgeadapt.runtime.prepared import PreparedAdapter
from edgeadapt.runtime.store import LiveWeight
from edgeadapt.runtime.unfused import KIND_METHODS, PreparedBranches, prepare_branches


class BundleAdapters:
    """Adapter name -> its prepared form, for one bundle, engine and backend ``section`` (the
    bundle.json key of the backend's variant entries). Thread-safe; preparing reads a file, so
    it runs outside any lock of the runtime."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, engine: SwitchEngine,
                 section: str) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.engine = engine
        self.section = section
        self._fused: dict[str, PreparedAdapter] = {}
        self._unfused: dict[str, PreparedBranches] = {}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(self.manifest.adapters)

    def entry(self, name: str) -> AdapterEntry:
        """``name``'s bundle.json entry; UnknownNameError naming the bundle's adapters."""
        entry = self.manifest.adapters.get(name) if isinstance(name, str) else None
        if entry is None:
            raise UnknownNameError(f"no adapter named {name!r} in {self.bundle_dir}; the "
                                   f"bundle has: {', '.join(self.names) or '(none)'}")
        return entry

    def is_unfused(self, name: str) -> bool:
        """Whether adapter ``name`` runs unfused (:meth:`variant`; SiRA always)."""
        return self.variant(name) is not None or self.entry(name).method == "sira"

    def variant(self, name: str) -> str | None:
        """The graph variant adapter ``name`` runs through: the one its entry names; for a LoRA
        / SoRA registered fused on a quantized base, the bundle's LoRA variant for this backend
        where it has one (fused on codes, most of ``B A`` rounds away: docs/quantized.md);
        else None (fused)."""
        entry = self.entry(name)
        if entry.variant is not None or entry.method not in KIND_METHODS["lora"] \
                or (getattr(self.manifest, self.section) or {}).get("precision", "fp32") == "fp32":
            return entry.variant
        return next((key for key, v in sorted(self.manifest.variants.items())
                     if (v.get("branch") or {}).get("kind") == "lora" and self.section in v),
                    None)

    def fused(self, name: str) -> PreparedAdapter:
        """Adapter ``name`` mapped onto the engine's live weights; SwitchError if it runs
        unfused."""
        with self._lock:
            prep = self._fused.get(name)
        if prep is not None:
            return prep
        entry = self.entry(name)
        if self.is_unfused(name):
            raise SwitchError(f"adapter {name!r} ({entry.method}) runs unfused in graph variant "
                              f"{self.variant(name)!r}; fused switching cannot apply it (switch "
                              "to it alone: rt.switch(name))")
        adapter = self._read(name, entry)
        prep = self.engine.prepare(adapter, name)
        _warn_fused_on_codes(adapter, self.engine.store.live_weights(), name)
        with self._lock:
            self._fused[name] = prep
        return prep

    def unfused(self, name: str) -> PreparedBranches:
        """Adapter ``name`` mapped onto its graph variant's branches (its task head, if any,
        validated against the engine's live weights too)."""
        with self._lock:
            pb = self._unfused.get(name)
        if pb is not None:
            return pb
        entry, variant = self.entry(name), self.variant(name)
        if variant is None:
            raise SwitchError(f"adapter {name!r} ({entry.method}) has no graph variant in the "
                              "bundle; export it with unfused=True (SiRA always has one)")
        pb = prepare_branches(self._read(name, entry), name, self.manifest, variant,
                              self.section)
        if pb.head:  # validated now, applied by the engine at switch time
            self.engine.prepare(head_only(pb), name)
        with self._lock:
            self._unfused[name] = pb
        return pb

    def _read(self, name: str, entry: AdapterEntry) -> Adapter:
        """Adapter ``name``'s file, validated against the bundle (``read_adapter``) and against
        its entry: AdapterFormatError if the file holds another method than bundle.json says."""
        adapter = read_adapter(self.bundle_dir / entry.file, self.manifest)
        if adapter.method != entry.method:
            raise AdapterFormatError(f"{self.bundle_dir / entry.file}: a {adapter.method} "
                                     f"adapter, but bundle.json registers {name!r} as "
                                     f"{entry.method}; re-register it (edgeadapt export adapter)")
        return adapter


def _warn_fused_on_codes(adapter: Adapter, live: dict[str, LiveWeight], name: str) -> None:
    """A UserWarning where ``adapter`` fuses a low-rank delta into quantized codes: the switch
    re-quantizes each such matrix whole, ``q' = clip(rint((q s + B A) / s))``, and a delta
    below half a step rounds away (90-100% of ``B A`` on SmolLM2, docs/quantized.md)."""
    on_codes = sorted(w for w, d in adapter.targets.items()
                      if isinstance(d, LoraDelta) and live[w].codes is not None)
    if on_codes:
        warnings.warn(f"adapter {name!r} ({adapter.method}) fuses into the quantized codes of "
                      f"{len(on_codes)} weight(s) ({on_codes[0]}, ...): most of B A rounds away; "
                      "export it with --unfused to run it beside the codes", stacklevel=3)


def head_only(pb: PreparedBranches) -> Adapter:
    """The part of an unfused adapter the engine applies: its task head (no deltas)."""
    return Adapter(pb.method, {}, {}, {}, head=pb.head)
