"""The HTTP API of ``gradindex serve`` (a FastAPI app; uvicorn or Ray Serve runs it).

Routes:

* ``POST /v1/attribute`` — body ``{"inputs": ..., "k": 10, "concept": "all"}`` (``inputs``: the
  task's query fields as JSON, see ``Task.queries_from_json``); answer
  ``{"results": [{"query": i, "results": [{"rank", "sample_id", "score", ...metadata}]}]}``,
  the objects ``gradindex query --json`` prints, in the same order.
* ``GET /v1/health`` — ``{"status": "ok", "concepts": [...]}``.
* ``GET /`` and ``POST /upload`` — the explorer page (:mod:`gradindex.serve.page`).
* ``GET /v1/info`` — ``gradindex info``'s summary of the store, the served concepts, the
  limits and the batching counters (:meth:`MicroBatcher.stats`).

Requests are micro-batched (:class:`~gradindex.serve.batcher.MicroBatcher`). Every error is
a one-line JSON object ``{"error": "..."}``: 400 bad input, 404/405 unknown route or method,
413 body over the limit, 415 a body not sent as ``application/json``, 403 a ``Host`` that is not
loopback on a loopback-bound server, 503 shutting down, 500 anything else (the traceback goes to the
server's log, never to the client). Every answer says ``"stale": true`` (and why) once the store was
rebuilt after the server started (:meth:`AttributionEngine.staleness`).
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gradindex.errors import GradIndexError
from gradindex.serve.batcher import MicroBatcher
from gradindex.serve.engine import AttributionEngine
from gradindex.serve.http import RequestError, error_response, json_response, read_body

logger = logging.getLogger(__name__)


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def create_app(engine: AttributionEngine, page: bool = True) -> FastAPI:
    """The API over ``engine``; the batcher starts and stops with the app (ASGI lifespan).
    ``page``: also the explorer page at ``/`` (:mod:`gradindex.serve.page`)."""
    config = engine.config
    batcher: MicroBatcher = MicroBatcher(engine.answer, config.max_batch, config.max_wait_ms / 1000)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="gradindex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.batcher = batcher

    @app.middleware("http")
    async def loopback_host(request: Request, call_next: Any) -> Response:
        """A server bound to loopback answers only requests addressed to loopback (DNS rebinding: a web page's
        script reaching 127.0.0.1 under its own host name sends ``Host: evil.example``)."""
        if config.host in LOOPBACK_HOSTS and not _loopback_host(request.headers.get("host", "")):
            return error_response(403, "Host header must name this machine (localhost, 127.0.0.1 or [::1]) for a "
                                  "server bound to loopback; bind another --host to serve other names")
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        return error_response(err.status_code, f"{err.detail}: {request.method} {request.url.path}")

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> Response:
        return error_response(err.status, str(err))

    @app.post("/v1/attribute")
    async def attribute(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":  # a cross-site form or text/plain POST never runs a query
            raise RequestError(415, f"Content-Type must be application/json, got {content_type[:100]!r}")
        try:
            payload = json.loads(body, parse_constant=_refuse_constant)
        except RecursionError:
            raise RequestError(400, "request body is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not valid JSON ({err})") from None
        try:
            parsed = await run_in_threadpool(engine.parse, payload)
            results = await batcher.submit(parsed, len(parsed.queries))
            reason = await run_in_threadpool(engine.staleness)
        except GradIndexError as err:
            raise RequestError(400, str(err)) from None
        except RecursionError:
            raise RequestError(400, "request inputs are nested too deeply") from None
        except RuntimeError as err:
            if "shutting down" in str(err):
                raise RequestError(503, str(err)) from None
            raise _internal(err) from None
        except Exception as err:  # noqa: BLE001 - one line to the client, the traceback to the log
            raise _internal(err) from None
        return json_response({"results": results, "stale": reason is not None,
                              **({"stale_reason": reason} if reason is not None else {})})

    @app.get("/v1/health")
    async def health() -> Response:
        return json_response({"status": "ok", "concepts": engine.concepts})

    @app.get("/v1/info")
    async def info() -> Response:
        return json_response({**engine.info(), "batching": batcher.stats()})

    if page:
        from gradindex.serve.page import add_page_routes

        add_page_routes(app, engine)  # GET / (the explorer page) and POST /upload
    return app


def _loopback_host(header: str) -> bool:
    """Whether a ``Host`` header names this machine (``localhost``, ``127.0.0.1``, ``[::1]``, any port)."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_HOSTS


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _internal(err: BaseException) -> RequestError:
    logger.error("request failed", exc_info=err)
    return RequestError(500, f"internal error ({type(err).__name__}); see the server's log")
