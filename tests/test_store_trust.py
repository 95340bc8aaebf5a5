"""Trust that follows your own stores: featurize records the store and its task file in $GRADINDEX_HOME;
later commands run that task without --trust-task while the file is unchanged; a foreign store, a
changed file or a record someone else could have written still stop with one line saying which."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from store_helpers import copy_store, make_store
from tiny_task import TinyTask

from gradindex.cli import main
from gradindex.config import gradindex_home
from gradindex.errors import TaskConsentError
from gradindex.features.query import load_store_task
from gradindex.query.attributor import Attributor
from gradindex.store.feature_store import FeatureStore
from gradindex.store.trust import FOLDER, own_store_verdict, record_path, spec_file, store_identity

HERE = Path(__file__).parent


def cli(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture()
def own(tmp_path):
    """A store featurized through the CLI from a task file of our own (a copy of tiny_task.py), indexed."""
    task_file = tmp_path / "mytask.py"
    shutil.copy(HERE / "tiny_task.py", task_file)
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    spec = f"{task_file}:TinyTask"
    result = cli("featurize", spec, "--out", tmp_path / "store", "--checkpoint", checkpoint, "--proj-dim", 4,
                 "--shard-size", 16, "--limit", 32)
    assert result.exit_code == 0, result.output
    assert cli("build-index", tmp_path / "store").exit_code == 0
    np.savez(tmp_path / "q.npz", x=TinyTask().x[40:43], y=TinyTask().y[40:43])
    return tmp_path / "store", task_file, tmp_path / "q.npz", spec


def query(store, inputs, *extra):
    return cli("query", store, "--inputs", inputs, "-k", 2, "--json", *extra)


def one_line_refusal(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_your_own_store_needs_no_trust_task_and_answers_as_with_it(own):
    store, task_file, inputs, spec = own
    records = list((gradindex_home() / FOLDER).glob("*.json"))
    mine = [json.loads(p.read_text()) for p in records if json.loads(p.read_text())["task"] == spec]
    assert len(mine) == 1 and str(task_file.resolve()) in mine[0]["files"] and mine[0]["store"] == str(store)
    plain, trusted = query(store, inputs), query(store, inputs, "--trust-task")
    assert plain.exit_code == 0, plain.output
    assert plain.output == trusted.output
    assert cli("learn-weights", store, "--steps", 2).exit_code == 0
    assert isinstance(load_store_task(FeatureStore.open(store)), object)
    Attributor.open(store).close()  # the Python API too


def test_a_changed_task_file_stops_with_one_line_naming_it(own):
    store, task_file, inputs, _ = own
    task_file.write_text(task_file.read_text() + "\n# edited\n")
    line = one_line_refusal(query(store, inputs), str(task_file.resolve()), "changed", "--trust-task")
    assert "sha256" in line
    assert query(store, inputs, "--trust-task").exit_code == 0  # consent still works
    task_file.unlink()
    one_line_refusal(query(store, inputs), "is gone")


def test_a_copy_elsewhere_is_a_foreign_store(own, tmp_path):
    store, _, inputs, _ = own
    other = copy_store(store, tmp_path / "elsewhere")
    one_line_refusal(query(other, inputs), "not featurized by you", "--trust-task")
    with pytest.raises(TaskConsentError, match="not featurized by you"):
        Attributor.open(other)


def test_a_store_rewritten_in_place_from_other_data_is_foreign(own, tmp_path):
    store, task_file, inputs, spec = own
    manifest = json.loads((store / "manifest.json").read_text())
    assert own_store_verdict(store, manifest) == (True, "")
    changed = {**manifest, "shards": [{**manifest["shards"][0], "sha256": "0" * 64}, *manifest["shards"][1:]]}
    assert not own_store_verdict(store, changed)[0]
    renamed = {**manifest, "task": {**manifest["task"], "task": f"{tmp_path / 'evil.py'}:TinyTask"}}
    assert not own_store_verdict(store, renamed)[0]


def test_records_others_could_write_are_ignored(own):
    store, _, inputs, _ = own
    manifest = json.loads((store / "manifest.json").read_text())
    path = record_path(store_identity(store, manifest))
    path.chmod(0o666)
    one_line_refusal(query(store, inputs), "not featurized by you")
    path.chmod(0o600)
    assert query(store, inputs).exit_code == 0


def test_append_from_the_edited_file_records_it_again(own):
    store, task_file, inputs, spec = own
    task_file.write_text(task_file.read_text() + "\n# edited\n")
    one_line_refusal(query(store, inputs), "changed")
    result = cli("featurize", spec, "--out", store, "--append")
    assert result.exit_code == 0 and "appended 8 examples" in result.output, result.output
    assert query(store, inputs).exit_code == 0


def test_module_specs_are_recorded_and_located_without_running_code(tmp_path):
    path = make_store(tmp_path)  # featurized from tiny_task:TinyTask (tests/ is on sys.path)
    store = FeatureStore.open(path)
    assert store.manifest["task"]["task"] == "tiny_task:TinyTask"
    assert spec_file("tiny_task:TinyTask") == (HERE / "tiny_task.py").resolve()
    assert spec_file("no_such_module_here:X") is None
    assert isinstance(load_store_task(store), TinyTask)
    foreign = FeatureStore.open(copy_store(path, tmp_path / "copy"))
    with pytest.raises(TaskConsentError, match="not featurized by you"):
        load_store_task(foreign)


def test_builtin_tasks_record_the_store_without_files(tmp_path, monkeypatch):
    """A built-in task's code needs no consent, but what a store's options do does (read a path, train):
    your own built-in store is recorded (no files to hash), a copy elsewhere is not yours."""
    from gradindex.store.trust import record_own_store

    manifest = {"task": {"task": "digits"}, "run_key": "r", "shards": [{"sha256": "a"}]}
    path = record_own_store(tmp_path / "s", manifest, TinyTask())
    assert path is not None and json.loads(path.read_text())["files"] == {}
    assert own_store_verdict(tmp_path / "s", manifest) == (True, "")
    assert not own_store_verdict(tmp_path / "copy", manifest)[0]
    monkeypatch.setenv("GRADINDEX_HOME", str(tmp_path / "ro"))
    (tmp_path / "ro").write_text("not a folder")  # an unwritable home: a warning, no failure
    manifest["task"]["task"] = "tiny_task:TinyTask"
    assert record_own_store(tmp_path / "s", manifest, TinyTask()) is None
