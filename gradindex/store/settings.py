"""Object-storage settings from the environment (no I/O, no imports of the storage classes).

``GRADINDEX_S3_ENDPOINT`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), ``AWS_REGION``,
``GRADINDEX_S3_TIMEOUT`` and the lease length ``GRADINDEX_LEASE_SECONDS``: read by
:mod:`gradindex.store.storage` and :mod:`gradindex.store.leases` alike, so neither imports the other
for them. A malformed value is a one-line :class:`~gradindex.errors.ConfigError`.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

from gradindex.errors import ConfigError


def _endpoint() -> str | None:
    for name in ("GRADINDEX_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        raise ConfigError(f"{name}={text!r}: expected a number of seconds") from None
    if not value > 0:
        raise ConfigError(f"{name}={text!r}: expected a positive number of seconds")
    return value


def s3_settings() -> dict[str, Any]:
    """``{"endpoint": "scheme://host:port" or None, "region": str or None, "timeout": seconds}`` from the
    environment (module docstring); a one-line :class:`ConfigError` for a malformed value."""
    endpoint = _endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        try:
            parsed = urllib.parse.urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            host = parsed.hostname
        except ValueError:  # e.g. 'http://[::1' (an unclosed IPv6 bracket)
            host = None
        if host is None or parsed.scheme not in ("http", "https") or parsed.path not in ("", "/"):
            raise ConfigError(f"S3 endpoint {endpoint!r}: expected http(s)://HOST[:PORT]")
        endpoint = f"{parsed.scheme}://{parsed.netloc}"
        region = region or "us-east-1"  # an S3-compatible server ignores it; never look it up
    return {"endpoint": endpoint, "region": region, "timeout": env_seconds("GRADINDEX_S3_TIMEOUT", 5.0)}
