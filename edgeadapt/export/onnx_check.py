"""Running an exported graph on ONNX Runtime for checks (numpy only, no torch).

Sessions use the default optimisation level with prepacking ON, so every weight that is still a
constant initializer is packed, exactly as in deployment. Live weights and branch inputs are bound
with IOBinding to OrtValues that alias caller-owned numpy buffers (no copy): editing a buffer in
place changes the next run's output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU session on ``path``: all graph optimisations, prepacking on, ``threads`` threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # overridable-initializer warnings for branch defaults
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(str(path), sess_options=opts,
                                providers=["CPUExecutionProvider"])


class BoundSession:
    """A session with named inputs bound once to numpy buffers that stay owned by this object.

    ``buffers[name]`` is the live array; mutate it in place (never rebind) and :meth:`run`
    sees the change.
    """

    def __init__(self, sess: ort.InferenceSession, buffers: dict[str, np.ndarray]) -> None:
        self.session = sess
        self.buffers = {k: np.ascontiguousarray(v) for k, v in buffers.items()}
        self._values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.buffers.items()}
        self.binding = sess.io_binding()
        for name, value in self._values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.output = sess.get_outputs()[0].name

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Outputs[0] for the data inputs ``feeds`` plus the bound buffers."""
        keep = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        for name, value in zip(feeds, keep, strict=True):
            self.binding.bind_ortvalue_input(name, value)
        self.binding.bind_output(self.output, "cpu")
        self.session.run_with_iobinding(self.binding)
        return self.binding.copy_outputs_to_cpu()[0]
