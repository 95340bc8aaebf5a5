"""Featurization on Ray (imported lazily; Ray is the optional extra ``gradindex[ray]``).

In: a :class:`~gradindex.task.Task`, a store location, a
:class:`~gradindex.config.FeaturizeConfig` and a Ray cluster (a local one bound to
127.0.0.1, or an existing one's address). Out: the same
:class:`~gradindex.store.feature_store.FeatureStore` a single-process
:func:`~gradindex.features.run.featurize` writes — every shard bit for bit.

How: the driver loads the model once on the CPU (fingerprint, groups, run key), cuts
the training rows into the same shards ``[start, stop)`` as the single-process path,
keeps the shards a previous identical run completed (``resume``) and hands the rest
to a pool of :class:`FeaturizeWorker` actors — one per GPU when the cluster has GPUs
and the device allows them, one per CPU slot otherwise. Each actor loads the task's
model once, keeps it, and runs the one per-shard routine
(:func:`~gradindex.features.run.featurize_shard`: temporary name → rename → sidecar),
returning the shard's info and its partial Gram sums ``{group: [k_g, k_g]}``. A worker
that dies is replaced and its shard redone (``max_retries``). The driver verifies every
shard (sidecar, size, sha256, run key) and writes the Gram file and the manifest once,
last (like ``lance.ray``'s write / on_write_complete). A shard whose worker died leaves
nothing that looks complete; without a manifest, a rerun with ``resume`` redoes it.

The store must be a path every node sees (one machine, or a shared mount), or an ``s3://``
location: then each worker sends its shard straight to the bucket (one PUT per file), and no
node needs a shared disk; every node reads the same ``AWS_*``/``GRADINDEX_S3_ENDPOINT``
environment (:mod:`gradindex.store.storage`).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gradindex.config import FeaturizeConfig, check_index_dim, require_number
from gradindex.errors import ConfigError, GradIndexError, MissingDependencyError, StoreMismatchError
from gradindex.features.run import RunOptions, commit_store, featurize_shard, group_entries, prepare_run
from gradindex.features.gradients import GradientProjector
from gradindex.features.precondition import GramAccumulator
from gradindex.store.feature_store import (
    FeatureStore,
    ShardInfo,
    Storage,
    completed_shard,
    open_storage,
    prepare_store,
    read_written_shard,
    remove_temporaries,
    shard_name,
    writer_lock,
)
from gradindex.task import Task, load_task

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
INSTALL_HINT = "pip install 'gradindex[ray]'"


def import_ray():
    """``ray``, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(f"Ray is not installed: {INSTALL_HINT}") from None
    return ray


@contextmanager
def loopback_only() -> Iterator[Any]:
    """Ray, resolving this node's address to 127.0.0.1 while the block runs.

    Ray's own setting for machines that are not cluster nodes (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``):
    a cluster started inside the block (``ray.init``, ``ray.cluster_utils.Cluster``) binds every
    server to the loopback interface; ``_node_ip_address="127.0.0.1"`` alone is resolved to the
    machine's address. The environment variable reaches the processes Ray starts.
    """
    ray = import_ray()
    constants = ray._private.ray_constants
    old_env, old_flag = os.environ.get(constants.ENABLE_RAY_CLUSTERS_ENV_VAR), constants.ENABLE_RAY_CLUSTER
    os.environ[constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield ray
    finally:
        constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = old_env


@contextmanager
def local_ray(num_cpus: int | None = None, **init_args: Any) -> Iterator[Any]:
    """A new local Ray cluster bound to 127.0.0.1 (no traffic leaves the machine), shut down on exit.

    ``address="local"``: always a fresh cluster, never one that ``RAY_ADDRESS`` or a cluster
    started earlier on this machine (``/tmp/ray/ray_current_cluster``) points to."""
    init_args.setdefault("address", "local")
    with loopback_only() as ray:
        ray.init(num_cpus=num_cpus, _node_ip_address=LOOPBACK, include_dashboard=False, **init_args)
        try:
            yield ray
        finally:
            ray.shutdown()


#: Seconds to wait for a Ray cluster address to accept a connection (``--ray-timeout``).
CONNECT_TIMEOUT = 30.0


def check_ray_address(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """A one-line :class:`ConfigError` unless something accepts TCP connections at ``address``
    (``HOST:PORT`` or ``ray://HOST:PORT``) within ``timeout`` seconds; ``None``, ``local`` and
    ``auto`` are not probed (``auto`` fails fast by itself). Ray's own connect retries for
    minutes; this makes an unreachable address an error within ``timeout``."""
    import socket

    if address in (None, "", "local", "auto"):
        return
    timeout = require_number(timeout, "--ray-timeout", above=0)
    text = address[len("ray://"):] if address.startswith("ray://") else address
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ConfigError(f"--ray {address}: no Ray cluster answers there ({reason} within {timeout:g} s); start "
                          "one with `ray start --head`, check the address, or use a bare --ray for a local "
                          "cluster") from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """A connected ``ray`` module.

    Reuses an already initialised Ray (and leaves it running). Otherwise ``address``
    ``None``/``"local"`` starts a :func:`local_ray` cluster, any other address (``auto``,
    ``HOST:PORT``, ``ray://HOST:PORT``) connects to a running cluster; either is shut
    down (disconnected) on exit.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
    elif address in (None, "", "local"):
        with local_ray(num_cpus, log_to_driver=False) as ray:
            yield ray
    else:
        check_ray_address(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except ConnectionError as err:
            raise ConfigError(f"--ray {address}: cannot connect ({' '.join(str(err).split())})") from None
        try:
            yield ray
        finally:
            ray.shutdown()


class FeaturizeWorker:
    """One Ray worker: loads the task's model once and featurizes shards with it."""

    def __init__(self, task_spec: dict[str, Any], load_spec: str, config: dict[str, Any], checkpoint: str | None,
                 device: str, threads: int, limit: int | None, run_key: str):
        torch.set_num_threads(threads)
        self.task = load_task(load_spec, task_spec.get("options", {}))
        self.task._spec = task_spec["task"]  # the driver's spec: part of the run key
        self.config = FeaturizeConfig.from_dict(config)
        self.device = torch.device(device)
        self.run = prepare_run(self.task, self.config, checkpoint, self.device, limit)
        if self.run.run_key != run_key:
            raise StoreMismatchError(
                f"Ray worker on {os.uname().nodename}: its model, groups or sample ids differ from the driver's "
                "(run key mismatch); every node must see the same checkpoint, task code and data"
            )
        self.projector = GradientProjector(self.run.model, self.run.groups, self.config.projection, self.device)

    def ready(self) -> str:
        """Returns once the model and data are loaded: the node this worker runs on."""
        return _node_id()

    def featurize_shard(self, store: str, shard: tuple[int, int, int], die: bool = False) -> dict[str, Any]:
        """Featurize and write one shard; ``die`` (a test hook) kills this process mid-shard."""
        if die:
            _die_mid_shard(store, shard)
        info, feats = featurize_shard(self.task, self.run, self.projector, self.config, self.device, store, shard)
        partial = GramAccumulator(self.projector.group_dims(), self.config.gram_max_dim)
        partial.update(feats)
        return {"info": info.to_dict(), "gram": partial.sums, "rows": partial.count, "pid": os.getpid(),
                "node": _node_id()}


def _die_mid_shard(store: str, shard: tuple[int, int, int]) -> None:
    """Leave half a Parquet file under the shard's temporary name and exit without cleanup."""
    with open(open_storage(store).temporary(shard_name(shard[0])), "wb") as handle:
        handle.write(b"PAR1" + bytes(64))  # a Parquet header, no footer
    os._exit(1)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def featurize_ray(
    task: Task,
    out: str | Path,
    config: FeaturizeConfig = FeaturizeConfig(),
    address: str | None = None,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    max_retries: int = 2,
    fail_shards: Collection[int] = (),
    **run: Any,
) -> FeatureStore:
    """Featurize the task's training set into a new store at ``out`` on Ray workers.

    ``run``: the keywords of :func:`~gradindex.features.run.featurize` (``checkpoint``, ``device``,
    ``overwrite``, ``resume``, ``limit``, ``show_progress``; :class:`~gradindex.features.run.RunOptions`).
    ``device``: ``cpu`` (one worker per ``cpus_per_worker`` CPU slots), ``cuda`` (one
    worker per GPU; an error if the cluster has none) or ``auto`` (GPUs when the cluster
    has them). ``workers`` caps the pool. ``fail_shards`` is a test hook: the first
    attempt of those shards kills its worker mid-shard.
    """
    import_ray()  # the install hint before any work
    options = RunOptions(**run)
    checkpoint, device, limit, resume = options.checkpoint, options.device, options.limit, options.resume
    if cpus_per_worker < 1 or max_retries < 0 or (workers is not None and workers < 1):
        raise ConfigError(f"featurize on Ray: expected workers >= 1, cpus_per_worker >= 1 and max_retries >= 0, "
                          f"got {workers}, {cpus_per_worker}, {max_retries}")
    if not (device in ("cpu", "auto") or device.startswith("cuda")):
        raise ConfigError(f"featurize on Ray: --device must be cpu, cuda or auto, got {device!r}")
    cpu = torch.device("cpu")
    prepared = prepare_run(task, config, checkpoint, cpu, limit)
    with writer_lock(out) as path:
        prepare_store(path, overwrite=options.overwrite, resume=resume)
        return _featurize_ray_into(path, task, prepared, config, checkpoint, device, resume, limit, address, workers,
                                   cpus_per_worker, max_retries, options.show_progress, fail_shards)


def _featurize_ray_into(path: Storage, task: Task, run: Any, config: FeaturizeConfig, checkpoint: str | Path | None,
                        device: str, resume: bool, limit: int | None, address: str | None, workers: int | None,
                        cpus_per_worker: int, max_retries: int, show_progress: bool,
                        fail_shards: Collection[int]) -> FeatureStore:
    cpu = torch.device("cpu")
    started = time.perf_counter()
    if config.normalize.value != "none":  # Adam normalisation runs in-process only (featurize)
        raise ConfigError("--normalize adam: not supported with --append or --ray yet; featurize without them")
    with GradientProjector(run.model, run.groups, config.projection, cpu) as projector:
        group_dims = projector.group_dims()
        check_index_dim(sum(group_dims.values()), "featurize")
        groups = group_entries(run.groups, projector)
    shards = run.shards(config.shard_size)
    kept: dict[int, ShardInfo] = {}
    if resume:
        for index, start, stop in shards:
            info = completed_shard(path, index, run.run_key)
            if info is not None and info.rows == stop - start:
                kept[index] = info
    todo = [shard for shard in shards if shard[0] not in kept]
    results: dict[int, dict[str, Any]] = {}
    with tqdm(total=len(run.ids), desc="featurize (ray)", unit="ex", disable=not show_progress) as bar:
        bar.update(sum(stop - start for index, start, stop in shards if index in kept))
        if todo:
            with ray_session(address) as session:
                pool = _WorkerPool(session, task, config, checkpoint, device, limit, run.run_key, workers,
                                   cpus_per_worker, len(todo))
                logger.info("featurize on Ray: %d %s worker(s), %d of %d shards to do", pool.size, pool.device,
                            len(todo), len(shards))
                results = pool.run(str(path), todo, max_retries, set(fail_shards), bar)
    gram = GramAccumulator(group_dims, config.gram_max_dim)
    infos = []
    for index, start, stop in shards:
        if index in kept:
            info = kept[index]
            gram.update(read_written_shard(path, info, list(group_dims))[1])
        else:
            info = ShardInfo(**results[index]["info"])
            if completed_shard(path, index, run.run_key) != info or info.rows != stop - start:
                raise StoreMismatchError(
                    f"{path}: shard {info.path} does not verify after its worker reported it (size, sha256 or run "
                    "key differ); is the store on a filesystem every Ray node shares (or on object storage)?"
                )
            gram.add(results[index]["gram"], results[index]["rows"])
        infos.append(info.to_dict())
    remove_temporaries(path)
    extra = None
    if results:  # what this run did on Ray (a rerun with every shard kept did nothing there)
        extra = {"ray": {"workers": pool.size, "device": pool.device, "shards_run": len(results),
                         "nodes": len({r["node"] for r in results.values()}),
                         "startup_seconds": round(pool.startup_seconds, 3), "work_seconds": round(pool.work_seconds, 3)}}
    return commit_store(path, task, run, config, checkpoint, groups, infos, gram, time.perf_counter() - started,
                        extra)


class _WorkerPool:
    """Featurize actors kept busy shard after shard; dead ones are replaced."""

    def __init__(self, ray: Any, task: Task, config: FeaturizeConfig, checkpoint: str | Path | None, device: str,
                 limit: int | None, run_key: str, workers: int | None, cpus_per_worker: int, cap: int):
        self.ray = ray
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if device.startswith("cuda") and not gpus:
            raise ConfigError("featurize on Ray: --device cuda, but the Ray cluster has no GPUs (use cpu or auto)")
        if device != "cpu" and gpus:
            self.device, options = "cuda", {"num_gpus": 1, "num_cpus": cpus_per_worker}
            slots = gpus
        else:
            self.device, options = "cpu", {"num_cpus": cpus_per_worker}
            slots = max(1, int(resources.get("CPU", 1)) // cpus_per_worker)
        if workers is not None and workers > slots:
            logger.warning("%d workers asked, the Ray cluster has room for %d; using %d", workers, slots, slots)
        self.size = max(1, min(workers or slots, slots, cap))  # more would wait for resources forever
        spec = task.spec()
        target, _, name = spec["task"].rpartition(":")
        load_spec = f"{Path(target).resolve()}:{name}" if target.endswith(".py") else spec["task"]
        self.actor_class = ray.remote(FeaturizeWorker).options(**options, scheduling_strategy="SPREAD")
        self.args = (spec, load_spec, config.to_dict(), None if checkpoint is None else str(Path(checkpoint).resolve()),
                     self.device, cpus_per_worker, limit, run_key)
        started = time.perf_counter()
        self.actors = [self._start() for _ in range(self.size)]
        try:
            ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayError as err:
            self.close()
            cause = getattr(err, "cause", None)
            if isinstance(cause, GradIndexError):
                raise cause from None
            last = [line for line in str(err).strip().splitlines() if line.strip()][-1:] or [type(err).__name__]
            raise GradIndexError(f"a Ray featurize worker failed to start: {last[0].strip()}") from None
        self.startup_seconds = time.perf_counter() - started  # actors up: model, task and data loaded

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)

    def _start(self) -> Any:
        return self.actor_class.remote(*self.args)

    def run(self, store: str, todo: list[tuple[int, int, int]], max_retries: int, fail_shards: set[int],
            bar: Any) -> dict[int, dict[str, Any]]:
        ray = self.ray
        pending = deque(todo)
        attempts = {shard[0]: 0 for shard in todo}
        running: dict[Any, tuple[int, tuple[int, int, int]]] = {}
        results: dict[int, dict[str, Any]] = {}
        failed: dict[int, str] = {}

        def submit(slot: int) -> None:
            shard = pending.popleft()
            die = shard[0] in fail_shards and attempts[shard[0]] == 0
            attempts[shard[0]] += 1
            running[self.actors[slot].featurize_shard.remote(store, shard, die)] = (slot, shard)

        started = time.perf_counter()
        try:
            for slot in range(self.size):
                if pending:
                    submit(slot)
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                slot, shard = running.pop(ref)
                try:
                    results[shard[0]] = ray.get(ref)
                    bar.update(shard[2] - shard[1])
                except ray.exceptions.RayTaskError as err:
                    if isinstance(err.cause, GradIndexError):
                        raise err.cause from None
                    raise
                except ray.exceptions.RayActorError as err:
                    ray.kill(self.actors[slot], no_restart=True)
                    logger.warning("shard %d: Ray worker died (attempt %d of %d)", shard[0], attempts[shard[0]],
                                   max_retries + 1)
                    if attempts[shard[0]] <= max_retries:
                        pending.appendleft(shard)
                    else:
                        failed[shard[0]] = _first_line(err)
                    if pending:
                        self.actors[slot] = self._start()  # a fresh worker: loads the model again
                if pending:
                    submit(slot)
        finally:
            self.close()
            self.work_seconds = time.perf_counter() - started  # first shard sent to last shard back
        if failed:
            first = min(failed)
            raise GradIndexError(
                f"shard(s) {sorted(failed)}: the Ray worker died {max_retries + 1} time(s) ({failed[first]}); "
                f"{len(results)} shard(s) of this run completed and are kept; rerun with --resume to do the rest"
            )
        return results
