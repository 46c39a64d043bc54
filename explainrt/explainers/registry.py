"""The method registry: name → Method class, filled by ``@register`` in each method's file.

Apart from the package's ``__init__`` so a method may look up the others (Feature CAM's base
map) without importing its own package.
"""
from __future__ import annotations

METHODS: dict = {}


def register(cls):
    """Class decorator: add a Method subclass under its ``name`` (a name taken twice is a bug)."""
    if cls.name in METHODS:
        raise RuntimeError(f"two methods are named {cls.name!r}: {METHODS[cls.name].__name__} and {cls.__name__}")
    METHODS[cls.name] = cls
    return cls
