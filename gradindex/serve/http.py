"""HTTP pieces shared by the API (:mod:`gradindex.serve.app`) and the page (:mod:`gradindex.serve.page`).

:class:`RequestError` (a refused request: status and one line), JSON responses, error bodies
``{"error": "<one line>"}``, and :func:`read_body`, which refuses a body over the limit as soon as
it is declared or streamed (413).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import Response


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


MAX_ERROR_CHARS = 1000


def error_response(status: int, message: str) -> Response:
    text = " ".join(str(message).split())
    if len(text) > MAX_ERROR_CHARS:  # never echo a megabyte of the request back
        text = f"{text[:MAX_ERROR_CHARS]}... ({len(text):,} characters)"
    return json_response({"error": text}, status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"request body over the limit of {limit} bytes (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)
