"""A readable ``repr`` for result dataclasses that hold arrays (shapes, not every number)."""
from __future__ import annotations

import dataclasses

import numpy as np


def _brief(value) -> str:
    if isinstance(value, np.ndarray):
        return f"<array {'x'.join(map(str, value.shape)) or 'scalar'} {value.dtype}>"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, dict) and len(value) > 8:
        return f"<dict of {len(value)}>"
    return repr(value)


class CompactRepr:
    """Mixin for dataclasses (declared with ``repr=False``): arrays and long lists shown by size."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={_brief(getattr(self, f.name))}" for f in dataclasses.fields(self) if f.repr)
        return f"{type(self).__name__}({fields})"
