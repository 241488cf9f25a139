"""Choosing a dispatcher's :class:`~jobstores.state.StateStore`: :func:`resolve_store`.

The one place a ``store=`` argument is interpreted: None is the default (the journal on the
dispatcher directory), a store object is used as it is, and a URL names a store by its
scheme in :data:`URL_SCHEMES`: ``postgresql://`` and ``postgres://`` name the PostgreSQL store
(:mod:`jobstores.postgres`, the ``postgres`` extra), imported only when such a URL is given.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from jobstores.journal import JournalStorage
from jobstores.state import StateStore

__all__ = ["URL_SCHEMES", "resolve_store"]


def _postgres(url: str, directory: Path) -> StateStore:
    try:
        from jobstores.postgres.backend import open_url
    except ImportError as exc:
        raise ValueError(
            "store: a postgresql:// URL needs the PostgreSQL store: "
            f"pip install 'task-dispatcher[postgres]' ({exc.msg})"
        ) from None
    return open_url(url, directory)


URL_SCHEMES: dict[str, Callable[[str, Path], StateStore]] = {
    "postgresql": _postgres,
    "postgres": _postgres,
}
"""URL scheme -> ``opener(url, directory)`` returning the store the URL names."""


def resolve_store(store: StateStore | str | None, directory: Path) -> StateStore:
    """The store of the dispatcher on ``directory`` that ``store`` names.

    None: :class:`~jobstores.journal.JournalStorage` on ``directory`` (today's default). A
    :class:`~jobstores.state.StateStore` object: itself. A string: a URL whose scheme is in
    :data:`URL_SCHEMES`, else :class:`ValueError` naming ``store`` and the scheme (never
    the rest of the URL, which may hold a password). Anything else: :class:`TypeError`.
    """
    if store is None:
        return JournalStorage(directory)
    if isinstance(store, str):
        scheme = urlsplit(store).scheme.lower() if "://" in store else ""
        opener = URL_SCHEMES.get(scheme)
        if opener is None:
            known = ", ".join(sorted(URL_SCHEMES)) or "none yet"
            what = f"the URL scheme {scheme!r}" if scheme else "a string that is not a URL"
            raise ValueError(
                f"store: no store is known for {what} (URL schemes known: {known}); pass a "
                "StateStore object such as jobstores.JournalStorage(directory)"
            )
        return opener(store, directory)
    if isinstance(store, StateStore):
        return store
    raise TypeError(f"store: expected a StateStore, a URL or None, not {type(store).__name__}")
