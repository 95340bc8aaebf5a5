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
413 body over the limit, 503 shutting down, 500 anything else (the traceback goes to the
server's log, never to the client).
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from gradindex.errors import GradIndexError
from gradindex.serve.batcher import MicroBatcher
from gradindex.serve.engine import AttributionEngine
from gradindex.serve.http import RequestError, error_response, json_response, read_body

logger = logging.getLogger(__name__)


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

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        return error_response(err.status_code, f"{err.detail}: {request.method} {request.url.path}")

    @app.exception_handler(RequestError)
    async def request_error(_: Request, err: RequestError) -> Response:
        return error_response(err.status, str(err))

    @app.post("/v1/attribute")
    async def attribute(request: Request) -> Response:
        body = await read_body(request, config.max_body_bytes)
        try:
            payload = json.loads(body, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as err:
            raise RequestError(400, f"request body is not valid JSON ({err})") from None
        try:
            parsed = await run_in_threadpool(engine.parse, payload)
            results = await batcher.submit(parsed, len(parsed.queries))
        except GradIndexError as err:
            raise RequestError(400, str(err)) from None
        except RuntimeError as err:
            if "shutting down" in str(err):
                raise RequestError(503, str(err)) from None
            raise _internal(err) from None
        except Exception as err:  # noqa: BLE001 - one line to the client, the traceback to the log
            raise _internal(err) from None
        return json_response({"results": results})

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


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _internal(err: BaseException) -> RequestError:
    logger.error("request failed", exc_info=err)
    return RequestError(500, f"internal error ({type(err).__name__}); see the server's log")
