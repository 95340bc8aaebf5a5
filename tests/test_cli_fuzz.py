"""Property-based fuzzing of the command line (hypothesis, derandomized: the same cases every run).

The real CLI runs in-process (click's CliRunner) on tiny stores built once per module, over
random and malformed values of every numeric and path option of every command and over
malformed query files (truncated or empty .npz, wrong shapes and dtypes, NaN, huge values,
pickled objects, bad JSONL and non-UTF-8 bytes). Every case must end with

* no traceback: the only exception leaving the CLI is ``SystemExit``;
* exit status 0 or 2;
* on error, exactly one line on stderr, starting with ``error:``;
* nothing written outside the temporary folders (the repository and ``$HOME`` are unchanged).

``CASES`` collects every distinct case (arguments plus input file bytes) and its exit status;
the module prints the counts at the end (``pytest -s``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradindex.cli import main
from gradindex.task import load_task
from lm_reference import write_tiny_corpus
from tiny_task import TinyTask

REPO = Path(__file__).resolve().parent.parent
TASK = f"{Path(__file__).parent / 'tiny_task.py'}:TinyTask"
CASES: dict[tuple, int] = {}  # distinct case -> exit status
FRESH = itertools.count()  # fresh output names

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=120, print_blob=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# -- values -------------------------------------------------------------------------------------------
BAD_NUMBERS = ["abc", "", "1.5", "0x10", "1e3", "--", " 7", "٣", "\x00"]


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values three times in four, so that many cases get past the first check."""
    return st.one_of(valid, valid, valid, invalid)


BAD_INTS = st.sampled_from(["-1", "-3", str(2**31), str(2**63), "9" * 30, "-0", *BAD_NUMBERS])
INTS = mostly(st.integers(0, 70).map(str), BAD_INTS)
SMALL_INTS = mostly(st.integers(1, 3).map(str), BAD_INTS)
FLOATS = mostly(
    st.sampled_from(["0", "-0.0", "1e-300", "0.01", "0.1", "0.5", "1", "3", "1e6"]),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64).map(repr),
              st.sampled_from(["1e7", "1e39", "3.5e38", "1e300", "1e308", "1e309", "-1", "nan", "inf", "-inf", "NaN",
                               *BAD_NUMBERS])),  # 1e39, 3.5e38: beyond float32 (issue 19)
)
DEVICES = mostly(st.sampled_from(["cpu", "auto"]),
                 st.sampled_from(["cuda", "cuda:0", "cuda:99", "mps", "nosuch", "", "CPU", "cuda:-1", "cpu:0", "meta"]))
#: JSON values of every type for an integer task option (issue 19: null, objects, lists and 1e400 gave tracebacks)
JSON_OPTIONS = ["seed=null", 'seed={"a":1}', "seed=[1,2]", "seed=1e400", "seed=-1e400", "seed=true", "seed=1.5",
                'seed="7"', "seed=1e39", f"seed={2**70}", "seed=NaN", "seed=" + "9" * 5000]
RAY = st.sampled_from(["127.0.0.1:1", "nohost", "host:abc", ":80", "ray://127.0.0.1:1", "127.0.0.1:99999"])


def _flags(draw, options: dict) -> list[str]:
    """A random subset of ``{flag: strategy}`` as command-line words (shuffled)."""
    chosen = draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=min(3, len(options))))
    words = []
    for flag in chosen:
        value = draw(options[flag])
        words += [flag] if value is None else [flag, value]
    return words


# -- query files --------------------------------------------------------------------------------------
def _npz(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def lying_npy(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """A .npy whose header declares ``shape`` but that holds 256 bytes of data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(256)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@st.composite
def arrays(draw, width: int):
    shape = draw(st.sampled_from([(3, width), (0, width), (2, width + 1), (width,), (2, width, 1), (1, 1), (1, 64),
                                  (2, 8, 8), (50, width)]))
    dtype = draw(st.sampled_from(["float32", "float64", "int64", "float16", "bool", "complex64", "uint8", "U3",
                                  "object"]))
    fill = draw(st.sampled_from(["normal", "nan", "inf", "huge", "negative", "zero", "sixteen"]))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    values = {"normal": rng.normal(size=shape) * 3, "nan": np.full(shape, np.nan), "inf": np.full(shape, np.inf),
              "huge": np.full(shape, 1e300), "negative": -np.abs(rng.normal(size=shape)) - 1,
              "zero": np.zeros(shape), "sixteen": np.full(shape, 16.0)}[fill]
    with np.errstate(all="ignore"):
        if dtype == "object":
            return np.array([None, "x"], dtype=object)
        if dtype == "U3":
            return values.astype(str).astype("U3")
        return values.astype(dtype)


@st.composite
def npz_files(draw, width: int) -> bytes:
    """Bytes of a query file for a task reading ``x [n, width]`` (+ ``y``) from a .npz."""
    kind = draw(st.sampled_from(["arrays", "arrays", "arrays", "empty", "random", "truncated", "npy", "no-x",
                                 "lying-npy", "lying-npz"]))
    if kind == "empty":
        return b""
    if kind.startswith("lying"):  # a ~400-byte file whose header declares shape (2^40, 64) (issue 19: MemoryError)
        return lying_npy((2**40, width)) if kind == "lying-npy" else _zip({"x.npy": lying_npy((2**40, width))})
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "npy":
        return _npy(draw(arrays(width)))
    x = draw(arrays(width))
    labels = draw(st.sampled_from(["ok", "missing", "long", "float", "big", "str"]))
    n = len(x) if x.ndim else 1
    y = {"ok": np.zeros(n, np.int64), "long": np.zeros(n + 2, np.int64), "float": np.full(n, 0.5),
         "big": np.full(n, 2**40, np.int64), "str": np.array(["a"] * n)}.get(labels)
    content = {"x": x} if y is None else {"x": x, "y": y}
    if kind == "no-x":
        content = {"images": x}
    data = _npz(content)
    if kind == "truncated":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    return data


@st.composite
def jsonl_files(draw, good: list[dict], vocab_size: int) -> bytes:
    """Bytes of a JSONL query file for the lm task: ``good`` records (the task's own), records
    with token ids (in and out of the vocabulary), broken records, broken files."""
    ids = st.lists(mostly(st.integers(0, vocab_size - 1), st.sampled_from([-1, vocab_size, 2**63, True, 1.5, "3"])),
                   min_size=0, max_size=4)
    broken = st.fixed_dictionaries({}, optional={
        "prompt": st.sampled_from(["", "zzz unknown", "a " * 3000, 3, None]),
        "completion": st.sampled_from(["", "nowhere", ["koba"], 1.5]),
        "span": st.sampled_from([[0, 1], [1, 0], [0, 99], "x", [True, 2], -1]),
        "prompt_ids": ids, "completion_ids": ids, "extra": st.just(1),
    })
    record = st.one_of(st.sampled_from(good), st.sampled_from(good),
                       st.fixed_dictionaries({"prompt_ids": ids, "completion_ids": ids}), broken)
    kind = draw(mostly(st.just("records"), st.sampled_from(["empty", "bytes", "latin1", "not-json", "array", "nested",
                                                             "nan", "bom", "blank"])))
    special = {"empty": b"", "latin1": '{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"),
               "not-json": b"{prompt: 1}\n", "array": b"[1, 2, 3]\n", "nested": b"[" * 100_000 + b"\n",
               "nan": b'{"prompt_ids": [NaN], "completion_ids": [Infinity]}\n', "blank": b"\n \n\t\n",
               "bom": b"\xef\xbb\xbf" + (json.dumps(good[0]) + "\n").encode()}
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=200))
    if kind in special:
        return special[kind]
    lines = draw(st.lists(record, min_size=1, max_size=3))
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


# -- the property -------------------------------------------------------------------------------------
def _listing(root: Path, recursive: bool) -> set[str]:
    if not root.is_dir():
        return set()
    if not recursive:
        return set(os.listdir(root))
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache")]
        found.update(os.path.join(folder, f) for f in files)
    return found


def _outside() -> tuple[set[str], set[str]]:
    return _listing(REPO, recursive=True), _listing(Path.home(), recursive=False)


def check(args: list[str], files: dict[Path, bytes] | None = None) -> None:
    """Run ``gradindex -q ARGS`` (after writing ``files``) and assert the CLI contract."""
    for path, data in (files or {}).items():
        path.write_bytes(data)
    digest = hashlib.sha256(b"".join(data for data in (files or {}).values())).hexdigest()[:16]
    before = _outside()
    result = CliRunner().invoke(main, ["-q", *args], catch_exceptions=True)
    CASES[(*args, digest)] = result.exit_code
    if os.environ.get("GRADINDEX_FUZZ_LOG"):
        with open(os.environ["GRADINDEX_FUZZ_LOG"], "a") as log:
            log.write(f"{result.exit_code} {args!r} {result.stderr.strip()[:200]!r}\n")
    shown = f"gradindex -q {' '.join(args)}\nexit {result.exit_code}\nstderr: {result.stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"{shown}\nescaped exception:\n{trace}")
    assert result.exit_code in (0, 2), shown
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert _outside() == before, f"{shown}\nwrote outside the temporary folders"


# -- fixtures -----------------------------------------------------------------------------------------
def _ok(*args) -> None:
    result = CliRunner().invoke(main, ["-q", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module", autouse=True)
def _count_cases():
    yield
    ok = sum(code == 0 for code in CASES.values())
    print(f"\ncli fuzz: {len(CASES)} distinct cases ({ok} exit 0, {len(CASES) - ok} exit 2 or worse)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny TinyTask stores (one per mutating command), a checkpoint and a good query file."""
    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = TinyTask().train(root / "tiny.pt")
    _ok("featurize", TASK, "--out", root / "store", "--checkpoint", checkpoint, "--proj-dim", 8, "--shard-size", 16)
    _ok("build-index", root / "store")
    for name in ("build", "learn", "lds"):
        shutil.copytree(root / "store", root / f"store-{name}")
    task = TinyTask()
    np.savez(root / "queries.npz", x=task.x[40:44], y=task.y[40:44])
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "afile").write_text("x")
    (root / "emptydir").mkdir()
    return root


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """Every case runs in a fresh temporary folder (relative paths land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bad_stores(world: Path, cwd: Path) -> st.SearchStrategy:
    """STORE arguments that are not a store: missing, a file, an empty folder, bad names."""
    return st.sampled_from([str(cwd / "missing"), str(world / "afile"), str(world / "emptydir"), "", "\x00bad",
                            "x" * 300, str(world / "afile" / "below"), "."])


# -- the cases ----------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_featurize_and_groups(world, cwd, data):
    options = {"--proj-dim": INTS, "--factor-dim": INTS, "--seed": INTS, "--batch-size": INTS,
               "--shard-size": INTS, "--limit": INTS, "--dtype": st.sampled_from(["float16", "float64", "x"]),
               "--proj-kind": st.sampled_from(["identity", "rademacher", "nope"]), "--device": DEVICES,
               "--group-dim": st.sampled_from(["hidden=4", "out=0", "nogroup=3", "hidden=x", "=2", "hidden=-1"]),
               "--group-rule": st.sampled_from(["*=a", "oops", "hidden.*=-", "*=-", "out.bias={param}"]),
               "--task-option": st.sampled_from(["seed=1", "seed=-4", "bogus=1", "seed=x", "noequals", *JSON_OPTIONS]),
               "--checkpoint": st.sampled_from([str(world / "tiny.pt"), str(world / "garbage.pt"),
                                                str(cwd / "none.pt"), str(world / "emptydir")]),
               "--ray": RAY, "--ray-timeout": FLOATS, "--resume": st.none(), "--overwrite": st.none(),
               "--append": st.none()}
    command = data.draw(st.sampled_from(["featurize", "featurize", "groups"]))
    task = data.draw(mostly(st.just(TASK), st.sampled_from(["digits-nosuch", "nowhere.py:X", f"{TASK}x", "os:path"])))
    words = _flags(data.draw, options)
    if command == "groups":
        words = [w for w in words if w not in ("--resume", "--overwrite", "--append")]
        drop = {"--batch-size", "--shard-size", "--limit", "--dtype", "--device", "--ray", "--ray-timeout"}
        kept, skip = [], False
        for w in words:
            if skip:
                skip = False
                continue
            if w in drop:
                skip = True
                continue
            kept.append(w)
        check(["groups", task, *kept])
        return
    out = data.draw(mostly(st.just(str(cwd / f"new{next(FRESH)}")),
                           st.sampled_from([str(world / "store"), str(world / "afile"), "", "\x00",
                                            str(cwd / "a" / "b" / "c"), str(world / "afile" / "below")])))
    check(["featurize", task, "--out", out, *words])


@FUZZ
@given(data=st.data())
def test_build_index(world, cwd, data):
    options = {"--kind": st.sampled_from(["flat", "ivf", "ivfpq", "hnsw", "auto", "lsh"]),
               "--preconditioner": st.sampled_from(["gram", "identity", "x"]), "--damping": FLOATS,
               "--nlist": INTS, "--bands": INTS, "--pq-bytes": INTS, "--hnsw-m": st.one_of(INTS, st.just("1")), "--ef-construction": INTS,
               "--train-size": INTS, "--index-seed": INTS, "--shards-per-part": INTS,
               "--shards": st.sampled_from(["0", "0-1", "5", "x", "1-0", "-1", "0,0", ""]),
               "--nprobe": INTS, "--ef-search": INTS, "--rerank": INTS, "--no-prune": st.none(),
               "--device": st.sampled_from(["cpu", "cuda", "auto", "gpu"]),
               "--balance": st.sampled_from(["on", "off", "auto", "?"]), "--update": st.none(),
               "--train-only": st.none(), "--concept": st.sampled_from(["all", "nosuch", "", "a/b"])}
    store = data.draw(mostly(st.just(str(world / "store-build")), _bad_stores(world, cwd)))
    check(["build-index", store, *_flags(data.draw, options)])


@FUZZ
@given(data=st.data())
def test_query_info_recall_precision(world, cwd, data):
    search = {"--nprobe": INTS, "--ef-search": INTS, "--rerank": INTS, "--no-prune": st.none(), "--device": DEVICES}
    command = data.draw(st.sampled_from(["query", "query", "query", "info", "recall", "precision", "plot"]))
    store = data.draw(mostly(st.just(str(world / "store")), _bad_stores(world, cwd)))
    inputs = str(world / "queries.npz")
    files = {}
    if data.draw(st.booleans()):
        inputs = str(cwd / data.draw(st.sampled_from(["q.npz", "q.npy", "q.jsonl"])))
        files[Path(inputs)] = data.draw(npz_files(4))
    elif data.draw(st.booleans()):
        inputs = data.draw(st.sampled_from([str(cwd / "none.npz"), str(world / "emptydir"), "", "\x00"]))
    if command == "query":
        options = {**search, "-k": INTS, "--batch-size": INTS, "--concept": st.sampled_from(["all", "x", ""]),
                   "--json": st.none(), "--checkpoint": st.sampled_from([str(world / "garbage.pt"), str(cwd / "n.pt"),
                                                                         str(world / "tiny.pt")]),
                   "--all": st.none(), "--out": st.sampled_from([str(cwd / "s.npy"), str(cwd / "s.parquet"),
                                                                 str(cwd / "s.csv"), str(world / "emptydir"),
                                                                 str(cwd / "no" / "s.npy")]),
                   "--ray": RAY, "--ray-timeout": FLOATS, "--actors": INTS}
        check(["query", store, "--inputs", inputs, *_flags(data.draw, options)], files)
    elif command == "info":
        check(["info", store, *data.draw(st.sampled_from([[], ["--json"]]))])
    elif command == "recall":
        options = {**search, "-k": INTS, "--queries": INTS, "--inputs": st.just(inputs), "--json": st.none(),
                   "--concept": st.sampled_from(["all", "x"])}
        check(["eval", "recall", store, *_flags(data.draw, options)], files)
    elif command == "precision":
        options = {"-k": INTS, "--inputs": st.just(inputs), "--concept": st.sampled_from(["all", "x"]),
                   "--device": DEVICES, "--json": st.none()}
        check(["eval", "precision", store, *_flags(data.draw, options)], files)
    else:
        out = data.draw(st.sampled_from([str(cwd / "w.png"), str(world / "emptydir"), str(cwd / "no" / "w.png")]))
        check(["weights", "plot", store, "--out", out,
               *data.draw(st.sampled_from([[], ["--concept", "all"], ["--concept", "nosuch"]]))])


@FUZZ
@given(data=st.data())
def test_learn_weights(world, cwd, data):
    options = {"--damping": FLOATS, "--queries": INTS, "--reference-size": INTS, "--top-k": INTS,
               "--regularization": FLOATS, "--steps": SMALL_INTS, "--lr": FLOATS, "--seed": INTS,
               "--method": st.sampled_from(["snr", "agreement", "auto", "x"]),
               "--example-norm": st.sampled_from(["none", "center", "standardize", "x"]),
               "--preconditioner": st.sampled_from(["gram", "identity"]), "--concept": st.sampled_from(["all", "c"]),
               "--device": DEVICES, "--inputs": st.sampled_from([str(world / "queries.npz"), str(cwd / "none.npz")])}
    store = data.draw(mostly(st.just(str(world / "store-learn")), _bad_stores(world, cwd)))
    check(["learn-weights", store, *_flags(data.draw, options)])


@FUZZ
@given(data=st.data())
def test_eval_lds_and_demo(world, cwd, data):
    if data.draw(st.booleans()):
        options = {"--models": SMALL_INTS, "--fraction": FLOATS, "--seed": INTS, "--training-seed": INTS,
                   "--workers": st.sampled_from(["-1", "0", "1", "x", str(2**63)]), "--damping": FLOATS,
                   "--device": DEVICES, "--concept": st.sampled_from(["all", "x"]), "--json": st.none(),
                   "--cache": st.sampled_from([str(cwd / "cache"), str(world / "afile")]),
                   "--inputs": st.sampled_from([str(world / "queries.npz"), str(cwd / "none.npz")])}
        words = _flags(data.draw, options)
        if "--models" not in words:
            words += ["--models", "3"]  # the default (64 models) is for real runs
        if "--workers" not in words:
            words += ["--workers", "1"]  # the default (2 spawned processes) takes seconds to start
        check(["eval", "lds", str(world / "store-lds"), *words])
    else:
        options = {"-k": SMALL_INTS, "--queries": SMALL_INTS, "--device": DEVICES,
                   "--task-option": st.sampled_from(["seed=1", "bogus=2"]),
                   "--task": st.sampled_from(["nosuch", "nowhere.py:X", TASK])}
        words = _flags(data.draw, options)
        if "--task" not in words or words[words.index("--task") + 1] == TASK:
            words += ["--queries", "0"]  # a full demo run trains and featurizes: keep it to bad input here
        check(["demo", "--out", str(cwd / "demo"), *words])


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory):
    """A store of the lm task on a tiny corpus and model (reads JSONL query files), its default
    query records and vocabulary size."""
    root = tmp_path_factory.mktemp("fuzz-lm")
    options = {"corpus": str(write_tiny_corpus(root / "corpus.json")), "width": 16, "layers": 1, "heads": 2,
               "epochs": 3}
    _ok("featurize", "lm", *[w for k, v in options.items() for w in ("--task-option", f"{k}={v}")],
        "--out", root / "store", "--proj-dim", 4)
    _ok("build-index", root / "store")
    task = load_task("lm", options)
    return root / "store", task.query_records(), len(task.tokenizer)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_lm_query_files(lm_store, cwd, data):
    store, good, vocab_size = lm_store
    path = cwd / "q.jsonl"
    command = data.draw(st.sampled_from(["query", "query", "all"]))
    extra = ["-k", "2"] if command == "query" else ["--all", "--out", str(cwd / "s.npy")]
    check(["query", str(store), "--inputs", str(path), *extra], {path: data.draw(jsonl_files(good, vocab_size))})


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A 60-example digits store (the built-in .npz/.npy query reader)."""
    root = tmp_path_factory.mktemp("fuzz-digits")
    _ok("featurize", "digits", "--out", root / "store", "--limit", 60, "--proj-dim", 4)
    _ok("build-index", root / "store")
    return root / "store"


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_digits_query_files(digits_store, cwd, data):
    path = cwd / data.draw(st.sampled_from(["q.npz", "q.npy", "q.bin"]))
    check(["query", str(digits_store), "--inputs", str(path), "-k", "2"], {path: data.draw(npz_files(64))})
