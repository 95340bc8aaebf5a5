"""Regression tests for the CLI cases of issue 19's probe: each used to crash, print a traceback, or exit 0
with a wrong result; each is now one line on stderr and exit status 2 (or a correct result)."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gradindex.cli import main
from store_helpers import manifest, write_manifest
from cli_helpers import one_line_error  # noqa: E402


def cli(*args, env=None):
    return CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False, env=env)


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


# -- exit 0 with a wrong result ----------------------------------------------------------------------------
def test_lds_refuses_too_few_models_and_too_small_subsets(store, digits, tmp_path):
    for models in (1, 2):
        one_line_error(cli("eval", "lds", store, "--models", models), "at least 3")
    one_line_error(cli("eval", "lds", store, "--models", 3, "--fraction", 0.0001, "--cache", tmp_path / "c"),
                   "LDSConfig.fraction")


def test_lds_of_measurements_that_never_vary_is_undefined_not_zero():
    from gradindex.errors import ConfigError
    from gradindex.eval.lds import lds_per_query

    with pytest.raises(ConfigError, match="LDS is undefined"):
        lds_per_query(np.random.default_rng(0).normal(size=(4, 3)), np.ones((4, 3)))


def test_weights_plot_writes_the_format_its_name_says(store, tmp_path):
    assert cli("weights", "plot", store, "--out", tmp_path / "w.svg").exit_code == 0
    head = (tmp_path / "w.svg").read_bytes()[:200]
    assert b"<svg" in head or b"<?xml" in head, head[:20]
    assert cli("weights", "plot", store, "--out", tmp_path / "w.png").exit_code == 0
    assert (tmp_path / "w.png").read_bytes()[:4] == b"\x89PNG"
    one_line_error(cli("weights", "plot", store, "--out", tmp_path / "w.bmp"), "expected a file name ending in .png")


def _nan_gram(store: Path) -> None:
    """Every Gram matrix NaN, the manifest's checksum updated to match (a crafted or corrupted store)."""
    import hashlib

    data = manifest(store)
    path = store / data["gram"]["file"]
    with np.load(path) as arrays:
        grams = {name: np.full_like(arrays[name], np.nan) for name in arrays.files}
    buffer = io.BytesIO()
    np.savez(buffer, **grams)
    path.write_bytes(buffer.getvalue())
    data["gram"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    write_manifest(store, data)


def test_nan_in_the_gram_is_an_error_not_nan_scores(store, digits):
    _nan_gram(store)
    one_line_error(cli("query", store, "--inputs", digits.parent / "queries.npz", "--json"), "not finite")
    one_line_error(cli("learn-weights", store), "NaN")
    assert "weights" not in manifest(store) or not manifest(store)["weights"]


USER_TASKS = '''
import numpy as np
import torch
from tiny_task import TinyTask


class NegativeIds(TinyTask):
    def sample_ids(self, dataset):
        return np.arange(len(dataset), dtype=np.int64) - 5


class Empty(TinyTask):
    def train_dataset(self):
        return torch.utils.data.TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
'''


@pytest.mark.parametrize("name, match", [("NegativeIds", "sample_ids: expected integers in 0..2^63-1"),
                                         ("Empty", "is empty")])
def test_negative_ids_and_an_empty_training_set_are_refused(tmp_path, monkeypatch, name, match):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    (tmp_path / "user_tasks.py").write_text(USER_TASKS)
    one_line_error(cli("featurize", f"{tmp_path / 'user_tasks.py'}:{name}", "--out", tmp_path / "s"), match)
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("made_up, match", [(-5, "negative sample ids"), (10**12, "which the store does not hold")])
def test_made_up_ids_in_an_index_part_are_refused(store, digits, made_up, match):
    import hashlib

    data = manifest(store)
    part = data["indexes"]["all"]["parts"][0]
    ids_path = store / part["ids_file"]
    ids = np.load(ids_path)
    ids[:] = made_up - np.arange(len(ids)) if made_up > 0 else made_up  # every hit made up
    np.save(ids_path, ids)
    part["ids_sha256"] = hashlib.sha256(ids_path.read_bytes()).hexdigest()
    write_manifest(store, data)
    one_line_error(cli("query", store, "--inputs", digits.parent / "queries.npz", "--json"), match)
