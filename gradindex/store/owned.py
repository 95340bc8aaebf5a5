"""Which files in a store folder gradindex wrote, so that featurize never deletes anything else.

In: a :class:`~gradindex.store.storage.Storage` (a local folder or an object-storage prefix).
Out: :func:`store_files` → ``(owned, foreign)`` relative paths; :func:`clear_owned` deletes the owned
files of the shards, indexes and Gram matrices (what a new featurize run replaces) and the folders
that are then empty — a user's file anywhere in the folder stays where it is (issue 19: featurize
into an existing folder used to delete ``DIR/shards/``, ``DIR/indexes/`` recursively).
"""

from __future__ import annotations

import re

from gradindex.config import NAME_PATTERN
from gradindex.errors import ConfigError
from gradindex.store.storage import Storage

_NAME = NAME_PATTERN.pattern
_TEMPORARY = r"\.[^/]+\.tmp-[0-9a-f]+"
#: every path (relative to the store) a store's writers create; see gradindex.store.feature_store and
#: gradindex.index.shards for the layout
OWNED = re.compile(
    rf"(?:manifest\.json|\.manifest\.lock|\.writer\.lock|gram(?:-[0-9a-f]{{16}})?\.npz|factors-[0-9a-f]{{16}}\.npz|{_TEMPORARY}"
    rf"|shards/(?:part-\d+\.(?:parquet|json)|{_TEMPORARY})"
    rf"|indexes/{_NAME}/(?:\.lock|{_TEMPORARY})"
    rf"|indexes/{_NAME}/b-[0-9a-f]+/(?:\.lock|trained\.faiss|transform\.npz|cells\.npz|{_TEMPORARY}"
    rf"|part-\d+-\d+\.(?:faiss|ids\.npy|f16|json)))"
)
#: folders a store writes: their owned files are listed one by one; ``lds`` (the LDS cache) is owned whole
STORE_FOLDERS = ("shards", "indexes")
OWNED_FOLDERS = ("lds",)
#: what a new featurize run replaces (relative-path prefixes)
REPLACED = ("shards/", "indexes/", "gram", "factors-")


def _walk(storage: Storage, folder: str) -> list[str]:
    """Every file under ``folder`` (relative to the store), recursively."""
    if not storage.is_folder(folder):
        return []
    prefix = f"{folder}/" if folder else ""
    files = [prefix + name for name in storage.files(folder)]
    for name in storage.folders(folder):
        files.extend(_walk(storage, prefix + name))
    return files


def store_files(storage: Storage) -> tuple[list[str], list[str]]:
    """``(owned, foreign)``: the files in the store folder a store writes, and every other file or folder
    (relative paths, sorted). ``foreign`` non-empty means the folder holds a user's things."""
    if not storage.exists():
        return [], []
    owned, foreign = [], []
    for name in storage.files(""):
        (owned if OWNED.fullmatch(name) else foreign).append(name)
    for name in storage.folders(""):
        if name in OWNED_FOLDERS:
            continue
        if name not in STORE_FOLDERS:
            foreign.append(f"{name}/")
            continue
        for path in _walk(storage, name):
            (owned if OWNED.fullmatch(path) else foreign).append(path)
    return sorted(owned), sorted(foreign)


def refuse_foreign_folder(storage: Storage) -> None:
    """A one-line error when ``storage`` holds anything a store does not write (call it for a folder with no
    manifest, unless ``--overwrite``: that writes the store beside those files, and :func:`clear_owned`
    never deletes them)."""
    _, foreign = store_files(storage)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise ConfigError(
            f"{storage} is not empty and holds no feature store ({foreign[0]!r}{more}); featurize into a new or "
            "empty folder, or pass --overwrite to write the store beside those files (they are kept)"
        )


def clear_owned(storage: Storage) -> None:
    """Delete the shards, index builds and Gram files a store wrote (nothing else), then the store's
    folders that are left empty."""
    owned, _ = store_files(storage)
    for path in owned:
        if path.startswith(REPLACED):
            storage.delete(path)
    for folder in STORE_FOLDERS:
        _remove_empty(storage, folder)


def _remove_empty(storage: Storage, folder: str) -> bool:
    """Remove ``folder`` and its subfolders where they hold no file; whether ``folder`` went."""
    if not storage.is_folder(folder):
        return True
    empty = all([_remove_empty(storage, f"{folder}/{name}") for name in storage.folders(folder)])
    if empty and not storage.files(folder):
        storage.delete_tree(folder)
        return True
    return False
