"""Masking secrets for display: secret-looking names, credentials inside values and error
texts, in time linear in the input wherever the text leaves the process."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from scheduler import TaskDispatcher, WebhookListener
from scheduler.control import create_app
from scheduler.web import dashboard_app
from tasks import ShellTask, ShellTaskError, mask_secrets
from tasks.runs import ERROR_LIMIT, RunEvent, RunEventKind, describe_error
from tasks.secrets import MASK, looks_secret, mask_text

MakeDispatcher = Callable[..., TaskDispatcher]
MiB = 1 << 20

# ---------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [
        # the words, wherever they are in a name
        "password", "PGPASSWORD", "db_passwd", "passphrase", "passcode", "pass", "--pass",
        "db.pw", "MYSQL_PWD", "api_token", "access_token", "tokens", "secret", "client-secret",
        "cookie", "session", "sessionid", "private_key", "jwt", "credentials", "creds",
        "signature", "sig",
        # header-style names
        "X-Api-Key", "x-api-key", "api-key", "apiKey", "APIKEY", "Authorization",
        "Proxy-Authorization", "x-auth-token", "X-Auth-Token", "X-CSRF-Token", "Set-Cookie",
        "X-Amz-Security-Token", "X-Amz-Signature", "Ocp-Apim-Subscription-Key",
        # auth and what it starts; key as the last word
        "auth", "oauth_token", "authorized_keys", "unauthorised", "ssh_key", "secret-key",
        "key", "KEY", "sshKey", "AccountKey",
    ],
)  # fmt: skip
def test_secret_looking_names(name: str) -> None:
    assert looks_secret(name)
    assert mask_secrets({name: "v"}) == {name: MASK}
    assert mask_text(f"{name}=v x") == f"{name}={MASK} x"


@pytest.mark.parametrize(
    "name",
    [
        # words that merely contain a secret word
        "monkey", "keyboard", "hotkey", "turkey", "key_id", "keys_count", "author", "authors",
        "co_author", "authority", "bypass", "passenger", "compass", "tokenizer", "signal",
        # PWD is the working directory; OLDPWD the previous one
        "PWD", "OLDPWD",
        # ordinary names
        "user", "username", "host", "url", "dsn", "command", "headers", "Accept",
        "Content-Type", "retries", "timeout", "account_id",
    ],
)  # fmt: skip
def test_names_that_stay_visible(name: str) -> None:
    assert not looks_secret(name)
    assert mask_secrets({name: "v"}) == {name: "v"}
    assert mask_text(f"{name}=v x") == f"{name}=v x"


# ---------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgres://user:pw@host/db", "postgres://user:***@host/db"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgres://u:p@ss@host/db", "postgres://u:***@host/db"),
        (
            "https://api.example.com/v1?token=abc&page=2",
            "https://api.example.com/v1?token=***&page=2",
        ),
        ("url=https://h/v1?token=abc&page=2", "url=https://h/v1?token=***&page=2"),
        ("PGPASSWORD=hunter2 psql -h db", "PGPASSWORD=*** psql -h db"),
        ('export PGPASSWORD="hunter 2"; psql', 'export PGPASSWORD="***"; psql'),
        ("password = 'x y' rest", "password = '***' rest"),
        ("sync --api-key=k123 --verbose", "sync --api-key=*** --verbose"),
        ("Authorization: Bearer abc.def\nnext line", "Authorization: ***\nnext line"),
        ("> X-Api-Key: k123\r\n> Accept: */*", "> X-Api-Key: ***\r\n> Accept: */*"),
        ("Set-Cookie: sid=1; Path=/", "Set-Cookie: ***"),
        ('{"token":"abc","n":1}', '{"token":"***","n":1}'),
        ("{'password': 'hunter2', 'user': 'bob'}", "{'password': '***', 'user': 'bob'}"),
        ("{'X-Api-Key': b'k1'}", "{'X-Api-Key': b'***'}"),
        ('{"pin": 1, "secret": 1234}', '{"pin": 1, "secret": ***}'),
        ("sig=abc&se=2030-01-01", "sig=***&se=2030-01-01"),
        ("https://user@host/path", "https://user@host/path"),
        ("mail me@example.com; retries=3", "mail me@example.com; retries=3"),
        ("./sync.sh --dry-run", "./sync.sh --dry-run"),
        ("KeyError: 'api_key'", "KeyError: 'api_key'"),
        ("if token == expected", "if token == expected"),
        ("monkey=1 author=me keyboard: qwerty", "monkey=1 author=me keyboard: qwerty"),
        # a name is secret from its first secret-looking word on, whatever follows
        ("passwordpass=1 tokentokenizer=abc", "passwordpass=*** tokentokenizer=***"),
        # İ is the one character whose lower case is longer: positions must not shift.
        ("İİ token=abc İ password=x", "İİ token=*** İ password=***"),
    ],
)
def test_credentials_inside_values_are_masked(text: str, masked: str) -> None:
    assert mask_text(text) == masked


def test_mask_secrets_masks_keys_and_values_at_any_depth() -> None:
    kwargs = {
        "password": "hunter2",
        "dsn": "postgres://app:pw@db/prod",
        "env": {"DATABASE_URL": "mysql://root:toor@localhost/x", "HOME": "/root"},
        "headers": {"Authorization": "Bearer abc", "X-Api-Key": "k", "Accept": "json"},
        "args": ["--token=abc", "plain", {"api-key": 1}],
        "retries": 3,
        7: "number key",
    }
    assert mask_secrets(kwargs) == {
        "password": "***",
        "dsn": "postgres://app:***@db/prod",
        "env": {"DATABASE_URL": "mysql://root:***@localhost/x", "HOME": "/root"},
        "headers": {"Authorization": "***", "X-Api-Key": "***", "Accept": "json"},
        "args": ["--token=***", "plain", {"api-key": "***"}],
        "retries": 3,
        7: "number key",
    }
    assert kwargs["password"] == "hunter2"  # a copy: the original is untouched


def test_many_strings_are_masked_each_on_its_own() -> None:
    # Strings of a structure are searched together: nothing runs from one into the next.
    values = ["token", "=abc", "x\ntoken=a", "b", "pass", ": x", "", "https://u:", "p@h"]
    assert mask_secrets(values) == [
        "token", "=abc", "x\ntoken=***", "b", "pass", ": x", "", "https://u:", "p@h"
    ]  # fmt: skip


# ---------------------------------------------------------------------- linear time

# Each shape made the old patterns backtrack (quadratic: 40 KB took 7.5 s, so one MiB
# would take over an hour); linear code masks each in milliseconds. The bound is generous
# for a loaded machine and far below what quadratic code needs.
HOSTILE = {
    "word characters without '='": "a" * MiB,
    "a secret word's run without '='": "token" * (MiB // 5),
    "'=' alone": "=" * MiB,
    "many short assignments": "a=" * (MiB // 2),
    "'://' alone": "://" * (MiB // 3),
    "many URL starts": "a://" * (MiB // 4),
    "URL starts with a colon": "a://:" * (MiB // 5),
    "a user and no '@'": "a://u:" + "x" * MiB,
    "'-' alone": "-" * MiB,
    "dashed words": "a-" * (MiB // 2),
    "dotted words": "a." * (MiB // 2),
    "quotes": "'" * MiB,
    "quoted secret names": "'token" * (MiB // 6),
    "secret names and colons without a space": "token:" * (MiB // 6),
    "camel-cased keys": "Key" * (MiB // 3),
    "white space": " " * MiB,
    "backslashes": "\\" * MiB,
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_masking_a_mebibyte_of_hostile_text_is_linear(text: str) -> None:
    started = time.perf_counter()
    mask_text(text)
    mask_secrets({"value": text, "list": [text]})
    assert time.perf_counter() - started < 2.0


def test_a_huge_secret_value_is_masked_whole() -> None:
    value = "x" * MiB
    assert mask_text(f"a b token={value} c") == "a b token=*** c"
    assert mask_text(f"Authorization: Bearer {value}\nok") == "Authorization: ***\nok"
    assert mask_secrets({"blob": value, "api_key": value}) == {"blob": value, "api_key": MASK}


async def test_reading_a_task_with_a_mebibyte_kwarg_keeps_the_event_loop_free(
    make_dispatcher: MakeDispatcher,
) -> None:
    dispatcher = make_dispatcher()
    await dispatcher.add_task(
        sys_type="local",
        task_type="shell",
        account_id="acc",
        interval=3600,
        task_id="big",
        command="date",
        blob="a" * MiB,
        query="x=" + "b" * MiB,
        api_token="s3cret",
    )
    await dispatcher.start()
    longest = 0.0
    stop = asyncio.Event()

    async def watch() -> None:
        # How late the loop wakes this up: its longest wait for anything else.
        nonlocal longest
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            longest = max(longest, time.perf_counter() - before - 0.005)

    watcher = asyncio.create_task(watch())
    api = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(dispatcher)), base_url="http://localhost"
    )
    pages = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=dashboard_app(dispatcher)),
        base_url="http://127.0.0.1:8765",
    )
    try:
        async with api, pages:
            for _ in range(3):
                shown = await asyncio.wait_for(api.get("/api/v1/tasks/big"), 30)
                listed = await asyncio.wait_for(api.get("/api/v1/tasks"), 30)
                page = await asyncio.wait_for(pages.get("/tasks/big"), 30)
                assert shown.status_code == listed.status_code == page.status_code == 200
                assert shown.json()["kwargs"]["api_token"] == MASK
                assert len(shown.json()["kwargs"]["blob"]) == MiB
                assert "s3cret" not in listed.text
                assert "s3cret" not in page.text
    finally:
        stop.set()
        await watcher
        await dispatcher.stop()
    # Masking the record takes milliseconds; the old patterns held the loop for minutes.
    assert longest < 1.0


# ---------------------------------------------------------------------- error texts

SECRETS = ("hunter2", "tok123", "abc.def", "pw9")
# The secrets are spelled in pieces ("hun""ter2"), so the task's own kwargs never hold them
# whole: any whole copy on disk, in a page or a log comes from the error text.
FAILING = (
    "printf '%s\\n' 'connecting to postgres://app:'\"pw\"'9@db/x failed'"
    ' "password=hun""ter2" \'GET https://api/v1?token=\'"tok"\'123&page=2\''
    ' "Authorization: Bearer abc.""def" >&2; exit 3'
)


def test_error_texts_are_masked_where_they_are_formed() -> None:
    error = describe_error(RuntimeError("login failed: password=hunter2"))
    assert error == "RuntimeError: login failed: password=***"
    long = describe_error(ValueError("token=abc " + "x" * 3000))
    assert long.startswith("ValueError: token=*** xxx")
    assert len(long) == ERROR_LIMIT
    at = datetime(2026, 1, 8, tzinfo=UTC)
    # Whoever reports a run (this process, a worker, a verdict of lost), its event holds the
    # error masked.
    event = RunEvent("r", "t", RunEventKind.FAILED, at, error="Authorization: Bearer abc.def")
    assert event.error == "Authorization: ***"
    sent = {**event.to_json(), "error": "?token=tok123"}
    assert RunEvent.from_json(sent).error == "?token=***"


async def test_a_shell_commands_stderr_is_masked_before_its_tail_is_cut() -> None:
    # Cut first, the tail would start inside the name ("rd=hunter2"), which looks harmless.
    task = ShellTask(
        sys_type="local",
        task_id="t",
        shell=True,
        command="printf 'password=hun''ter2 %s' \"$(printf 'B%.0s' $(seq 489))\" >&2; exit 1",
    )
    with pytest.raises(ShellTaskError) as raised:
        await task.run()
    assert "ter2" not in str(raised.value)
    assert "ssword=***" in str(raised.value)


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]]

    def do_POST(self) -> None:
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP listener on a free loopback port; yields its URL and what it received."""

    class Hook(_Hook):
        received: ClassVar[list[dict[str, Any]]] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", Hook.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _assert_masked(where: str, text: str) -> None:
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"{where} shows {leaked}: {text[:2000]}"


async def test_a_failed_runs_error_is_masked_everywhere_it_leaves_the_process(
    make_dispatcher: MakeDispatcher,
    state_dir: Path,
    hook: tuple[str, list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, received = hook
    dispatcher = make_dispatcher(task_manager_factory=None)
    dispatcher.add_listener(WebhookListener(url, backoff=0.01))
    task_id = await dispatcher.add_task(
        sys_type="local",
        task_type="shell",
        account_id="acc",
        interval=3600,
        shell=True,
        command=FAILING,
        run_policy={"pause_after_failures": 1},
    )
    with caplog.at_level(logging.DEBUG):
        await dispatcher.start()
        await asyncio.wait_for(dispatcher.run_pending(), 30)
        record = dispatcher.get_task(task_id)
        (run,) = dispatcher.runs(task_id)
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(dispatcher)),
                base_url="http://localhost",
            ) as api,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=dashboard_app(dispatcher)),
                base_url="http://127.0.0.1:8765",
            ) as pages,
        ):
            shown = (await api.get(f"/api/v1/tasks/{task_id}", params={"show_secrets": "1"})).text
            page = (await pages.get(f"/tasks/{task_id}")).text
        await dispatcher.stop()  # waits for the webhook's posts

    # The run failed with the command's stderr, masked.
    assert record.last_error is not None
    assert "exit status 3" in record.last_error
    assert "password=***" in record.last_error
    assert "token=***" in record.last_error
    assert "postgres://app:***@db/x" in record.last_error
    assert "Authorization: ***" in record.last_error
    _assert_masked("the record's last_error", record.last_error)
    assert record.paused_reason is not None
    _assert_masked("the pause reason", record.paused_reason)
    assert run.error == record.last_error
    _assert_masked("the API", shown)
    assert "password=***" in page
    _assert_masked("the task page", page)
    _assert_masked("the log", caplog.text)
    assert [event["event"] for event in received] == ["run_failed", "task_paused"]
    assert received[0]["error"] == record.last_error
    _assert_masked("the webhook", json.dumps(received))
    # Nothing the dispatcher wrote (state file, journal, run history) holds a secret whole.
    written = [path for path in state_dir.rglob("*") if path.is_file()]
    assert written
    for path in written:
        _assert_masked(str(path.relative_to(state_dir)), path.read_bytes().decode(errors="replace"))
