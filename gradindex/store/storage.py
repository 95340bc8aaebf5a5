"""Where a store's files live: a local folder or a prefix on object storage (the one place that knows).

In: a store location — a path, a ``file://`` URI, or ``s3://bucket/prefix``. Out: a
:class:`Storage` whose methods take paths relative to the store root (POSIX,
``shards/part-00000.parquet``) and read, write, list, delete, lock and verify files:

* :class:`LocalStorage` — a folder: every write goes to a temporary sibling and is renamed,
  locks are ``flock`` s (this is how local stores have always been written, byte for byte).
* :class:`ObjectStorage` — ``s3://`` through ``pyarrow.fs.S3FileSystem``: a file is written
  in full to a local temporary file, then sent in one PUT to its final name (an object appears
  whole or not at all, so no temporary names live in the bucket); files that must be local
  (FAISS parts, memory-mapped re-rank vectors, shards for pyarrow) are downloaded once per
  machine to ``$GRADINDEX_CACHE`` (default ``$GRADINDEX_HOME/cache``), under
  ``<store-hash>/<folder>/<sha256[:16]>-<name>``, verified against their manifest sha256 when
  downloaded and again on each process's first use; locks are lease objects
  (:mod:`gradindex.store.leases`).

Connection settings of ``s3://`` (read from the environment, so Ray workers on other nodes
use the same): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` (or
the AWS config files / instance metadata, as the AWS SDK finds them), ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, and the endpoint of an S3-compatible server:
``GRADINDEX_S3_ENDPOINT``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``
(``http://127.0.0.1:8333``). Connect timeout ``GRADINDEX_S3_TIMEOUT`` seconds (default 5),
two attempts per request; ``GRADINDEX_S3_CONDITIONAL=0`` turns off the conditional PUTs that make
the locks exact (:mod:`gradindex.store.leases`). Every failure is one line naming the location
(:class:`~gradindex.errors.ObjectStoreError`).
"""

from __future__ import annotations

import fcntl
import hashlib
import fnmatch
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any

from gradindex.errors import ArtifactNotFoundError, ConfigError, GradIndexError, ObjectStoreError, StoreMismatchError
from gradindex.store.settings import s3_settings

SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]+):")  # one letter would be a Windows drive
OBJECT_SCHEMES = ("s3",)
CHUNK = 1 << 22


# -- small file helpers (local files) --------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def temporary_path(path: str | Path) -> Path:
    """A sibling temporary name for ``path`` (rename it onto ``path`` when complete)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def file_lock(file: Path, flags: int) -> Iterator[IO]:
    """``flock(file, flags)`` held for the block (created if missing); ``LOCK_NB`` raises ``BlockingIOError``."""
    handle = open(file, "a")
    try:
        fcntl.flock(handle, flags)
        yield handle
    finally:
        handle.close()  # releases the lock


def relative_key(root: str, relative: Any, what: str) -> PurePosixPath:
    """``relative`` (a path read from a manifest) as a clean relative POSIX path, or a one-line
    :class:`StoreMismatchError` for absolute paths, ``..``, NUL and backslashes."""
    text = relative if isinstance(relative, str) else ""
    pure = PurePosixPath(text)
    if not text or "\x00" in text or "\\" in text or pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise StoreMismatchError(
            f"{root}: {what} {relative!r} is not a relative path inside the store; the manifest is corrupt or crafted"
        )
    return pure


def inside_root(root: str | Path, relative: Any, what: str) -> Path:
    """The real path of ``relative`` if it stays inside the folder ``root`` (symlinks resolved)."""
    pure = relative_key(str(root), relative, what)
    base = Path(root).resolve()
    real = (base / pure).resolve()
    if not real.is_relative_to(base) or real == base:
        raise StoreMismatchError(f"{root}: {what} {relative!r} leads outside the store (to {real}); refused")
    return real


def cache_root() -> Path:
    """``$GRADINDEX_CACHE``, else ``$GRADINDEX_HOME/cache`` (``~/.cache/gradindex/cache``)."""
    if os.environ.get("GRADINDEX_CACHE"):
        return Path(os.environ["GRADINDEX_CACHE"])
    return Path(os.environ.get("GRADINDEX_HOME") or Path.home() / ".cache" / "gradindex") / "cache"


# -- opening a location ------------------------------------------------------------------------
def is_uri(location: Any) -> bool:
    """Whether ``location`` is a URI with a scheme (``s3://…``, ``file://…``) rather than a path."""
    return isinstance(location, str) and SCHEME.match(location) is not None and "://" in location


def open_storage(location: "str | Path | Storage") -> "Storage":
    """The storage of a store location: a :class:`Storage` as it is, a path or ``file://`` URI as
    :class:`LocalStorage`, ``s3://bucket/prefix`` as :class:`ObjectStorage`; other schemes are a
    one-line :class:`ConfigError`."""
    if isinstance(location, Storage):
        return location
    text = str(location)
    scheme = SCHEME.match(text)
    if scheme is None or isinstance(location, Path):
        return LocalStorage(Path(location))
    name = scheme.group(1).lower()
    parsed = urllib.parse.urlparse(text)
    if name == "file" and parsed.netloc in ("", "localhost"):
        return LocalStorage(Path(urllib.parse.unquote(parsed.path)))
    if name in OBJECT_SCHEMES:
        return ObjectStorage.from_uri(text)
    raise ConfigError(
        f"store {text}: supported locations are local paths, file:// URIs and s3://bucket/prefix, not {name}://"
    )


class Storage:
    """A store root. Paths given to the methods are relative to it (POSIX)."""

    location: str  # what messages show: the folder or the URI
    local: bool

    def __str__(self) -> str:
        return self.location

    def key(self, relative: Any, what: str = "file") -> str:
        """``relative`` checked to stay inside the store (a one-line error otherwise)."""
        return str(relative_key(self.location, relative, what))


class LocalStorage(Storage):
    """A store folder. ``confine(relative, what) -> Path`` resolves a manifest path to a real path
    inside the folder (default :func:`inside_root`)."""

    local = True

    def __init__(self, root: Path, confine: Callable[[Any, str], Path] | None = None):
        self.root = Path(root)
        self.location = str(self.root)
        self._confine = confine

    def file(self, relative: Any, what: str = "file") -> Path:
        """The real local path of ``relative`` (refused if it leads outside the store)."""
        return self._confine(relative, what) if self._confine else inside_root(self.root, relative, what)

    def real_folder(self, relative: str, what: str = "folder") -> str:
        """``relative`` if it is inside the store and no symlink (a one-line error otherwise)."""
        if self.file(relative, what) != self.root.resolve() / relative:
            raise StoreMismatchError(f"{self.root}: {what} {relative} is a symlink; refused")
        return relative

    def make_root(self, *folders: str) -> None:
        """Create the store folder (and ``folders`` in it); a file in its place is a one-line error."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"store path {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in folders:
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    def exists(self, relative: str = "") -> bool:
        return (self.root / relative).exists() if relative else self.root.is_dir()

    def is_file(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    def size(self, relative: str, what: str = "file") -> int | None:
        """The size in bytes of the file ``relative`` (``None`` when there is none)."""
        path = self.file(relative, what)
        return path.stat().st_size if path.is_file() else None

    def sizes(self, relatives: list[str], what: str = "file") -> dict[str, int | None]:
        """``{relative: size in bytes, or None when missing}`` (each refused if it leads outside the store)."""
        out = {}
        for relative in relatives:
            path = self.file(relative, what)
            out[relative] = path.stat().st_size if path.is_file() else None
        return out

    def read_bytes(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def write_bytes(self, relative: str, data: bytes) -> None:
        atomic_write_bytes(self.root / relative, data)

    def temporary(self, relative: str) -> Path:
        """A temporary name beside ``relative`` (its folder created) to write the file under first."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return temporary_path(path)

    def publish(self, tmp: Path, relative: str) -> None:
        """Rename the finished ``tmp`` onto ``relative``."""
        os.replace(tmp, self.root / relative)

    def written(self, relative: str, size: int, sha256: str) -> bool:
        """Whether ``relative`` holds the complete file of ``size`` bytes and ``sha256``."""
        path = self.root / relative
        return path.stat().st_size == size and sha256_file(path) == sha256

    def names(self, folder: str, pattern: str) -> list[str]:
        """Names of the entries of ``folder`` that match the glob ``pattern``."""
        return sorted(p.name for p in (self.root / folder).glob(pattern))

    def is_folder(self, relative: str) -> bool:
        return (self.root / relative).is_dir()

    def files(self, folder: str) -> list[str]:
        """Names of the files (and symlinks) directly in ``folder``."""
        return sorted(p.name for p in (self.root / folder).iterdir() if p.is_symlink() or p.is_file())

    def folders(self, folder: str) -> list[str]:
        """Names of the real subfolders (no symlinks) of ``folder``."""
        top = self.root / folder
        return sorted(p.name for p in top.iterdir() if p.is_dir() and not p.is_symlink()) if top.is_dir() else []

    def delete(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)

    def delete_tree(self, relative: str) -> None:
        """Remove the folder ``relative`` with everything in it (a file or symlink there: just it)."""
        target = self.root / relative
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    def remove_temporaries(self, folders: list[str], name: str = "*") -> list[Path]:
        """Delete temporary files (``.<name>.tmp-*``) a killed writer left in ``folders``."""
        leftovers = sorted(p for folder in folders for p in (self.root / folder).glob(f".{name}.tmp-*"))
        for file in leftovers:
            file.unlink(missing_ok=True)
        return leftovers

    def fetch(self, relative: str, sha256: str | None, verify: bool, missing: str, mismatch: str,
              what: str = "file") -> Path:
        """The local path of ``relative``, its sha256 checked when ``verify``."""
        path = self.file(relative, what)
        if not path.is_file():
            raise ArtifactNotFoundError(missing)
        if verify and sha256_file(path) != sha256:
            raise StoreMismatchError(mismatch)
        return path

    def scratch(self, name: str) -> Path:
        """A local folder for things derived from the store (``eval lds``'s retrained models)."""
        return self.root / name

    @contextmanager
    def lock(self, relative: str, shared: bool = False, blocking: bool = True) -> Iterator[None]:
        """``flock`` on ``relative`` (created if missing); not ``blocking``: ``BlockingIOError`` if taken."""
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        with file_lock(self.root / relative, flags):
            yield


# -- object storage ------------------------------------------------------------------------------
def s3_filesystem() -> Any:
    """A ``pyarrow.fs.S3FileSystem`` configured from the environment (module docstring)."""
    from pyarrow import fs

    settings = s3_settings()
    options: dict[str, Any] = {"connect_timeout": settings["timeout"], "request_timeout": settings["timeout"] * 6,
                               "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=2)}
    if settings["endpoint"]:
        scheme, _, netloc = settings["endpoint"].partition("://")
        options["endpoint_override"] = netloc
        options["scheme"] = scheme
    if settings["region"]:
        options["region"] = settings["region"]
    return fs.S3FileSystem(**options)


class ObjectStorage(Storage):
    """A store under ``s3://bucket/prefix`` (see the module docstring)."""

    local = False

    def __init__(self, filesystem: Any, base: str, location: str):
        self.fs = filesystem
        self.base = base.rstrip("/")
        self.location = location
        self.downloads = 0  # files fetched into the cache by this object (tests)

    @classmethod
    def from_uri(cls, uri: str) -> "ObjectStorage":
        parsed = urllib.parse.urlparse(uri)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket or "") or parsed.query or parsed.fragment \
                or not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ConfigError(f"store {uri}: expected s3://BUCKET/PREFIX (a bucket name and a folder in it)")
        return cls(s3_filesystem(), f"{bucket}/{prefix}", f"s3://{bucket}/{prefix}")

    # -- plumbing
    def _full(self, relative: str) -> str:
        return f"{self.base}/{relative}" if relative else self.base

    @contextmanager
    def _errors(self, doing: str, relative: str = "") -> Iterator[None]:
        """pyarrow/AWS errors as one line naming the location (no traceback, no retries here)."""
        try:
            yield
        except OSError as err:
            if isinstance(err, GradIndexError):
                raise
            text = " ".join(str(err).split()) or type(err).__name__
            where = f"{self.location}/{relative}" if relative else self.location
            raise ObjectStoreError(f"{where}: {doing} failed ({text}); check the bucket, the credentials "
                                   "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the endpoint "
                                   "(GRADINDEX_S3_ENDPOINT)") from None

    def _info(self, relative: str) -> Any:
        with self._errors("stat", relative):
            return self.fs.get_file_info(self._full(relative))

    # -- the Storage interface (see LocalStorage for what each method means)
    def file(self, relative: Any, what: str = "file") -> PurePosixPath:
        return PurePosixPath(self.key(relative, what))

    def real_folder(self, relative: str, what: str = "folder") -> str:
        return self.key(relative, what)

    def make_root(self, *folders: str) -> None:
        """Nothing to create (folders are key prefixes); the bucket must exist and be reachable."""
        from pyarrow import fs

        bucket = self.base.split("/", 1)[0]
        with self._errors("open bucket"):
            if self.fs.get_file_info(bucket).type != fs.FileType.Directory:
                raise ObjectStoreError(f"{self.location}: no bucket {bucket!r} at the endpoint; create it first")

    def exists(self, relative: str = "") -> bool:
        from pyarrow import fs

        return self._info(relative).type != fs.FileType.NotFound

    def is_file(self, relative: str) -> bool:
        return self.size(relative) is not None

    def size(self, relative: str, what: str = "file") -> int | None:
        from pyarrow import fs

        info = self._info(self.key(relative, what))
        return info.size if info.type == fs.FileType.File else None

    def sizes(self, relatives: list[str], what: str = "file") -> dict[str, int | None]:
        """One listing per folder instead of a request per file."""
        folders = {str(PurePosixPath(self.key(r, what)).parent) for r in relatives}
        listed: dict[str, int] = {}
        for folder in folders:
            listed.update(self.list("" if folder == "." else folder, recursive=False))
        return {r: listed.get(self.key(r, what)) for r in relatives}

    def written(self, relative: str, size: int, sha256: str) -> bool:
        """An object appears only whole (one PUT): its size is checked; readers check its sha256."""
        return self.size(relative) == size

    def names(self, folder: str, pattern: str) -> list[str]:
        return sorted(name for name in (PurePosixPath(r).name for r in self.list(folder, recursive=False))
                      if fnmatch.fnmatchcase(name, pattern))

    def is_folder(self, relative: str) -> bool:
        from pyarrow import fs

        return self._info(relative).type == fs.FileType.Directory

    def files(self, folder: str) -> list[str]:
        return sorted(PurePosixPath(r).name for r in self.list(folder, recursive=False))

    def folders(self, folder: str) -> list[str]:
        from pyarrow import fs

        with self._errors("list", folder):
            infos = self.fs.get_file_info(fs.FileSelector(self._full(folder), recursive=False, allow_not_found=True))
        return sorted(PurePosixPath(i.path).name for i in infos if i.type == fs.FileType.Directory)

    def remove_temporaries(self, folders: list[str], name: str = "*") -> list[Path]:
        """Nothing: no temporary names are ever written to the bucket."""
        return []

    def read_bytes(self, relative: str) -> bytes:
        with self._errors("read", relative):
            with self.fs.open_input_stream(self._full(relative)) as handle:
                return handle.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        with self._errors("write", relative):
            with self.fs.open_output_stream(self._full(relative)) as handle:
                handle.write(data)

    def temporary(self, relative: str) -> Path:
        folder = self._cache_dir() / ".tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f".{PurePosixPath(relative).name}.tmp-{uuid.uuid4().hex[:8]}"

    def publish(self, tmp: Path, relative: str) -> None:
        """Upload the finished local file ``tmp`` to ``relative`` (then remove ``tmp``)."""
        with self._errors("upload", relative):
            with open(tmp, "rb") as source, self.fs.open_output_stream(self._full(relative)) as target:
                while block := source.read(CHUNK):
                    target.write(block)
        tmp.unlink(missing_ok=True)

    def list(self, relative: str = "", recursive: bool = True) -> dict[str, int]:
        """``{path relative to the store: size}`` of every file under ``relative`` (``recursive``: in
        its subfolders too)."""
        from pyarrow import fs

        with self._errors("list", relative):
            infos = self.fs.get_file_info(fs.FileSelector(self._full(relative), recursive=recursive,
                                                          allow_not_found=True))
        start = len(self.base) + 1
        return {info.path[start:]: info.size for info in infos if info.type == fs.FileType.File}

    def delete(self, relative: str) -> None:
        from pyarrow import fs

        with self._errors("delete", relative):
            if self.fs.get_file_info(self._full(relative)).type == fs.FileType.File:
                self.fs.delete_file(self._full(relative))

    def delete_tree(self, relative: str) -> None:
        if self.is_file(relative):
            self.delete(relative)
            return
        with self._errors("delete", relative):
            for name in self.list(relative):
                self.fs.delete_file(self._full(name))

    def _cache_dir(self) -> Path:
        return cache_root() / hashlib.sha256(self.location.encode()).hexdigest()[:16]

    def cached_path(self, relative: str, sha256: str) -> Path:
        pure = PurePosixPath(relative)
        return self._cache_dir() / pure.parent / f"{sha256[:16]}-{pure.name}"

    def fetch(self, relative: str, sha256: str | None, verify: bool, missing: str, mismatch: str,
              what: str = "file") -> Path:
        """A verified local copy of ``relative`` in the cache: downloaded once per machine (checked
        against ``sha256`` on arrival, the store's copy refused with ``mismatch`` if it differs) and
        checked again whenever a process reuses it (a changed cached copy is refused: delete it).
        Always verified, whatever ``verify`` says: the cache never holds an unchecked file."""
        relative = self.key(relative, what)
        if sha256 is None:
            raise StoreMismatchError(f"{self.location}: {relative} has no sha256 in the manifest; refused")
        path = self.cached_path(relative, sha256)
        if path.is_file():
            if sha256_file(path) != sha256:
                raise StoreMismatchError(
                    f"{path}: checksum mismatch in the local cache of {self.location}/{relative} (changed on this "
                    f"machine); delete it (or the cache folder {self._cache_dir()}) and run again"
                )
            return path
        if self.size(relative, what) is None:
            raise ArtifactNotFoundError(missing)
        self.downloads += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
        digest = hashlib.sha256()
        try:
            with self._errors("download", relative):
                with self.fs.open_input_stream(self._full(relative)) as source, open(tmp, "wb") as target:
                    while block := source.read(CHUNK):
                        digest.update(block)
                        target.write(block)
            if digest.hexdigest() != sha256:
                raise StoreMismatchError(mismatch)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def scratch(self, name: str) -> Path:
        return self._cache_dir() / name

    def conditional(self) -> Any:
        """The conditional-PUT client of this bucket (:class:`gradindex.store.leases.ConditionalPuts`), or
        ``None`` where there is none (no botocore, a server that ignores the conditions, or
        ``GRADINDEX_S3_CONDITIONAL=0``); probed once."""
        if not hasattr(self, "_conditional"):
            from gradindex.store.leases import ConditionalPuts

            self._conditional = ConditionalPuts.probe(self)
        return self._conditional

    @contextmanager
    def lock(self, relative: str, shared: bool = False, blocking: bool = True) -> Iterator[None]:
        """A lease object standing for an ``flock`` (see :mod:`gradindex.store.leases`)."""
        from gradindex.store.leases import Lease

        lease = Lease(self, relative, shared)
        lease.acquire(blocking)
        try:
            yield
        finally:
            lease.release()
