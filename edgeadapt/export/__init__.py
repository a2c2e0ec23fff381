"""Export: base models to ONNX / ExecuTorch bundles, training runs to adapter files.

    export_base("smollm2", "bundle/", backends=("onnxruntime", "executorch"), targets="qv")
    export_adapter("runs/x", "bundle/", "sentiment", value_dtype="float16")

The same functions back ``edgeadapt export base|adapter``. Importing this package imports no
torch; the backend exporters (:mod:`.onnx`, :mod:`.executorch`) do.
"""

from edgeadapt.export.adapter import export_adapter
from edgeadapt.export.bundle import export_base

__all__ = ["export_adapter", "export_base"]
