"""Bad input, CLI errors and surprises (issue 14, items 9-18): each ends in one line on stderr and
exit status 2 (never a traceback), and the surprises a new user hit are gone."""

from __future__ import annotations

import errno
import json
import socket
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.config import (
    MAX_INDEX_DIM,
    IndexConfig,
    LDSConfig,
    LearnConfig,
    SearchConfig,
    check_damping,
    check_index_dim,
    parse_device,
)
from gradindex.errors import ConfigError
from gradindex.features.query import query_group_features
from gradindex.store.feature_store import FeatureStore
from store_helpers import cli_store
from tiny_task import TinyTask
from cli_helpers import one_line_error  # noqa: E402

HERE = Path(__file__).parent
TASK = f"{HERE / 'tiny_task.py'}:TinyTask"


#: commands that run the store's task: these tests' stores are their own (a file task), so they consent
TRUSTING = ("query", "learn-weights", "eval", "serve", "tune")


def run(*args, quiet: bool = True):
    args = [*map(str, args), *(["--trust-task"] if args and args[0] in TRUSTING else [])]
    return CliRunner().invoke(main, [*(["-q"] if quiet else []), *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A TinyTask store with a flat index, its checkpoint and a query file."""
    return cli_store(tmp_path_factory.mktemp("errors"), run)


def write_task(folder: Path, body: str, name: str = "user_task.py") -> str:
    """A task file subclassing TinyTask; returns its spec."""
    path = folder / name
    path.write_text("import sys\nimport torch\nfrom gradindex.task import Task\nfrom tiny_task import TinyTask\n\n"
                    + textwrap.dedent(body))
    return f"{path}:UserTask"


# -- usage errors -------------------------------------------------------------------------------------------
def test_usage_errors_are_one_line_and_bare_groups_still_show_their_help(tmp_path):
    one_line_error(run("featurize", TASK, "--out", tmp_path / "s", "--proj-dim", "abc"),
                   "featurize: Invalid value for '--proj-dim'", "--help")
    one_line_error(run("query"), "Missing argument 'STORE'")
    one_line_error(run("nosuch"), "No such command 'nosuch'")
    one_line_error(CliRunner().invoke(main, ["--bogus"]), "No such option '--bogus'")
    for group in ([], ["eval"]):
        shown = CliRunner().invoke(main, group)
        assert "Usage:" in shown.output and "Commands:" in shown.output and "error:" not in shown.output


# -- item 9: devices, task options, errors inside user task code, sys.exit -------------------------------
def test_device_strings_are_checked_once_in_config():
    for good in ("cpu", "cuda", "cuda:1", "mps"):
        assert parse_device(good) == good
    assert parse_device("auto", allow_auto=True) == "auto"
    for bad in ("nosuch", "", "CPU", "cuda:", "cuda:-1", "cuda:x", "auto", None, 3):
        with pytest.raises(ConfigError, match="expected a torch device"):
            parse_device(bad)


def test_bad_or_absent_device_is_one_line(built):
    root, _ = built
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--device", "nosuch"),
                   "--device", "nosuch")
    one_line_error(run("featurize", TASK, "--out", root / "x", "--device", "gpu"), "expected a torch device")
    if not torch.cuda.is_available():
        one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--device", "cuda"),
                       "no CUDA device")
        one_line_error(run("featurize", TASK, "--out", root / "x", "--device", "cuda:0"), "no CUDA device")
        one_line_error(run("eval", "lds", root / "store", "--device", "cuda", "--models", 3), "no CUDA device")
    assert not (root / "x" / "manifest.json").exists()


def test_unknown_option_of_a_builtin_task_lists_the_accepted_ones(tmp_path):
    line = one_line_error(run("featurize", "digits", "--out", tmp_path / "s", "--task-option", "colour=red"),
                          "unknown option(s) colour")
    assert "arch" in line and "seed" in line
    one_line_error(run("groups", "lm", "--task-option", "widht=8"), "widht", "width")


@pytest.mark.parametrize("hook, body, what", [
    ("UserTask.__init__", """
        class UserTask(TinyTask):
            def __init__(self, seed=0):
                raise ValueError("constructor broke")
        """, "ValueError: constructor broke"),
    ("UserTask.load_model", """
        class UserTask(TinyTask):
            def load_model(self, checkpoint):
                return {}["missing"]
        """, "KeyError"),
    ("UserTask.compute_train_loss", """
        class UserTask(TinyTask):
            def compute_train_loss(self, batch, model):
                x, y = batch
                return model(x[:, :3]).sum(1)
        """, "RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    ("UserTask.__init__", """
        class UserTask(TinyTask):
            def __init__(self, seed=0):
                sys.exit(7)
        """, "called sys.exit(7)"),
    ("UserTask.compute_train_loss", """
        class UserTask(TinyTask):
            def compute_train_loss(self, batch, model):
                sys.exit(7)
        """, "called sys.exit(7)"),
])
def test_errors_in_user_task_code_name_the_hook_and_the_line(built, tmp_path, hook, body, what):
    _, checkpoint = built
    spec = write_task(tmp_path, body)
    line = one_line_error(run("featurize", spec, "--out", tmp_path / "s", "--checkpoint", checkpoint),
                          f"task hook {hook}", what)
    source = spec.rpartition(":")[0]
    number = next(i for i, text in enumerate(Path(source).read_text().splitlines(), start=1)
                  if "raise" in text or "return {}" in text or "sys.exit(7)" in text or "x[:, :3]" in text)
    assert line.endswith(f"({source}:{number})"), line


def test_a_loss_without_gradient_is_one_line(built, tmp_path):
    _, checkpoint = built
    spec = write_task(tmp_path, """
        class UserTask(TinyTask):
            def compute_train_loss(self, batch, model):
                return torch.zeros(len(batch[0]))
        """)
    one_line_error(run("featurize", spec, "--out", tmp_path / "s", "--checkpoint", checkpoint),
                   "UserTask.compute_train_loss", "has no gradient")


def test_a_task_module_calling_sys_exit_exits_2_not_7(tmp_path):
    spec = write_task(tmp_path, "sys.exit(7)\n")
    one_line_error(run("featurize", spec, "--out", tmp_path / "s"), "importing", "sys.exit(7)", "user_task.py:6")


# -- item 10: unreadable query files, out-of-vocabulary ids, non-UTF-8, full disk ---------------------------
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x93NUMPY garbage"])
def test_empty_or_corrupt_npz_is_one_line_for_the_builtin_readers(tmp_path, content):
    from gradindex.task import load_task

    path = tmp_path / "q.npz"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="q.npz"):
        load_task("digits").load_queries(path)
    with pytest.raises(ConfigError, match="q.npz"):
        load_task("diffusion", {"num_train": 8}).load_queries(path)


def test_empty_npz_on_the_cli_is_one_line_not_aborted(built, tmp_path):
    root, _ = built
    (tmp_path / "q.npz").write_bytes(b"")
    result = run("query", root / "store", "--inputs", tmp_path / "q.npz")
    assert "Aborted" not in result.output  # the tiny task's own reader: the error names it
    one_line_error(result, "task hook TinyTask.load_queries raised EOFError", "tiny_task.py:")


def test_truncated_npz_is_one_line(built, tmp_path):
    root, _ = built
    data = (root / "queries.npz").read_bytes()
    (tmp_path / "q.npz").write_bytes(data[: len(data) // 2])
    one_line_error(run("query", root / "store", "--inputs", tmp_path / "q.npz"), "TinyTask.load_queries")


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory):
    from lm_reference import write_tiny_corpus

    from gradindex.task import load_task

    corpus = write_tiny_corpus(tmp_path_factory.mktemp("lm") / "corpus.json")
    return load_task("lm", {"corpus": str(corpus), "width": 16, "layers": 1, "heads": 2})


def test_out_of_vocabulary_token_ids_are_refused(lm_task, tmp_path):
    path = tmp_path / "q.jsonl"
    good = {"prompt_ids": [1, 2], "completion_ids": [lm_task.vocab_size - 1]}
    path.write_text(json.dumps(good) + "\n")
    assert len(lm_task.load_queries(path)) == 1
    for key in ("prompt_ids", "completion_ids"):
        path.write_text(json.dumps({**good, key: [3, lm_task.vocab_size]}) + "\n")
        with pytest.raises(ConfigError, match=f"{key}.*outside the model's vocabulary"):
            lm_task.load_queries(path)


def test_non_utf8_jsonl_is_one_error(lm_task, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"prompt_ids": [1], "completion_ids": [2]}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(ConfigError, match=r"q.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        lm_task.load_queries(path)
    path.write_bytes(b'\xef\xbb\xbf{"prompt_ids": [1], "completion_ids": [2]}\n')  # a BOM is fine
    assert len(lm_task.load_queries(path)) == 1


def test_full_disk_during_featurize_is_one_line_and_leaves_no_complete_store(built, tmp_path, monkeypatch):
    import pyarrow.parquet

    _, checkpoint = built
    real = pyarrow.parquet.write_table
    calls = []

    def full_disk(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:  # the second shard: the disk is full half-way through the file
            Path(where).write_bytes(b"PAR1 half")
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        return real(table, where, **kwargs)

    monkeypatch.setattr(pyarrow.parquet, "write_table", full_disk)
    out = tmp_path / "store"
    one_line_error(run("featurize", TASK, "--out", out, "--checkpoint", checkpoint, "--proj-dim", 8,
                       "--shard-size", 16), "No space left on device")
    assert not (out / "manifest.json").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the half-written shard is gone
    one_line_error(run("query", out, "--inputs", tmp_path / "q.npz"), "incomplete feature store")


def test_read_only_folder_is_one_line(built, tmp_path, monkeypatch):
    import gradindex.store.feature_store as store_module

    root, checkpoint = built

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(store_module, "prepare_store", read_only)
    monkeypatch.setattr(sys.modules["gradindex.features.run"], "prepare_store", read_only)
    one_line_error(run("featurize", TASK, "--out", tmp_path / "ro", "--checkpoint", checkpoint),
                   "Read-only file system", str(tmp_path / "ro"))
    monkeypatch.setattr(store_module.np.lib.format, "open_memmap", read_only)
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--all", "--out",
                       tmp_path / "s.npy"), "Read-only file system")
    assert not list(tmp_path.glob("*s.npy*")) and not list(tmp_path.glob("*.tmp-*"))


# -- item 11: non-finite and out-of-range numbers ----------------------------------------------------------
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, -1e-9, 1e7, True, "0.1"])
def test_damping_must_be_finite_and_in_range(value):
    for make in (lambda: IndexConfig(damping=value), lambda: LearnConfig(damping=value),
                 lambda: check_damping(value)):
        with pytest.raises(ConfigError, match="damping: expected a finite number"):
            make()
    assert check_damping(0) == 0.0 and check_damping(1e6) == 1e6


@pytest.mark.parametrize("field, value", [
    ("regularization", float("inf")), ("regularization", -1.0), ("lr", float("nan")), ("lr", 0.0),
    ("lr", float("inf")), ("steps", 10**9), ("top_k", 4096),
])
def test_learn_config_refuses_out_of_range(field, value):
    with pytest.raises(ConfigError, match=f"LearnConfig.{field}"):
        LearnConfig(**{field: value})


@pytest.mark.parametrize("config", [
    lambda: LDSConfig(fraction=float("nan")), lambda: LDSConfig(fraction=float("inf")), lambda: LDSConfig(fraction=1),
    lambda: LDSConfig(num_models=10**9), lambda: IndexConfig(bands=10**6), lambda: IndexConfig(nlist=2**40),
    lambda: IndexConfig(seed=2**40), lambda: IndexConfig(hnsw_m=10**6), lambda: SearchConfig(ef_search=2**31),
])
def test_knobs_that_would_only_exhaust_memory_are_refused(config):
    with pytest.raises(ConfigError, match="expected"):
        config()


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "-inf", "1e400"])
def test_damping_flags_are_one_line(built, value):
    root, _ = built
    one_line_error(run("build-index", root / "store", "--damping", value), "damping")
    one_line_error(run("learn-weights", root / "store", "--damping", value), "damping")
    one_line_error(run("eval", "lds", root / "store", "--damping", value), "damping")
    assert FeatureStore.open(root / "store").manifest["indexes"]["all"]["config"]["damping"] == 0.1


# -- item 12: --top-k beyond the reference sample; no default queries ----------------------------------------
def test_top_k_as_large_as_the_reference_sample_is_refused(built):
    root, _ = built
    one_line_error(run("learn-weights", root / "store", "--top-k", 40), "top_k 40", "40 training examples")
    one_line_error(run("learn-weights", root / "store", "--top-k", 9, "--reference-size", 9), "LearnConfig.top_k")
    assert "weights" not in FeatureStore.open(root / "store").manifest


@pytest.fixture(scope="module")
def bare_store(built, tmp_path_factory):
    """A store of a task with neither default queries nor a training routine."""
    _, checkpoint = built
    folder = tmp_path_factory.mktemp("bare")
    spec = write_task(folder, """
        class UserTask(TinyTask):
            query_dataset = Task.query_dataset
            train = Task.train
        """)
    assert run("featurize", spec, "--out", folder / "store", "--checkpoint", checkpoint, "--proj-dim", 4).exit_code == 0
    assert run("build-index", folder / "store").exit_code == 0
    return folder / "store"


def test_no_default_queries_asks_for_inputs(bare_store, built):
    root, _ = built
    one_line_error(run("learn-weights", bare_store), "no default queries", "--inputs")
    one_line_error(run("eval", "recall", bare_store), "no default queries", "--inputs")
    assert run("eval", "recall", bare_store, "--inputs", root / "queries.npz").exit_code == 0


# -- item 13: an unreachable Ray address times out -----------------------------------------------------------
def test_unreachable_ray_address_is_one_line_within_the_timeout(built):
    pytest.importorskip("ray")
    root, _ = built
    with socket.socket() as probe:  # a port on 127.0.0.1 where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--ray", f"127.0.0.1:{port}"),
                   f"127.0.0.1:{port}", "no Ray cluster answers")
    one_line_error(run("featurize", TASK, "--out", root / "r", "--ray", f"ray://127.0.0.1:{port}", "--ray-timeout",
                       "2"), "no Ray cluster answers")
    assert time.perf_counter() - started < 30
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--ray", "nohost"),
                   "expected auto, HOST:PORT")
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--ray-timeout", "inf"),
                   "--ray-timeout")


def test_ray_session_probes_the_address_too():
    pytest.importorskip("ray")
    from gradindex.features.distributed import check_ray_address, ray_session

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        with ray_session(f"127.0.0.1:{port}"):
            pass
    check_ray_address("local")
    check_ray_address(None)


# -- item 14: LDS needs train(); FAISS's width limit ----------------------------------------------------------
def test_eval_lds_without_a_training_routine_refuses_up_front(bare_store, built):
    root, _ = built
    one_line_error(run("eval", "lds", bare_store, "--inputs", root / "queries.npz", "--models", 3),
                   "defines no train", "retrain")
    assert not (bare_store / "lds").exists()


def test_tune_without_a_training_routine_refuses_up_front(bare_store):
    one_line_error(run("tune", bare_store, "--budget", 8), "defines no train", "tune")
    assert not (bare_store / "lds").exists()


def test_task_code_failing_in_an_lds_worker_process_is_one_line(built, tmp_path):
    root, checkpoint = built
    spec = write_task(tmp_path, """
        class UserTask(TinyTask):
            def train(self, path, indices=None, seed=0):
                raise ValueError("no training today")
        """)
    assert run("featurize", spec, "--out", tmp_path / "s", "--checkpoint", checkpoint, "--proj-dim", 4).exit_code == 0
    line = one_line_error(run("eval", "lds", tmp_path / "s", "--inputs", root / "queries.npz", "--models", 3,
                              "--workers", 2), "LDS worker: task code (train) raised ValueError: no training today")
    assert line.endswith(f"({tmp_path / 'user_task.py'}:9)"), line


def test_the_hf_task_has_no_training_routine():
    pytest.importorskip("transformers")
    from gradindex.task import Task
    from gradindex.integrations.hf import HFCausalLMTask

    assert HFCausalLMTask.train is Task.train  # so `eval lds` refuses it up front (test above)


def test_faiss_reads_back_2_20_dimensions_and_not_more(tmp_path):
    faiss = pytest.importorskip("faiss")
    for dim, readable in ((MAX_INDEX_DIM, True), (MAX_INDEX_DIM + 1, False)):
        index = faiss.IndexFlatIP(dim)
        index.add(np.ones((1, dim), np.float32))
        faiss.write_index(index, str(tmp_path / "x.faiss"))
        if readable:
            assert faiss.read_index(str(tmp_path / "x.faiss")).d == dim
        else:
            with pytest.raises(RuntimeError):
                faiss.read_index(str(tmp_path / "x.faiss"))
    check_index_dim(MAX_INDEX_DIM, "here")
    with pytest.raises(ConfigError, match="2\\^20"):
        check_index_dim(MAX_INDEX_DIM + 1, "here")


def test_identity_projection_wider_than_faiss_is_refused_at_featurize(tmp_path):
    spec = write_task(tmp_path, """
        class UserTask(TinyTask):
            def load_model(self, checkpoint):
                return torch.nn.Sequential(torch.nn.Linear(4, 1024), torch.nn.Linear(1024, 1024),
                                           torch.nn.Linear(1024, 3))

            def compute_train_loss(self, batch, model):
                return model(batch[0]).sum(1)
        """)
    started = time.perf_counter()
    one_line_error(run("featurize", spec, "--out", tmp_path / "s", "--proj-kind", "identity"),
                   "1,057,795 dimensions", "--proj-kind gaussian")
    assert time.perf_counter() - started < 20
    assert not (tmp_path / "s" / "manifest.json").exists()


# -- item 17: query --all ------------------------------------------------------------------------------------
def test_query_all_equals_brute_force_scores(built, tmp_path):
    root, _ = built
    store = FeatureStore.open(root / "store", trust_task=True)
    result = run("query", root / "store", "--inputs", root / "queries.npz", "--all", "--out", tmp_path / "s.npy")
    assert result.exit_code == 0, result.output
    matrix = np.load(tmp_path / "s.npy")
    ids = np.load(tmp_path / "s.sample_ids.npy")
    assert matrix.shape == (4, 40) and matrix.dtype == np.float32
    # brute force: Σ_g w_g (−ψ_g(q))·φ_g(x) group by group (uniform weights, the index's Gram setting)
    queries = TinyTask().load_queries(root / "queries.npz")
    psi = query_group_features(store, queries)
    stored_ids, feats = store.read()
    expected = sum(psi[g].astype(np.float64) @ feats[g].astype(np.float64).T for g in store.groups)
    assert (ids == stored_ids).all()
    np.testing.assert_allclose(matrix, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # and the top-k of `query` (FAISS) are the largest entries of each row
    lines = run("query", root / "store", "--inputs", root / "queries.npz", "-k", 40, "--json").output.splitlines()
    for q, line in enumerate(lines):
        results = json.loads(line)["results"]
        by_id = dict(zip(ids.tolist(), matrix[q].tolist()))
        for r in results:
            assert by_id[r["sample_id"]] == pytest.approx(r["score"], rel=1e-4, abs=1e-4)
    # parquet: a row per training example, the transpose
    assert run("query", root / "store", "--inputs", root / "queries.npz", "--all", "--out",
               tmp_path / "s.parquet").exit_code == 0
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["sample_id", "scores"]
    assert (table.column("sample_id").to_numpy() == ids).all()
    np.testing.assert_array_equal(np.stack(table.column("scores").to_numpy(zero_copy_only=False)), matrix.T)


def test_query_all_refuses_other_outputs(built, tmp_path):
    root, _ = built
    for name in ("s.csv", "s", "s.npz"):
        one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--all", "--out",
                           tmp_path / name), "expected a file name ending in .npy or .parquet")
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--all"), "--all and --out")
    one_line_error(run("query", root / "store", "--inputs", root / "queries.npz", "--out", tmp_path / "s.npy"),
                   "--all and --out")
    assert not list(tmp_path.iterdir())


# -- item 18: quiet FAISS, info, captions, eval lds says what it does ----------------------------------------
def test_faiss_kmeans_warnings_are_silent_under_q_and_one_line_otherwise(built, tmp_path, capfd):
    import shutil

    root, _ = built
    shutil.copytree(root / "store", tmp_path / "store")
    capfd.readouterr()
    quiet = run("build-index", tmp_path / "store", "--kind", "ivf", "--nlist", 4)
    assert quiet.exit_code == 0 and quiet.stderr == ""
    loud = run("build-index", tmp_path / "store", "--kind", "ivf", "--nlist", 4, quiet=False)
    assert loud.exit_code == 0
    assert "WARNING clustering" not in capfd.readouterr().err  # FAISS writes to fd 2 directly
    assert loud.stderr.count("k-means: 40 training vectors for 4 direction cells") == 1


def test_info_shows_damping_only_for_gram(built, tmp_path):
    import shutil

    root, _ = built
    shutil.copytree(root / "store", tmp_path / "store")
    assert run("build-index", tmp_path / "store", "--preconditioner", "identity").exit_code == 0
    info = run("info", tmp_path / "store").output
    assert "index 'all': flat, identity," in info and "identity (damping" not in info
    assert run("build-index", tmp_path / "store").exit_code == 0
    assert "index 'all': flat, gram (damping 0.1)," in run("info", tmp_path / "store").output


def test_query_table_has_no_blank_caption(built, tmp_path):
    _, checkpoint = built
    spec = write_task(tmp_path, """
        class UserTask(TinyTask):
            describe = Task.describe
        """)
    assert run("featurize", spec, "--out", tmp_path / "s", "--checkpoint", checkpoint, "--proj-dim", 4).exit_code == 0
    assert run("build-index", tmp_path / "s").exit_code == 0
    np.savez(tmp_path / "q.npz", x=TinyTask().x[40:42], y=TinyTask().y[40:42])
    lines = run("query", tmp_path / "s", "--inputs", tmp_path / "q.npz", "-k", 2).output.splitlines()
    assert "query 0" in lines and "query 1" in lines and not any(line.rstrip() != line for line in lines)


def test_eval_lds_says_what_it_will_do_before_the_progress_bars(built, tmp_path):
    root, _ = built
    result = run("eval", "lds", root / "store", "--models", 3, "--workers", 1, "--cache", tmp_path / "cache",
                 quiet=False)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stderr.splitlines() if line.startswith("LDS: training"))
    assert "3 of 3 models" in line and str(tmp_path / "cache") in line and "20 of 40 training examples" in line
    assert result.stderr.index("LDS: training") < result.stderr.index("retrain")


# -- missing test: the CLI's search knobs reach the search ---------------------------------------------------
def test_search_flags_reach_the_search(built, monkeypatch):
    from gradindex.index import GradIndex

    root, _ = built
    seen = []
    real = GradIndex.open.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("search"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(GradIndex, "open", classmethod(spy))
    flags = ["--nprobe", 3, "--ef-search", 5, "--rerank", 7, "--no-prune"]
    wanted = SearchConfig(nprobe=3, ef_search=5, rerank=7, prune=False)
    assert run("query", root / "store", "--inputs", root / "queries.npz", *flags).exit_code == 0
    assert seen[-1] == wanted
    assert run("eval", "recall", root / "store", "--inputs", root / "queries.npz", *flags).exit_code == 0
    assert seen[-1] == wanted
    assert run("query", root / "store", "--inputs", root / "queries.npz").exit_code == 0
    assert seen[-1] is None  # no flags: the partition's own defaults
