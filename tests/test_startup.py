"""Start-up: commands that compute nothing load neither torch nor FAISS (issue 12 item 4).

Each command runs in a fresh interpreter under ``python -X importtime``, whose report
names every module imported; the test reads the names, not the times, so it is not
sensitive to the machine's load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "faiss")


def imported_modules(*args: str) -> set[str]:
    """Run ``python -X importtime -m gradindex ARGS`` (this checkout); the names of the modules it imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "gradindex", *args], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "gradindex.cli.app" in names  # the report was read
    return names


def heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


@pytest.mark.parametrize("args", [["--help"], ["info", "--help"], ["serve", "--help"], ["query", "--help"]])
def test_help_imports_neither_torch_nor_faiss(args):
    assert heavy(imported_modules(*args)) == []


def test_info_and_weights_plot_import_neither_torch_nor_faiss(toy_store, tmp_path):
    assert heavy(imported_modules("info", str(toy_store.path))) == []
    assert heavy(imported_modules("info", "--json", str(toy_store.path))) == []
    assert heavy(imported_modules("weights", "plot", str(toy_store.path), "--out", str(tmp_path / "w.png"))) == []
    assert (tmp_path / "w.png").stat().st_size > 0


def test_a_computing_command_does_load_torch(toy_store):
    """The check can fail: `groups` needs the model."""
    manifest = toy_store.manifest
    assert "torch" in heavy(imported_modules("groups", manifest["task"]["task"], "--checkpoint", manifest["checkpoint"]))


def test_package_names_are_lazy_and_the_same_objects():
    code = (
        "import sys, gradindex\n"
        "assert 'torch' not in sys.modules\n"
        "import gradindex.features.run, gradindex.query.attributor, gradindex.index\n"
        "from gradindex import featurize, Attributor, TopK, FeatureStore, load_task\n"
        "assert featurize is sys.modules['gradindex.features.run'].featurize, featurize\n"
        "assert gradindex.featurize is featurize  # no submodule of that name shadows the function\n"
        "assert Attributor is gradindex.query.attributor.Attributor and TopK is gradindex.index.TopK\n"
        "assert set(gradindex.__all__) <= set(dir(gradindex))\n"
        "try:\n"
        "    gradindex.nothing\n"
        "except AttributeError as err:\n"
        "    assert 'nothing' in str(err)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
