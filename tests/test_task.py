"""Loading tasks from specs, the Task contract, model fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradindex.errors import ArtifactNotFoundError, ConfigError, TaskError
from gradindex.task import Task, default_queries, load_task, model_fingerprint
from gradindex.tasks.digits import DigitsTask

HERE = Path(__file__).parent


def test_builtin_file_and_module_specs():
    assert isinstance(load_task("digits"), DigitsTask) and load_task("digits-cnn").arch == "cnn"
    from_file = load_task(f"{HERE / 'tiny_task.py'}:TinyTask", {"seed": 2})
    from_module = load_task("tiny_task:TinyTask")
    assert type(from_file).__name__ == "TinyTask" and from_file.seed == 2
    assert from_module.spec() == {"task": "tiny_task:TinyTask", "options": {"seed": 0}}
    assert load_task(f"{HERE / 'tiny_task.py'}:TinyTask") is not from_file  # a fresh instance each time


@pytest.mark.parametrize(
    "spec,error,match",
    [
        ("nope", ConfigError, "built-in name"),
        ("missing_file.py:Task", ArtifactNotFoundError, "no such file"),
        ("no_such_module_xyz:Task", ArtifactNotFoundError, "cannot import module"),
        ("tiny_task:Missing", ConfigError, "defines no 'Missing'"),
        ("tiny_task:build_model", TaskError, "not a subclass"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        load_task(spec)


def test_broken_task_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TaskError, match="importing .*broken.py failed: RuntimeError: boom"):
        load_task(f"{path}:X")


def test_bad_options():
    with pytest.raises(ConfigError, match="arch must be one of"):
        load_task("digits", {"arch": "transformer"})
    with pytest.raises(ConfigError, match="cannot construct TinyTask"):
        load_task("tiny_task:TinyTask", {"colour": "red"})


def test_missing_methods_name_the_subclass():
    class Half(Task):
        pass

    with pytest.raises(NotImplementedError, match="Half must implement compute_train_loss"):
        Half().compute_train_loss(None, None)
    with pytest.raises(NotImplementedError, match="Half defines no concept measurement"):
        Half().concept_measurement(None, None, "style")
    with pytest.raises(NotImplementedError, match="Half defines no training routine"):
        Half().train("x.pt")


def test_fingerprint_tracks_parameters():
    model = torch.nn.Linear(3, 2)
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.bias[0] += 1e-6
    assert model_fingerprint(model) != before


def test_digits_checkpoint_errors(tmp_path):
    task = DigitsTask()
    with pytest.raises(ArtifactNotFoundError, match="tools/train_digits.py"):
        task.load_model(tmp_path / "none.pt")
    cnn = DigitsTask(arch="cnn").train(tmp_path / "cnn.pt", indices=range(50))
    with pytest.raises(Exception, match="holds a 'cnn' model"):
        task.load_model(cnn)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(Exception, match="not a digits checkpoint"):
        task.load_model(tmp_path / "junk.pt")


def test_default_queries_of_a_concept_are_the_tasks_concept_queries():
    class Plain(Task):
        def query_dataset(self):
            return ["all"]

    class WithConcepts(Plain):
        def concept_queries(self, concept):
            return [concept]

    assert default_queries(Plain(), "style") == ["all"] == default_queries(WithConcepts(), "all")
    assert default_queries(WithConcepts(), "style") == ["style"]
    with pytest.raises(ConfigError, match="--inputs"):
        default_queries(Task(), "style")
