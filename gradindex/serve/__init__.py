"""Lookups as a service: ``gradindex serve`` (HTTP; Ray Serve across machines with ``--ray``).

Modules, in the order a request flows:

* :mod:`~gradindex.serve.server` — uvicorn on a socket bound first (``run_server``; ``ServerThread`` for tests).
* :mod:`~gradindex.serve.app` — the FastAPI routes (``/v1/attribute``, ``/v1/health``, ``/v1/info``), limits, errors.
* :mod:`~gradindex.serve.batcher` — micro-batching of concurrent requests.
* :mod:`~gradindex.serve.engine` — warm ``Attributor`` s: request JSON → ``query --json``'s objects.
* :mod:`~gradindex.serve.ray_serve` — the same app on Ray Serve, index parts on replicas.

Needs the optional extra ``gradindex[serve]`` (FastAPI, uvicorn); nothing here is imported by
``import gradindex``.
"""

from __future__ import annotations

from gradindex.errors import MissingDependencyError

INSTALL_HINT = "pip install 'gradindex[serve]'"


def import_serving() -> None:
    """Check that FastAPI and uvicorn import, else a one-line error saying how to install them."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(f"gradindex serve needs FastAPI and uvicorn ({err}): {INSTALL_HINT}") from None
