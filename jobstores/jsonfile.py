"""``JsonJobStore``: task records in ``dispatch_config.json``, served to APScheduler as jobs.

The records are the source of truth. The store owns them (and the file), builds an APScheduler
``Job`` from each schedulable record, and turns APScheduler's calls back into record changes:
``update_job`` after a run was submitted moves ``next_execution_time``; ``remove_job`` (a
trigger with no further run) marks the task ``completed``. The store never deletes a record on
APScheduler's behalf; only :meth:`remove_task` does.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from apscheduler.job import Job
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError
from pydantic import ValidationError

from jobstores.durable import (
    DirectoryLock,
    ensure_private_dir,
    remove_stale_temp_files,
    set_aside,
    write_atomic,
)
from jobstores.format import (
    CorruptFileError,
    Document,
    decode_document,
    encode_document,
    encode_raw,
    encode_task,
)
from scheduler.errors import DispatcherClosedError, InvalidTaskError, TaskNotFoundError
from scheduler.triggers import TaskTrigger, end_instant, same_instant, utc_now
from scheduler.zones import choose_timezone, zone_key
from tasks.manager import TaskManager, TaskManagerFactory
from tasks.model import TaskRecord, TaskStatus

__all__ = ["STATE_FILENAME", "JsonJobStore", "SaveHealth", "TaskJob", "describe_validation_error"]

logger = logging.getLogger(__name__)

STATE_FILENAME = "dispatch_config.json"
_RETRY_FIRST = 1.0  # seconds before the first retry of a failed background save; doubles
_RETRY_LIMIT = 60.0
_UNKNOWN_POSITION = 1 << 30
_NO_KWARGS: dict[str, Any] = {}  # shared by every job: the manager's run() takes none


@dataclass(frozen=True)
class SaveHealth:
    """How saving is going: what a host should watch."""

    last_saved_at: datetime | None = None
    """When the state was last written durably (None: not yet by this process)."""
    last_error: str | None = None
    """The error of the latest save, if it failed; None once a save succeeds."""
    last_error_at: datetime | None = None
    failed_saves: int = 0
    """Failed saves since the last successful one."""
    unsaved_task_ids: tuple[str, ...] = ()
    """Tasks whose latest change is not on disk yet."""

    @property
    def ok(self) -> bool:
        """Whether the latest save succeeded (or none has failed)."""
        return self.last_error is None


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """``(field, message)`` of the first problem in a pydantic error."""
    return validation_problems(exc)[0]


def validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    """``(field, message)`` of every problem in a pydantic error."""
    return [
        (
            ".".join(str(part) for part in error["loc"]) or "record",
            str(error["msg"]).removeprefix("Value error, "),
        )
        for error in exc.errors()
    ]


def parse_record(raw: Any, zone: tzinfo, *, parsed_json: bool = False) -> TaskRecord:
    """Validate one saved task object; raise :class:`InvalidTaskError` naming the field.

    ``parsed_json`` says ``raw`` came from orjson, so its kwargs need no JSON check.
    """
    if not isinstance(raw, dict):
        raise InvalidTaskError("record", f"is {type(raw).__name__}, not an object")
    try:
        return TaskRecord.model_validate(raw, context={"zone": zone, "kwargs_checked": parsed_json})
    except ValidationError as exc:
        raise InvalidTaskError(*describe_validation_error(exc)) from exc


class TaskJob(Job):
    """The APScheduler job of one task; also remembers where it is filed in the store's index."""

    __slots__ = ("filed_at",)

    @classmethod
    def adopt(cls, job: Job) -> TaskJob:
        """``job`` itself if it is a TaskJob, else a TaskJob copy of it."""
        if isinstance(job, cls):
            return job
        copy = cls.__new__(cls)
        for name in Job.__slots__:
            if name != "__weakref__" and hasattr(job, name):
                setattr(copy, name, getattr(job, name))
        return copy


class JsonJobStore(BaseJobStore):
    """A job store that keeps task records in ``<directory>/dispatch_config.json``.

    Creating the store takes the directory's lock (one owner at a time), sets aside anything
    unreadable, loads the records and re-creates each task's manager with
    ``manager_factory(sys_type=..., **kwargs)``. A record that cannot be restored is logged
    and kept verbatim in the file through later saves. ``timezone`` None is the zone the file
    records, else the local one; another zone than the recorded one needs
    ``convert_timezone=True`` (see :func:`scheduler.zones.choose_timezone`).

    Every method is thread-safe. APScheduler's methods save before they return; the
    record-changing methods (:meth:`add_tasks`, :meth:`update_task`, ...) leave saving to the
    caller, who picks :meth:`save` (durable on return), :meth:`save_async` or
    :meth:`request_save`. Concurrent saves share one write (group commit).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        timezone: tzinfo | None,
        manager_factory: TaskManagerFactory,
        now: datetime | None = None,
        convert_timezone: bool = False,
    ) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILENAME
        self.backup_path = self.directory / f"{STATE_FILENAME}.bak"
        self.timezone: tzinfo = timezone or UTC
        """The zone of the hour windows; settled by :meth:`_load` from the file's record."""
        self._requested_zone = timezone
        self._convert_zone = convert_timezone
        self._extra: dict[str, Any] = {}
        self.lock = threading.RLock()
        """Guards every structure below; the scheduler shares it as its job store lock."""
        self._factory = manager_factory
        self._records: dict[str, TaskRecord] = {}
        self._managers: dict[str, TaskManager] = {}
        self._order: dict[str, list[str]] = {}
        self.order_version = 0
        """Changes whenever a task's position within its account may have changed."""
        self._kept: list[Any] = []
        self._kept_ids: set[str] = set()
        self._kept_order: dict[str, list[str]] = {}
        self._jobs: dict[str, TaskJob] = {}
        self._index: list[tuple[float, str]] = []
        self._triggers: dict[tuple[Any, ...], TaskTrigger] = {}
        self._names: dict[str, str] = {}
        self._in_flight: set[str] = set()
        self._faults: dict[str, str] = {}
        """Tasks put in error while a run was in flight: the error outlives that run."""
        self._executing: set[str] = set()
        self._encoded: dict[str, bytes] = {}
        """Each unchanged task's saved line, so a save encodes only what changed."""
        self._version = 0
        self._durable_version = 0
        self._dirty: dict[str, int] = {}
        self._defer_depth = 0
        self._deferred = False
        self._write_lock = threading.Lock()
        self._health = SaveHealth()
        self._save_pool: ThreadPoolExecutor | None = None
        self._pending_save: asyncio.Future[bool] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._save_wanted = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

        ensure_private_dir(self.directory)
        self._dir_lock = DirectoryLock(self.directory)
        self._dir_lock.acquire()
        try:
            remove_stale_temp_files(self.path)
            remove_stale_temp_files(self.backup_path)
            self._load(now or self.now())
        except BaseException:
            self._dir_lock.release()
            raise

    # ------------------------------------------------------------------ loading

    def _read(self, path: Path) -> Document | None:
        """Decode ``path``; set it aside (and return None) if it is unusable."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_document(data, path)
        except CorruptFileError as exc:
            set_aside(path, str(exc))
            return None

    def _settle_zone(self, document: Document | None) -> None:
        recorded = document.timezone if document is not None else None
        self.timezone = choose_timezone(
            self._requested_zone, recorded, self.path, convert=self._convert_zone
        )
        if recorded is not None and zone_key(self.timezone) != recorded:
            logger.warning(
                "%s: converting the store from %s to %s as asked: hour windows and end dates "
                "are now read in %s",
                self.path,
                recorded,
                self.timezone,
                self.timezone,
            )

    def _load(self, now: datetime) -> None:
        existed = self.path.exists()
        document = self._read(self.path)
        from_backup = False
        if document is None and existed:
            document = self._read(self.backup_path)
            if document is None:
                self._settle_zone(None)
                logger.error(
                    "%s was unreadable and there is no usable backup: starting empty", self.path
                )
                return
            from_backup = True
            logger.error(
                "%s was unreadable: restored %d task(s) from the backup saved at %s; changes "
                "made after that are lost",
                self.path,
                len(document.tasks),
                document.saved_at or "an unknown time",
            )
        self._settle_zone(document)
        if document is None:
            return
        self._extra = document.extra
        for problem in document.problems:
            logger.warning("%s: %s", self.path, problem)
        shared: dict[str, str] = {}
        for index, raw in enumerate(document.tasks):
            self._restore(raw, index, now, document.parsed_json, shared)
        self._rebuild_order(document.account_tasks)
        if from_backup or self._kept:
            self._version += 1
            self.save()

    def _restore(
        self, raw: Any, index: int, now: datetime, parsed_json: bool, shared: dict[str, str]
    ) -> None:
        task_id = raw.get("task_id") if isinstance(raw, dict) else None
        label = task_id if isinstance(task_id, str) else f"tasks[{index}]"
        try:
            record = parse_record(raw, self.timezone, parsed_json=parsed_json)
            if record.task_id in self._records or record.task_id in self._kept_ids:
                raise InvalidTaskError("task_id", "duplicate task id")
            manager = self._create_manager(record)
            loaded = self._loaded(self._share_strings(record, shared), now)
        except Exception as exc:
            # One record never stops the others: whatever it does (an invalid field, a
            # factory or a schedule that raises), it is kept as it is, unrestored.
            reason = exc if isinstance(exc, InvalidTaskError) else f"{type(exc).__name__}: {exc}"
            logger.error(
                "task %s could not be restored (%s); kept in the file as it is", label, reason
            )
            self._kept.append(raw)
            if isinstance(task_id, str):
                self._kept_ids.add(task_id)
            return
        self._records[record.task_id] = loaded
        self._managers[record.task_id] = manager

    @staticmethod
    def _share_strings(record: TaskRecord, shared: dict[str, str]) -> TaskRecord:
        """Make a freshly loaded record reuse equal strings already loaded (``shared``).

        Account ids, names, task types and most kwargs values repeat across tasks; a file
        parser creates a new string for every occurrence.
        """
        values = record.__dict__
        for name in ("account_id", "account_name", "task_type", "sys_type"):
            value = values[name]
            if value is not None:
                values[name] = shared.setdefault(value, value)
        kwargs = values["kwargs"]
        for key, value in kwargs.items():
            if value == record.task_id:
                kwargs[key] = record.task_id
            elif isinstance(value, str) and len(value) <= 128:
                kwargs[key] = shared.setdefault(value, value)
        return record

    def _loaded(self, record: TaskRecord, now: datetime) -> TaskRecord:
        """Normalise a record read from disk: runs interrupted, times missing, ends passed."""
        if record.status is TaskStatus.RUNNING:
            logger.warning(
                "task %s (account %s) was running when the dispatcher stopped; runnable again",
                record.task_id,
                record.account_id,
            )
            record = record.replace(status=TaskStatus.PENDING)
        if record.status in (TaskStatus.PAUSED, TaskStatus.COMPLETED):
            return (
                record.replace(next_execution_time=None) if record.next_execution_time else record
            )
        planned = record.next_execution_time
        if planned is None:
            planned = self.next_time(record, record.last_execution_time, now)
        end = end_instant(record.task_end_time, self.timezone)
        if planned is None or (end is not None and planned > end):
            return record.replace(status=TaskStatus.COMPLETED, next_execution_time=None)
        return (
            record.replace(next_execution_time=planned)
            if not same_instant(planned, record.next_execution_time)
            else record
        )

    def _rebuild_order(self, hint: dict[str, list[str]]) -> None:
        placed: set[str] = set()
        for account, ids in hint.items():
            for task_id in ids:
                record = self._records.get(task_id)
                if record is not None and record.account_id == account and task_id not in placed:
                    self._order.setdefault(account, []).append(task_id)
                    placed.add(task_id)
                elif task_id in self._kept_ids:
                    self._kept_order.setdefault(account, []).append(task_id)
        for task_id, record in self._records.items():
            if task_id not in placed:
                self._order.setdefault(record.account_id, []).append(task_id)

    def _create_manager(self, record: TaskRecord) -> TaskManager:
        try:
            manager = self._factory(sys_type=record.sys_type, **record.kwargs)
        except InvalidTaskError:
            raise
        except Exception as exc:
            raise InvalidTaskError(
                "task_manager_factory", f"raised {type(exc).__name__}: {exc}"
            ) from exc
        if not callable(getattr(manager, "run", None)):
            raise InvalidTaskError(
                "task_manager_factory", f"returned {type(manager).__name__}, which has no run()"
            )
        return manager

    # ------------------------------------------------------------------ scheduling maths

    def trigger(self, record: TaskRecord) -> TaskTrigger:
        """The trigger that plans ``record``'s runs (shared by tasks with the same schedule)."""
        key = (record.interval, record.valid_time_range, record.task_end_time)
        trigger = self._triggers.get(key)
        if trigger is None:
            trigger = self._triggers[key] = TaskTrigger.for_record(record, self.timezone)
        return trigger

    def next_time(
        self, record: TaskRecord, previous: datetime | None, now: datetime
    ) -> datetime | None:
        """The run after ``previous`` (the first run when None), or None if none is left."""
        return self.trigger(record).get_next_fire_time(previous, now)

    # ------------------------------------------------------------------ queries

    def now(self) -> datetime:
        """The current instant in the dispatcher's zone (how records carry time)."""
        return utc_now().astimezone(self.timezone)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def find(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``, or None."""
        return self._records.get(task_id)

    def get(self, task_id: str) -> TaskRecord:
        """The record of ``task_id``; raises :class:`TaskNotFoundError`."""
        try:
            return self._records[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None

    def records(self) -> list[TaskRecord]:
        """Every restored record, in file order."""
        with self.lock:
            return list(self._records.values())

    def account_tasks(self) -> dict[str, list[str]]:
        """Account id -> its task ids in priority order (a copy)."""
        with self.lock:
            return {account: list(ids) for account, ids in self._order.items() if ids}

    def position(self, task_id: str) -> int:
        """``task_id``'s 0-based priority within its account (large if unknown)."""
        record = self._records.get(task_id)
        ids = self._order.get(record.account_id) if record is not None else None
        try:
            return ids.index(task_id) if ids is not None else _UNKNOWN_POSITION
        except ValueError:
            return _UNKNOWN_POSITION

    def _order_changed(self) -> None:
        self.order_version += 1

    def manager(self, task_id: str) -> TaskManager:
        """The live task manager of ``task_id``."""
        try:
            return self._managers[task_id]
        except KeyError:
            raise TaskNotFoundError(task_id) from None

    def kept_records(self) -> list[Any]:
        """Records that could not be restored, verbatim (they stay in the file)."""
        with self.lock:
            return list(self._kept)

    def is_executing(self, task_id: str) -> bool:
        """Whether a run of ``task_id`` is executing right now."""
        return task_id in self._executing

    @property
    def save_health(self) -> SaveHealth:
        """The state of saving, for the host to watch."""
        with self.lock:
            return replace(self._health, unsaved_task_ids=tuple(sorted(self._dirty)))

    # ------------------------------------------------------------------ record changes

    def _check_open(self) -> None:
        if self._closed:
            raise DispatcherClosedError(f"the job store of {str(self.directory)!r} is closed")

    def _changed(self, task_id: str) -> None:
        self._encoded.pop(task_id, None)
        self._version += 1
        self._dirty[task_id] = self._version

    def touch(self) -> None:
        """Make the next save write the file even if no task changed."""
        with self.lock:
            self._version += 1

    def add_tasks(self, records: Sequence[TaskRecord]) -> None:
        """Add new tasks all together, or none of them (raises :class:`InvalidTaskError`)."""
        self._check_open()
        seen: set[str] = set()
        for record in records:
            if record.task_id in seen:
                raise InvalidTaskError("task_id", f"duplicate task id {record.task_id!r}")
            seen.add(record.task_id)
        managers = {record.task_id: self._create_manager(record) for record in records}
        with self.lock:
            for record in records:
                if record.task_id in self._records or record.task_id in self._kept_ids:
                    raise InvalidTaskError("task_id", f"a task with id {record.task_id!r} exists")
            for record in records:
                self._records[record.task_id] = record
                self._managers[record.task_id] = managers[record.task_id]
                self._order.setdefault(record.account_id, []).append(record.task_id)
                self._sync_job(record)
                self._changed(record.task_id)

    def remove_task(self, task_id: str) -> TaskRecord:
        """Delete ``task_id`` for good; returns its last record."""
        self._check_open()
        with self.lock:
            record = self.get(task_id)
            del self._records[task_id]
            del self._managers[task_id]
            ids = self._order.get(record.account_id, [])
            if task_id in ids:
                ids.remove(task_id)
            if not ids:
                self._order.pop(record.account_id, None)
            self._order_changed()
            self._drop_job(task_id)
            self._changed(task_id)
            return record

    def update_task(self, task_id: str, change: Callable[[TaskRecord], TaskRecord]) -> TaskRecord:
        """Replace ``task_id``'s record with ``change(record)`` atomically; returns the new one."""
        self._check_open()
        with self.lock:
            old = self.get(task_id)
            new = change(old)
            if new is not old:
                self._records[task_id] = new
                self._sync_job(new)
                self._changed(task_id)
            return new

    def reorder(self, task_id: str, position: int) -> None:
        """Move ``task_id`` to ``position`` (0-based) in its account's priority order."""
        self._check_open()
        with self.lock:
            record = self.get(task_id)
            ids = self._order[record.account_id]
            if not 0 <= position < len(ids):
                raise InvalidTaskError(
                    "position",
                    f"must be from 0 to {len(ids) - 1} for account {record.account_id!r}",
                )
            ids.remove(task_id)
            ids.insert(position, task_id)
            self._order_changed()
            self._changed(task_id)

    def run_submitted(self, task_id: str) -> None:
        """A run of ``task_id`` is queued: completion waits for it."""
        with self.lock:
            self._in_flight.add(task_id)

    def run_executing(self, task_id: str, executing: bool) -> None:
        """Note that a run of ``task_id`` started or stopped executing."""
        with self.lock:
            if executing:
                self._executing.add(task_id)
            else:
                self._executing.discard(task_id)

    def run_settled(self, task_id: str) -> None:
        """The queued run of ``task_id`` is over; a task with no further run is completed."""
        with self.lock:
            self._in_flight.discard(task_id)
            self._executing.discard(task_id)
            record = self._records.get(task_id)
            error = self._faults.pop(task_id, None)
            if record is not None and error is not None and record.status is not TaskStatus.PAUSED:
                self._records[task_id] = record.replace(
                    status=TaskStatus.ERROR, last_error=error, updated_at=self.now()
                )
                self._changed(task_id)
            elif (
                record is not None
                and self._scheduler is not None
                and task_id not in self._jobs
                and record.status not in (TaskStatus.PAUSED, TaskStatus.COMPLETED)
            ):
                self._complete(record)

    def fault(self, task_id: str, exc: BaseException) -> None:
        """Scheduling ``task_id`` raised: log it, unschedule it and put it in ``error``.

        The other tasks carry on; the task's record says what went wrong, and pausing then
        resuming it (or a restart) plans it again.
        """
        with self.lock:
            self._drop_job(task_id)
            record = self._records.get(task_id)
            if record is None:
                return
            error = f"scheduling failed: {type(exc).__name__}: {exc}"
            if task_id in self._in_flight:
                self._faults[task_id] = error
            self._records[task_id] = record.replace(
                status=TaskStatus.ERROR,
                next_execution_time=None,
                last_error=error,
                updated_at=self.now(),
            )
            self._changed(task_id)
            self._persist()
        logger.error(
            "task %s (account %s) put in error, no further runs planned: %s",
            task_id,
            record.account_id,
            error,
            exc_info=exc,
        )

    def _complete(self, record: TaskRecord) -> None:
        """No run is left before the task's end: it is ``completed`` and stays on file."""
        self._drop_job(record.task_id)
        self._records[record.task_id] = record.replace(
            status=TaskStatus.COMPLETED, next_execution_time=None, updated_at=self.now()
        )
        self._changed(record.task_id)
        logger.info(
            "task %s (account %s) completed: no run left before its end time",
            record.task_id,
            record.account_id,
        )

    # ------------------------------------------------------------------ jobs

    @staticmethod
    def _timestamp(job: Job) -> float:
        when = job.next_run_time
        return math.inf if when is None else float(when.timestamp())

    def _drop_job(self, task_id: str) -> None:
        job = self._jobs.pop(task_id, None)
        if job is not None:
            # The job's place in the index is the one it was filed under: APScheduler changes
            # a job's next run time before it calls update_job().
            key = (job.filed_at, task_id)
            position = bisect.bisect_left(self._index, key)
            if position < len(self._index) and self._index[position] == key:
                del self._index[position]

    def _place_job(self, job: TaskJob) -> None:
        job.filed_at = self._timestamp(job)
        self._jobs[job.id] = job
        bisect.insort(self._index, (job.filed_at, job.id))

    def _job_time(self, record: TaskRecord) -> datetime | None:
        return None if record.status is TaskStatus.PAUSED else record.next_execution_time

    def _sync_job(self, record: TaskRecord) -> None:
        """Make APScheduler's job for ``record`` agree with it."""
        if self._scheduler is None:
            return
        job = self._jobs.get(record.task_id)
        paused = record.status is TaskStatus.PAUSED
        if record.status is TaskStatus.COMPLETED or (
            not paused and record.next_execution_time is None
        ):
            # Completed, or exhausted with its last run still in flight: nothing to schedule.
            self._drop_job(record.task_id)
            return
        wanted = self._job_time(record)
        if job is None:
            self._place_job(self._build_job(record))
        elif not same_instant(job.next_run_time, wanted):
            self._drop_job(record.task_id)
            job._modify(next_run_time=wanted)
            self._place_job(job)

    def _build_job(self, record: TaskRecord) -> TaskJob:
        # Fill the job's slots directly, as APScheduler's own stores do when they restore a
        # job (Job.__setstate__): Job.__init__ re-validates the callable's signature with
        # inspect, which is most of the cost of starting a dispatcher with many tasks.
        job = TaskJob.__new__(TaskJob)
        job._scheduler = self._scheduler
        job._jobstore_alias = self._alias
        job.id = record.task_id
        name = f"{record.task_type} for {record.account_id}"
        job.name = self._names.setdefault(name, name)
        job.func = self._managers[record.task_id].run
        job.func_ref = None
        job.args = ()
        job.kwargs = _NO_KWARGS
        job.trigger = self.trigger(record)
        job.executor = "default"
        job.misfire_grace_time = None
        job.coalesce = True
        job.max_instances = 1
        job.next_run_time = self._job_time(record)
        return job

    def _persist(self) -> None:
        if self._defer_depth:
            self._deferred = True
        else:
            self.save()

    @contextlib.contextmanager
    def deferred_saves(self, *, durable: bool) -> Iterator[None]:
        """Save once when the block ends instead of after every change inside it.

        ``durable=True`` writes before leaving the block; ``False`` requests a background save.
        """
        with self.lock:
            self._defer_depth += 1
        try:
            yield
        finally:
            with self.lock:
                self._defer_depth -= 1
                flush = not self._defer_depth and self._durable_version < self._version
            if flush:
                if durable:
                    self.save()
                else:
                    self.request_save()

    # APScheduler's job store interface ------------------------------------------------

    def start(self, scheduler: Any, alias: str) -> None:
        """Called by APScheduler when it starts: build a job for every schedulable record."""
        super().start(scheduler, alias)
        faults: list[tuple[str, Exception]] = []
        with self.lock:
            self._jobs.clear()
            for record in self._records.values():
                if record.status is TaskStatus.PAUSED or (
                    record.status is not TaskStatus.COMPLETED
                    and record.next_execution_time is not None
                ):
                    try:
                        job = self._build_job(record)
                    except Exception as exc:
                        faults.append((record.task_id, exc))
                        continue
                    job.filed_at = self._timestamp(job)
                    self._jobs[job.id] = job
            self._index = sorted((job.filed_at, task_id) for task_id, job in self._jobs.items())
            for task_id, error in faults:
                self.fault(task_id, error)

    def shutdown(self) -> None:
        """Called by APScheduler when it shuts down: the records stay; jobs are let go."""
        with self.lock:
            self._jobs.clear()
            self._index.clear()
            self._scheduler = None

    def lookup_job(self, job_id: str) -> Job | None:
        """The job of ``job_id``, or None."""
        return self._jobs.get(job_id)

    def get_due_jobs(self, now: datetime) -> list[Job]:
        """Jobs whose next run time is at or before ``now``, earliest first."""
        limit = now.timestamp()
        with self.lock:
            end = bisect.bisect_right(self._index, (limit, "\U0010ffff"))
            return [self._jobs[task_id] for _, task_id in self._index[:end]]

    def get_next_run_time(self) -> datetime | None:
        """The earliest next run time, or None when nothing is scheduled."""
        with self.lock:
            if not self._index or self._index[0][0] == math.inf:
                return None
            return self._jobs[self._index[0][1]].next_run_time  # type: ignore[no-any-return]

    def get_all_jobs(self) -> list[Job]:
        """Every job, earliest first, paused jobs last."""
        with self.lock:
            return [self._jobs[task_id] for _, task_id in self._index]

    def add_job(self, job: Job) -> None:
        """Attach ``job`` to its task record; only tasks added through the store qualify."""
        with self.lock:
            if job.id in self._jobs:
                raise ConflictingIdError(job.id)
            record = self._records.get(job.id)
            if record is None:
                raise ValueError(
                    f"JsonJobStore holds task-dispatcher tasks only; add task {job.id!r} with "
                    "TaskDispatcher.add_task()"
                )
            self._place_job(TaskJob.adopt(job))
            self._adopt(record, job)

    def update_job(self, job: Job) -> None:
        """Record ``job``'s new next run time (None pauses the task, a time resumes it)."""
        with self.lock:
            if job.id not in self._jobs:
                raise JobLookupError(job.id)
            self._drop_job(job.id)
            self._place_job(TaskJob.adopt(job))
            self._adopt(self._records[job.id], job)

    def _adopt(self, record: TaskRecord, job: Job) -> None:
        when = job.next_run_time
        when = None if when is None else when.astimezone(self.timezone)
        if same_instant(when, record.next_execution_time):
            return
        status = record.status
        if when is None and status not in (TaskStatus.PAUSED, TaskStatus.COMPLETED):
            status = TaskStatus.PAUSED
        elif when is not None and status is TaskStatus.PAUSED:
            status = TaskStatus.PENDING
        self._records[record.task_id] = record.replace(
            next_execution_time=when, status=status, updated_at=self.now()
        )
        self._changed(record.task_id)
        self._persist()

    def remove_job(self, job_id: str) -> None:
        """APScheduler found no further run: the task is ``completed`` and stays on file."""
        with self.lock:
            if job_id not in self._jobs:
                raise JobLookupError(job_id)
            self._drop_job(job_id)
            record = self._records[job_id]
            if job_id in self._in_flight or record.status is TaskStatus.PAUSED:
                # A queued last run decides completion when it settles (run_settled).
                self._records[job_id] = record.replace(
                    next_execution_time=None, updated_at=self.now()
                )
                self._changed(job_id)
            else:
                self._complete(record)
            self._persist()

    def remove_all_jobs(self) -> None:
        """Unschedule every job: each task is ``completed`` (records are never dropped here)."""
        with self.lock, self.deferred_saves(durable=True):
            for job_id in list(self._jobs):
                self.remove_job(job_id)

    # ------------------------------------------------------------------ saving

    def _encode_lines(self, records: list[TaskRecord], lines: list[bytes | None]) -> list[bytes]:
        """Each record's line: cached ones as they are, the others encoded now and cached.

        Called without the lock: a record that changed meanwhile is not cached (its change
        already dropped its line, and the next save encodes the new record).
        """
        fresh = {}
        for index, line in enumerate(lines):
            if line is None:
                lines[index] = fresh[index] = encode_task(records[index].plain())
        if fresh:
            with self.lock:
                current = self._records
                for index, line in fresh.items():
                    record = records[index]
                    if current.get(record.task_id) is record:
                        self._encoded[record.task_id] = line
        return lines  # type: ignore[return-value]

    def _file_order(self) -> dict[str, list[str]]:
        order = {account: list(ids) for account, ids in self._order.items() if ids}
        for account, ids in self._kept_order.items():
            order.setdefault(account, []).extend(ids)
        return order

    def save(self) -> bool:
        """Write every change made so far; durable when it returns True.

        A failed write is logged once with the task ids affected and recorded in
        :attr:`save_health`; the changes stay in memory for the next save.
        """
        target = self._version
        with self._write_lock:
            if self._durable_version >= target:
                return self._health.ok
            with self.lock:
                version = self._version
                records = list(self._records.values())
                cached = self._encoded
                lines = [cached.get(task_id) for task_id in self._records]
                kept = list(self._kept)
                order = self._file_order()
                unsaved = sorted(self._dirty)
            now = self.now()
            try:
                data = encode_document(
                    [*self._encode_lines(records, lines), *map(encode_raw, kept)],
                    order,
                    now,
                    zone_key(self.timezone),
                    self._extra,
                )
                write_atomic(self.path, data, backup=self.backup_path)
            except (OSError, TypeError, ValueError) as exc:
                with self.lock:
                    self._health = SaveHealth(
                        last_saved_at=self._health.last_saved_at,
                        last_error=f"{type(exc).__name__}: {exc}",
                        last_error_at=now,
                        failed_saves=self._health.failed_saves + 1,
                    )
                logger.error(
                    "saving %s failed (%s: %s); changes to task(s) %s are kept in memory and "
                    "will be written by the next successful save",
                    self.path,
                    type(exc).__name__,
                    exc,
                    ", ".join(unsaved) or "-",
                    extra={"unsaved_task_ids": tuple(unsaved)},
                )
                return False
            with self.lock:
                self._durable_version = version
                if self._version == version:
                    self._dirty.clear()
                else:
                    self._dirty = {k: v for k, v in self._dirty.items() if v > version}
                if self._health.last_error is not None:
                    logger.warning(
                        "saving %s works again; every pending change is written", self.path
                    )
                self._health = SaveHealth(last_saved_at=now)
            return True

    async def save_async(self) -> bool:
        """Write every change made so far, off the event loop; durable when it returns True."""
        target = self._version
        loop = asyncio.get_running_loop()
        while self._durable_version < target:
            pending = self._pending_save
            if pending is None or pending.done() or pending.get_loop() is not loop:
                if self._save_pool is None:
                    self._save_pool = ThreadPoolExecutor(1, thread_name_prefix="dispatch-save")
                pending = self._pending_save = loop.run_in_executor(self._save_pool, self.save)
            if not await asyncio.shield(pending):
                self._schedule_retry(loop)
                return False
        return True

    def request_save(self) -> None:
        """Save soon without waiting: in the background on a running loop, else right now.

        Requests coalesce: however many arrive while a save is being written, one more save
        follows it, covering them all.
        """
        if self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.save()
            return
        self._save_wanted = True
        if self._saver is None or self._saver.done():
            self._saver = loop.create_task(self._save_in_background())

    async def _save_in_background(self) -> None:
        while self._save_wanted and not self._closed:
            self._save_wanted = False
            if not await self.save_async():
                return

    async def drain_saves(self) -> None:
        """Wait for the background saves requested so far."""
        while self._saver is not None and not self._saver.done():
            await self._saver

    def request_retry(self) -> None:
        """After a failed :meth:`save`: retry later in the background, if called on a running
        event loop (otherwise the next save, whatever asks for it, writes the change)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._schedule_retry(loop)

    def _schedule_retry(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retry is not None or self._closed:
            return
        delay = min(_RETRY_LIMIT, _RETRY_FIRST * 2.0 ** min(self._health.failed_saves - 1, 6))

        def retry() -> None:
            self._retry = None
            if not self._closed:
                self.request_save()

        self._retry = loop.call_later(delay, retry)

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop accepting changes, finish saving and give up the directory lock."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._save_pool is not None:
            self._save_pool.shutdown(wait=True)
        self._dir_lock.release()
