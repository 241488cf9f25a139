"""The PostgreSQL store's commands: ``import`` and ``export`` of ``dispatch_config.json``.

``--store URL`` (``$TASK_DISPATCHER_STORE``) names the store, a libpq URL such as
``postgresql://dispatcher@db.example/dispatch``. psycopg is imported only when one of these
commands runs, so the command line works without the ``postgres`` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import orjson

from jobstores.durable import write_atomic
from scheduler.cli_parse import STORE_ENV_VAR, Options
from scheduler.cli_render import errors, fail
from tasks.secrets import mask_text

__all__ = ["export", "import_", "open_store"]

CLUSTER = "default"

_EXTRA_HINT = (
    "the PostgreSQL store needs the postgres extra: pip install 'task-dispatcher[postgres]'"
)


def _store(options: Options, command: str) -> str:
    if not options.store:
        raise click.UsageError(
            f"{command} works on a PostgreSQL store: name it with --store URL (or ${STORE_ENV_VAR})"
        )
    return options.store


def _postgres() -> ModuleType:
    try:
        import jobstores.postgres as postgres
    except ImportError:
        fail(_EXTRA_HINT, status=1)
    return postgres


def open_store(url: str, advertise_url: str | None) -> Any:
    """The PostgreSQL store at ``url`` for ``run`` (this instance advertising
    ``advertise_url`` while it leads)."""
    postgres = _postgres()
    return postgres.PostgresStorage.for_url(url, advertise_url=advertise_url)


@click.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--replace", is_flag=True, help="Replace the tasks the store holds already.")
@click.pass_obj
def import_(options: Options, path: Path, replace: bool) -> None:
    """Load a dispatch_config.json into the store (--store), in one transaction.

    Tasks that cannot be restored are kept as they are, as a dispatcher keeps them. The
    store must not be led by a running dispatcher meanwhile.
    """
    url = _store(options, "import")
    postgres = _postgres()
    try:
        data = path.read_bytes()
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}")
    with errors():
        url, cluster, _ = postgres.split_store_url(url)
    state = postgres.PostgresState(postgres.connector(url), cluster)
    lease = postgres.Leadership.for_url(url, cluster)
    try:
        with errors():
            if not lease.try_acquire():
                if lease.last_error is not None:
                    fail(f"cannot reach the store: {mask_text(lease.last_error)}", status=1)
                fail(
                    f"cluster {cluster!r} of the store is led by a running dispatcher; "
                    "stop it before importing",
                    status=1,
                )
            summary = postgres.import_document(
                state,
                lease.fence(),
                data,
                source=path,
                zone=options.zone(),
                convert_timezone=options.convert_timezone,
                replace=replace,
            )
    finally:
        lease.stop()
        state.close()
    kept = f", {summary.kept} kept unrestorable" if summary.kept else ""
    click.echo(f"{path}: imported {summary.restored} task(s){kept}")


@click.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.pass_obj
def export(options: Options, path: Path | None) -> None:
    """Write the store's state (--store) as a dispatch_config.json: to PATH (replaced
    atomically), else to standard output."""
    url = _store(options, "export")
    postgres = _postgres()
    with errors():
        url, cluster, _ = postgres.split_store_url(url)
    state = postgres.PostgresState(postgres.connector(url), cluster)
    try:
        with errors():
            data: bytes = postgres.export_document(state)
    finally:
        state.close()
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        write_atomic(path, data)
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}", status=1)
    count = len(orjson.loads(data)["tasks"])
    click.echo(f"{path}: exported {count} task(s)")
