"""The built-in ``shell`` task type: run a command; a non-zero exit or a timeout fails the run."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from tasks.registry import default_registry
from tasks.secrets import mask_text

__all__ = ["OUTPUT_LOGGER", "ShellTask", "ShellTaskError"]

logger = logging.getLogger(__name__)

OUTPUT_LOGGER = f"{__name__}.output"
"""The logger of what a successful run printed (its stdout tail, masked, on one line), at
DEBUG: a host (``run --demo``) lowers this logger's level to show the work."""
_output = logging.getLogger(OUTPUT_LOGGER)

_TAIL = 500
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ShellTaskError(RuntimeError):
    """The command failed: its exit status (or the timeout) and the tail of its stderr."""


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name}: must be true or false, not {value!r}")


def _tail(data: bytes | bytearray) -> str:
    """The end of a command's output, credentials masked (before the cut, so the cut never
    leaves the end of a secret's name and its value in view)."""
    text = mask_text(bytes(data).decode(errors="replace").strip())
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


def _output_tail(data: bytes | bytearray) -> str:
    """What a run printed, as one line of at most about ``_TAIL`` characters: credentials
    masked before the cut (a cut could split a ``password=`` and hide its name)."""
    lines = mask_text(bytes(data).decode(errors="replace")).splitlines()
    text = " | ".join(line.strip() for line in lines if line.strip())
    # Terminal escapes and other control characters must not reach the log as such.
    text = "".join(char if char.isprintable() else "?" for char in text)
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


async def _drain(stream: asyncio.StreamReader, into: bytearray) -> None:
    """Read ``stream`` to its end, keeping only its last few kilobytes."""
    while chunk := await stream.read(65536):
        into.extend(chunk)
        if len(into) > 8 * _TAIL:
            del into[: len(into) - 8 * _TAIL]


class ShellTask:
    """Runs ``command`` once per run.

    Keyword arguments (from the task's kwargs): ``command`` (a string, split like a shell
    would, or a list of arguments), ``shell`` (run through ``/bin/sh``; default false),
    ``timeout`` (seconds), ``cwd`` (working directory) and ``env`` (extra environment).
    """

    def __init__(
        self,
        *,
        sys_type: str,
        task_id: str,
        command: str | Sequence[str] | None = None,
        shell: bool | str = False,
        timeout: float | str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if not command:
            raise ValueError("command: a shell task needs a command")
        self.task_id = task_id
        self.shell = _flag(shell, "shell")
        if isinstance(command, str):
            self.argv = [command] if self.shell else shlex.split(command)
        elif isinstance(command, Sequence) and all(isinstance(a, str) for a in command):
            self.argv = [shlex.join(command)] if self.shell else list(command)
        else:
            raise ValueError(f"command: must be a string or a list of strings, not {command!r}")
        if not self.argv:
            raise ValueError("command: is empty")
        self.timeout = None if timeout in (None, "") else float(timeout)
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout: must be positive, got {timeout!r}")
        self.cwd = cwd
        self.env = {**os.environ, **{str(k): str(v) for k, v in (env or {}).items()}}

    async def run(self) -> None:
        """Run the command to its end; raise :class:`ShellTaskError` if it fails."""
        if self.shell:
            process = await asyncio.create_subprocess_shell(
                self.argv[0],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        else:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        assert process.stdout is not None
        assert process.stderr is not None
        stdout, stderr = bytearray(), bytearray()
        # Read both pipes ourselves so what was written before a timeout is not lost.
        readers = asyncio.gather(_drain(process.stdout, stdout), _drain(process.stderr, stderr))
        try:
            await asyncio.wait_for(process.wait(), self.timeout)
        except TimeoutError:
            _kill_group(process)
            await process.wait()
            await readers
            raise ShellTaskError(
                f"timed out after {self.timeout:g}s; stderr: {_tail(stderr) or '(empty)'}"
            ) from None
        except asyncio.CancelledError:
            # Cancelled: stopped (the run's timeout, or the dispatcher stopping). Kill the
            # whole process group, so children of a shell command stop too.
            _kill_group(process)
            await process.wait()
            readers.cancel()
            raise
        await readers
        if stdout and _output.isEnabledFor(logging.DEBUG):
            _output.debug("task %s printed: %s", self.task_id, _output_tail(stdout))
        if process.returncode != 0:
            raise ShellTaskError(
                f"exit status {process.returncode}; stderr: {_tail(stderr) or '(empty)'}"
            )


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill ``process`` and every process of its group (it leads a session of its own)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError:  # pragma: no cover - no process groups here
        process.kill()


default_registry.register("shell", ShellTask, replace=True)
