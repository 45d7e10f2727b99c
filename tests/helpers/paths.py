"""Paths: the repository's root, and the absolute local paths a saved file should not hold."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: src/, tests/, docs/, recipes/, ...


def absolute_paths(file) -> list[str]:
    """The strings of a saved JSON (or the words of a card) that are absolute local paths."""
    import re

    if file.suffix != ".json":
        return re.findall(r"(?<![\w.:])/(?:home|work|tmp|usr|root|opt)/\S+", file.read_text())
    found = []

    def walk(value):
        if isinstance(value, dict | list):
            for item in value.values() if isinstance(value, dict) else value:
                walk(item)
        elif isinstance(value, str) and (value.startswith("/") or "site-packages" in value):
            found.append(value)

    walk(json.loads(file.read_text()))
    return found
