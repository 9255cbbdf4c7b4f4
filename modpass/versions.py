"""Versions recorded in saved plans."""

from __future__ import annotations

from importlib import metadata


def versions() -> dict[str, str]:
    found = {}
    for dist in ("modpass", "torch", "transformers"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found
