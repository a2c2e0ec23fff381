"""ONNX graph rewrites shared by the exporter and the runtime (onnx + numpy, no torch).

Below both: :mod:`edgeadapt.export` writes the graphs, :mod:`edgeadapt.runtime` rewrites them
again at load (edgeadapt's kernel in place of MatMul, constant live weights for repack), and
neither imports the other for it.

- :mod:`edgeadapt.graphs.values`: where a live weight sits in a graph, who reads a value, the
  names edgeadapt gives live inputs.
- :mod:`edgeadapt.graphs.blocked`: the ``blocked32`` rewrite of MatMul-read live weights, its
  inverse, and its form read by ``edgeadapt.BlockedMatMul``.
- :mod:`edgeadapt.graphs.skip_norm`: residual add + RMS norm as one fused contrib op (the
  KV-cache decoder).
"""
