"""Stores on object storage (``s3://``), against a real S3-compatible server on 127.0.0.1 (SeaweedFS,
tests/s3_server.py; skipped, saying why, where it cannot be started).

The reference is always the same work on a local folder: featurize writes the same bytes (every
shard, sidecar and the Gram file), ``--append`` too; build-index, learn-weights, query, serve and
eval answer the same. Index files are read from a local cache verified by sha256; a changed
cached copy or a changed object is refused with one line; a killed featurize leaves no
complete-looking store and ``--resume`` finishes it; bad locations, credentials and endpoints
are one line, quickly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import FeaturizeConfig, IndexConfig, ProjectionConfig, ServeConfig
from gradindex.errors import ArtifactNotFoundError, ConfigError, StoreMismatchError
from gradindex.features.run import featurize
from gradindex.features.append import featurize_append
from gradindex.index import build_index
from gradindex.store.storage import ObjectStorage, open_storage
from gradindex.store.feature_store import FeatureStore, writer_lock
from gradindex.task import load_task
from s3_server import BUCKET, round_winners
from store_helpers import CONFIG, answers, same_answers
from tiny_task import TinyTask

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{(Path(__file__).parent / 'tiny_task.py').resolve()}:TinyTask"


def new_uri() -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def objects(server, uri: str) -> dict[str, bytes]:
    """``{path in the store: bytes}`` of every object under ``uri`` (read with a plain pyarrow client)."""
    from pyarrow import fs

    base = uri[len("s3://"):]
    filesystem = server.filesystem()
    infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == fs.FileType.File:
            with filesystem.open_input_stream(info.path) as handle:
                out[info.path[len(base) + 1:]] = handle.read()
    return out


def local_files(folder: Path) -> dict[str, bytes]:
    """``{path: bytes}`` of a local store's files, less the lock files (object storage has leases instead)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".manifest.lock", ".writer.lock", ".lock")}


def same_store_bytes(server, uri: str, folder: Path) -> None:
    """Every file of the local store has an object of the same bytes, and no other object exists;
    the manifests agree but for the time featurize took."""
    remote, local = objects(server, uri), local_files(folder)
    assert sorted(remote) == sorted(local)
    for name in local:
        if name != "manifest.json":
            assert remote[name] == local[name], name
    drop = ("featurize_seconds", "appended")
    assert {k: v for k, v in json.loads(remote["manifest.json"]).items() if k not in drop} == \
        {k: v for k, v in json.loads(local["manifest.json"]).items() if k not in drop}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("s3-tiny") / "tiny.pt"
    TinyTask().train(path)
    return path


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["-q", *args])
    return result.exit_code, result.output


# -- featurize: the same bytes ----------------------------------------------------------------------
def test_featurize_and_append_to_s3_write_the_bytes_of_a_local_run(s3_env, tmp_path, checkpoint):
    uri = new_uri()
    local = featurize(TinyTask(), tmp_path / "local", CONFIG, checkpoint=checkpoint, show_progress=False)
    remote = featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, show_progress=False)
    assert remote.path == uri and isinstance(remote.storage, ObjectStorage)
    assert remote.manifest["shards"] == local.manifest["shards"]  # sha256, bytes, rows, run key of each shard
    assert remote.manifest["gram"] == local.manifest["gram"]
    same_store_bytes(s3_env, uri, tmp_path / "local")
    ids, feats = FeatureStore.open(uri).read()
    ref_ids, ref_feats = local.read()
    np.testing.assert_array_equal(ids, ref_ids)
    for group in ref_feats:
        np.testing.assert_array_equal(feats[group], ref_feats[group])
    grams, ref_grams = FeatureStore.open(uri).read_gram(), local.read_gram()
    assert sorted(grams) == sorted(ref_grams) == local.groups
    for group in ref_grams:
        np.testing.assert_array_equal(grams[group], ref_grams[group])

    # featurize --append: 24 rows first, the other 16 appended, on both
    uri = new_uri()
    featurize(TinyTask(), tmp_path / "appended", CONFIG, checkpoint=checkpoint, limit=24, show_progress=False)
    featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, limit=24, show_progress=False)
    local, added = featurize_append(TinyTask(), tmp_path / "appended", checkpoint=checkpoint, show_progress=False)
    remote, remote_added = featurize_append(TinyTask(), uri, checkpoint=checkpoint, show_progress=False)
    assert added == remote_added == 16 and remote.num_samples == 40
    assert remote.manifest["shards"] == local.manifest["shards"] and remote.manifest["gram"] == local.manifest["gram"]
    same_store_bytes(s3_env, uri, tmp_path / "appended")  # the replaced Gram file is gone from the bucket too


# -- reading: the same answers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_pair(tmp_path_factory, s3_server):
    """(local store folder, s3 URI, queries file, JSON inputs): 200 digits in 4 shards, on both."""
    root = tmp_path_factory.mktemp("s3-digits")
    task = load_task("digits")
    x = task.split["x_test"][:6].reshape(6, 8, 8) * 16.0
    y = task.split["y_test"][:6]
    np.savez(root / "queries.npz", x=x, y=y)
    uri = new_uri()
    config = FeaturizeConfig(projection=ProjectionConfig(proj_dim=32), shard_size=64)
    saved = dict(os.environ)
    os.environ.update(s3_server.env())
    try:
        featurize(task, root / "local", config, limit=200, show_progress=False)
        featurize(task, uri, config, limit=200, show_progress=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return root / "local", uri, root / "queries.npz", {"x": x.tolist(), "y": y.tolist()}


def test_learn_weights_build_index_query_and_eval_from_s3_answer_what_local_answers(s3_env, digits_pair):
    local, uri, queries, _ = digits_pair
    outputs = {}
    for store in (str(local), uri):
        steps = [["learn-weights", store, "--steps", "30", "--queries", "6", "--inputs", str(queries)],
                 ["build-index", store, "--kind", "flat", "--balance", "on", "--keep-vectors",
                  "--shards-per-part", "2"],
                 ["query", store, "--inputs", str(queries), "-k", "5", "--json"],
                 ["eval", "recall", store, "-k", "5", "--inputs", str(queries), "--json"],
                 ["info", store],
                 ["weights", "plot", store, "--out", str(queries.with_name(f"weights-{len(outputs)}.png"))]]
        outputs[store] = []
        for step in steps:
            code, output = cli(*step)
            assert code == 0, (step, output)
            outputs[store].append(output.replace(store, "STORE").replace("weights-1.png", "weights-0.png"))
    assert outputs[uri][1:] == outputs[str(local)][1:]  # the learned table may differ in its timing line only
    remote, reference = FeatureStore.open(uri), FeatureStore.open(local)
    assert _same_weights(remote.manifest["weights"], reference.manifest["weights"])
    parts, ref_parts = remote.manifest["indexes"]["all"]["parts"], reference.manifest["indexes"]["all"]["parts"]
    assert len(parts) == 2 and [{k: v for k, v in p.items() if k not in ("file", "ids_file", "vectors_file")}
                                for p in parts] == \
        [{k: v for k, v in p.items() if k not in ("file", "ids_file", "vectors_file")} for p in ref_parts]
    assert remote.manifest["indexes"]["all"]["transform"]["sha256"] == \
        reference.manifest["indexes"]["all"]["transform"]["sha256"]


def _same_weights(a: dict, b: dict) -> bool:
    strip = lambda w: {c: {s: v["weights"] for s, v in settings.items()} for c, settings in w.items()}  # noqa: E731
    return strip(a) == strip(b)


def test_serve_from_s3_answers_what_query_on_the_local_store_answers(s3_env, digits_pair):
    pytest.importorskip("fastapi")
    from gradindex.serve.app import create_app
    from gradindex.serve.engine import AttributionEngine
    from gradindex.serve.server import ServerThread
    from same_answer import assert_same_answers
    from test_serve import post, query_json

    local, uri, queries, inputs = digits_pair
    for store in (str(local), uri):
        for _ in range(2):  # a rebuild replaces the build folder; the old one is removed from the bucket too
            code, output = cli("build-index", store, "--kind", "flat", "--concept", "uniform")
            assert code == 0, output
    folder = FeatureStore.open(uri).manifest["indexes"]["uniform"]["folder"]
    assert {name.rsplit("/", 1)[0] for name in objects(s3_env, uri) if name.startswith("indexes/uniform/")} == {folder}
    engine = AttributionEngine.open(uri, ["uniform"], config=ServeConfig(max_wait_ms=0))
    with ServerThread(create_app(engine)) as running:
        status, body = post(running.url, {"inputs": inputs, "k": 4, "concept": "uniform"})
    engine.close()
    assert status == 200, body
    assert_same_answers(body["results"], query_json(local, queries, 4, concept="uniform"))


# -- the cache and checksums -------------------------------------------------------------------------
def test_index_files_come_from_a_verified_cache_and_changes_are_refused(s3_env, tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache"))
    uri = new_uri()
    store = featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, show_progress=False)
    build_index(store, IndexConfig(shards_per_part=2), show_progress=False)
    local = featurize(TinyTask(), tmp_path / "local", CONFIG, checkpoint=checkpoint, show_progress=False)
    build_index(local, IndexConfig(shards_per_part=2), show_progress=False)
    assert same_answers(answers(uri), answers(tmp_path / "local"))

    first = FeatureStore.open(uri, trust_task=True)
    answers(first)
    assert first.storage.downloads == 0  # every file came from the cache this time
    entry = first.manifest["indexes"]["all"]
    part = entry["parts"][0]
    cached = first.storage.cached_path(part["file"], part["sha256"])
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "cache"))
    data = bytearray(cached.read_bytes())
    data[-1] ^= 1
    cached.write_bytes(bytes(data))
    code, output = cli("eval", "recall", uri, "--trust-task", "-k", "3")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "checksum mismatch in the local cache" in output and str(cached) in output
    cached.unlink()  # the fix the message names: the next run downloads it again
    assert same_answers(answers(uri), answers(tmp_path / "local"))

    # an object changed on the server (same size) is refused when a machine downloads it
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "fresh-cache"))
    shard = store.manifest["shards"][1]["path"]
    filesystem = s3_env.filesystem()
    key = f"{uri[len('s3://'):]}/{shard}"
    with filesystem.open_input_stream(key) as handle:
        data = bytearray(handle.read())
    data[len(data) // 2] ^= 0x10
    with filesystem.open_output_stream(key) as handle:
        handle.write(bytes(data))
    with pytest.raises(StoreMismatchError, match="checksum mismatch in shards/part-00001"):
        FeatureStore.open(uri).read()
    code, output = cli("build-index", uri)
    assert code == 2 and "checksum mismatch in shards/part-00001" in output and len(output.strip().splitlines()) == 1
    assert not list((tmp_path / "fresh-cache").rglob("*part-00001*"))  # nothing unverified is kept


# -- a killed featurize, a second writer -------------------------------------------------------------
KILL_AFTER_TWO_SHARDS = """
import importlib, os, sys
featurize_module = importlib.import_module("gradindex.features.run")
from gradindex.cli import main
real, calls = featurize_module.write_shard, []
def write_shard(*args, **kwargs):
    info = real(*args, **kwargs)
    calls.append(info)
    if len(calls) == 2:
        os._exit(9)  # killed: no cleanup, no manifest, the writer's lease left behind
    return info
featurize_module.write_shard = write_shard
main(sys.argv[1:])
"""


def test_a_killed_featurize_leaves_no_complete_store_and_resume_finishes_it(s3_env, tmp_path, checkpoint):
    uri = new_uri()
    args = ["-q", "featurize", TINY, "--out", uri, "--checkpoint", str(checkpoint), "--batch-size", "8",
            "--shard-size", "8", "--proj-dim", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_TWO_SHARDS, *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    left = objects(s3_env, uri)
    assert "manifest.json" not in left and "shards/part-00001.parquet" in left and ".writer.lock" in left
    with pytest.raises(ArtifactNotFoundError, match="incomplete feature store"):
        FeatureStore.open(uri)
    code, output = cli("info", uri)
    assert code == 2 and "incomplete feature store" in output

    before = {k: v for k, v in left.items() if k.startswith("shards/")}
    time.sleep(3.5)  # the killed run's lease (GRADINDEX_LEASE_SECONDS=3) expires
    code, output = cli(*args[1:], "--resume")
    assert code == 0, output
    after = objects(s3_env, uri)
    assert all(after[k] == v for k, v in before.items())  # the two finished shards were kept
    code, output = cli(*[str(tmp_path / "local") if a == uri else a for a in args[1:]])  # the same run, locally
    assert code == 0, output
    assert FeatureStore.open(uri).manifest["shards"] == FeatureStore.open(tmp_path / "local").manifest["shards"]
    same_store_bytes(s3_env, uri, tmp_path / "local")


def test_a_second_writer_is_refused_while_the_first_holds_the_store(s3_env, checkpoint):
    uri = new_uri()
    with writer_lock(uri) as storage:
        assert ".writer.lock" in objects(s3_env, uri)
        with pytest.raises(ConfigError, match="another featurize is writing this store"):
            featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, show_progress=False)
        time.sleep(4)  # past the lease's ttl: the holder renewed it, so it still counts
        with pytest.raises(ConfigError, match="another featurize is writing this store"):
            featurize(TinyTask(), storage.location, CONFIG, checkpoint=checkpoint, show_progress=False)
    assert ".writer.lock" not in objects(s3_env, uri)  # released
    featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, show_progress=False)


# -- bad locations: one line, quickly ---------------------------------------------------------------
@pytest.mark.parametrize("location, expected", [
    ("s3://", "expected s3://BUCKET/PREFIX"),
    ("s3://Bad_Bucket/x", "expected s3://BUCKET/PREFIX"),
    (f"s3://{BUCKET}", "expected s3://BUCKET/PREFIX"),
    (f"s3://{BUCKET}/a/../b", "expected s3://BUCKET/PREFIX"),
    ("gs://bucket/prefix", "not gs://"),
    (f"s3://{BUCKET}/nothing-here", "no feature store at s3://"),
    ("s3://no-such-bucket-x/prefix", "no feature store at s3://"),
])
def test_bad_locations_are_one_line(s3_env, location, expected):
    code, output = cli("info", location)
    assert code == 2 and len(output.strip().splitlines()) == 1 and expected in output, output


def test_a_featurize_into_a_missing_bucket_is_one_line(s3_env, checkpoint):
    code, output = cli("featurize", TINY, "--out", "s3://no-such-bucket-x/p", "--checkpoint", str(checkpoint))
    assert code == 2 and "no bucket 'no-such-bucket-x'" in output and len(output.strip().splitlines()) == 1


def test_wrong_credentials_are_one_line(s3_env, digits_pair, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    started = time.monotonic()
    code, output = cli("info", digits_pair[1])
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "ACCESS_DENIED" in output or "AccessDenied" in output or "SignatureDoesNotMatch" in output, output
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("server", ["closed port", "silent server"])
def test_an_unreachable_endpoint_is_one_line_within_bounded_time(s3_env, monkeypatch, server):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if server == "silent server":
        listener.listen(16)  # accepts connections (the kernel does) and never answers
    else:
        listener.close()
    monkeypatch.setenv("GRADINDEX_S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("GRADINDEX_S3_TIMEOUT", "1")
    started = time.monotonic()
    try:
        code, output = cli("info", f"s3://{BUCKET}/anything")
    finally:
        listener.close()
    elapsed = time.monotonic() - started
    assert code == 2 and len(output.strip().splitlines()) == 1 and "GRADINDEX_S3_ENDPOINT" in output, output
    assert elapsed < 30, elapsed


def test_bad_endpoint_settings_are_one_line(s3_env, monkeypatch):
    monkeypatch.setenv("GRADINDEX_S3_ENDPOINT", "ftp://127.0.0.1:1/x")
    code, output = cli("info", f"s3://{BUCKET}/anything")
    assert code == 2 and "expected http(s)://HOST[:PORT]" in output
    monkeypatch.setenv("GRADINDEX_S3_ENDPOINT", s3_env.endpoint)
    monkeypatch.setenv("GRADINDEX_S3_TIMEOUT", "soon")
    code, output = cli("info", f"s3://{BUCKET}/anything")
    assert code == 2 and "GRADINDEX_S3_TIMEOUT='soon'" in output


def test_local_locations_are_untouched(tmp_path):
    """Paths and file:// URIs stay local stores (no pyarrow filesystem, no cache)."""
    assert open_storage(tmp_path).local and open_storage(f"file://{tmp_path}").root == tmp_path
    assert open_storage("relative/store").root == Path("relative/store")
    with pytest.raises(ConfigError, match="not hdfs://"):
        open_storage("hdfs://host/path")


KILL_BEFORE_INDEX_COMMIT = """
import importlib, os, sys
build = importlib.import_module("gradindex.index.build")
def killed(*args, **kwargs):
    os._exit(9)  # every part is in the bucket, the manifest not switched yet
build._commit_entry = killed
from gradindex.cli import main
main(sys.argv[1:])
"""


def test_a_killed_rebuild_leaves_the_old_index_answering_and_the_next_build_clears_it(s3_env, checkpoint):
    uri = new_uri()
    store = featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, show_progress=False)
    build_index(store, IndexConfig(shards_per_part=2), show_progress=False)
    before, entry = answers(uri), FeatureStore.open(uri).manifest["indexes"]["all"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    command = [sys.executable, "-c", KILL_BEFORE_INDEX_COMMIT, "-q", "build-index", uri, "--kind", "hnsw"]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    folders = {name.split("/")[2] for name in objects(s3_env, uri) if name.startswith("indexes/all/")}
    assert len(folders) == 2  # the killed build's folder is there, unlisted
    assert FeatureStore.open(uri).manifest["indexes"]["all"] == entry and same_answers(answers(uri), before)
    time.sleep(3.5)  # the killed builder's folder lease expires
    build_index(FeatureStore.open(uri), IndexConfig(shards_per_part=2), show_progress=False)
    left = {name.split("/")[2] for name in objects(s3_env, uri) if name.startswith("indexes/all/")}
    assert left == {FeatureStore.open(uri).manifest["indexes"]["all"]["folder"].split("/")[2]}
    assert same_answers(answers(uri), before)


@pytest.mark.parametrize("conditional", ["1", "0"])
def test_lease_objects_behave_like_the_local_locks(s3_env, monkeypatch, conditional):
    """Exact (conditional PUTs through botocore) and best effort (plain PUTs) alike."""
    monkeypatch.setenv("GRADINDEX_S3_CONDITIONAL", conditional)
    storage = open_storage(new_uri())
    if conditional == "1":
        pytest.importorskip("botocore")
        assert storage.conditional() is not None  # SeaweedFS honours If-None-Match / If-Match
    else:
        assert storage.conditional() is None
    with storage.lock("b/.lock", shared=True), storage.lock("b/.lock", shared=True):  # shared leases coexist
        with pytest.raises(BlockingIOError):
            with storage.lock("b/.lock", blocking=False):  # an exclusive one (a tidy) is refused meanwhile
                pass
    with storage.lock("b/.lock", blocking=False):
        with pytest.raises(BlockingIOError):
            with storage.lock("b/.lock", shared=True, blocking=False):
                pass
    assert storage.list("b") == {}  # every lease deleted on release
    stale = {"owner": "gone", "host": "elsewhere", "pid": 1, "renewed": time.time() - 10, "ttl": 3}
    storage.write_bytes("b/.lock", json.dumps(stale).encode())  # a killed holder's, not renewed for 10 s
    with storage.lock("b/.lock", blocking=False):
        pass


def test_exclusive_leases_are_exact_with_conditional_puts(s3_env):
    """Eight writers race for one lease at the same instant: exactly one gets it."""
    pytest.importorskip("botocore")
    storage = open_storage(new_uri())
    assert storage.conditional() is not None
    assert round_winners(storage.location, 8) == 1
    assert storage.list() == {}  # the winner's lease is gone


# -- eval lds ----------------------------------------------------------------------------------------------
def test_eval_lds_on_an_s3_store_equals_the_local_one(s3_env, tmp_path, checkpoint, monkeypatch):
    """The retrained models live in a local folder (--cache, or the store's local scratch folder for
    an s3:// store) and the LDS table is the local store's, number for number."""
    monkeypatch.setenv("GRADINDEX_CACHE", str(tmp_path / "cache"))
    uri = new_uri()
    featurize(TinyTask(), uri, CONFIG, checkpoint=checkpoint, show_progress=False)
    featurize(TinyTask(), tmp_path / "local", CONFIG, checkpoint=checkpoint, show_progress=False)
    args = ["--models", "4", "--workers", "1", "--split", "all", "--trust-task", "--json"]
    code, remote = cli("eval", "lds", uri, "--cache", str(tmp_path / "lds"), *args)
    assert code == 0, remote
    code, local = cli("eval", "lds", str(tmp_path / "local"), "--cache", str(tmp_path / "lds"), *args)
    assert code == 0, local
    rows = json.loads(remote)
    assert rows == json.loads(local) and "uniform" in {row["attribution"] for row in rows}
    code, default_cache = cli("eval", "lds", uri, *args)  # no --cache: a local folder, never the bucket
    assert code == 0 and json.loads(default_cache) == rows, default_cache
    assert not [name for name in objects(s3_env, uri) if name.startswith("lds")]
