"""The sign-in dialects of five existing services, each a thin translator over the core.

Each module exposes ``surface`` (its error envelope) and ``router`` (its routes, with the
service's own paths). ``REGISTRY`` maps a dialect's name to its module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

REGISTRY: dict[str, str] = {
    "classroom": "authgate.dialects.classroom",
    "descope": "authgate.dialects.descope",
    "tiledesk": "authgate.dialects.tiledesk",
    "deskera": "authgate.dialects.deskera",
    "webapi": "authgate.dialects.webapi",
}


def load(name: str) -> ModuleType:
    return importlib.import_module(REGISTRY[name])
