"""Data safety of the store: names and paths stay inside it, rebuilds and appends are atomic,
concurrent writers serialise, crafted or damaged files are refused with one line (issue 14)."""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import gradindex.index.build as index_build
import gradindex.features.projection as projection
from gradindex.cli import main
from gradindex.config import FeaturizeConfig, IndexConfig, LearnConfig, ProjectionConfig
from gradindex.errors import ConfigError, GradIndexError, StoreMismatchError
from gradindex.features.run import featurize
from gradindex.features.append import featurize_append
from gradindex.index import GradIndex, build_index
from gradindex.weights.learn import learn_weights
from gradindex.query.attributor import Attributor, metadata_lookup
from gradindex.store.feature_store import MANIFEST, FeatureStore, commit_manifest, prepare_store, write_shard
from gradindex.weights.group_weights import GroupWeights, save_weights
from store_helpers import (
    CONFIG, answers, census, copy_store, make_store, manifest, minimal_manifest, same_answers, stored_ids,
    temporaries, write_manifest,
)
from tiny_task import CrashingTask, TinyTask
from cli_helpers import one_line_error  # noqa: E402


def cli(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny store with the gram index 'all' (never modified: tests work on copies)."""
    return make_store(tmp_path_factory.mktemp("safety"))


@pytest.fixture
def store(base, tmp_path) -> Path:
    return copy_store(base, tmp_path / "store")


# -- 1. concept names never leave STORE/indexes ------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "", "a\\b", "/tmp", ".hidden", "x\x00y", "a" * 200])
def test_unsafe_concept_names_are_refused_by_the_config(name):
    with pytest.raises(ConfigError, match="IndexConfig.concept"):
        IndexConfig(concept=name)


def test_build_index_concept_dotdot_deletes_nothing(store):
    (store / "notes.txt").write_text("mine")
    before = census(store)
    one_line_error(cli("build-index", store, "--concept", ".."), "concept")
    one_line_error(cli("build-index", store, "--concept", "../shards"), "concept")
    assert census(store) == before


def test_concept_folder_that_escapes_through_a_symlink_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (store / "indexes" / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(GradIndexError, match="outside"):
        build_index(FeatureStore.open(store), IndexConfig(concept="evil"), show_progress=False)
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]


# -- 2. rebuilds are atomic ---------------------------------------------------------------------------
def test_rebuild_that_fails_midway_leaves_the_old_index_queryable(store, monkeypatch):
    old = answers(store)
    old_manifest = manifest(store)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_build, "write_index", full_disk)
    with pytest.raises(OSError):
        build_index(FeatureStore.open(store), IndexConfig(preconditioner="identity"), show_progress=False)
    monkeypatch.undo()
    assert manifest(store) == old_manifest
    assert same_answers(answers(store), old)
    assert not temporaries(store)
    # the failed build's folder is gone; a clean rebuild works and switches the answers
    build_index(FeatureStore.open(store), IndexConfig(preconditioner="identity"), show_progress=False)
    assert not same_answers(answers(store), old)
    entry = manifest(store)["indexes"]["all"]
    folders = [p for p in (store / "indexes" / "all").iterdir() if p.is_dir()]
    assert [str(p.relative_to(store)) for p in folders] == [entry["folder"]]


def test_queries_keep_working_during_a_rebuild(store, monkeypatch):
    old = answers(store)
    seen = []
    real_add = index_build.PartBuilder.add

    def add_and_query(self, vectors):
        if not seen:
            seen.append(answers(store))  # a query while the rebuild is half done
        return real_add(self, vectors)

    monkeypatch.setattr(index_build.PartBuilder, "add", add_and_query)
    build_index(FeatureStore.open(store), IndexConfig(preconditioner="identity"), show_progress=False)
    assert seen and same_answers(seen[0], old)


def test_a_reader_of_the_previous_manifest_retries_after_a_rebuild(store):
    reader = FeatureStore.open(store)  # holds the manifest listing the old index
    build_index(FeatureStore.open(store), IndexConfig(preconditioner="identity"), show_progress=False)
    index = GradIndex.open(reader, "all")  # the old files are gone; it rereads the manifest
    assert index.config.preconditioner.value == "identity"


# -- 3. featurize --append killed between the gram and the manifest -------------------------------------
def test_append_killed_before_the_manifest_keeps_a_store_that_queries_and_appends(tmp_path, monkeypatch):
    path = make_store(tmp_path, limit=24)
    old = answers(path)
    real_replace = os.replace

    def kill_at_manifest(src, dst, *args, **kwargs):
        if Path(dst).name == MANIFEST:
            raise KeyboardInterrupt("killed before the manifest rename")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", kill_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        featurize_append(TinyTask(), path, show_progress=False)
    monkeypatch.undo()
    assert len(stored_ids(path)) == 24
    assert same_answers(answers(path), old)
    store, added = featurize_append(TinyTask(), path, show_progress=False)
    assert added == 16 and sorted(stored_ids(path)) == sorted(TinyTask().sample_ids(TinyTask().train_dataset()))
    assert store.read_gram()
    assert not temporaries(path)
    assert len(list(path.glob("gram*.npz"))) == 1


# -- 4. concurrency -------------------------------------------------------------------------------------
def test_manifest_updates_from_stale_readers_are_not_lost(store):
    first, second = FeatureStore.open(store), FeatureStore.open(store)  # both read the manifest now
    groups = first.groups
    info = {"method": "test", "config": LearnConfig().to_dict()}
    save_weights(first, GroupWeights("all", {g: 2.0 for g in groups}, info))
    save_weights(second, GroupWeights("first", {g: 3.0 for g in groups}, info))
    weights = manifest(store)["weights"]
    assert set(weights) == {"all", "first"}
    assert "all" in manifest(store)["indexes"]  # and nothing else of the manifest is lost


class BlockingTask(TinyTask):
    """Waits on ``gate`` in its first training-loss call (a featurize paused mid-run)."""

    def __init__(self, started: threading.Event, gate: threading.Event):
        super().__init__()
        self.started, self.gate, self.calls = started, gate, 0

    def compute_train_loss(self, batch, model):
        self.calls += 1
        if self.calls == 2:
            self.started.set()
            assert self.gate.wait(30)
        return super().compute_train_loss(batch, model)


def test_second_featurize_into_one_store_is_refused_while_the_first_runs(tmp_path):
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    started, gate = threading.Event(), threading.Event()
    errors = []

    def first():
        try:
            featurize(BlockingTask(started, gate), tmp_path / "store", CONFIG, checkpoint=checkpoint,
                      show_progress=False)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(30)
    try:
        other = FeaturizeConfig(batch_size=8, shard_size=8, projection=ProjectionConfig(proj_dim=4, seed=5))
        with pytest.raises(ConfigError, match="another featurize"):
            featurize(TinyTask(), tmp_path / "store", other, checkpoint=checkpoint, show_progress=False,
                      overwrite=True)
        with pytest.raises(ConfigError, match="another featurize"):
            featurize(TinyTask(), tmp_path / "store", other, checkpoint=checkpoint, show_progress=False, resume=True)
    finally:
        gate.set()
        thread.join(60)
    assert not errors
    clean = make_store(tmp_path, "clean", index=None)
    assert [s["sha256"] for s in manifest(tmp_path / "store")["shards"]] == \
        [s["sha256"] for s in manifest(clean)["shards"]]


def test_commit_refuses_shards_written_by_another_run(tmp_path, monkeypatch):
    """A shard replaced behind the writer's back (no lock on that filesystem) is not committed."""
    featurize_module = importlib.import_module("gradindex.features.run")  # the package re-exports the function
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    real_commit = featurize_module.commit_store

    def swap_then_commit(path, *args, **kwargs):
        write_shard(path, 1, np.arange(8) + 5000, {"hidden": np.zeros((8, 4), np.float32),
                                                   "out": np.zeros((8, 4), np.float32)}, {"label": np.zeros(8, int)},
                    run_key="other-run")
        return real_commit(path, *args, **kwargs)

    monkeypatch.setattr(featurize_module, "commit_store", swap_then_commit)
    with pytest.raises(StoreMismatchError, match="another run"):
        featurize(TinyTask(), tmp_path / "store", CONFIG, checkpoint=checkpoint, show_progress=False)
    assert not (tmp_path / "store" / MANIFEST).exists()


@pytest.mark.parametrize("first", ["gram", "identity"])
def test_two_concurrent_builds_leave_a_consistent_index(store, monkeypatch, first):
    """Both builds train and pause mid-part; one commits, then the other: the last one's entry stands,
    complete, and the first one's cleanup deleted nothing the other still needed."""
    configs = {"gram": IndexConfig(damping=0.5), "identity": IndexConfig(preconditioner="identity")}
    started = {name: threading.Event() for name in configs}
    gates = {name: threading.Event() for name in configs}
    errors = []
    real_add = index_build.PartBuilder.add

    def add(self, vectors):
        name = threading.current_thread().name
        if name in gates and not started[name].is_set():
            started[name].set()
            assert gates[name].wait(30)
        return real_add(self, vectors)

    monkeypatch.setattr(index_build.PartBuilder, "add", add)

    def build(name):
        try:
            build_index(FeatureStore.open(store), configs[name], show_progress=False)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = {name: threading.Thread(target=build, args=(name,), name=name) for name in configs}
    for name, thread in threads.items():
        thread.start()
        assert started[name].wait(30)
    last = "identity" if first == "gram" else "gram"
    for name in (first, last):
        gates[name].set()
        threads[name].join(60)
    assert not errors, errors
    entry = manifest(store)["indexes"]["all"]
    assert entry["config"]["preconditioner"] == configs[last].preconditioner.value
    answers(store)  # every file the manifest lists exists and verifies
    folders = [p for p in (store / "indexes" / "all").iterdir() if p.is_dir()]
    assert [str(p.relative_to(store)) for p in folders] == [entry["folder"]]


# -- 5. temporaries of a killed run ----------------------------------------------------------------------
def test_resume_removes_the_temporaries_of_a_killed_run(tmp_path):
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    path = tmp_path / "store"
    prepare_store(path)
    (path / "shards" / ".part-00001.parquet.tmp-deadbeef").write_bytes(b"PAR1" + bytes(64))
    (path / ".manifest.json.tmp-deadbeef").write_text("{")
    featurize(TinyTask(), path, CONFIG, checkpoint=checkpoint, resume=True, show_progress=False)
    assert not temporaries(path)


# -- 7. manifest paths stay inside the store ---------------------------------------------------------------
def _point_outside(store: Path, outside: Path, how: str, field: str) -> None:
    """Copy the file ``field`` names to ``outside`` and point the manifest there (checksums stay valid)."""
    data = manifest(store)
    entry = data["indexes"]["all"]
    part = entry["parts"][0]
    holders = {
        "shard": (data["shards"][0], "path"),
        "gram": (data["gram"], "file"),
        "part": (part, "file"),
        "ids": (part, "ids_file"),
        "trained": (entry["trained"], "file"),
    }
    holder, key = holders[field]
    relative = holder[key]
    source = store / relative
    copy = outside / Path(relative).name
    shutil.copy(source, copy)
    if how == "dotdot":
        holder[key] = os.path.relpath(copy, store)
    elif how == "absolute":
        holder[key] = str(copy)
    else:  # a symlink inside the store pointing outside
        source.unlink()
        source.symlink_to(copy)
    write_manifest(store, data)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("field", ["shard", "gram", "part", "ids", "trained"])
def test_manifest_paths_outside_the_store_are_refused(store, tmp_path, how, field):
    outside = tmp_path / "outside"
    outside.mkdir()
    _point_outside(store, outside, how, field)
    with pytest.raises(StoreMismatchError, match="outside the store|not a relative path"):
        opened = FeatureStore.open(store)
        opened.read()
        opened.read_gram()
        GradIndex.open(opened, "all")
        build_index(opened, IndexConfig(), update=True, show_progress=False)


# -- 10. garbage files whose checksums match ----------------------------------------------------------------
def _replace_with_garbage(store: Path, relative: str, holder: dict, sha_key: str, bytes_key: str | None) -> None:
    garbage = b"this is not the file you are looking for" * 10
    (store / relative).write_bytes(garbage)
    holder[sha_key] = hashlib.sha256(garbage).hexdigest()
    if bytes_key:
        holder[bytes_key] = len(garbage)


@pytest.mark.parametrize("field", ["shard", "part", "ids", "trained", "gram"])
def test_garbage_with_a_matching_checksum_is_one_clear_error(store, field):
    data = manifest(store)
    entry = data["indexes"]["all"]
    part = entry["parts"][0]
    if field == "shard":
        _replace_with_garbage(store, data["shards"][0]["path"], data["shards"][0], "sha256", "bytes")
    elif field == "part":
        _replace_with_garbage(store, part["file"], part, "sha256", "bytes")
    elif field == "ids":
        _replace_with_garbage(store, part["ids_file"], part, "ids_sha256", None)
    elif field == "trained":
        _replace_with_garbage(store, entry["trained"]["file"], entry["trained"], "sha256", None)
    else:
        _replace_with_garbage(store, data["gram"]["file"], data["gram"], "sha256", None)
    write_manifest(store, data)

    def use():
        opened = FeatureStore.open(store)
        opened.read()
        opened.read_gram()
        GradIndex.open(opened, "all")
        build_index(opened, IndexConfig(), update=True, show_progress=False)

    with pytest.raises(StoreMismatchError, match="not a readable"):
        use()
    args = ["build-index", store, "--update"] if field == "trained" else ["eval", "recall", store, "--trust-task"]
    one_line_error(cli(*args), "not a readable")


# -- 12. row counts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("also_rows", [False, True])
def test_a_removed_row_is_detected_when_the_store_is_opened(store, also_rows):
    data = manifest(store)
    shard = data["shards"][1]
    file = store / shard["path"]
    table = pq.read_table(file)
    pq.write_table(table.slice(0, table.num_rows - 1), file, compression="none")
    shard["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    shard["bytes"] = file.stat().st_size
    if also_rows:
        shard["rows"] -= 1
    write_manifest(store, data)
    with pytest.raises(StoreMismatchError, match="rows"):
        FeatureStore.open(store).read()
    one_line_error(cli("build-index", store), "rows")


# -- 15. the weights an index was built with ------------------------------------------------------------------
def test_query_warns_when_the_weights_changed_after_the_build(store):
    assert cli("learn-weights", store, "--trust-task", "--steps", 5).exit_code == 0
    np.savez(store.parent / "q.npz", x=TinyTask().x[40:44], y=TinyTask().y[40:44])
    result = cli("query", store, "--inputs", store.parent / "q.npz", "--trust-task", "-k", 2, "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "weights" in line]
    assert len(warnings) == 1 and "build-index" in warnings[0], result.stderr
    entry = manifest(store)["indexes"]["all"]
    assert entry["weights_digest"] and entry["config"]["damping"] == 0.1
    info = cli("info", store)
    assert entry["weights_digest"] in info.output
    current = GroupWeights.from_manifest(manifest(store), "all", FeatureStore.open(store).groups)
    assert current.digest() in info.output and current.digest() != entry["weights_digest"]
    assert cli("build-index", store).exit_code == 0
    again = cli("query", store, "--inputs", store.parent / "q.npz", "--trust-task", "-k", 2, "--json")
    assert again.exit_code == 0 and "weights" not in again.stderr


# -- 16. weights per preconditioner, reset, the reserved concept 'uniform' -------------------------------------
def test_weights_are_kept_per_setting_and_can_be_reset(store):
    opened = FeatureStore.open(store, trust_task=True)
    gram = learn_weights(opened, LearnConfig(steps=5), show_progress=False)
    identity = learn_weights(opened, LearnConfig(steps=5, preconditioner="identity"), show_progress=False)
    groups = opened.groups
    data = manifest(store)
    assert GroupWeights.from_manifest(data, "all", groups).weights == gram.weights
    assert GroupWeights.from_manifest(data, "all", groups, "identity", 0.1).weights == identity.weights
    # an identity index uses the identity weights, a gram index with another damping uniform ones
    assert build_index(FeatureStore.open(store), IndexConfig(preconditioner="identity"),
                       show_progress=False).weights.weights == identity.weights
    assert build_index(FeatureStore.open(store), IndexConfig(damping=0.5),
                       show_progress=False).weights.weights == {g: 1.0 for g in groups}
    result = cli("learn-weights", store, "--reset")
    assert result.exit_code == 0 and "uniform" in result.output
    assert GroupWeights.from_manifest(manifest(store), "all", groups).weights == {g: 1.0 for g in groups}
    assert not manifest(store).get("weights", {}).get("all")


def test_concept_uniform_indexes_uniform_weights_and_queries(store):
    opened = FeatureStore.open(store, trust_task=True)
    learn_weights(opened, LearnConfig(steps=5), show_progress=False)
    assert cli("build-index", store, "--concept", "uniform").exit_code == 0
    np.savez(store.parent / "q.npz", x=TinyTask().x[40:44], y=TinyTask().y[40:44])
    result = cli("query", store, "--inputs", store.parent / "q.npz", "--concept", "uniform", "--trust-task",
                 "-k", 3, "--json")
    assert result.exit_code == 0, result.output
    uniform = [[r["sample_id"] for r in json.loads(line)["results"]] for line in result.output.splitlines()]
    # the same as the 'all' index built with uniform weights (the base store's index)
    base_ids, _ = answers(store, "all", k=3)
    assert uniform == base_ids[:4].tolist()
    one_line_error(cli("learn-weights", store, "--concept", "uniform", "--trust-task"), "reserved")


# -- 19. the projection format ------------------------------------------------------------------------------
def test_a_store_of_another_projection_format_is_refused(store, monkeypatch):
    assert manifest(store)["projection_format"]["chunk_bytes"] == projection.CHUNK_BYTES
    monkeypatch.setattr(projection, "CHUNK_BYTES", projection.CHUNK_BYTES // 2)
    with pytest.raises(StoreMismatchError, match="projection format"):
        Attributor.open(store, trust_task=True)
    with pytest.raises(StoreMismatchError, match="projection format"):
        featurize_append(TinyTask(), store, show_progress=False)


# -- missing tests named by the issue ------------------------------------------------------------------------
def test_metadata_lookup_with_unsorted_ids(tmp_path):
    path = tmp_path / "store"
    prepare_store(path)
    ids = np.array([70, 10, 50, 30, 90, 20], dtype=np.int64)
    labels = np.array([7, 1, 5, 3, 9, 2])
    features = {"g": np.zeros((6, 2), np.float32)}
    shards = [write_shard(path, 0, ids[:3], {"g": features["g"][:3]}, {"label": labels[:3]}),
              write_shard(path, 1, ids[3:], {"g": features["g"][3:]}, {"label": labels[3:]})]
    commit_manifest(path, minimal_manifest(shards, {"g": 2}, metadata_columns=["label"]))
    store = FeatureStore.open(path)
    wanted = np.array([[90, 10, -1], [20, 70, 55]])
    got = metadata_lookup(store, wanted)["label"]
    assert got.tolist() == [[9, 1, None], [2, 7, None]]


def test_resume_refuses_the_shards_of_another_run_when_groups_are_projected(tmp_path):
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    with pytest.raises(KeyboardInterrupt):
        featurize(CrashingTask(crash_at=3), tmp_path / "store", CONFIG, checkpoint=checkpoint, show_progress=False)
    assert (tmp_path / "store" / "shards" / "part-00001.json").exists()  # two shards of seed 0 landed
    other = FeaturizeConfig(batch_size=8, shard_size=8, projection=ProjectionConfig(proj_dim=4, seed=9))
    resumed = featurize(TinyTask(), tmp_path / "store", other, checkpoint=checkpoint, resume=True,
                        show_progress=False)
    clean = featurize(TinyTask(), tmp_path / "clean", other, checkpoint=checkpoint, show_progress=False)
    seed0 = featurize(TinyTask(), tmp_path / "seed0", CONFIG, checkpoint=checkpoint, show_progress=False)
    for group, block in clean.read()[1].items():
        assert not np.allclose(seed0.read()[1][group], block)  # the seed changes the projected features
        np.testing.assert_array_equal(resumed.read()[1][group], block)


# -- stores of format version 1 ------------------------------------------------------------------------------
def _as_version_1(store: Path) -> None:
    """Rewrite a store in the version-1 layout: gram.npz, index files in indexes/<concept>/, weights
    without settings, no projection format."""
    data = manifest(store)
    (store / data["gram"]["file"]).rename(store / "gram.npz")
    del data["gram"]["file"]
    for concept, entry in data["indexes"].items():
        folder = store / entry.pop("folder")
        entry.pop("weights_digest")
        for file in folder.iterdir():
            file.rename(store / "indexes" / concept / file.name)
        folder.rmdir()
        entry["trained"]["file"] = f"indexes/{concept}/trained.faiss"
        for part in entry["parts"]:
            part["file"] = f"indexes/{concept}/{Path(part['file']).name}"
            part["ids_file"] = f"indexes/{concept}/{Path(part['ids_file']).name}"
            (store / "indexes" / concept / f"{part['name']}.json").write_text(json.dumps(part))  # its sidecar
    data["weights"] = {concept: next(iter(settings.values())) for concept, settings in data.get("weights", {}).items()}
    del data["projection_format"]
    data["format_version"] = 1
    write_manifest(store, data)


def test_a_version_1_store_is_read_and_upgraded(tmp_path):
    path = make_store(tmp_path, limit=24, index=None)
    learn_weights(FeatureStore.open(path, trust_task=True), LearnConfig(steps=5), show_progress=False)
    build_index(FeatureStore.open(path), IndexConfig(), show_progress=False)
    before = answers(path)
    learned = GroupWeights.from_manifest(manifest(path), "all", FeatureStore.open(path).groups)
    _as_version_1(path)
    assert manifest(path)["format_version"] == 1
    assert same_answers(answers(path), before)
    upgraded = FeatureStore.open(path).manifest
    assert GroupWeights.from_manifest(upgraded, "all", learned.weights).weights == learned.weights
    featurize_append(TinyTask(), path, show_progress=False)  # rewrites the manifest: version 2 from here on
    build_index(FeatureStore.open(path), IndexConfig(), update=True, show_progress=False)
    data = manifest(path)
    assert data["format_version"] == 2 and list(data["weights"]["all"]) == ["gram@0.1"]
    assert data["projection_format"] == {"version": 1, "chunk_bytes": 1 << 26}
    assert data["indexes"]["all"]["ntotal"] == 40 and len(answers(path)[0]) == 8
    build_index(FeatureStore.open(path), IndexConfig(), show_progress=False)  # a fresh build: old files go
    assert sorted(p.name for p in (path / "indexes" / "all").iterdir() if p.name != ".lock") == \
        [Path(manifest(path)["indexes"]["all"]["folder"]).name]
    assert [p.name for p in path.glob("gram*.npz")] == [manifest(path)["gram"]["file"]]


# -- featurize --out into a folder that is not a store (issue 19: it deleted DIR/indexes/ recursively) -----
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_featurize_into_a_users_folder_deletes_nothing(tmp_path, monkeypatch):
    """The issue's reproduction: ``mkdir -p d/indexes; echo x > d/indexes/thesis.tex;
    gradindex featurize digits --out d --limit 5`` — the file used to be gone, exit 0."""
    monkeypatch.chdir(tmp_path)
    Path("d/indexes").mkdir(parents=True)
    Path("d/indexes/thesis.tex").write_text("x\n")
    one_line_error(cli("featurize", "digits", "--out", "d", "--limit", 5), "not empty and holds no feature store")
    assert Path("d/indexes/thesis.tex").read_text() == "x\n" and not Path("d/manifest.json").exists()
    result = cli("featurize", "digits", "--out", "d", "--limit", 5, "--overwrite")
    assert result.exit_code == 0, result.output
    assert Path("d/indexes/thesis.tex").read_text() == "x\n" and FeatureStore.open("d").num_samples == 5


@pytest.mark.parametrize("user_file", ["notes.txt", "shards/keep.parquet", "indexes/all/mine.faiss",
                                       "indexes/all/b-1234/README", "gram-mine.npz", "data/x.csv"])
def test_overwrite_replaces_only_what_a_store_wrote(base, store, user_file):
    builds = [p for p in (store / "indexes" / "all").iterdir() if p.name.startswith("b-")]
    assert builds
    (store / user_file).parent.mkdir(parents=True, exist_ok=True)
    (store / user_file).write_bytes(b"mine")
    featurize(TinyTask(), store, CONFIG, checkpoint=base.parent / "tiny.pt", overwrite=True, show_progress=False)
    assert (store / user_file).read_bytes() == b"mine"
    assert not any(p.exists() for p in builds)  # the old index builds went; the user's file stayed
    assert FeatureStore.open(store).manifest.get("indexes", {}) == {}


def test_a_non_store_folder_is_refused_by_the_api_too_and_an_empty_one_is_fine(tmp_path):
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "a.jpg").write_bytes(b"jpg")
    before = _tree(folder)
    with pytest.raises(ConfigError, match=r"not empty and holds no feature store \('2024/'\)"):
        featurize(TinyTask(), folder, CONFIG, checkpoint=checkpoint, show_progress=False)
    with pytest.raises(ConfigError, match="not empty and holds no feature store"):
        featurize(TinyTask(), folder, CONFIG, checkpoint=checkpoint, resume=True, show_progress=False)
    assert {k: v for k, v in _tree(folder).items() if not k.startswith(".")} == before
    (tmp_path / "empty").mkdir()
    assert featurize(TinyTask(), tmp_path / "empty", CONFIG, checkpoint=checkpoint, show_progress=False).num_samples
