"""Kills injected at every rename of every store writer (issue 14).

Each writer (featurize, featurize --append, build-index, build-index --update, learn-weights)
runs on a fresh copy of its "before" store and is stopped at its n-th ``os.replace``/``os.rename``
for n = 1 .. all, two ways:

* ``kill``: in a forked child that ``os._exit``\\ s just before, and in another run just after,
  that rename (no ``finally``, no cleanup: a SIGKILL, or a power cut after the last fsync);
* ``full-disk``: in this process, the rename raises ``OSError(ENOSPC)`` (cleanup runs).

After each stop the store must be the old complete store or the new complete one (its rows,
its query answers), never broken, with no row lost or duplicated; running the writer again
must finish the job and leave no temporary files or unreferenced index folders.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from gradindex.config import IndexConfig, LearnConfig
from gradindex.errors import ArtifactNotFoundError, GradIndexError
from gradindex.features.run import featurize
from gradindex.features.append import featurize_append
from gradindex.index import build_index, list_parts, open_part
from gradindex.index.kinds import import_faiss
from gradindex.weights.learn import learn_weights
from gradindex.store.feature_store import FeatureStore
from gradindex.weights.group_weights import GroupWeights
from store_helpers import CONFIG, answers, copy_store, make_store, manifest, same_answers, temporaries
from tiny_task import TinyTask

KILLED = 86
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


class _Renames:
    """``os.replace``/``os.rename`` counting their calls and calling ``action`` at the ``at``-th
    (``after``: once that rename is done). Renames into ``GRADINDEX_HOME`` (the record of your own
    stores, gradindex.store.trust) are not the store's and are not counted: failing there is a warning
    by design (tests/test_store_trust.py)."""

    def __init__(self, at: int, action: Callable[[], None], after: bool = False):
        self.at, self.action, self.after, self.calls = at, action, after, 0
        self.real = {"replace": os.replace, "rename": os.rename}

    def _wrap(self, name):
        def call(src, dst, *args, **kwargs):
            home = os.environ.get("GRADINDEX_HOME")
            if home and os.path.abspath(dst).startswith(os.path.abspath(home) + os.sep):
                return self.real[name](src, dst, *args, **kwargs)
            self.calls += 1
            if self.calls == self.at and not self.after:
                self.action()
            result = self.real[name](src, dst, *args, **kwargs)
            if self.calls == self.at and self.after:
                self.action()
            return result
        return call

    def __enter__(self):
        os.replace, os.rename = self._wrap("replace"), self._wrap("rename")
        return self

    def __exit__(self, *exc):
        os.replace, os.rename = self.real["replace"], self.real["rename"]


def count_renames(op: Callable[[], None]) -> int:
    with _Renames(0, lambda: None) as renames:
        op()
    return renames.calls


def run_killed_at(op: Callable[[], None], at: int, after: bool = False) -> int:
    """Run ``op`` in a forked child that dies at its ``at``-th rename (``after``: right after it); the
    child's exit status."""
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            with _Renames(at, lambda: os._exit(KILLED), after):
                op()
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_full_disk_at(op: Callable[[], None], at: int) -> bool:
    """Run ``op`` here with its ``at``-th rename failing for lack of space; whether it failed."""

    def full():
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    try:
        with _Renames(at, full):
            op()
    except OSError as err:
        assert "injected" in str(err), err
        return True
    except GradIndexError as err:
        assert "injected" in str(err), err
        return True
    return False


# -- the stores before and after each writer -----------------------------------------------------------
@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    import_faiss().omp_set_num_threads(1)
    root = tmp_path_factory.mktemp("kills")
    out = {"root": root, "s0": make_store(root, "s0", limit=24), "full": make_store(root, "full")}
    out["appended"] = copy_store(out["s0"], root / "appended")
    featurize_append(TinyTask(), out["appended"], show_progress=False)
    out["updated"] = copy_store(out["appended"], root / "updated")
    build_index(FeatureStore.open(out["updated"]), IndexConfig(), update=True, show_progress=False)
    out["rebuilt"] = copy_store(out["full"], root / "rebuilt")
    build_index(FeatureStore.open(out["rebuilt"]), IndexConfig(preconditioner="identity"), show_progress=False)
    out["learned"] = copy_store(out["full"], root / "learned")
    learn_weights(FeatureStore.open(out["learned"], trust_task=True), LearnConfig(steps=5), show_progress=False)
    out["answers"] = {name: answers(out[name]) for name in ("s0", "full", "appended", "updated", "rebuilt")}
    out["ids"] = {name: _rows(out[name]) for name in ("s0", "full")}
    return out


def _rows(path: Path) -> np.ndarray:
    ids = FeatureStore.open(path).read(groups=[])[0]
    assert len(np.unique(ids)) == len(ids), "duplicated rows"
    return np.sort(ids)


def _index_rows(path: Path, concept: str = "all") -> np.ndarray:
    store = FeatureStore.open(path)
    ids = np.concatenate([open_part(store, concept, part).sample_ids for part in list_parts(store, concept)])
    assert len(np.unique(ids)) == len(ids), "duplicated index rows"
    return np.sort(ids)


def _clean(path: Path) -> None:
    """No temporaries, and every index folder is the one its concept's entry names."""
    assert not temporaries(path), temporaries(path)
    entries = manifest(path).get("indexes", {})
    for concept_dir in (path / "indexes").glob("*"):
        folders = sorted(str(p.relative_to(path)) for p in concept_dir.iterdir() if p.is_dir())
        assert folders == [entries[concept_dir.name]["folder"]], folders
    assert len(list(path.glob("gram*.npz"))) == 1


# -- the writers: (state before, the writer, check after a stop, recovery, final state) --------------------
def _featurize_scenario(refs, work: Path):
    checkpoint = refs["root"] / "tiny.pt"

    def op():
        featurize(TinyTask(), work, CONFIG, checkpoint=checkpoint, show_progress=False)

    def after_stop():
        try:
            FeatureStore.open(work)
        except ArtifactNotFoundError as err:
            assert "incomplete" in str(err)
            return "old"
        assert np.array_equal(_rows(work), refs["ids"]["full"])
        return "new"

    def recover():
        if not (work / "manifest.json").exists():
            featurize(TinyTask(), work, CONFIG, checkpoint=checkpoint, resume=True, show_progress=False)

    def final():
        assert np.array_equal(_rows(work), refs["ids"]["full"])
        shas = [s["sha256"] for s in manifest(work)["shards"]]
        assert shas == [s["sha256"] for s in manifest(refs["full"])["shards"]]
        assert not temporaries(work)

    return None, op, after_stop, recover, final


def _append_scenario(refs, work: Path):
    def op():
        featurize_append(TinyTask(), work, show_progress=False)

    def after_stop():
        rows = _rows(work)
        got = answers(work)
        if np.array_equal(rows, refs["ids"]["s0"]):
            assert same_answers(got, refs["answers"]["s0"])
            return "old"
        assert np.array_equal(rows, refs["ids"]["full"])
        assert same_answers(got, refs["answers"]["appended"])
        return "new"

    def recover():
        featurize_append(TinyTask(), work, show_progress=False)

    def final():
        assert np.array_equal(_rows(work), refs["ids"]["full"])
        assert same_answers(answers(work), refs["answers"]["appended"])
        _clean(work)

    return "s0", op, after_stop, recover, final


def _build_scenario(refs, work: Path):
    config = IndexConfig(preconditioner="identity")

    def op():
        build_index(FeatureStore.open(work), config, show_progress=False)

    def after_stop():
        got = answers(work)
        assert np.array_equal(_index_rows(work), refs["ids"]["full"])
        if same_answers(got, refs["answers"]["full"]):
            return "old"
        assert same_answers(got, refs["answers"]["rebuilt"])
        return "new"

    def recover():
        op()

    def final():
        assert same_answers(answers(work), refs["answers"]["rebuilt"])
        _clean(work)

    return "full", op, after_stop, recover, final


def _update_scenario(refs, work: Path):
    def op():
        build_index(FeatureStore.open(work), IndexConfig(), update=True, show_progress=False)

    def after_stop():
        got = answers(work)
        rows = _index_rows(work)
        if np.array_equal(rows, refs["ids"]["s0"]):
            assert same_answers(got, refs["answers"]["appended"])
            return "old"
        assert np.array_equal(rows, refs["ids"]["full"])
        assert same_answers(got, refs["answers"]["updated"])
        return "new"

    def recover():
        op()

    def final():
        assert np.array_equal(_index_rows(work), refs["ids"]["full"])
        assert same_answers(answers(work), refs["answers"]["updated"])
        _clean(work)

    return "appended", op, after_stop, recover, final


def _learn_scenario(refs, work: Path):
    groups = FeatureStore.open(refs["full"]).groups
    learned = GroupWeights.from_manifest(manifest(refs["learned"]), "all", groups).weights

    def op():
        learn_weights(FeatureStore.open(work, trust_task=True), LearnConfig(steps=5), show_progress=False)

    def after_stop():
        weights = GroupWeights.from_manifest(manifest(work), "all", groups).weights
        if weights == {g: 1.0 for g in groups}:
            return "old"
        assert weights == learned
        return "new"

    def recover():
        if after_stop() == "old":
            op()

    def final():
        assert GroupWeights.from_manifest(manifest(work), "all", groups).weights == learned
        assert same_answers(answers(work), refs["answers"]["full"])  # the index keeps its own weights
        _clean(work)

    return "full", op, after_stop, recover, final


SCENARIOS = {"featurize": _featurize_scenario, "append": _append_scenario, "build-index": _build_scenario,
             "build-index-update": _update_scenario, "learn-weights": _learn_scenario}


@pytest.mark.parametrize("how", ["kill", "full-disk"])
@pytest.mark.parametrize("writer", list(SCENARIOS))
def test_a_stop_at_every_rename_leaves_the_old_or_the_new_store(refs, tmp_path, writer, how):
    def fresh(name: str) -> tuple[Path, tuple]:
        work = tmp_path / name
        scenario = SCENARIOS[writer](refs, work)
        if scenario[0] is not None:
            copy_store(refs[scenario[0]], work)
        return work, scenario

    _, (_, op, _, _, final) = fresh("count")
    total = count_renames(op)
    final()
    assert total >= 1
    seen = set()
    stops = [(at, after) for at in range(1, total + 1) for after in ((False, True) if how == "kill" else (False,))]
    for at, after in stops:
        work, (_, op, after_stop, recover, final) = fresh(f"at-{at}-{'after' if after else 'before'}")
        if how == "kill":
            assert run_killed_at(op, at, after) == KILLED, f"{writer}: no kill at rename {at}"
        else:
            assert run_full_disk_at(op, at), f"{writer}: rename {at} did not fail"
        seen.add(after_stop())
        recover()
        final()
    print(f"{writer} {how}: {total} renames, {len(stops)} stops, states seen {sorted(seen)}")
    # the manifest is the last rename: stopped before it the store is the old one, after it the new one
    assert seen == ({"old", "new"} if how == "kill" else {"old"}), (writer, how, seen)
