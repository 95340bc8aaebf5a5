"""Without Ray installed, the --ray options fail in one line naming the extra to install."""

from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from gradindex.cli import main
from gradindex.features.distributed import import_ray
from gradindex.errors import MissingDependencyError


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError


def test_import_ray_names_the_extra(no_ray):
    with pytest.raises(MissingDependencyError, match=r"pip install 'gradindex\[ray\]'"):
        import_ray()


@pytest.mark.parametrize("args", [
    ["featurize", "digits", "--out", "{tmp}/store", "--ray"],
    ["featurize", "digits", "--out", "{tmp}/store", "--ray", "auto"],
    ["query", "{tmp}/store", "--inputs", "{tmp}/q.npz", "--ray"],
])
def test_cli_ray_without_ray(no_ray, tmp_path, args):
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert result.output.strip() == "error: Ray is not installed: pip install 'gradindex[ray]'"
    assert not (tmp_path / "store").exists()
