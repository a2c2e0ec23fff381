"""edgeadapt: sparse adapters (SHiRA, SoRA, SiRA, LoRA) from training to on-device switching.

Importing the package imports no torch; the subpackages that need it import it themselves.
Pipeline: ``edgeadapt.adapters`` + ``edgeadapt.train`` -> ``edgeadapt.export`` ->
``edgeadapt.runtime``, with ``edgeadapt.bench`` reading all three.
"""

__version__ = "0.1.0"
