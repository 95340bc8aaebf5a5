"""FAISS itself: imported with an install hint, and where it can run (GPU detection, device choice).

No index logic here; :mod:`gradindex.index.kinds` and :mod:`gradindex.index.certify` both use it.
"""

from __future__ import annotations

import logging

from gradindex.errors import MissingDependencyError

logger = logging.getLogger(__name__)


def import_faiss():
    """``faiss``, or a clear error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(
            "FAISS is not installed: pip install 'gradindex[cpu]' (faiss-cpu), or on a CUDA machine "
            "pip install 'gradindex[gpu]' (faiss-gpu-cu12)"
        ) from None
    return faiss


def gpu_available() -> bool:
    faiss = import_faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for FAISS; ``cuda`` without GPU FAISS falls back to ``cpu`` with a warning."""
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if device == "cuda":
        logger.warning("--device cuda: this FAISS build has no usable GPU; using the CPU instead")
    return "cpu"
