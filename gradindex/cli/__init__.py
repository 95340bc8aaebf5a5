"""The ``gradindex`` command line (click).

* :mod:`~gradindex.cli.app` — the command group and the one error policy (one line, exit 2).
* :mod:`~gradindex.cli.options` — flags and parameter types shared by several commands.
* one module per verb group: :mod:`~gradindex.cli.featurize_cmd` (``groups``, ``featurize``),
  :mod:`~gradindex.cli.index_cmd` (``build-index``), :mod:`~gradindex.cli.weights_cmd`
  (``learn-weights``, ``weights plot``), :mod:`~gradindex.cli.query_cmd` (``query``, ``serve``),
  :mod:`~gradindex.cli.eval_cmd` (``eval lds|precision|recall``), :mod:`~gradindex.cli.info_cmd`
  (``info``, ``demo``), :mod:`~gradindex.cli.tune_cmd` (``tune``), :mod:`~gradindex.cli.report_cmd`
  (``report --html``).
* :mod:`~gradindex.cli.demo` — the end-to-end demo on bundled data.
"""

from gradindex.cli.app import main
from gradindex.cli import (  # noqa: F401  (each module registers its commands)
    eval_cmd, factors_cmd, featurize_cmd, index_cmd, info_cmd, query_cmd, report_cmd, tune_cmd, weights_cmd,
)

__all__ = ["main"]
