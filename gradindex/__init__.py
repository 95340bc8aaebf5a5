"""gradindex: per-concept training-data attribution as a FAISS index.

Pipeline (one function per stage)::

    featurize(task, out)            -> FeatureStore   per-example projected gradients
    build_index(store, IndexConfig) -> GradIndex      √w-scaled vectors in FAISS
    Attributor.open(store).attribute(queries, k) -> TopK
"""

from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig
from gradindex.errors import GradIndexError
from gradindex.featurize import featurize
from gradindex.index import GradIndex, TopK, build_index
from gradindex.query import Attributor
from gradindex.store import FeatureStore
from gradindex.task import Task, load_task
from gradindex.weights import GroupWeights

__all__ = [
    "Attributor",
    "FeatureStore",
    "FeaturizeConfig",
    "GradIndex",
    "GradIndexError",
    "GroupWeights",
    "IndexConfig",
    "ProjectionConfig",
    "Task",
    "TopK",
    "build_index",
    "featurize",
    "load_task",
]

__version__ = "0.1.0"
