"""Masking values of keys that look secret, for logs and command-line output."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "looks_secret", "mask_secrets", "mask_text"]

MASK = "***"
_SECRET = re.compile(
    r"pass(word|wd|phrase)?|token|cookie|secret|(^|_)key$|api_?key|auth|credential|session|private",
    re.IGNORECASE,
)


def looks_secret(key: str) -> bool:
    """Whether a kwargs key names something that must not be shown (password, token, ...)."""
    return bool(_SECRET.search(key))


# The password of a URL's user info: scheme://user:PASSWORD@host
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)", re.IGNORECASE
)
# name=value inside a string (query strings, environment assignments, command options) whose
# name looks secret: ?token=abc, PGPASSWORD=abc, --api-key=abc
_ASSIGNMENT = re.compile(r"(?P<head>(?P<name>[A-Za-z_][\w.-]*)=)(?P<value>[^\s&;'\"]+)")


def mask_text(text: str) -> str:
    """``text`` with credentials inside it masked: URL passwords and secret-looking
    ``name=value`` assignments (``postgres://user:***@host/db``, ``?token=***``)."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    return _ASSIGNMENT.sub(
        lambda m: m["head"] + MASK if looks_secret(m["name"].replace("-", "_")) else m[0], text
    )


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` with the values of secret-looking keys replaced by ``***``, and
    credentials inside other strings masked (see :func:`mask_text`)."""
    if isinstance(value, dict):
        return {k: MASK if looks_secret(str(k)) else mask_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str):
        return mask_text(value)
    return value
