"""The manifest is validated against one schema, and crafted manifests are refused (issue 14).

* Named shape errors: each → ``StoreMismatchError`` naming the field, one line from the CLI.
* A property-based fuzz (hypothesis, derandomized) over manifest mutations — deleted, retyped
  and renamed fields, paths pointing out of the store (``..``, absolute, symlinks) — and the
  readers and writers that trust the manifest: every run ends in success or a
  ``GradIndexError`` (never another exception), no file outside the store is opened or
  changed, and a path pointing out of the store never gets past ``FeatureStore.open``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gradindex.cli import main
from gradindex.config import IndexConfig, LearnConfig
from gradindex.errors import GradIndexError, StoreMismatchError
from gradindex.index import GradIndex, build_index
from gradindex.weights.learn import learn_weights
from gradindex.query.attributor import Attributor
from gradindex.store.feature_store import MANIFEST, FeatureStore
from store_helpers import census, copy_store, make_store, manifest, queries, write_manifest

# -- which files Python code opens (pyarrow and FAISS open theirs in C: see the path property below) ------
_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny store with learned weights and an index (every kind of manifest entry)."""
    root = tmp_path_factory.mktemp("fuzz")
    path = make_store(root, index=None)
    learn_weights(FeatureStore.open(path, trust_task=True), LearnConfig(steps=5), show_progress=False)
    build_index(FeatureStore.open(path), IndexConfig(), show_progress=False)
    return path


# -- named shape errors ---------------------------------------------------------------------------------
def _set(data, path, value):
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(data, path):
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


SHAPE_CASES = [
    ("list as manifest", lambda m: [], "manifest"),
    ("empty manifest", lambda m: {}, "format_version"),
    ("string as manifest", lambda m: "x", "manifest"),
    *[(f"missing {field}", lambda m, f=field: _delete(m, [f]), field)
      for field in ("shards", "groups", "task", "config", "model_fingerprint", "num_samples")],
    ("shards a dict", lambda m: _set(m, ["shards"], {}), "shards"),
    ("shard a number", lambda m: _set(m, ["shards", 0], 5), "shards.0"),
    ("shard rows a string", lambda m: _set(m, ["shards", 1, "rows"], "8"), "shards.1.rows"),
    ("groups a dict", lambda m: _set(m, ["groups"], {}), "groups"),
    ("group dim a string", lambda m: _set(m, ["groups", 0, "dim"], "x"), "groups.0.dim"),
    ("task a string", lambda m: _set(m, ["task"], "digits"), "task"),
    ("task name a number", lambda m: _set(m, ["task", "task"], 5), "task.task"),
    ("config a list", lambda m: _set(m, ["config"], []), "config"),
    ("projection a number", lambda m: _set(m, ["config", "projection"], 5), "config.projection"),
    ("config unknown field", lambda m: _set(m, ["config", "nope"], 1), "config"),
    ("fingerprint a number", lambda m: _set(m, ["model_fingerprint"], 5), "model_fingerprint"),
    ("num_samples a string", lambda m: _set(m, ["num_samples"], "40"), "num_samples"),
    ("num_samples negative", lambda m: _set(m, ["num_samples"], -1), "num_samples"),
    ("num_samples not the rows", lambda m: _set(m, ["num_samples"], 41), "num_samples"),
    ("indexes a list", lambda m: _set(m, ["indexes"], []), "indexes"),
    ("parts a dict", lambda m: _set(m, ["indexes", "all", "parts"], {}), "indexes.all.parts"),
    ("part file a number", lambda m: _set(m, ["indexes", "all", "parts", 0, "file"], 5),
     "indexes.all.parts.0.file"),
    ("part shard out of range", lambda m: _set(m, ["indexes", "all", "parts", 0, "shards"], [0, 99]),
     "indexes.all.parts.0.shards"),
    ("index dim a string", lambda m: _set(m, ["indexes", "all", "dim"], "x"), "indexes.all.dim"),
    ("index kind unknown", lambda m: _set(m, ["indexes", "all", "kind"], "annoy"), "indexes.all.kind"),
    ("index config bad", lambda m: _set(m, ["indexes", "all", "config", "kind"], 7), "indexes.all.config"),
    ("index name unsafe", lambda m: _set(m, ["indexes", "../x"], m["indexes"]["all"]), "indexes"),
    ("weights a list", lambda m: _set(m, ["weights"], []), "weights"),
    ("concept weights a number", lambda m: _set(m, ["weights", "all"], 5), "weights.all"),
    ("a weight a string", lambda m: _set(m, ["weights", "all", "gram@0.1", "weights", "hidden"], "x"),
     "weights.all.gram@0.1.weights.hidden"),
    ("a weight negative", lambda m: _set(m, ["weights", "all", "gram@0.1", "weights", "hidden"], -1.0),
     "weights.all.gram@0.1.weights.hidden"),
    ("weights miss a group", lambda m: _delete(m, ["weights", "all", "gram@0.1", "weights", "hidden"]),
     "weights.all.gram@0.1.weights"),
]


@pytest.mark.parametrize("name,mutate,field", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_manifest_shape_errors_name_the_field(base, tmp_path, name, mutate, field):
    store = copy_store(base, tmp_path / "store")
    data = manifest(store)
    replaced = mutate(data)
    write_manifest(store, data if replaced is None else replaced)
    with pytest.raises(StoreMismatchError) as caught:
        FeatureStore.open(store)
    message = str(caught.value)
    assert field in message and "\n" not in message, message
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output


# -- the fuzz ---------------------------------------------------------------------------------------------
PATH_KEYS = {"path", "file", "ids_file", "vectors_file", "folder"}
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True),
                        st.text(max_size=8), st.just([]), st.just({}), st.just([0, 1]), st.just({"x": 1}))


def _paths(value, prefix=()):
    """Every path of keys/indices into a JSON value (the value's own path first)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _file_fields(value, prefix=()):
    return [p for p in _paths(value, prefix) if p and p[-1] in PATH_KEYS and isinstance(_get(value, p), str)
            and _get(value, p)]


def _get(data, path):
    for key in path:
        data = data[key]
    return data


FAMILIES = {"shape": ["delete", "retype", "retag"], "paths": ["inject", "symlink"]}


def _mutate(data: dict, draw, store: Path, outside: Path, family: str) -> tuple[str, dict]:
    """One mutation of ``data`` (and maybe of the store's files) of ``family``; its kind and the mutated manifest."""
    data = copy.deepcopy(data)
    kind = draw(st.sampled_from(FAMILIES[family]))
    # the task's options go to the task's own constructor: its errors are the task's (issue 14 item 9, the
    # CLI's one-line report of errors raised in task code), not the manifest's
    paths = [p for p in list(_paths(data))[1:] if p[:2] != ("task", "options")]
    if kind in ("inject", "symlink"):
        fields = _file_fields(data)
        field = draw(st.sampled_from(fields))
        relative = _get(data, field)
        source = store / relative
        if source.is_file():
            shutil.copy(source, outside / Path(relative).name)  # a valid copy: checksums still match
        if kind == "symlink" and source.exists():
            # the file itself, or a folder on its way (shards/, indexes/, indexes/all/, ...), becomes a link
            # to a valid copy outside the store
            levels = [Path(relative), *list(Path(relative).parents)[:-1]]
            link = store / draw(st.sampled_from(levels))
            copy_at = outside / f"linked-{link.name}"
            if link.is_dir():
                shutil.copytree(link, copy_at, symlinks=True)
                shutil.rmtree(link)
            else:
                shutil.copy(link, copy_at)
                link.unlink()
            link.symlink_to(copy_at, target_is_directory=copy_at.is_dir())
            return kind, data
        injected = draw(st.sampled_from([
            os.path.relpath(outside / Path(relative).name, store), str(outside / Path(relative).name),
            f"{relative.split('/')[0]}/../../{outside.name}/{Path(relative).name}", "/etc/hostname", "", ".", "..",
            "shards", "indexes/all/../../..", "manifest.json",
        ]))
        _set(data, field, injected)
        return "inject", data
    path = draw(st.sampled_from(paths))
    if kind == "delete":
        _delete(data, path)
    elif kind == "retype":
        _set(data, path, draw(JSON_VALUES))
    else:
        parent = _get(data, path[:-1])
        if isinstance(parent, dict):
            parent[draw(st.sampled_from(["x", "", "../x", path[-1] + "_", "all", "gram@0.5"]))] = parent.pop(path[-1])
        else:
            _set(data, path, draw(JSON_VALUES))
    return kind, data


def _readers_and_writers(store: Path) -> None:
    """Everything that trusts the manifest, in order; the first GradIndexError ends it."""
    opened = FeatureStore.open(store, trust_task=True)
    opened.read()
    opened.read_metadata()
    opened.read_gram()
    index = GradIndex.open(opened, "all")
    index.search(np.ones((2, opened.dim), np.float32), 3)
    attributor = Attributor.open(opened)
    try:
        attributor.attribute(queries(), k=3)
    finally:
        attributor.close()
    build_index(FeatureStore.open(store), IndexConfig(), update=True, show_progress=False)


#: CI runs a fixed, modest set of examples; GRADINDEX_FUZZ_EXAMPLES=N runs N random ones (a longer hunt)
HUNT = int(os.environ.get("GRADINDEX_FUZZ_EXAMPLES", "0"))


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=HUNT or 60, derandomize=not HUNT, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_crafted_manifests_are_refused_and_nothing_outside_is_touched(base, family, data):
    global _OPENED
    root = Path(tempfile.mkdtemp(prefix="gi-fuzz-"))
    try:
        store = copy_store(base, root / "store")
        outside = root / "outside"
        outside.mkdir()
        kind, mutated = _mutate(manifest(store), data.draw, store, outside, family)
        (store / MANIFEST).write_text(json.dumps(mutated))
        before_outside = census(outside)
        _OPENED = []
        try:
            _readers_and_writers(store)
            outcome = "ok"
        except GradIndexError as err:
            outcome = f"refused: {err}"
            assert "\n" not in str(err).strip(), err
        finally:
            opened, _OPENED = _OPENED, None
        event(f"{kind}: {outcome.split(':')[0]}")  # --hypothesis-show-statistics counts them
        if kind in ("inject", "symlink") and outcome == "ok":
            pytest.fail(f"a manifest path pointing out of the store was used ({kind})")
        reached = [p for p in opened if Path(p).resolve().is_relative_to(outside.resolve())
                   or p in ("/etc/hostname",)]
        assert not reached, reached
        assert census(outside) == before_outside
        assert sorted(p.name for p in root.iterdir()) == ["outside", "store"]
        result = CliRunner().invoke(main, ["info", str(store)])
        assert result.exit_code in (0, 2) and (result.exception is None or isinstance(result.exception, SystemExit)), \
            result.output
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_path_property_is_not_vacuous(base, tmp_path, monkeypatch):
    """With the confinement switched off, a shard path out of the store is read without complaint: the
    fuzz's "a path out of the store never gets past FeatureStore.open" would catch that."""
    import gradindex.store.feature_store as store_module

    store = copy_store(base, tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    data = manifest(store)
    shutil.copy(store / data["shards"][0]["path"], outside / "x.parquet")
    data["shards"][0]["path"] = os.path.relpath(outside / "x.parquet", store)
    write_manifest(store, data)
    with pytest.raises(StoreMismatchError, match="not a relative path inside the store"):
        _readers_and_writers(store)
    monkeypatch.setattr(store_module, "inside_store", lambda root, relative, what: Path(root) / relative)
    _readers_and_writers(store)  # reads the copy outside and succeeds


def test_info_on_a_per_group_damping_without_every_group(base, tmp_path):
    """The fuzz's falsifying example: an index config's per-group damping ``{}`` made ``info``
    raise KeyError (a traceback, exit 1); it must print or refuse in one line."""
    store = copy_store(base, tmp_path / "store")
    data = manifest(store)
    data["indexes"]["all"]["config"]["damping"] = {}
    write_manifest(store, data)
    result = CliRunner().invoke(main, ["info", str(store)])
    assert result.exit_code in (0, 2) and not isinstance(result.exception, KeyError), result.output


# -- a built-in task's options in the manifest are data (issue 19): wrong JSON types, paths, training ------
OPTION_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["/etc/passwd", "~/.ssh/id_rsa", "../../x", "./local.json", "mlp", "cnn", "", "x" * 5000]),
    st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("manifest-digits")
    run = CliRunner().invoke(main, ["-q", "featurize", "digits", "--out", str(root / "store"), "--limit", "30"],
                             catch_exceptions=False)
    assert run.exit_code == 0, run.output
    from gradindex.task import load_task

    task = load_task("digits")
    np.savez(root / "queries.npz", x=task.split["x_test"][:2].reshape(2, 8, 8) * 16, y=task.split["y_test"][:2])
    return root / "store", root / "queries.npz"


@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_builtin_task_options_from_a_manifest_never_train_read_paths_or_trace(digits_store, data):
    store, queries_file = digits_store
    options = data.draw(st.dictionaries(st.sampled_from(["seed", "arch", "corpus", "epochs", "config"]),
                                        OPTION_VALUES, max_size=2))
    work = Path(tempfile.mkdtemp()) / "store"
    try:
        copy_store(store, work)
        crafted = manifest(work)
        crafted["task"]["options"] = options
        write_manifest(work, crafted)
        home = Path(os.environ["GRADINDEX_HOME"])
        before = census(home)
        result = CliRunner().invoke(main, ["-q", "query", str(work), "--inputs", str(queries_file), "--json"])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) < 1200, result.stderr
        assert census(home) == before, "the store's options made the command train"
        if any(isinstance(v, str) and ("/" in v or v.startswith(("~", "."))) for v in options.values()):
            assert result.exit_code == 2
        event(f"exit {result.exit_code}")
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
