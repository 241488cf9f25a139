"""Masking secrets for display: values of secret-looking names, and credentials in text.

A name is secret-looking when it contains one of a few words (see :func:`looks_secret`):
kwargs keys, keys of nested dicts (a ``headers`` dict), ``name=value`` assignments,
``Name: value`` headers and ``"name": value`` pairs inside text are all judged alike.

Everything here runs on user data of any size (a kwarg of a megabyte, a command's stderr),
so the work is linear in the input and mostly done in C: each pattern starts with a literal
word, found by the regex engine's fast search in a lower-cased copy of the text, and every
repetition after it is possessive and stops at the next occurrence of that word, so no
character is scanned again from each of its positions. Only the values actually masked cost
Python-level work.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Any

__all__ = ["MASK", "looks_secret", "mask_secrets", "mask_text"]

MASK = "***"

# The words that make a name secret, each with the conditions around it (matched in the
# lower-cased name; the first word of each is a literal the regex engine searches fast):
# - password, passwd, passphrase, passcode anywhere (PGPASSWORD); pass alone (--pass, db.pass)
#   but not bypass, passenger, compass
# - pw alone (db_pw); pwd as the last part of a longer name (MYSQL_PWD), not PWD (the working
#   directory) nor OLDPWD
# - token (access_token, X-Auth-Token), not tokenizer
# - secret, cookie (Set-Cookie), session (sessionid), private (private_key), jwt
# - credential(s) anywhere, creds alone
# - signature anywhere (X-Amz-Signature), sig alone (a SAS token's sig=)
# - auth and the words it starts (auth, oauth, Authorization, x-auth-token, unauthorised),
#   not author, authors, authority, co_author
# - api key (apikey, api_key, X-Api-Key), and key as the last word (ssh_key, secret-key,
#   keys), not monkey, keyboard, hotkey, key_id; in the original case also a camel-cased
#   last word Key (sshKey, AccountKey), see _CAMEL_KEY
_WORDS: tuple[tuple[str, str], ...] = (
    ("pass", r"pass(?:w(?:or)?d|phrase|code|(?<![a-z]pass)(?![a-z]))"),
    ("pw", r"pw(?:(?<![a-z]pw)(?![a-z])|(?<=[_.-]pw)d(?![a-z]))"),
    ("token", r"token(?!iz)"),
    ("secret", r"secret"),
    ("cookie", r"cookie"),
    ("session", r"session"),
    ("private", r"private"),
    ("jwt", r"jwt"),
    ("cred", r"cred(?:ential|(?<![a-z]cred)s(?![a-z]))"),
    ("sig", r"sig(?:nature|(?<![a-z]sig)(?![a-z]))"),
    ("auth", r"auth(?!or(?!i[sz]))"),
    ("key", r"key(?:(?<=apikey)|(?<=api[_.-]key)|(?<![a-z0-9]key)s?(?![\w.-]))"),
)
_CAMEL_KEY = ("Key", r"Key(?<=[A-Za-z0-9]Key)s?(?![\w.-])")

# After a secret word: the rest of the name (up to the word's next secret-looking occurrence,
# which is tried on its own), a separator and the value, whose span is what gets masked:
# - name=value (query strings, environment assignments, options: ?token=abc, PGPASSWORD=abc,
#   --api-key=abc, password = "abc"); an unquoted value ends at white space, '&', ';' or a
#   quote; '==' is a comparison, not an assignment
# - "name": value / 'name': value (JSON, Python reprs: {"password": "abc"}); an unquoted
#   value ends at a ',', '}' or ']' too
# - Name: value (HTTP headers, YAML, log lines: Authorization: Bearer abc); an unquoted
#   value runs to the end of the line
# A quoted value (escapes honoured, b'' and r'' prefixes allowed) has its inside masked; an
# unterminated one runs to the end of its line. The value's group is the last one a match
# closes (its lastindex).
_ASSIGNMENT = r"""
    (?:(?!{word})[\w.-])*+
    (?:(?P<pair>['"][ \t]*+:)[ \t]*+ | (?P<eq>['"]?[ \t]*+=)[ \t]*+ | :[ \t]++)
    (?:
        [bBrRuU]{{0,2}}"(?P<dq>(?:[^"\\\r\n]++|\\.)*+)"?
      | [bBrRuU]{{0,2}}'(?P<sq>(?:[^'\\\r\n]++|\\.)*+)'?
      | (?(pair)(?P<item>[^\s&;,'"}}\]]++)
        |(?(eq)(?P<bare>[^\s&;'"=][^\s&;'"]*+)|(?P<line>[^\r\n]++)))
    )
"""

_NAMES = tuple(re.compile(pattern) for _, pattern in _WORDS)
_ASSIGNMENTS = tuple(
    re.compile(pattern + _ASSIGNMENT.format(word=pattern), re.VERBOSE) for _, pattern in _WORDS
)
_CAMEL_NAME = re.compile(_CAMEL_KEY[1])
_CAMEL_ASSIGNMENT = re.compile(_CAMEL_KEY[1] + _ASSIGNMENT.format(word=_CAMEL_KEY[1]), re.VERBOSE)

# The password of a URL's user info, up to the last '@' before the path (a password with an
# unencoded '@' is still masked whole): scheme://user:PASSWORD@host. The search starts at
# the literal '://'; the spans scanned after two of them never overlap, since each one
# stops at a '/'.
_URL_PASSWORD = re.compile(r"://(?<=[A-Za-z0-9+.-]://)[^\s:/@]*+:(?P<password>[^\s/]*)@")

# Texts masked together are joined by a character that no name, separator or value crosses.
_JOIN = "\n"


def _lowered(text: str) -> str:
    """``text`` lower-cased, character for character (same length, same positions)."""
    # U+0130 is the only character whose lower case is two characters long.
    return text.replace("\u0130", "i").lower()


def _secret_spans(text: str) -> list[tuple[int, int]]:
    """The spans of ``text`` to mask, sorted and without overlaps."""
    low = _lowered(text)
    found = [[match.span(match.lastindex or 0) for match in p.finditer(low)] for p in _ASSIGNMENTS]
    found.append([match.span(match.lastindex or 0) for match in _CAMEL_ASSIGNMENT.finditer(text)])
    if "://" in text:
        found.append([match.span("password") for match in _URL_PASSWORD.finditer(text)])
    found = [spans for spans in found if spans]
    if len(found) < 2:
        # One pattern's matches are already in order and apart.
        return found[0] if found else []
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for spans in found for span in spans):
        if merged and (start < merged[-1][1] or start == merged[-1][0]):
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _mask_all(texts: Sequence[str]) -> list[str]:
    """:func:`mask_text` of each of ``texts``, searched together (one pass over them all,
    however many short strings a structure holds)."""
    result = list(texts)
    if not texts:
        return result
    joined = texts[0] if len(texts) == 1 else _JOIN.join(texts)
    spans = _secret_spans(joined)
    if not spans:
        return result
    starts = list(accumulate((len(text) + len(_JOIN) for text in texts), initial=0))
    index = -1
    pieces: list[str] = []
    offset = last = 0
    for start, end in spans:
        if index < 0 or start >= starts[index + 1]:
            if pieces:
                pieces.append(texts[index][last:])
                result[index] = "".join(pieces)
            index = bisect_right(starts, start) - 1
            offset, last, pieces = starts[index], 0, []
        pieces += (texts[index][last : start - offset], MASK)
        last = end - offset
    pieces.append(texts[index][last:])
    result[index] = "".join(pieces)
    return result


def _secret_names(names: Sequence[str]) -> set[int]:
    """The indexes of the secret-looking ones among ``names``."""
    if not names:
        return set()
    joined = _JOIN.join(names)
    low = _lowered(joined)
    starts = list(accumulate((len(name) + len(_JOIN) for name in names), initial=0))
    found: set[int] = set()
    for pattern, text in [(p, low) for p in _NAMES] + [(_CAMEL_NAME, joined)]:
        match = pattern.search(text)
        while match is not None:
            index = bisect_right(starts, match.start()) - 1
            found.add(index)
            # One hit is enough for a name: go on after it.
            match = pattern.search(text, starts[index + 1])
    return found


def looks_secret(key: str) -> bool:
    """Whether a name (a kwargs key, a header, a variable) names something that must not be
    shown: ``password``, ``PGPASSWORD``, ``api_key``, ``X-Api-Key``, ``Authorization``,
    ``x-auth-token``, ``Set-Cookie``, ``sessionid``, ``ssh_key``, ... but not ``author``,
    ``monkey``, ``keyboard`` or ``key_id``."""
    return bool(_secret_names([key]))


def mask_text(text: str) -> str:
    """``text`` with credentials inside it masked: URL passwords and the values of
    secret-looking names (``postgres://user:***@host/db``, ``?token=***``,
    ``Authorization: ***``, ``{"password": "***"}``). Linear in the length of ``text``."""
    return _mask_all([text])[0]


def mask_secrets(value: Any) -> Any:
    """A copy of ``value`` (JSON-like: dicts, lists, strings, numbers) with the values of
    secret-looking keys replaced by ``***`` at any depth, and credentials inside other
    strings masked (see :func:`mask_text`)."""
    keys: list[str] = []
    texts: list[str] = []
    _gather(value, keys, texts)
    secret = {keys[i] for i in _secret_names(keys)}
    changed = zip(texts, _mask_all(texts), strict=True)
    masked = {text: new for text, new in changed if new is not text}
    return _rebuilt(value, secret, masked)


def _gather(value: Any, keys: list[str], texts: list[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            keys.append(str(key))
            _gather(item, keys, texts)
    elif isinstance(value, list):
        for item in value:
            _gather(item, keys, texts)
    elif isinstance(value, str):
        texts.append(value)


def _rebuilt(value: Any, secret: set[str], masked: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {
            key: MASK if str(key) in secret else _rebuilt(item, secret, masked)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rebuilt(item, secret, masked) for item in value]
    if isinstance(value, str):
        return masked.get(value, value)
    return value
