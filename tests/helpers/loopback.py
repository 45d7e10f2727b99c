"""One HTTP request to a test server on loopback (`edje serve` in a thread or a subprocess)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def http_json(url: str, payload=None, *, body: bytes | None = None, method=None, timeout=20.0):
    """(status, JSON body) of one HTTP request on loopback; 4xx/5xx are returned, not raised."""
    if payload is not None:
        body = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())
