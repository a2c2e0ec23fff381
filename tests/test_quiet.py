"""edgeadapt.quiet: the command line's filters drop the libraries' noise by category and module,
and keep edgeadapt's own warnings and every error. Each case runs in a fresh interpreter, since
the filters are process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import logging, warnings
    from edgeadapt import quiet
    quiet.install()

    def warn_from(module, category, message):  # a warning issued by code of ``module``
        exec(f"warnings.warn({message!r}, {category.__name__})",
             {"__name__": module, "warnings": warnings, category.__name__: category})

    warn_from("executorch.exir.emit._emitter", UserWarning, "lib-user")
    warn_from("torch.export._trace", FutureWarning, "lib-future")
    warn_from("onnxscript.ir", DeprecationWarning, "lib-deprecation")
    warn_from("copyreg", FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated, use x")
    warn_from("transformers.modeling_utils", FutureWarning, "hf-future")
    warn_from("transformers.modeling_utils", UserWarning, "hf-user-kept")
    warn_from("edgeadapt.export.bundle", UserWarning, "own-warning-kept")
    warn_from("executorch.exir", RuntimeWarning, "lib-runtime-kept")
    logging.getLogger("torchao").warning("lib-log-warning")
    logging.getLogger("torchao").error("lib-log-error-kept")
    logging.getLogger("torch.utils._pytree").warning("pytree-log-warning")
    logging.getLogger("some.library").warning("other-log-warning-kept")
    logging.basicConfig(level=logging.WARNING)  # as ExecuTorch's partitioner does on import
    own = logging.getLogger("edgeadapt.export")
    own.setLevel(logging.INFO)
    own.addHandler(logging.StreamHandler())  # the command line's echo handler
    own.info("own-info-once")
    logging.getLogger("edgeadapt.runtime").warning("own-log-warning-kept")
""")


def _run(env: dict[str, str] | None = None, *args: str) -> str:
    res = subprocess.run([sys.executable, *args, "-c", SCRIPT], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True)
    return res.stderr


def test_library_noise_is_filtered_and_own_messages_are_kept():
    err = _run({"PYTHONWARNINGS": ""})
    for gone in ("lib-user", "lib-future", "lib-deprecation", "LeafSpec", "hf-future",
                 "lib-log-warning", "pytree-log-warning"):
        assert gone not in err, gone
    for kept in ("hf-user-kept", "own-warning-kept", "lib-runtime-kept", "lib-log-error-kept",
                 "other-log-warning-kept", "own-log-warning-kept"):
        assert kept in err, kept
    assert err.count("own-info-once") == 1  # not repeated through the root logger


def test_python_switches_and_edgeadapt_verbose_turn_it_off():
    assert "lib-user" in _run({"PYTHONWARNINGS": ""}, "-W", "default")
    err = _run({"PYTHONWARNINGS": "", "EDGEADAPT_VERBOSE": "1"})
    assert "lib-user" in err and "lib-log-warning" in err
