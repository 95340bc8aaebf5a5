"""The one schema of a store's ``manifest.json``, its consistency checks, and its upgrade.

In: the parsed JSON of a manifest. Out: the manifest in the current format (a version-1
manifest is upgraded in memory), or a one-line
:class:`~gradindex.errors.StoreMismatchError` naming the offending field
(``shards.1.rows: expected integer, got string``).

Checked: the shape of every field a reader relies on (shards, groups, task, config,
fingerprint, row counts, Gram file, projection format, learned weights, index entries
and their parts), then what a schema cannot say: the rows add up to ``num_samples``,
configs parse, names are safe folder names, an index covers each store shard at most
once and has the store's dimension. Whether the listed files exist and stay inside the
store is the store's business (:meth:`gradindex.store.feature_store.FeatureStore.open`);
:func:`manifest_paths` lists them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jsonschema

from gradindex.config import (
    DEFAULT_DAMPING, NAME_PATTERN, ConfigError, FeaturizeConfig, IndexConfig, SearchConfig, check_name, setting_key,
)
from gradindex.errors import StoreMismatchError

FORMAT_VERSION = 2
#: what version-1 stores were projected with (projection.CHUNK_BYTES of that code)
V1_PROJECTION_FORMAT = {"version": 1, "chunk_bytes": 1 << 26}

_COUNT = {"type": "integer", "minimum": 0}
_POSITIVE = {"type": "integer", "minimum": 1}
_SHA = {"type": "string", "pattern": r"^[0-9a-f]{64}\Z"}
_PATH = {"type": "string", "minLength": 1}
_NAME = {"type": "string", "pattern": rf"^{NAME_PATTERN.pattern}\Z"}
_STRINGS = {"type": "array", "items": {"type": "string"}}

_BLOCK = {
    "type": "object",
    "required": ["module", "params", "kind", "left", "right"],
    "properties": {"module": {"type": "string"}, "params": _STRINGS, "kind": {"type": "string"}, "left": _COUNT,
                   "right": _COUNT, "tie": {"type": "string"}, "heads": _COUNT, "k_left": _COUNT, "k_right": _COUNT,
                   "k": _COUNT},
}
_GROUP = {
    "type": "object",
    "required": ["name", "dim", "blocks"],
    "properties": {"name": {"type": "string", "minLength": 1}, "dim": _POSITIVE,
                   "blocks": {"type": "array", "items": _BLOCK}},
}
_SHARD = {
    "type": "object",
    "required": ["path", "rows", "sha256", "bytes"],
    "properties": {"path": _PATH, "rows": _COUNT, "sha256": _SHA, "bytes": _COUNT, "run_key": {"type": "string"}},
}
_NUMBERS = {"type": "object", "additionalProperties": {"type": "number"}}
#: a relative Gram damping: one number, or one per group (``--damping auto`` resolved); "auto" in old entries
_DAMPING = {"type": ["number", "string", "object"], "minimum": 0,
            "additionalProperties": {"type": "number", "minimum": 0}}
_INFO = {  # what readers use of the learning diagnostics; other keys are free
    "type": "object",
    "properties": {
        "method": {"type": "string"},
        "config": {"type": "object", "properties": {"preconditioner": {"enum": ["gram", "identity", "kfac", "ekfac"]},
                                                    "damping": _DAMPING}},
        "num_queries": _COUNT, "reference_size": _COUNT, "shares": _NUMBERS, "uniform_shares": _NUMBERS,
        **{key: {"type": "number"} for key in ("snr_uniform", "snr_learned", "agreement_uniform",
                                               "agreement_learned", "seconds")},
    },
}
_WEIGHTS = {
    "type": "object",
    "required": ["weights"],
    "properties": {"weights": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
                   "info": _INFO},
}
_PART = {
    "type": "object",
    "required": ["name", "file", "sha256", "ntotal", "shards", "bytes", "ids_file", "ids_sha256", "trained_sha256"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"}, "file": _PATH, "sha256": _SHA, "ntotal": _COUNT, "bytes": _COUNT,
        "shards": {"type": "array", "items": _COUNT, "minItems": 1, "uniqueItems": True},
        "vectors_file": {"type": "string"}, "vectors_sha256": {"type": "string"},
        "ids_file": _PATH, "ids_sha256": _SHA, "trained_sha256": _SHA,
        "info": {"type": ["object", "null"],
                 "properties": {"band_max": {"type": "array", "items": {"type": "number"}},
                                "band_count": {"type": "array", "items": _COUNT},
                                "cell_max": {"type": "array", "items": {"type": "number"}},
                                "cell_count": {"type": "array", "items": _COUNT}}},
    },
    "if": {"required": ["vectors_file"], "properties": {"vectors_file": {"minLength": 1}}},
    "then": {"required": ["vectors_sha256"], "properties": {"vectors_sha256": _SHA}},
}
_LAYOUT = {
    "type": "object",
    "anyOf": [{"maxProperties": 0},
              {"required": ["bands", "nlist", "edges", "rho"],
               "properties": {"bands": _POSITIVE, "nlist": _POSITIVE,
                              "edges": {"type": "array", "items": {"type": "number"}},
                              "rho": {"type": "array", "items": {"type": "number"}, "minItems": 1}}}],
}
_INDEX = {
    "type": "object",
    "required": ["config", "kind", "knobs", "dim", "weights", "transform", "trained", "parts", "ntotal"],
    "properties": {
        "config": {"type": "object"},
        "kind": {"enum": ["flat", "ivf", "ivfpq", "hnsw"]},
        "knobs": {"type": "object", "additionalProperties": {"type": "integer"}},
        "dim": _POSITIVE,
        "weights": _WEIGHTS,
        "weights_digest": {"type": "string"},
        "folder": _PATH,
        "transform": {
            "type": "object", "required": ["kind"],
            "properties": {"kind": {"enum": ["none", "balance"]}, "file": _PATH, "sha256": _SHA,
                           "damping": _DAMPING},
            "if": {"properties": {"kind": {"const": "balance"}}},
            "then": {"required": ["file", "sha256"]},
        },
        "trained": {"type": "object", "required": ["file", "sha256"], "properties": {"file": _PATH, "sha256": _SHA}},
        "layout": _LAYOUT,
        "cells": {"anyOf": [{"type": "object", "maxProperties": 0},
                            {"type": "object", "required": ["file", "sha256"],
                             "properties": {"file": _PATH, "sha256": _SHA}}]},
        "search": {"type": "object"},
        "calibration": {"type": "object", "required": ["search", "target", "k", "recall"],
                        "properties": {"search": {"type": "object"}, "target": {"type": "number"},
                                       "k": _POSITIVE, "recall": {"type": "number"}}},
        "parts": {"type": "array", "items": _PART},
        "ntotal": _COUNT,
    },
}
SCHEMA = {
    "type": "object",
    "required": ["format_version", "task", "model_fingerprint", "config", "groups", "num_samples", "dtype", "shards",
                 "projection_format"],
    "properties": {
        "task": {"type": "object", "required": ["task"],
                 "properties": {"task": {"type": "string", "minLength": 1}, "options": {"type": "object"}}},
        "checkpoint": {"type": ["string", "null"]},
        "model_fingerprint": {"type": "string", "minLength": 1},
        "config": {"type": "object", "required": ["projection"],
                   "properties": {"projection": {"type": "object"}, "group_rules": {"type": "array"}}},
        "groups": {"type": "array", "minItems": 1, "items": _GROUP},
        "num_samples": _COUNT,
        "dtype": {"enum": ["float32", "float16"]},
        "metadata_columns": _STRINGS,
        "shards": {"type": "array", "items": _SHARD},
        "gram": {"type": "object", "required": ["sha256", "count"],
                 "properties": {"file": _PATH, "sha256": _SHA, "count": _COUNT, "skipped_groups": _STRINGS}},
        "factors": {"type": "object", "required": ["file", "sha256", "fisher", "count"],
                    "properties": {"file": _PATH, "sha256": _SHA, "fisher": {"enum": ["true", "empirical"]},
                                   "count": _COUNT}},
        "run_key": {"type": "string"},
        "projection_format": {"type": "object", "required": ["version", "chunk_bytes"],
                              "properties": {"version": _POSITIVE, "chunk_bytes": _POSITIVE}},
        "weights": {"type": "object", "propertyNames": _NAME,
                    "additionalProperties": {"type": "object", "additionalProperties": _WEIGHTS}},
        "indexes": {"type": "object", "propertyNames": _NAME, "additionalProperties": _INDEX},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
               type(None): "null"}


def validate_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """``manifest`` in the current format, or a one-line :class:`StoreMismatchError` naming the field."""
    if not isinstance(manifest, dict):
        _fail(where, "(the manifest)", f"expected an object, got {_type_name(manifest)}")
    version = manifest.get("format_version")
    if version not in (1, FORMAT_VERSION) or isinstance(version, bool):
        raise StoreMismatchError(
            f"{where}: store format version {version!r} (manifest field format_version), this gradindex reads "
            f"versions 1 and {FORMAT_VERSION}; featurize again"
        )
    manifest = upgrade(manifest)
    error = jsonschema.exceptions.best_match(_VALIDATOR.iter_errors(manifest))
    if error is not None:
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required" and isinstance(error.instance, dict):
            path += [next(name for name in error.validator_value if name not in error.instance)]
        _fail(where, ".".join(path), _describe(error))
    manifest = _canonical(manifest, where)
    for field, check in _consistency(manifest):
        try:
            problem = check()
        except _CONFIG_ERRORS as err:
            problem = str(err)
        if problem:
            _fail(where, field, problem)
    return manifest


_CONFIG_ERRORS = (ConfigError, TypeError, ValueError, KeyError, AttributeError)


def _canonical(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest with every stage config parsed and written back whole (defaults filled in), so
    readers find each config field; a config that does not parse is refused, naming it."""
    def parse(field: str, cls: Any, data: dict[str, Any]) -> dict[str, Any]:
        try:
            return cls.from_dict(data).to_dict()
        except _CONFIG_ERRORS as err:
            _fail(where, field, str(err))

    manifest = {**manifest, "config": parse("config", FeaturizeConfig, manifest["config"])}
    if "indexes" in manifest:
        manifest["indexes"] = {
            concept: {**entry, "config": parse(f"indexes.{concept}.config", IndexConfig, entry["config"]),
                      "search": parse(f"indexes.{concept}.search", SearchConfig, entry.get("search", {}))}
            for concept, entry in manifest["indexes"].items()
        }
    return manifest


def upgrade(manifest: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest in the version-2 layout: weights kept per setting, the projection format."""
    if manifest.get("format_version") != 1:
        return manifest
    manifest = {**manifest, "format_version": FORMAT_VERSION}
    manifest.setdefault("projection_format", dict(V1_PROJECTION_FORMAT))
    if isinstance(manifest.get("weights"), dict):
        manifest["weights"] = {concept: _v1_weights(entry) for concept, entry in manifest["weights"].items()}
    return manifest


def _v1_weights(entry: Any) -> Any:
    if not (isinstance(entry, dict) and isinstance(entry.get("weights"), dict)):
        return entry  # the schema names what is wrong
    info = entry.get("info") if isinstance(entry.get("info"), dict) else {}
    setting = info.get("config") if isinstance(info.get("config"), dict) else {}
    try:
        key = setting_key(setting.get("preconditioner", "gram"), setting.get("damping", DEFAULT_DAMPING))
    except ConfigError:
        return entry
    return {key: entry}


def manifest_paths(manifest: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(field, path relative to the store)`` of every file and folder a (validated) manifest names."""
    for i, shard in enumerate(manifest["shards"]):
        yield f"shards.{i}.path", shard["path"]
    if manifest.get("gram"):
        yield "gram.file", manifest["gram"].get("file", "gram.npz")
    if manifest.get("factors"):
        yield "factors.file", manifest["factors"]["file"]
    for concept, entry in manifest.get("indexes", {}).items():
        where = f"indexes.{concept}"
        if "folder" in entry:
            yield f"{where}.folder", entry["folder"]
        yield f"{where}.trained.file", entry["trained"]["file"]
        if entry["transform"]["kind"] != "none":
            yield f"{where}.transform.file", entry["transform"]["file"]
        if entry.get("cells"):
            yield f"{where}.cells.file", entry["cells"]["file"]
        for i, part in enumerate(entry["parts"]):
            yield f"{where}.parts.{i}.file", part["file"]
            yield f"{where}.parts.{i}.ids_file", part["ids_file"]
            if part.get("vectors_file"):
                yield f"{where}.parts.{i}.vectors_file", part["vectors_file"]


# -- what the schema cannot say ---------------------------------------------------------------------
def _consistency(manifest: dict[str, Any]):
    """``(field, check)`` pairs; ``check()`` returns a problem or None (a ConfigError counts as one)."""
    groups = [g["name"] for g in manifest["groups"]]
    dim = sum(g["dim"] for g in manifest["groups"])
    shards = manifest["shards"]
    yield "groups", lambda: f"group names repeat: {groups}" if len(set(groups)) != len(groups) else None
    yield "dtype", lambda: (f"{manifest['dtype']}, but config.dtype is {manifest['config']['dtype']}"
                            if manifest["dtype"] != manifest["config"]["dtype"] else None)
    yield "shards", lambda: ("shard paths repeat" if len({s["path"] for s in shards}) != len(shards) else None)
    yield "num_samples", lambda: (
        f"{manifest['num_samples']} samples, but the shards hold {sum(s['rows'] for s in shards)} rows"
        if sum(s["rows"] for s in shards) != manifest["num_samples"] else None)
    for concept, settings in manifest.get("weights", {}).items():
        for key, entry in settings.items():
            yield f"weights.{concept}.{key}.weights", lambda entry=entry: _weights_problem(entry, groups)
    for concept, entry in manifest.get("indexes", {}).items():
        where = f"indexes.{concept}"
        yield f"{where}.config.concept", lambda concept=concept, entry=entry: (
            f"{entry['config']['concept']!r} is not the entry's name {concept!r}"
            if entry["config"]["concept"] != concept else None)
        yield f"{where}.dim", lambda entry=entry: (
            f"{entry['dim']}, but the groups add up to {dim}" if entry["dim"] != dim else None)
        yield f"{where}.weights.weights", lambda entry=entry: _weights_problem(entry["weights"], groups)
        yield f"{where}.ntotal", lambda entry=entry: (
            "differs from the sum of its parts" if entry["ntotal"] != sum(p["ntotal"] for p in entry["parts"])
            else None)
        banded = entry["kind"] in ("ivf", "ivfpq")
        yield f"{where}.layout", lambda entry=entry, banded=banded: (
            f"a {entry['kind']} index needs its band layout" if banded != bool(entry.get("layout")) else None)
        seen: set[int] = set()
        for i, part in enumerate(entry["parts"]):
            yield f"{where}.parts.{i}.shards", lambda part=part, seen=seen: _part_problem(part, len(shards), seen)
            if banded and entry.get("layout"):
                yield f"{where}.parts.{i}.info", lambda part=part, entry=entry: _bands_problem(part, entry["layout"])
    for concept in manifest.get("indexes", {}):
        yield "indexes", lambda concept=concept: check_name(concept, "index name") and None


def _weights_problem(entry: dict[str, Any], groups: list[str]) -> str | None:
    weights = entry["weights"]
    missing = sorted(set(groups) - set(weights))
    if missing:
        return f"misses groups {missing}"
    bad = {g: w for g, w in weights.items() if not math.isfinite(w)}
    return f"weights must be finite, got {bad}" if bad else None


def _part_problem(part: dict[str, Any], num_shards: int, seen: set[int]) -> str | None:
    outside = [s for s in part["shards"] if s >= num_shards]
    if outside:
        return f"store shards {outside} do not exist (the store has {num_shards})"
    twice = sorted(seen & set(part["shards"]))
    seen.update(part["shards"])
    return f"store shards {twice} are in two parts" if twice else None


def _bands_problem(part: dict[str, Any], layout: dict[str, Any]) -> str | None:
    info = part.get("info") or {}
    if len(info.get("band_max", [])) != layout["bands"] or len(info.get("band_count", [])) != layout["bands"]:
        return f"expected band_max and band_count for {layout['bands']} bands"
    cells = layout["bands"] * layout["nlist"]
    if "cell_max" in info and (len(info["cell_max"]) != cells or len(info.get("cell_count", [])) != cells):
        return f"expected cell_max and cell_count for {cells} cells (bands × nlist)"
    return None


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, str) else " or ".join(error.validator_value)
        return f"expected {wanted}, got {_type_name(error.instance)}"
    if error.validator == "required":
        return "missing"
    text = error.message
    return text if len(text) <= 160 else text[:157] + "..."


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _fail(where: str, field: str, problem: str) -> None:
    raise StoreMismatchError(
        f"{where}: manifest field {field or '(top level)'}: {problem}; the manifest is corrupt, crafted or from "
        "another gradindex version"
    )
