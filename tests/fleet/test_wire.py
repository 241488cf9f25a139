"""What the dispatcher and workers agree on, and the backend's checks (no broker needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery.app.utils import find_app
from fleet_support import ROOT, wait_until

import scheduler
import scheduler.backends
import scheduler.fleet
from scheduler.control.client import ControlClient
from scheduler.errors import ControlError
from scheduler.fleet import backend, wire, worker
from scheduler.fleet.backend import CeleryRunBackend
from scheduler.fleet.wire import check_broker_url, mask_url, queue_name, worker_name


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
        ("redis://:s3cret@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        ("rediss://ops:s3cret@broker.example:6380/2", "rediss://ops:***@broker.example:6380/2"),
    ],
)
def test_broker_urls_are_logged_without_password(url: str, masked: str) -> None:
    assert mask_url(url) == masked
    assert "s3cret" not in repr(CeleryRunBackend(url).health())


def test_queue_names_and_worker_names() -> None:
    assert queue_name("mac_intel") == "td.sys.mac_intel"
    with pytest.raises(ValueError, match="sys_type: 'a b'"):
        queue_name("a b")
    assert worker_name("celery@mac-01") == "mac-01"
    assert worker_name("w1@host") == "w1@host"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"start_timeout": 0}, "start_timeout"),
        ({"lost_after": -1}, "lost_after"),
        ({"poll_interval": 0}, "poll_interval"),
    ],
)
def test_backend_options_are_checked(options: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        CeleryRunBackend("redis://localhost:6379/0", **options)


def test_broker_must_be_redis() -> None:
    with pytest.raises(ValueError, match="broker_url: 'amqp://u:\\*\\*\\*@h/' is not a Redis"):
        check_broker_url("amqp://u:pw@h/")


def test_scheduler_imports_without_the_celery_extra() -> None:
    # Hide celery/kombu/redis: `import scheduler` works; the backend names the extra.
    code = """
import sys
for name in ("celery", "kombu", "redis"):
    sys.modules[name] = None
import scheduler
try:
    scheduler.CeleryRunBackend
except ImportError as exc:
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "pip install 'task-dispatcher[celery]'" in result.stdout


def test_worker_command_without_broker_fails_clearly() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scheduler", "worker", "--sys-type", "linux"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--broker" in result.stderr


def test_the_fleets_public_names_lead_into_its_folder() -> None:
    """The fleet lives in ``scheduler/fleet/``; what users name keeps working: Celery's
    ``-A scheduler.worker``, the names of ``scheduler.fleet``, ``CeleryRunBackend`` from
    ``scheduler`` and ``scheduler.backends``, and the loggers a host configures."""
    app = find_app("scheduler.worker")  # what `celery -A scheduler.worker` looks up
    assert app is worker.app
    assert wire.TASK_NAME in app.tasks
    assert sorted(scheduler.fleet.__all__) == sorted(wire.__all__)
    for name in wire.__all__:
        assert getattr(scheduler.fleet, name) is getattr(wire, name), name
    assert scheduler.CeleryRunBackend is CeleryRunBackend
    assert scheduler.backends.CeleryRunBackend is CeleryRunBackend
    assert backend.logger.name == "scheduler.backends.celery"
    assert worker.logger.name == "scheduler.worker"


def test_the_claim_script_takes_a_free_claim_and_its_own_again(broker_url: str) -> None:
    """A free claim is taken with its heartbeat and ``started`` event; the same attempt's own
    claim (its reply lost with a broken connection) is taken again, with a write for WAITAOF
    and a fresh heartbeat; anyone else's claim is answered with its value and left alone."""
    from scheduler.fleet.wire import CLAIM_SCRIPT

    client = redis.Redis.from_url(broker_url)
    claim = client.register_script(CLAIM_SCRIPT)
    keys = ["td:claim:r1", "td:alive:r1", "td:events"]
    assert claim(keys=keys, args=["mine", 600, 5000, "started"]) == 1
    assert client.get("td:claim:r1") == b"mine"
    assert 0 < client.pttl("td:alive:r1") <= 5000
    assert client.xlen("td:events") == 1
    client.delete("td:alive:r1")  # the heartbeat ran out while the connection was broken
    changes = client.info("persistence")["rdb_changes_since_last_save"]
    assert claim(keys=keys, args=["mine", 600, 5000, "started"]) == 1
    assert client.info("persistence")["rdb_changes_since_last_save"] > changes  # written
    assert 0 < client.pttl("td:alive:r1") <= 5000
    assert 0 < client.ttl("td:claim:r1") <= 600  # its own expiry kept
    assert client.xlen("td:events") == 1  # announced once
    assert claim(keys=keys, args=["theirs", 600, 5000, "started"]) == b"mine"
    assert client.get("td:claim:r1") == b"mine"
    assert client.xlen("td:events") == 1


def test_run_sends_again_after_its_resend_after(tmp_path: Path, broker_url: str) -> None:
    """``run --resend-after`` reaches the fleet's backend (its health reports it); without it
    the backend re-sends after ``--lost-after``; a value that is not positive is refused."""
    command = [sys.executable, "-m", "scheduler", "--dir", str(tmp_path / "d"), "run"]
    command += ["--no-live", "--broker", broker_url, "--lost-after", "12"]
    done = subprocess.run(
        [*command, "--resend-after", "0"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "Invalid value for '--resend-after': 0.0 is not in the range x>0." in done.stderr
    for extra, expected in (["--resend-after", "2.5"], 2.5), ([], 12.0):
        process = subprocess.Popen(
            [*command, *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            socket_path = tmp_path / "d" / "control.sock"
            wait_until(socket_path.exists, 30, "the control socket")
            with ControlClient(socket_path=socket_path) as client:
                health = wait_for_backend(client)
            assert health["resend_after"] == expected
            assert health["lost_after"] == 12.0
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)


def wait_for_backend(client: ControlClient) -> dict[str, Any]:
    """The run backend's health, as a running dispatcher reports it, once it answers."""
    found: dict[str, Any] = {}

    def answers() -> bool:
        try:
            found.update(client.health()["backend"]["health"])
        except (OSError, httpx.HTTPError, ControlError):
            return False
        return True

    wait_until(answers, 30, "the dispatcher's health")
    return found
