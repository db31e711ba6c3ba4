"""How a capture writes its store: the options object, sizes given as text, options kept as JSON."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from attnhooks.backends.base import Codec
from attnhooks.errors import StoreOptionError

__all__ = ["StoreOptions", "dumps_options", "parse_bytes"]


@dataclass(frozen=True)
class StoreOptions:
    """How a capture writes its store (see :func:`attnhooks.capture` for each option)."""

    mode: str = "create"
    buffer: int = 1 << 30
    when_full: str = "block"
    dtype: str | None = None
    codec: Codec | None = None


def parse_bytes(value: int | str) -> int:
    """``1 << 30``, ``"512MiB"``, ``"1GiB"``, ``"2GB"`` -> bytes.

    Raises:
        StoreOptionError: neither a positive number of bytes nor a size.

    Example:
        >>> parse_bytes("512MiB"), parse_bytes("2GB"), parse_bytes(4096)
        (536870912, 2000000000, 4096)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", value, re.IGNORECASE)
        if match:
            unit = match.group(2).upper().rstrip("B").rstrip("I")
            power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
            base = 1024 if "I" in match.group(2).upper() or unit == "" else 1000
            return int(float(match.group(1)) * base**power)
    raise StoreOptionError(f"buffer={value!r}: use a number of bytes or a size such as '512MiB' or '2GiB'")


def dumps_options(options: dict[str, Any]) -> str:
    """A capture's options as given, as the JSON text kept in its store's metadata."""
    return json.dumps(options, default=repr, sort_keys=True)
