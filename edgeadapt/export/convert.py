"""``edgeadapt convert SOURCE --to peft OUT``: an edgeadapt adapter as a Hugging Face PEFT adapter.

SOURCE is a training run (LoRA, SoRA, SHiRA) or an ``.eadp`` file; the PEFT directory is
written by :func:`edgeadapt.format.peft_write.write_peft` (spec: docs/format.md §7) and loads with
``PeftModel.from_pretrained(base, OUT)`` on the base edgeadapt trained on
(``edgeadapt.models.load_model(<model>).model``), giving the run's outputs. SiRA (a mixture of
routed LoRA experts, run unfused) has no PEFT equivalent and is refused.
"""

from __future__ import annotations

from pathlib import Path

from edgeadapt.errors import ConfigError
from edgeadapt.export.adapter import load_run_adapter
from edgeadapt.format.adapter_file import read_adapter
from edgeadapt.format.container import check_writable_dir
from edgeadapt.format.peft_write import write_peft

#: the ``--to`` formats ``convert`` writes
FORMATS = ("peft",)


def convert_adapter(source: str | Path, out: str | Path, to: str = "peft") -> Path:
    """Write the adapter of ``source`` (run directory or ``.eadp`` file) to ``out`` in format
    ``to``; returns ``out``. ConfigError for SiRA (:func:`~edgeadapt.format.peft_write.write_peft`),
    a head-only run or an unknown format; AdapterFormatError / WriteError from reading and
    writing. Nothing is written before the adapter has been read and checked."""
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r}: choose from {', '.join(FORMATS)}")
    source, out = Path(source), Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a directory for the PEFT adapter")
    check_writable_dir(out, "OUT ")
    if source.is_file():
        adapter = read_adapter(source)
        peft_meta = adapter.meta.get("peft") or {}
        base = adapter.meta.get("model") or peft_meta.get("base_model_name_or_path")
    else:
        adapter, info = load_run_adapter(source)
        base = info.get("model")
    return write_peft(out, adapter, base if isinstance(base, str) else None)
