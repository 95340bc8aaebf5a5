"""Trust that follows your own stores: a record of the stores this user featurized, and from which task code.

A store's manifest names task code (``file.py:Class``, ``module:Class``) that querying it runs; a
store from elsewhere runs it only with explicit consent (``--trust-task``,
:func:`gradindex.features.query.load_store_task`). A store you featurized yourself from your own
file needs none: ``featurize`` (and ``--append``) write a record here, and later commands on this
machine accept it while the task file is unchanged.

In: a store (location and manifest) and the task object that wrote it.
Out: one JSON file per store under ``$GRADINDEX_HOME/trusted-stores/<identity>.json``::

    {"store": "/abs/path", "identity": "<sha256>", "task": "<spec>", "files": {"/abs/task.py": "<sha256>"}}

``identity``: sha256 of the store's location, its featurize run key and its first shard's sha256 (a
copy elsewhere, or another store written at the same place, is another store). ``files``: the
source files defining the task class and its non-gradindex bases, with their sha256. A record
counts only if it was written by this user (owner uid) and is not writable by others.
:func:`own_store_verdict` says whether a store is trusted, or why not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gradindex.config import gradindex_home
from gradindex.task import Task, defining_files, resolve_spec

logger = logging.getLogger(__name__)

FOLDER = "trusted-stores"


def store_identity(location: str | Path, manifest: Mapping[str, Any]) -> str:
    """sha256 hex of the store's location, its run key and its first shard's sha256."""
    shards = manifest.get("shards") or [{}]
    key = [str(location), manifest.get("run_key"), shards[0].get("sha256")]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """sha256 hex of a file's bytes; None when it cannot be read."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def record_path(identity: str) -> Path:
    return gradindex_home() / FOLDER / f"{identity}.json"


def record_own_store(location: str | Path, manifest: Mapping[str, Any], task: Task) -> Path | None:
    """Record that this user wrote the store at ``location`` from ``task``'s code (the file
    path). A built-in task's record lists no files: its code needs no consent, but the record is the
    consent for what its options do (read a path they name, train a checkpoint). A home that cannot be
    written: a warning, None."""
    from gradindex.task import is_builtin_spec

    spec = manifest["task"]["task"]
    identity = store_identity(location, manifest)
    files = ({} if is_builtin_spec(spec) else
             {str(Path(f).resolve()): file_sha256(f) for f in sorted(defining_files(type(task)))})
    record = {"store": str(location), "identity": identity, "task": spec, "files": files}
    path = record_path(identity)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("warning: could not record %s as your own store in %s (%s); querying it will need "
                       "--trust-task", location, path.parent, err.strerror or err)
        return None
    return path


def own_store_verdict(location: str | Path, manifest: Mapping[str, Any]) -> tuple[bool, str]:
    """``(True, "")`` when this user featurized the store at ``location`` from the task file its
    manifest names and that file is unchanged; else ``(False, why)``: a short reason naming the
    foreign store or the changed file."""
    spec = manifest["task"]["task"]
    path = record_path(store_identity(location, manifest))
    record = _read_own_record(path)
    if record is None or record.get("task") != spec:
        return False, "it was not featurized by you on this machine (no record in $GRADINDEX_HOME)"
    from gradindex.task import is_builtin_spec

    if is_builtin_spec(spec):
        return True, ""
    files = record.get("files") or {}
    loaded = spec_file(spec)
    if loaded is None or str(loaded) not in files:
        return False, f"the code {spec!r} names is not the file you featurized it from"
    for name, digest in files.items():
        now = file_sha256(name)
        if now != digest:
            state = "is gone" if now is None else f"changed (sha256 {str(digest)[:12]}… → {now[:12]}…)"
            return False, f"task file {name} {state} since you featurized this store"
    return True, ""


def spec_file(spec: str) -> Path | None:
    """The source file ``spec`` would load, found without running any code (``file.py:Class``: that
    file; ``module:Class``: the first ``module.py`` or ``module/__init__.py`` on ``sys.path``)."""
    target, _, _ = resolve_spec(spec).rpartition(":")
    if target.endswith(".py"):
        return Path(target).resolve()
    parts = target.split(".")
    for entry in sys.path:
        base = Path(entry or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate.resolve()
    return None


def _read_own_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` if it exists, is owned by this user and is writable by nobody else."""
    try:
        info = path.stat()
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            logger.debug("ignoring trust record %s: not owned by this user or writable by others", path)
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
