"""Locks on object storage: lease objects, exact where the server takes conditional PUTs.

In: an :class:`~gradindex.store.storage.ObjectStorage` and a lock's name (``.writer.lock``,
``.manifest.lock``, ``indexes/<concept>/b-<id>/.lock``). Out: :class:`Lease`, what stands in
for an ``flock`` there (exclusive or shared, blocking or not; S3 has no locks).

A lease is a small JSON object ``{owner, host, pid, renewed, ttl}``: ``<name>`` for an exclusive
lease, ``<name>-<owner>`` for each shared one. Its holder renews it every ``ttl/3`` s from a
thread and deletes it on release; a lease not renewed for ``ttl`` s (``GRADINDEX_LEASE_SECONDS``,
default 60: its holder was killed) no longer counts. Lease times are the writers' clocks, assumed
to agree to well within ``ttl``.

* **Exclusive leases are exact** where botocore is installed (``pip install 'gradindex[s3]'``)
  and the server honours conditional PUTs (AWS S3 documents them, SeaweedFS 4.48 does them;
  probed once per bucket and process by creating an object twice with ``If-None-Match: *``). Acquiring is one PUT with
  ``If-None-Match: *`` (of any number of racing writers exactly one gets it), taking over a
  stale lease is a PUT with ``If-Match: <its ETag>`` (one taker wins), renewing is a PUT with
  ``If-Match: <our ETag>``. pyarrow sends no such headers, hence botocore for these few PUTs.
* **Best effort otherwise**: read the leases, write ours, wait ``SETTLE`` s, read again and back
  off if ours was overwritten or a conflicting one appeared. A second writer that comes while the
  first holds the lease is refused; two that start within the same fraction of a second can both
  pass.
* **Shared leases** are always plain PUTs of per-holder objects. gradindex takes them only while
  holding the store's exclusive ``.manifest.lock`` (a build claiming its folder), and the tidy
  that removes folders holds that lease too, so they are as exact as it is.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from gradindex.errors import ObjectStoreError
from gradindex.store.settings import env_seconds, s3_settings

if TYPE_CHECKING:
    from gradindex.store.storage import ObjectStorage

logger = logging.getLogger(__name__)


def lease_seconds() -> float:
    """How long a lease object stays valid without renewal (``GRADINDEX_LEASE_SECONDS``, default 60)."""
    return env_seconds("GRADINDEX_LEASE_SECONDS", 60.0)


class ConditionalPuts:
    """``If-None-Match``/``If-Match`` PUTs, GETs with ETags and DELETEs of one bucket, through botocore."""

    def __init__(self, client: Any, storage: ObjectStorage):
        self.client = client
        self.storage = storage
        self.bucket, _, self.prefix = storage.base.partition("/")

    @classmethod
    def probe(cls, storage: ObjectStorage) -> "ConditionalPuts | None":
        """A client if conditional PUTs work on this bucket, else ``None`` (logged)."""
        if os.environ.get("GRADINDEX_S3_CONDITIONAL", "1").strip().lower() in ("0", "false", "no", "off"):
            return None
        try:
            import botocore.config
            import botocore.session
        except ImportError:
            logger.info("%s: botocore is not installed, so locks are best effort (pip install 'gradindex[s3]')",
                        storage)
            return None
        settings = s3_settings()
        config = botocore.config.Config(
            connect_timeout=settings["timeout"], read_timeout=settings["timeout"] * 6,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path"} if settings["endpoint"] else None)
        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=settings["endpoint"], region_name=settings["region"], config=config)
        puts = cls(client, storage)
        probe = f".gradindex-probe-{uuid.uuid4().hex[:12]}"
        try:
            first, second = puts.create(probe, b"1"), puts.create(probe, b"2")
            puts.delete(probe)
        except ObjectStoreError as err:
            logger.info("%s: conditional PUTs unavailable (%s); locks are best effort", storage, err)
            return None
        if not (first and second is None):
            logger.info("%s: the server ignores If-None-Match; locks are best effort", storage)
            return None
        return puts

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    def _call(self, doing: str, relative: str, **kwargs: Any) -> dict[str, Any] | None:
        """The response, ``None`` for a failed precondition or a missing object, else a one-line error."""
        import botocore.exceptions

        try:
            return getattr(self.client, doing)(Bucket=self.bucket, Key=self._key(relative), **kwargs)
        except botocore.exceptions.ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404") or \
                    status in (404, 409, 412):
                return None
            raise ObjectStoreError(f"{self.storage}/{relative}: {doing} failed ({code}: {err})") from None
        except botocore.exceptions.BotoCoreError as err:
            raise ObjectStoreError(f"{self.storage}/{relative}: {doing} failed ({err})") from None

    def create(self, relative: str, data: bytes) -> str | None:
        """PUT only if no object ``relative`` exists: its ETag, or ``None`` if one did."""
        response = self._call("put_object", relative, Body=data, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def replace(self, relative: str, data: bytes, etag: str) -> str | None:
        """PUT only if ``relative`` still has ``etag``: the new ETag, or ``None``."""
        response = self._call("put_object", relative, Body=data, IfMatch=etag)
        return None if response is None else response["ETag"]

    def get(self, relative: str) -> tuple[bytes, str] | None:
        response = self._call("get_object", relative)
        return None if response is None else (response["Body"].read(), response["ETag"])

    def delete(self, relative: str) -> None:
        self._call("delete_object", relative)


class Lease:
    """A lease on ``name`` in ``storage`` (module docstring): ``acquire(blocking)``, ``release()``."""

    SETTLE = 0.2

    def __init__(self, storage: ObjectStorage, name: str, shared: bool):
        self.storage, self.name, self.shared = storage, name, shared
        self.owner = uuid.uuid4().hex
        self.ttl = lease_seconds()
        self.object = f"{name}-{self.owner}" if shared else name
        self.puts = None if shared else storage.conditional()
        self.etag: str | None = None  # of our lease object (exact leases)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "renewed": time.time(), "ttl": self.ttl}).encode()

    def _live(self, data: bytes) -> dict[str, Any] | None:
        """The lease in ``data`` if it is someone else's and still valid."""
        try:
            lease = json.loads(data)
            fresh = float(lease["renewed"]) + float(lease["ttl"]) > time.time()
        except (ValueError, KeyError, TypeError):
            return None  # not a lease (a crafted or truncated object never blocks)
        return lease if fresh and lease.get("owner") != self.owner else None

    def acquire(self, blocking: bool) -> None:
        deadline = time.monotonic() + 3 * self.ttl
        while True:
            others = self._try_exact() if self.puts is not None else self._try_best_effort()
            if not others:
                break
            if not blocking:
                raise BlockingIOError(f"{self.storage}/{self.name} is held by {_holder(others)}")
            if time.monotonic() > deadline:
                raise ObjectStoreError(f"{self.storage}/{self.name}: still held by {_holder(others)} after "
                                       f"{3 * self.ttl:g} s; if that process is gone, wait {self.ttl:g} s")
            time.sleep(self.SETTLE * (1 + (uuid.uuid4().int % 5)))
        self._thread = threading.Thread(target=self._renew, daemon=True, name=f"lease {self.name}")
        self._thread.start()

    def _try_exact(self) -> list[dict[str, Any]]:
        """One conditional attempt: ``[]`` when the lease is ours, else the live lease in the way."""
        self.etag = self.puts.create(self.object, self._body())
        if self.etag is None:
            current = self.puts.get(self.object)
            if current is None:
                return [{}]  # released meanwhile: try again
            live = self._live(current[0])
            if live is not None:
                return [live]
            self.etag = self.puts.replace(self.object, self._body(), current[1])  # a dead holder's: take it over
            if self.etag is None:
                return [{}]
        shared = self._others()  # holders of shared leases on the name (ours is not counted)
        if shared:
            self.puts.delete(self.object)
            self.etag = None
        return shared

    def _try_best_effort(self) -> list[dict[str, Any]]:
        others = self._others()
        if others:
            return others
        self.storage.write_bytes(self.object, self._body())
        time.sleep(self.SETTLE)
        mine = self._mine()
        others = self._others()
        if mine and not others:
            return []
        if mine:
            self.storage.delete(self.object)  # a conflicting lease appeared meanwhile: back off
        return others or [{}]

    def _others(self) -> list[dict[str, Any]]:
        """Live leases of others on the same name that conflict with ours (exclusive: any;
        shared: an exclusive one)."""
        folder = str(PurePosixPath(self.name).parent)
        live = []
        for relative in self.storage.list("" if folder == "." else folder, recursive=False):
            if not (relative == self.name or (relative.startswith(f"{self.name}-") and not self.shared)):
                continue
            try:
                lease = self._live(self.storage.read_bytes(relative))
            except ObjectStoreError:
                continue  # deleted meanwhile
            if lease is not None:
                live.append(lease)
        return live

    def _mine(self) -> bool:
        """Whether our lease object still holds our owner id (a racing writer's PUT may have replaced it)."""
        try:
            return json.loads(self.storage.read_bytes(self.object)).get("owner") == self.owner
        except (ObjectStoreError, ValueError, AttributeError):
            return False

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if self.puts is None:
                    self.storage.write_bytes(self.object, self._body())
                    continue
                etag = self.puts.replace(self.object, self._body(), self.etag)
                if etag is None:
                    logger.warning("%s/%s: this lease was taken over (not renewed for %g s?)", self.storage,
                                   self.name, self.ttl)
                    self.etag = None
                    return
                self.etag = etag
            except ObjectStoreError:
                pass  # the next renewal tries again; past ttl others may take it

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.puts is not None:
            current = self.puts.get(self.object)
            if self.etag is not None and current is not None and current[1] == self.etag:
                self.puts.delete(self.object)
        elif self._mine():
            self.storage.delete(self.object)


def _holder(leases: list[dict[str, Any]]) -> str:
    lease = next((lease for lease in leases if lease), None)
    if lease is None:
        return "another process"
    return f"process {lease.get('pid')} on {lease.get('host')}"
