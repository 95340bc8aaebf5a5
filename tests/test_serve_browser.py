"""The explorer page in a real browser: headless Chromium (the system's; Selenium, nothing downloaded) against
a running `gradindex serve` on 127.0.0.1. Load the page, pick a query with the keyboard, check the shown
top-k equals `query --json`, switch concept, switch opponents off and on, upload an image.

Skipped, with one line saying why, where chromium / chromedriver / selenium are missing (`.ci/run` installs
them with apt-get where it can). Set GRADINDEX_SCREENSHOTS=DIR to keep the screenshots (docs/explorer.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    selenium = None
if not (CHROMIUM and CHROMEDRIVER and selenium):
    pytest.skip("browser tests skipped: need chromium, chromedriver (apt-get install chromium chromium-driver) and "
                "selenium (pip install selenium)", allow_module_level=True)

from explorer_helpers import assert_cards_match, default_query_file, digits_store, query_json  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CARDS_JS = """
return Array.from(document.querySelectorAll('article.answer')).map(a => ({
  proponents: Array.from(a.querySelectorAll('section.proponents li.card')).map(
      c => [Number(c.dataset.sampleId), Number(c.dataset.score)]),
  opponents: Array.from(a.querySelectorAll('section.opponents li.card')).map(
      c => [Number(c.dataset.sampleId), Number(c.dataset.score)])}));
"""


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """`gradindex serve STORE --concept all --concept uniform --port 0` in a subprocess: (url, store, task, root)."""
    root = tmp_path_factory.mktemp("browser")
    store, task = digits_store(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "gradindex", "serve", str(store.path), "--concept", "all",
                                "--concept", "uniform", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    line = process.stdout.readline()
    match = re.search(r"on (http://\S+)", line)
    if match is None:
        process.kill()
        pytest.fail(f"serve did not start: {line}{process.stderr.read()}")
    yield match.group(1), store, task, root
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch anything
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def shown(driver) -> list[dict]:
    return [{kind: [(int(s), float(v)) for s, v in rows] for kind, rows in answer.items()}
            for answer in driver.execute_script(CARDS_JS)]


def wait_for_url(driver, fragment: str) -> None:
    WebDriverWait(driver, 60).until(lambda d: fragment in d.current_url and d.execute_script(
        "return document.readyState") == "complete")


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    keep = os.environ.get("GRADINDEX_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    return path


def test_pick_a_query_switch_concept_and_opponents(serving, browser, tmp_path):
    url, store, task, root = serving
    browser.get(url + "/")
    timing = browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {paint: performance.getEntriesByType('paint').map(e => [e.name, e.startTime]),"
        "        response: n.responseEnd, loaded: n.loadEventEnd};")
    assert timing["response"] > 0, timing
    print(f"\npage timing (ms since navigation start): {timing}, server: "
          f"{browser.find_element(By.ID, 'timing').text}")  # measured, not asserted (tools/ for speed)
    assert browser.title.startswith("gradindex explorer")
    assert all(img.get_attribute("alt") for img in browser.find_elements(By.TAG_NAME, "img"))
    # pick default query 4 with the keyboard: focus its thumbnail and press Enter
    link = browser.find_element(By.CSS_SELECTOR, 'a.query-link[data-q="4"]')
    browser.execute_script("arguments[0].focus();", link)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_for_url(browser, "q=4")
    reference = default_query_file(task, 4, root / "q4.npz")
    [answer] = shown(browser)
    assert_cards_match(answer, query_json(store.path, reference, 10)[0])
    # switch concept and k, submit with the keyboard
    Select(browser.find_element(By.ID, "concept")).select_by_value("uniform")
    k_box = browser.find_element(By.ID, "k")
    k_box.clear()
    k_box.send_keys("6", Keys.ENTER)
    wait_for_url(browser, "concept=uniform")
    [answer] = shown(browser)
    assert_cards_match(answer, query_json(store.path, reference, 6, "uniform")[0])
    # opponents off, then on again
    browser.find_element(By.ID, "opponents").click()
    browser.find_element(By.ID, "apply").click()
    WebDriverWait(browser, 60).until(lambda d: not d.find_elements(By.CSS_SELECTOR, "section.opponents"))
    assert shown(browser)[0]["opponents"] == [] and len(shown(browser)[0]["proponents"]) == 6
    browser.find_element(By.ID, "opponents").click()
    browser.find_element(By.ID, "apply").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "section.opponents li.card"))
    assert_cards_match(shown(browser)[0], query_json(store.path, reference, 6, "uniform")[0])
    # the address is shareable: a fresh load of it shows the same
    again = browser.current_url
    browser.get(again)
    assert_cards_match(shown(browser)[0], query_json(store.path, reference, 6, "uniform")[0])
    screenshot(browser, "explorer.png", tmp_path)


def test_upload_an_image(serving, browser, tmp_path):
    from PIL import Image

    url, store, task, root = serving
    browser.get(url + "/?q=0&k=5")
    pixels = task.split["x_test"][11].reshape(8, 8)
    picture = root / "my-digit.png"
    Image.fromarray(np.kron(255 - pixels * 255, np.ones((6, 6))).astype(np.uint8)).save(picture)
    browser.find_element(By.ID, "upload-file").send_keys(str(picture))
    browser.find_element(By.ID, "upload-fields").send_keys(json.dumps({"y": int(task.split["y_test"][11])}))
    browser.find_element(By.ID, "upload-button").click()
    wait_for_url(browser, "inputs=")
    inputs = json.loads(urllib.parse.parse_qs(urllib.parse.urlparse(browser.current_url).query)["inputs"][0])
    assert np.array(inputs["x"]).shape == (1, 8, 8) and inputs["y"] == [int(task.split["y_test"][11])]
    reference = root / "uploaded.npz"
    np.savez(reference, x=np.array(inputs["x"]), y=np.array(inputs["y"]))
    [answer] = shown(browser)
    assert_cards_match(answer, query_json(store.path, reference, 5)[0])
    assert "your query" in browser.find_element(By.CSS_SELECTOR, "article.answer h2").text
    screenshot(browser, "explorer-upload.png", tmp_path)
    # a bad file: the status line says why, the page stays
    bad = root / "bad.png"
    bad.write_bytes(b"not an image")
    browser.find_element(By.ID, "upload-file").send_keys(str(bad))
    browser.find_element(By.ID, "upload-button").click()
    WebDriverWait(browser, 60).until(
        lambda d: "cannot decode" in d.find_element(By.ID, "upload-status").text)
