"""A small synchronous client of the control API, for the command line (and scripts).

It speaks to a dispatcher through its Unix socket (``<dir>/control.sock``) or over TCP
(``--url``), and turns error responses into :class:`ControlError` carrying the server's
message, so a command prints the same line whether it ran on the file or through the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, tzinfo
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from zoneinfo import ZoneInfo

import httpx
import orjson

from scheduler.control.api import API_PREFIX, path_segment
from scheduler.errors import ControlError
from scheduler.triggers import RunPreview
from tasks.model import TaskRecord
from tasks.waiting import Waiting

__all__ = ["PROBE_TIMEOUT", "ControlClient"]

PROBE_TIMEOUT = 2.0
"""Seconds to wait for a dispatcher's socket to answer before treating it as stale."""
_TIMEOUT = 60.0
"""Seconds a request may take: changes are saved before the answer (a large store's save)."""


class ControlClient:
    """Requests to one dispatcher's control API; use as a context manager or :meth:`close`."""

    def __init__(
        self,
        *,
        socket_path: Path | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = _TIMEOUT,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path and url")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if socket_path is not None:
            self.where = str(socket_path)
            transport = httpx.HTTPTransport(uds=str(socket_path))
            base = "http://localhost"
        else:
            assert url is not None
            self.where = url
            transport = httpx.HTTPTransport()
            base = url.rstrip("/")
        self._headers = headers
        self._timeout = timeout
        self._http = httpx.Client(
            transport=transport, base_url=base, headers=headers, timeout=timeout
        )
        self._health: dict[str, Any] | None = None
        self._followed = False

    @classmethod
    def probe(cls, socket_path: Path, token: str | None = None) -> ControlClient | None:
        """A client of the dispatcher serving ``socket_path``, or None if nothing answers.

        A standby of a cluster answers there: the client then speaks to the leader it names,
        over TCP with ``token``."""
        if not socket_path.exists():
            return None
        client = cls(socket_path=socket_path)
        if token:
            client._headers = {"Authorization": f"Bearer {token}"}  # for the leader only
        try:
            health = client._request("GET", "/health", timeout=PROBE_TIMEOUT, ok=(503,))
            leader = health.get("leader") or {}
            if health.get("role") == "standby" and leader.get("url"):
                client._follow(str(leader["url"]))
                health = client._request("GET", "/health", ok=(503,))
            client._health = health
        except ControlError:
            client.close()
            return None
        return client

    def _follow(self, location: str) -> None:
        """Speak to the instance at ``location`` from now on (a standby's 307 to its
        leader), with the same token; once only."""
        parts = httpx.URL(location)
        if parts.scheme not in ("http", "https") or self._followed:
            raise ControlError(f"{self.where} redirected to {location!r}: not followed")
        self._followed = True
        self._http.close()
        base = f"{parts.scheme}://{parts.netloc.decode()}"
        self.where = base
        self._http = httpx.Client(base_url=base, headers=self._headers, timeout=self._timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
        ok: tuple[int, ...] = (),
    ) -> Any:
        query = {k: _param(v) for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method,
                API_PREFIX + path,
                params=query,
                content=None if body is None else orjson.dumps(body),
                headers={"Content-Type": "application/json"} if body is not None else None,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise ControlError(f"cannot reach the dispatcher at {self.where}: {exc}") from exc
        location = response.headers.get("location")
        if response.status_code == 307 and location:
            # A standby of a cluster: the leader serves this, and gets the same token.
            self._follow(location)
            return self._request(method, path, params=params, body=body, timeout=timeout, ok=ok)
        if response.status_code >= 400 and response.status_code not in ok:
            try:
                error = response.json()
                message, field = str(error["message"]), error.get("field")
            except (ValueError, KeyError, TypeError):
                message, field = f"HTTP {response.status_code}: {response.text[:200]}", None
            raise ControlError(message, status=response.status_code, field=field)
        return response.json() if response.content else None

    # ------------------------------------------------------------------ queries

    def health(self) -> dict[str, Any]:
        """The dispatcher's health document (fetched once per client)."""
        if self._health is None:
            self._health = self._request("GET", "/health", ok=(503,))
        return self._health

    def zone(self) -> tzinfo:
        """The dispatcher's zone of the hour windows."""
        return ZoneInfo(self.health()["timezone"])

    def state_file(self) -> str:
        """The dispatcher's state file (as the server names it)."""
        return str(self.health()["state_file"])

    def list_tasks(
        self,
        *,
        account: str | None = None,
        status: str | None = None,
        task_type: str | None = None,
        sys_type: str | None = None,
        show_secrets: bool = False,
        limit: int | None = None,
        after: str | None = None,
    ) -> dict[str, Any]:
        """The ``/tasks`` listing; its ``tasks`` as :class:`TaskRecord`.

        With ``limit``, one page of at most that many tasks: its ``next`` (None on the last
        page) is the ``after`` of the following one.
        """
        listing: dict[str, Any] = self._request(
            "GET",
            "/tasks",
            params={
                "account": account,
                "status": status,
                "task_type": task_type,
                "sys_type": sys_type,
                "show_secrets": show_secrets or None,
                "limit": limit,
                "after": after,
            },
        )
        listing["tasks"] = [_record(data)[0] for data in listing["tasks"]]
        return listing

    def get_task(self, task_id: str, *, show_secrets: bool = False) -> TaskRecord:
        """One task's record."""
        return self.get_task_view(task_id, show_secrets=show_secrets)[0]

    def get_task_view(
        self, task_id: str, *, show_secrets: bool = False
    ) -> tuple[TaskRecord, Waiting | None]:
        """One task's record, and why it waits (the server's ``waiting``)."""
        data = self._request(
            "GET", f"/tasks/{_quote(task_id)}", params={"show_secrets": show_secrets or None}
        )
        return _record(data)

    def next_runs(self, task_id: str, count: int = 5) -> RunPreview:
        """The task's next planned runs."""
        data = self._request("GET", f"/tasks/{_quote(task_id)}/next-runs", params={"count": count})
        return RunPreview(
            data["task_id"],
            data["status"],
            data["if_resumed"],
            tuple(datetime.fromisoformat(t) for t in data["runs"]),
        )

    def account_tasks(self, account_id: str) -> list[str]:
        """The account's task ids in priority order."""
        data = self._request("GET", f"/accounts/{_quote(account_id)}")
        return list(data["task_ids"])

    def runs(self, task_id: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Run history entries as JSON objects (filters: account, limit, failed, since)."""
        result: list[dict[str, Any]] = self._request(
            "GET", "/runs", params={"task_id": task_id, **filters}
        )
        return result

    # ------------------------------------------------------------------ changes

    def add_task(self, keywords: Mapping[str, Any]) -> str:
        """Add one task (``add_task``'s keywords); its id once saved."""
        return str(self._request("POST", "/tasks", body=dict(keywords))["task_id"])

    def add_tasks(self, tasks: list[Mapping[str, Any]]) -> list[str]:
        """Add many tasks with one save, all or none; their ids."""
        data = self._request("POST", "/tasks/bulk", body={"tasks": [dict(t) for t in tasks]})
        return [str(task_id) for task_id in data["task_ids"]]

    def pause_task(self, task_id: str) -> TaskRecord:
        """Pause; the record once saved."""
        return TaskRecord.model_validate(self._request("POST", f"/tasks/{_quote(task_id)}/pause"))

    def resume_task(self, task_id: str) -> TaskRecord:
        """Resume; the record once saved."""
        return TaskRecord.model_validate(self._request("POST", f"/tasks/{_quote(task_id)}/resume"))

    def run_now(self, task_id: str) -> TaskRecord:
        """Ask for one run now; the record once the request is saved."""
        return TaskRecord.model_validate(self._request("POST", f"/tasks/{_quote(task_id)}/run"))

    def pause_account(self, account_id: str) -> list[dict[str, Any]]:
        """Pause every task of the account (one commit); per task: id, status, changed."""
        data = self._request("POST", f"/accounts/{_quote(account_id)}/pause")
        return list(data["tasks"])

    def resume_account(self, account_id: str) -> list[dict[str, Any]]:
        """Resume every paused task of the account (one commit); per task as above."""
        data = self._request("POST", f"/accounts/{_quote(account_id)}/resume")
        return list(data["tasks"])

    def remove_task(self, task_id: str) -> None:
        """Remove for good (saved when this returns)."""
        self._request("DELETE", f"/tasks/{_quote(task_id)}")

    def update_task(self, task_id: str, changes: Mapping[str, Any]) -> TaskRecord:
        """Edit in place (only the fields given); the record once saved."""
        return TaskRecord.model_validate(
            self._request("PATCH", f"/tasks/{_quote(task_id)}", body=dict(changes))
        )

    def reorder_task(self, task_id: str, position: int) -> tuple[str, list[str]]:
        """Move within the account's order; ``(account_id, task ids in the new order)``."""
        data = self._request(
            "POST", f"/tasks/{_quote(task_id)}/reorder", body={"position": position}
        )
        return str(data["account_id"]), list(data["task_ids"])


def _record(data: dict[str, Any]) -> tuple[TaskRecord, Waiting | None]:
    """A task view's record (its ``waiting`` is not a field of the record) and ``waiting``."""
    waiting = data.pop("waiting", None)
    return TaskRecord.model_validate(data), None if waiting is None else Waiting.of(waiting)


def _quote(segment: str) -> str:
    return path_segment(segment)


def _param(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return value
