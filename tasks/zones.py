"""Which zone a store's hour windows are read in: the one resolver every entry point uses.

A state file records the zone its windows were written for. A dispatcher (or a command) given
no zone takes that one, else the machine's local zone; given a different zone it refuses,
unless told to convert, because ``[8, 22]`` in Shanghai is not ``[8, 22]`` in UTC.
"""

from __future__ import annotations

from datetime import tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tzlocal

from tasks.errors import InvalidTaskError, TimezoneMismatchError

__all__ = ["choose_timezone", "resolve_timezone", "zone_key"]


def resolve_timezone(value: str | tzinfo | None) -> tzinfo:
    """An IANA zone name or tzinfo as a tzinfo; None is the machine's local zone."""
    if value is None:
        return tzlocal.get_localzone()
    if isinstance(value, tzinfo):
        return value
    if isinstance(value, str):
        try:
            return ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise InvalidTaskError("timezone", f"unknown time zone {value!r}") from None
    raise InvalidTaskError("timezone", f"must be an IANA zone name or a tzinfo, not {value!r}")


def zone_key(zone: tzinfo) -> str | None:
    """The IANA key a file records for ``zone`` (None for a zone without one)."""
    key = getattr(zone, "key", None)
    if isinstance(key, str):
        return key
    name = str(zone)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None
    return name


def choose_timezone(
    requested: tzinfo | None, recorded: str | None, path: Path, *, convert: bool = False
) -> tzinfo:
    """The zone of the store whose file at ``path`` records ``recorded`` (None: no record).

    ``requested`` None takes the recorded zone, else the local one. A requested zone other
    than the recorded one raises :class:`TimezoneMismatchError` unless ``convert`` is true;
    a recorded zone unknown here raises :class:`InvalidTaskError` unless a zone is requested
    with ``convert``.
    """
    if recorded is None:
        return requested if requested is not None else resolve_timezone(None)
    if requested is not None:
        if convert or zone_key(requested) == recorded:
            return requested
        raise TimezoneMismatchError(path, recorded, zone_key(requested) or str(requested))
    try:
        return ZoneInfo(recorded)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidTaskError(
            "timezone",
            f"{str(path)!r} records the time zone {recorded!r}, unknown here; give the zone "
            "to use with convert_timezone=True (--timezone ZONE --convert-timezone)",
        ) from None
