"""Shared helpers of the store-safety tests: a tiny built store, its query answers, a file census.

The tiny task (tests/tiny_task.py, 40 rows, two groups) is featurized with ``proj_dim`` 4, so
both groups are really projected (the seeds matter), into shards of 8 rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig
from gradindex.features.run import featurize
from gradindex.index import build_index
from gradindex.query.attributor import Attributor
from gradindex.store.feature_store import MANIFEST, FeatureStore
from same_answer import same_ranking
from tiny_task import TinyTask

HERE = Path(__file__).parent
TASK_SPEC = f"{(HERE / 'tiny_task.py').resolve()}:TinyTask"
CONFIG = FeaturizeConfig(batch_size=8, shard_size=8, projection=ProjectionConfig(proj_dim=4))


def queries():
    return TinyTask().query_dataset()


def featurized(root: Path, config: FeaturizeConfig = CONFIG, name: str = "store",
               limit: int | None = None) -> FeatureStore:
    """The tiny task (trained once into ``root/tiny.pt``) featurized into ``root/name`` (first ``limit`` rows)."""
    checkpoint = root / "tiny.pt"
    if not checkpoint.exists():
        TinyTask().train(checkpoint)
    return featurize(TinyTask(), root / name, config, checkpoint=checkpoint, limit=limit, show_progress=False)


def make_store(root: Path, name: str = "store", limit: int | None = None, index: IndexConfig | None = IndexConfig(),
               config: FeaturizeConfig = CONFIG) -> Path:
    """A featurized tiny store at ``root/name`` (first ``limit`` rows), with an index unless ``index`` is None."""
    store = featurized(root, config, name, limit)
    if index is not None:
        build_index(store, index, show_progress=False)
    return root / name


def cli_store(root: Path, run) -> tuple[Path, Path]:
    """Through the CLI (``run(*args)``, a click runner): the tiny task featurized (proj_dim 8, shards of 16
    rows) into ``root/store`` and indexed, with ``root/queries.npz`` (4 query rows); ``(root, checkpoint)``."""
    checkpoint = TinyTask().train(root / "tiny.pt")
    assert run("featurize", TASK_SPEC, "--out", root / "store", "--checkpoint", checkpoint, "--proj-dim", 8,
               "--shard-size", 16).exit_code == 0
    assert run("build-index", root / "store").exit_code == 0
    task = TinyTask()
    np.savez(root / "queries.npz", x=task.x[40:44], y=task.y[40:44])
    return root, checkpoint


def copy_store(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def write_manifest(path: Path, data) -> None:
    (Path(path) / MANIFEST).write_text(json.dumps(data, indent=1))


def answers(path: Path, concept: str = "all", k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(sample_ids [n, k], scores [n, k])`` of the tiny queries against ``concept``'s index."""
    attributor = Attributor.open(path, concept=concept, trust_task=True)
    try:
        top = attributor.attribute(queries(), k=k)
    finally:
        attributor.close()
    return top.sample_ids, top.scores


def same_answers(a, b) -> bool:
    """``(sample_ids, scores)`` pairs: the same answer (tests/same_answer.py's definition)."""
    return same_ranking(a, b)


def stored_ids(path: Path) -> np.ndarray:
    return FeatureStore.open(path).read(groups=[])[0]


def temporaries(path: Path) -> list[Path]:
    """Files a finished store must not hold: temporary names of interrupted writes."""
    return sorted(p for p in Path(path).rglob("*") if ".tmp-" in p.name)


def census(path: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``path`` (symlinks not followed)."""
    out = {}
    for file in sorted(Path(path).rglob("*")):
        if file.is_file() and not file.is_symlink():
            out[str(file.relative_to(path))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def minimal_manifest(shards, groups: dict[str, int], **fields) -> dict:
    """A valid manifest for a hand-made store (``shards``: ShardInfo or dicts; ``groups``: {name: dim})."""
    from gradindex.features.projection import projection_format

    shards = [s if isinstance(s, dict) else s.to_dict() for s in shards]
    return {"task": {"task": "digits", "options": {}}, "checkpoint": None, "model_fingerprint": "0" * 64,
            "config": FeaturizeConfig().to_dict(),
            "groups": [{"name": g, "dim": d, "blocks": []} for g, d in groups.items()],
            "num_samples": sum(s["rows"] for s in shards), "dtype": "float32", "shards": shards,
            "projection_format": projection_format(), **fields}
