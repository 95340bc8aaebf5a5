"""gradindex: per-concept training-data attribution as a FAISS index.

Pipeline (one function per stage)::

    featurize(task, out)            -> FeatureStore   per-example projected gradients
    build_index(store, IndexConfig) -> GradIndex      √w-scaled vectors in FAISS
    Attributor.open(store).attribute(queries, k) -> TopK   (.opponents(queries, k): the most negative)
    write_html_report(store, inputs, "report.html")         the explorer's view as one HTML file

The names below are imported on first use (PEP 562), so ``import gradindex`` and the
commands that compute nothing (``--help``, ``info``) load neither torch nor FAISS.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> module that defines it
_EXPORTS = {
    "Attributor": "gradindex.query.attributor",
    "FeatureStore": "gradindex.store.feature_store",
    "FeaturizeConfig": "gradindex.config",
    "GradIndex": "gradindex.index",
    "GradIndexError": "gradindex.errors",
    "GroupWeights": "gradindex.weights.group_weights",
    "IndexConfig": "gradindex.config",
    "ProjectionConfig": "gradindex.config",
    "Task": "gradindex.task",
    "TopK": "gradindex.index",
    "build_index": "gradindex.index",
    "featurize": "gradindex.features.run",
    "load_task": "gradindex.task",
    "write_html_report": "gradindex.eval.html_report",
}

__all__ = sorted(_EXPORTS)

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gradindex' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__", *(name for name in globals() if name.startswith("__"))})


if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
    from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig
    from gradindex.eval.html_report import write_html_report
    from gradindex.errors import GradIndexError
    from gradindex.features.run import featurize
    from gradindex.index import GradIndex, TopK, build_index
    from gradindex.query.attributor import Attributor
    from gradindex.store.feature_store import FeatureStore
    from gradindex.task import Task, load_task
    from gradindex.weights.group_weights import GroupWeights
