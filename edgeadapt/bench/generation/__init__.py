"""``edgeadapt bench BUNDLE --generate``: what generation costs on each backend with a KV-cache
decoder, adapters fused in place, against onnxruntime-genai and transformers + PEFT in the same
process (docs/bench.md, "Generation").

The parts, in the order :func:`edgeadapt.bench.generation.run.run_generate` runs them:

1. :mod:`.cases`: one runtime per case (base, SHiRA fused, LoRA fused; unfused adapters where
   the decoder runs them, else skipped) on every backend whose runtime has a decoder, each a
   :class:`.decoding.DecodeCase`; :mod:`.peers`: onnxruntime-genai (:mod:`.genai_peer` on
   models :mod:`.genai_build` prepares) and transformers + PEFT (:mod:`.torch_decode`);
2. :mod:`.parity`: the greedy tokens of every case and peer against transformers on the
   PyTorch model carrying the same adapter (ParityError before anything is timed);
3. :mod:`.timing`: time to first token and decode steps, every case interleaved;
4. :mod:`.requests`: the switch between two requests, then the bit-exact restore;
5. :mod:`.load`: the switch while two threads decode.

:mod:`.options` holds the sizes and counts (:mod:`.cli`: the command's options),
:mod:`.schema` validates the report's ``generate`` section and evaluates its targets,
:mod:`.report` prints and plots it.
"""
