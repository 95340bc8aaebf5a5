"""Regression tests for the CLI cases of issue 19's probe: each used to crash, print a traceback, or exit 0
with a wrong result; each is now one line on stderr and exit status 2 (or a correct result)."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from store_helpers import manifest, write_manifest


def cli(*args, env=None):
    return CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False, env=env)


def one_line_error(result, match: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert match in result.stderr, result.stderr


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """A 40-row digits store with a flat index, and a good query file beside it."""
    root = tmp_path_factory.mktemp("probe")
    assert cli("featurize", "digits", "--out", root / "store", "--limit", 40).exit_code == 0
    assert cli("build-index", root / "store").exit_code == 0
    from gradindex.task import load_task

    task = load_task("digits")
    np.savez(root / "queries.npz", x=task.split["x_test"][:3].reshape(3, 8, 8) * 16, y=task.split["y_test"][:3])
    return root / "store"


@pytest.fixture
def store(digits, tmp_path) -> Path:
    return Path(shutil.copytree(digits, tmp_path / "store"))


def test_hnsw_m_1_is_refused_before_anything_is_written(store):
    before = sorted(p.name for p in (store / "indexes" / "all").iterdir())
    one_line_error(cli("build-index", store, "--kind", "hnsw", "--hnsw-m", 1), "hnsw_m: expected at least 2")
    assert sorted(p.name for p in (store / "indexes" / "all").iterdir()) == before  # no orphan b-* folder


@pytest.mark.parametrize("value", ["null", '{"a":1}', "[1,2]", "1e400", "true", "1.5", '"7"', str(2**70)])
def test_task_option_json_values_of_the_wrong_type_are_one_line(tmp_path, value):
    one_line_error(cli("featurize", "digits", "--out", tmp_path / "s", "--limit", 5, "--task-option", f"seed={value}"),
                   "option seed expects int")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_learning_rate_beyond_float32_and_huge_regularization_name_their_flag(store):
    one_line_error(cli("learn-weights", store, "--lr", "1e39"), "LearnConfig.lr")
    result = cli("learn-weights", store, "--regularization", "1e300")
    one_line_error(result, "LearnConfig.regularization")
    assert "lr" not in result.stderr.replace("LearnConfig.regularization", "")


def _lying_npy(shape=(2**40, 64)) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(256)


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_a_lying_npy_header_is_one_line_in_query_and_eval_recall(store, tmp_path, kind):
    path = tmp_path / f"q.{kind}"
    if kind == "npy":
        path.write_bytes(_lying_npy())
    else:
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", _lying_npy())
            archive.writestr("y.npy", _lying_npy((2**40,)))
    assert path.stat().st_size < 1000
    one_line_error(cli("query", store, "--inputs", path), "header declares shape")
    one_line_error(cli("eval", "recall", store, "--inputs", path), "header declares shape")


def test_a_malformed_s3_endpoint_is_one_line(tmp_path):
    result = cli("info", "s3://bucket/store", env={"GRADINDEX_S3_ENDPOINT": "http://[::1"})
    one_line_error(result, "S3 endpoint 'http://[::1'")


# -- a store's built-in task options are data: they never make a command train or read a path ----------
def test_a_store_never_makes_query_train(store, digits, tmp_path):
    data = manifest(store)
    data["task"]["options"]["seed"] = 7  # a digits model nobody trained
    write_manifest(store, data)
    home = Path(os.environ["GRADINDEX_HOME"])
    before = sorted(p.name for p in home.rglob("*"))
    one_line_error(cli("query", store, "--inputs", digits.parent / "queries.npz"), "never makes a command train")
    assert sorted(p.name for p in home.rglob("*")) == before  # no checkpoint written


@pytest.mark.parametrize("option", [("seed", 0, "config", "/etc/passwd"), ("corpus", "/etc/passwd", None, None)])
def test_store_options_naming_paths_need_consent(store, digits, option):
    key, value, _, _ = option
    data = manifest(store)
    data["task"] = {"task": "lm", "options": {key: value}} if key == "corpus" else \
        {"task": "resnet", "options": {"config": "/etc/passwd"}}
    write_manifest(store, data)
    one_line_error(cli("query", store, "--inputs", digits.parent / "queries.npz"), "names a path")


# -- the smaller cases -------------------------------------------------------------------------------------
NOISY_TASK = '''
import warnings
import torch
from gradindex.task import Task


class Noisy(Task):
    def __init__(self, mode="warn"):
        self.options = {"mode": mode}
        if mode == "interrupt":
            raise KeyboardInterrupt
        if mode == "word":
            raise ValueError("unknown word " + "w" * 200_000)
        warnings.warn("a library warning")

    def load_model(self, checkpoint=None):
        return torch.nn.Linear(3, 2)
'''


@pytest.fixture
def noisy(tmp_path) -> str:
    (tmp_path / "noisy.py").write_text(NOISY_TASK)
    return f"{tmp_path / 'noisy.py'}:Noisy"


def test_quiet_silences_library_warnings(noisy):
    import subprocess
    import sys

    def run(*flags):  # a child process: pytest records warnings instead of printing them
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "gradindex", *flags, "groups", noisy], env=env, capture_output=True,
                              text=True, timeout=120)

    assert "a library warning" in run().stderr  # shown without -q
    quiet = run("-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_a_keyboard_interrupt_raised_by_a_task_module_is_one_line(noisy):
    one_line_error(cli("groups", noisy, "--task-option", "mode=interrupt"), "raised KeyboardInterrupt")


def test_a_200_kb_word_is_not_echoed_whole(tmp_path):
    result = cli("featurize", "digits", "--out", tmp_path / "s", "--task-option", "w" * 200_000 + "=1")
    one_line_error(result, "unknown option(s) www")
    assert len(result.stderr) < 2000 and "characters)" in result.stderr


def test_an_empty_gradindex_home_is_unset_not_the_current_folder(monkeypatch, tmp_path):
    from gradindex.store.storage import cache_root
    from gradindex.tasks.checkpoints import gradindex_home

    monkeypatch.setenv("GRADINDEX_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GRADINDEX_CACHE", raising=False)
    assert gradindex_home() == tmp_path / ".cache" / "gradindex"
    assert cache_root() == tmp_path / ".cache" / "gradindex" / "cache"
