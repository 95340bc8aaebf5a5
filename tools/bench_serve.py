"""Lookups as a service: `gradindex serve` latency and QPS against one `gradindex query` process per call.

    flock /tmp/gradindex-bench.lock python tools/bench_serve.py --store /work/runs/serve/store-1e5

The store is real featurized data: the digits MLP's projected gradients (3 groups × 256 = 768 dims)
of 10⁵ augmented digits (tools/enlarged_digits.py), with a flat (exact) index::

    python -m gradindex featurize tools/enlarged_digits.py:EnlargedDigits --task-option size=100000 \\
        --out /work/runs/serve/store-1e5 --shard-size 25000
    python -m gradindex build-index /work/runs/serve/store-1e5

Queries: the store task's held-out digits (augmented), one per request, ``k`` 10. Measured in one run,
on this machine, everything on 127.0.0.1:

1. ``gradindex query STORE --inputs one.npz -k 10 --json`` per call (subprocess wall time: start-up,
   imports, model, index load, one lookup), ``--query-calls`` times; the median is the baseline.
2. ``gradindex serve STORE --port 0`` in a subprocess: time to its first answer; its answer to the
   baseline's query must equal ``query --json``'s. Then, per concurrency level C (1, 8, 32 by
   default), C client threads (one keep-alive connection each) send single-query requests for
   ``--seconds`` (at most ``--max-requests``): p50/p99 latency per request, QPS, and the server's
   batching counters (mean queries per featurize + search).

Prints one JSON object per row and a Markdown table (docs/benchmarks/serve.md's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def gradindex(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradindex", *args]


def query_inputs(store: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` held-out queries of the store's task: pixels ``[count, 8, 8]`` (0..16), labels ``[count]``."""
    from gradindex.features.query import load_store_task
    from gradindex.store.feature_store import FeatureStore

    task = load_store_task(FeatureStore.open(store, verify=False))
    x, y = task.query_dataset().tensors
    return (x[:count].numpy().reshape(-1, 8, 8) * 16.0).astype(np.float32), y[:count].numpy()


def store_size(store: str) -> str:
    manifest = json.loads((Path(store) / "manifest.json").read_text())
    index = manifest.get("indexes", {}).get("all", {})
    dim = sum(g["dim"] for g in manifest["groups"])
    return f"{manifest['num_samples']} vectors × {dim} ({index.get('kind', 'no index')} index)"


def time_query_calls(store: str, inputs: Path, k: int, calls: int, env: dict[str, str]) -> tuple[list[float], list]:
    times, answer = [], None
    for _ in range(calls):
        start = time.perf_counter()
        done = subprocess.run(gradindex("-q", "query", store, "--inputs", str(inputs), "-k", str(k), "--json"),
                              capture_output=True, text=True, env=env, check=True)
        times.append(time.perf_counter() - start)
        answer = [json.loads(line) for line in done.stdout.splitlines()]
    return times, answer


class Client:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, address: str):
        host, port = address.removeprefix("http://").rsplit(":", 1)
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        self.connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: {response.status} {payload}")
        return payload

    def close(self) -> None:
        self.connection.close()


def batching(address: str) -> dict:
    """The server's batching counters (a fresh connection: an idle one is closed after 5 s)."""
    client = Client(address)
    try:
        return client.call("GET", "/v1/info")["batching"]
    finally:
        client.close()


def load_level(address: str, bodies: list[dict], clients: int, seconds: float, max_requests: int) -> dict:
    """``clients`` threads sending ``bodies`` round-robin until ``seconds`` pass or ``max_requests`` are sent."""
    latencies: list[float] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        client = Client(address)
        i = offset
        try:
            while time.perf_counter() < deadline:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                start = time.perf_counter()
                client.call("POST", "/v1/attribute", bodies[i % len(bodies)])
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                i += clients
        finally:
            client.close()

    before = batching(address)
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = batching(address)
    batches = after["batches"] - before["batches"]
    return {"clients": clients, "requests": len(latencies), "seconds": wall, "qps": len(latencies) / wall,
            "p50_ms": 1e3 * percentile(latencies, 50), "p99_ms": 1e3 * percentile(latencies, 99),
            "queries_per_batch": (after["queries"] - before["queries"]) / max(batches, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="Store with a built index (10⁵ vectors for docs/benchmarks/serve.md).")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--clients", default="1,8,32", help="Concurrency levels.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Load time per level (at most).")
    parser.add_argument("--max-requests", type=int, default=5000, help="Requests per level (at most).")
    parser.add_argument("--query-calls", type=int, default=3, help="`gradindex query` calls timed.")
    parser.add_argument("--queries", type=int, default=256, help="Distinct held-out queries sent round-robin.")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    x, y = query_inputs(args.store, args.queries)
    bodies = [{"inputs": {"x": x[i:i + 1].tolist(), "y": y[i:i + 1].tolist()}, "k": args.k} for i in range(len(x))]
    with tempfile.TemporaryDirectory() as folder:
        one = Path(folder) / "one.npz"
        np.savez(one, x=x[:1], y=y[:1])
        query_times, reference = time_query_calls(args.store, one, args.k, args.query_calls, env)
    query_wall = statistics.median(query_times)
    print(json.dumps({"baseline": "gradindex query per call", "calls": len(query_times),
                      "wall_s": query_times, "median_s": query_wall}), flush=True)

    start = time.perf_counter()
    server = subprocess.Popen(gradindex("-q", "serve", args.store, "--port", "0", "--max-batch", str(args.max_batch),
                                        "--max-wait-ms", str(args.max_wait_ms)),
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()
        if " on http://127.0.0.1:" not in line:
            raise SystemExit(f"serve did not start: {line!r}")
        address = line.split(" on ")[-1].split()[0]
        first = Client(address)
        answer = first.call("POST", "/v1/attribute", bodies[0])["results"]
        startup = time.perf_counter() - start
        if answer != reference:
            raise SystemExit("serve's answer differs from query --json's")
        for body in bodies[:32]:  # warm-up
            first.call("POST", "/v1/attribute", body)
        first.close()
        print(json.dumps({"serve_startup_to_first_answer_s": startup, "same_answer_as_query": True}), flush=True)
        rows = []
        for clients in (int(c) for c in args.clients.split(",")):
            row = load_level(address, bodies, clients, args.seconds, args.max_requests)
            row["p50_speedup_vs_query"] = query_wall / (row["p50_ms"] / 1e3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\n{args.store}: {store_size(args.store)}; OMP_NUM_THREADS={threads}; --max-batch {args.max_batch} "
          f"--max-wait-ms {args.max_wait_ms:g}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"`gradindex query` per call: median {query_wall:.2f} s wall over {len(query_times)} calls; "
          f"`serve` start-up to first answer {startup:.1f} s\n")
    print("| clients | requests | p50 ms | p99 ms | QPS | queries / batch | p50 vs `query` per call |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['qps']:.0f} | "
              f"{r['queries_per_batch']:.1f} | {r['p50_speedup_vs_query']:.0f}× |")


if __name__ == "__main__":
    main()
