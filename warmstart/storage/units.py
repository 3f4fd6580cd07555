"""The one size parser: `parse_size('8GB')` means the same in every part of warmstart.

Decimal (SI) suffixes are powers of 1000 and binary (IEC) suffixes powers of 1024, as the
standards write them: `8GB` is 8 * 10**9 bytes, `8GiB` is 8 * 2**30. A bare letter (`512M`,
`1g`), which no standard defines, is binary, the way `dd`, `ls -h` and Java heap flags read it.
Case does not matter and a trailing `/s` (rates such as `100MB/s`) is accepted.
"""

from __future__ import annotations

import math
import re
from typing import Any

from warmstart.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB,
    "k": KiB, "m": MiB, "g": GiB, "t": TiB,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([a-z]*)(?:/s)?")


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from an int or a string like '4096', '512MiB', '64M', '8GB', '1.5g'."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{key}: a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip().lower())
        if match and match[2] in UNITS:
            number = float(match[1]) * UNITS[match[2]]
            if math.isfinite(number):
                return int(number)
    raise ConfigError(f"{key}: cannot read {value!r} as a size (examples: 4096, 8MiB, 512M, "
                      f"8GB = 8*10^9, 8GiB = 8*2^30)")


def format_size(n: float) -> str:
    """A short binary-unit label for messages and reports: 1.5 GiB, 64 MiB, 900 B."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
