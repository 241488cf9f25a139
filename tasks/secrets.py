"""Masking values of keys that look secret, for logs and command-line output."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "looks_secret", "mask_secrets"]

MASK = "***"
_SECRET = re.compile(
    r"pass(word|wd|phrase)?|token|cookie|secret|(^|_)key$|api_?key|auth|credential|session|private",
    re.IGNORECASE,
)


def looks_secret(key: str) -> bool:
    """Whether a kwargs key names something that must not be shown (password, token, ...)."""
    return bool(_SECRET.search(key))


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` with the values of secret-looking keys replaced by ``***``."""
    if isinstance(value, dict):
        return {k: MASK if looks_secret(str(k)) else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    return value
