"""The explorer page's speed against the JSON API's, on the demo store (one run, same machine, same server).

    flock /tmp/gradindex-bench.lock python tools/bench_explorer.py [--store gradindex-demo/store]

Without --store it builds the demo's store (`gradindex demo`'s: digits, default featurize, flat index)
under --out. Serves it in this process on 127.0.0.1 (a background thread), then, one request at a time
over a keep-alive connection, for the same default queries (``q`` cycling over the first 24):

1. ``POST /v1/attribute`` with k 10 (the API's latency), and with ``"opponents": true``;
2. ``GET /?q=..&k=10`` — the page with proponents and opponents, rendered (server time to the last byte);
3. with Chromium and Selenium installed: a headless browser's navigation to the page — ``responseEnd``,
   first contentful paint and ``loadEventEnd`` (ms from navigation start), after a warm-up navigation.

Prints one JSON object per row (medians over --requests) and the page/API ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


def build_demo_store(out: Path) -> Path:
    from gradindex.config import IndexConfig
    from gradindex.features.run import featurize
    from gradindex.index import build_index
    from gradindex.task import load_task

    task = load_task("digits")
    store = featurize(task, out / "store", overwrite=True, show_progress=False)
    build_index(store, IndexConfig(), show_progress=False)
    return out / "store"


def timed(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> float:
    started = time.perf_counter()
    connection.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    response = connection.getresponse()
    response.read()
    assert response.status == 200, (path, response.status)
    return 1000 * (time.perf_counter() - started)


def browser_timings(url: str, count: int) -> list[dict]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return []
    if not (chromium and driver_path):
        return []
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            rows = []
            for q in range(count + 1):  # row 0: the fresh browser's first navigation
                driver.get(f"{url}/?q={q % 24}&k=10")
                time.sleep(0.2)  # let the paint entries land
                rows.append(driver.execute_script(
                    "const n = performance.getEntriesByType('navigation')[0];"
                    "const p = performance.getEntriesByName('first-contentful-paint')[0];"
                    "return {response: n.responseEnd, paint: p ? p.startTime : null, loaded: n.loadEventEnd};"))
            return rows
        finally:
            driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gradindex-bench-explorer"))
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--browser-loads", type=int, default=8)
    args = parser.parse_args()

    from gradindex.config import ServeConfig
    from gradindex.serve.app import create_app
    from gradindex.serve.engine import AttributionEngine
    from gradindex.serve.server import ServerThread
    from gradindex.task import load_task

    store = args.store or build_demo_store(args.out)
    task = load_task("digits")
    queries = task.query_dataset()
    bodies = [json.dumps({"inputs": {"x": [(queries[q][0].numpy() * 16).tolist()], "y": [int(queries[q][1])]},
                          "k": 10}).encode() for q in range(24)]
    engine = AttributionEngine.open(store, config=ServeConfig(max_wait_ms=0))
    started = time.perf_counter()
    with ServerThread(create_app(engine)) as server:
        print(json.dumps({"row": "server start (page set-up and warm-up included)",
                          "ms": round(1000 * (time.perf_counter() - started), 1)}))
        host = urlparse(server.url)
        connection = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
        rows = {"api": [], "api_opponents": [], "page": []}
        for i in range(args.requests):
            q = i % 24
            rows["api"].append(timed(connection, "POST", "/v1/attribute", bodies[q]))
            with_opponents = json.dumps({**json.loads(bodies[q]), "opponents": True}).encode()
            rows["api_opponents"].append(timed(connection, "POST", "/v1/attribute", with_opponents))
            rows["page"].append(timed(connection, "GET", f"/?q={q}&k=10"))
        medians = {name: statistics.median(values) for name, values in rows.items()}
        for name, values in rows.items():
            print(json.dumps({"row": name, "median_ms": round(medians[name], 2),
                              "p90_ms": round(float(np.percentile(values, 90)), 2), "requests": len(values)}))
        print(json.dumps({"row": "ratios", "page/api": round(medians["page"] / medians["api"], 2),
                          "page/api_opponents": round(medians["page"] / medians["api_opponents"], 2)}))
        loads = browser_timings(server.url, args.browser_loads)
        if loads:
            first, loads = loads[0], loads[1:]
            print(json.dumps({"row": "browser: first navigation of a fresh browser (ms from start)",
                              **{key: None if value is None else round(value, 1) for key, value in first.items()}}))
            summary = {key: round(statistics.median(r[key] for r in loads if r[key] is not None), 1)
                       for key in ("response", "paint", "loaded") if any(r[key] is not None for r in loads)}
            print(json.dumps({"row": "browser: later navigations (ms from start, median)", **summary,
                              "loads": len(loads)}))
        else:
            print(json.dumps({"row": "browser", "skipped": "no chromium/chromedriver/selenium"}))
    engine.close()


if __name__ == "__main__":
    main()
