"""Task code named by a store runs only with the user's consent; relative task specs are stored resolved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.errors import GradIndexError, TaskConsentError
from gradindex.query.attributor import Attributor
from gradindex.features.query import load_store_task
from gradindex.store.feature_store import FeatureStore
from gradindex.tasks.digits import DigitsTask
from store_helpers import TASK_SPEC, answers, copy_store, make_store, manifest, write_manifest
from tiny_task import TinyTask

HERE = Path(__file__).parent
PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("payload ran")
from tiny_task import TinyTask as Evil
"""


def cli(*args):
    return CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent")
    path = make_store(root)
    np.savez(root / "q.npz", x=TinyTask().x[40:44], y=TinyTask().y[40:44])
    return path


def crafted(base: Path, tmp_path: Path, how: str, monkeypatch) -> tuple[Path, Path, str]:
    """A copy of ``base`` whose manifest names a payload task that writes ``marker`` when imported."""
    store = copy_store(base, tmp_path / "store")
    marker = tmp_path / "marker.txt"
    if how == "module":
        folder = tmp_path / "modules"
        folder.mkdir()
        (folder / "gi_payload_mod.py").write_text(PAYLOAD.format(marker=str(marker)))
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.syspath_prepend(str(HERE))
        spec = "gi_payload_mod:Evil"
    else:
        (store / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
        monkeypatch.syspath_prepend(str(HERE))
        if how == "absolute":
            spec = f"{store / 'payload.py'}:Evil"
        else:  # relative, shipped inside the store and run from there
            monkeypatch.chdir(store)
            spec = "payload.py:Evil"
    data = manifest(store)
    data["task"]["task"] = spec
    data["task"]["options"] = {}
    write_manifest(store, data)
    return store, marker, spec


@pytest.mark.parametrize("how", ["absolute", "relative", "module"])
def test_a_store_naming_foreign_code_does_not_run_it_without_consent(base, tmp_path, monkeypatch, how):
    store, marker, spec = crafted(base, tmp_path, how, monkeypatch)
    queries = base.parent / "q.npz"
    for args in (["query", store, "--inputs", queries], ["learn-weights", store, "--steps", 2],
                 ["eval", "recall", store], ["eval", "precision", store, "--concept", "all"],
                 ["eval", "lds", store, "--models", 3]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "--trust-task" in lines[0] and spec in lines[0], result.stderr
        assert not marker.exists(), args
    with pytest.raises(TaskConsentError, match="trust_task=True"):
        Attributor.open(store)
    with pytest.raises(TaskConsentError):
        load_store_task(FeatureStore.open(store))
    assert not marker.exists()
    # a different --task is no consent
    result = cli("query", store, "--inputs", queries, "--task", TASK_SPEC)
    assert result.exit_code == 2 and "not" in result.stderr and not marker.exists()
    # with consent it runs (so the test above could fail)
    result = cli("query", store, "--inputs", queries, "--trust-task", "-k", 2)
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_the_same_task_spec_on_the_command_line_is_consent(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    queries = base.parent / "q.npz"
    result = cli("query", store, "--inputs", queries)
    assert result.exit_code == 2 and "--trust-task" in result.stderr
    spec = manifest(store)["task"]["task"]
    assert spec == "tiny_task:TinyTask"  # a module spec (tests/ is on sys.path)
    result = cli("query", store, "--inputs", queries, "--task", spec, "-k", 2)
    assert result.exit_code == 0, result.output
    assert Attributor.open(store, trust_task=True).task is not None
    assert answers(store)  # trust_task=True through the Python API


def test_builtin_tasks_need_no_consent(base, tmp_path):
    store = copy_store(base, tmp_path / "store")
    data = manifest(store)
    data["task"] = {"task": "digits", "options": {}}
    write_manifest(store, data)
    assert isinstance(load_store_task(FeatureStore.open(store)), DigitsTask)
    data["task"] = {"task": "gradindex.tasks.digits:DigitsTask", "options": {}}
    write_manifest(store, data)
    assert isinstance(load_store_task(FeatureStore.open(store)), DigitsTask)


def test_the_store_featurize_returns_trusts_its_own_task(tmp_path):
    path = make_store(tmp_path)
    store = FeatureStore.open(copy_store(path, tmp_path / "copy"))  # a copy elsewhere: foreign (test_store_trust.py)
    with pytest.raises(GradIndexError, match="--trust-task"):
        load_store_task(store)
    from gradindex.features.run import featurize
    from store_helpers import CONFIG

    written = featurize(TinyTask(), tmp_path / "again", CONFIG, checkpoint=tmp_path / "tiny.pt", show_progress=False)
    assert isinstance(load_store_task(written), TinyTask)


def test_a_relative_task_spec_is_stored_resolved(tmp_path, monkeypatch):
    checkpoint = TinyTask().train(tmp_path / "tiny.pt")
    monkeypatch.chdir(HERE)
    result = cli("featurize", "tiny_task.py:TinyTask", "--out", tmp_path / "store", "--checkpoint", checkpoint,
                 "--proj-dim", 4)
    assert result.exit_code == 0, result.output
    assert manifest(tmp_path / "store")["task"]["task"] == TASK_SPEC
    monkeypatch.chdir(tmp_path)
    assert cli("build-index", tmp_path / "store").exit_code == 0
    np.savez(tmp_path / "q.npz", x=TinyTask().x[40:44], y=TinyTask().y[40:44])
    result = cli("query", tmp_path / "store", "--inputs", tmp_path / "q.npz", "--task", TASK_SPEC, "-k", 2)
    assert result.exit_code == 0, result.output
    # a relative --task naming the same file from another folder is the same spec
    monkeypatch.chdir(HERE.parent)
    result = cli("query", tmp_path / "store", "--inputs", tmp_path / "q.npz", "--task", "tests/tiny_task.py:TinyTask",
                 "-k", 2)
    assert result.exit_code == 0, result.output
