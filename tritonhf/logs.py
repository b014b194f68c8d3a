"""Logs where operators look: Triton's and the supervisor's, on stdout and stderr, one event a line.

``tritonhf serve`` runs in a container whose stdout and stderr are what ``kubectl logs``
and every log collector read; a log file in ``/tmp`` is invisible to them and grows
against the pod's emptyDir limit. So the server's output is piped through
``tritonhf serve`` (``Events``): each of Triton's events, a header line such as
``I1201 23:19:59.123456 1234 server.cc:123] "message"`` and the lines that continue it
(the model table, a stub's traceback), is written as it comes, in Triton's text or as
one JSON object a line. Only a bounded tail stays in memory, for error messages.
The supervisor's own records go through ``logging`` to stderr, in the same format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import sys
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO

FORMATS = ("text", "json")
LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "V": "DEBUG"}
# Triton's glog-style header: level, MMDD, time, thread, file:line]
HEADER = re.compile(r"^(?P<level>[IWEV])\d{4} (?P<time>\d\d:\d\d:\d\d\.\d+) +(?P<thread>\d+) (?P<where>[^\]\s]+)\] ?")
QUIET_S = 0.1  # an event's last continuation line is written once the output pauses this long
TAIL_LINES = 2000
LONGEST = 1 << 16  # a line without its end (a progress bar's carriage returns) is handed on at this length

Sink = Callable[[list[str]], None]


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def triton_event(lines: list[str]) -> dict[str, str]:
    """One of Triton's events (its header line and continuation lines) as a structured record."""
    header = HEADER.match(lines[0])
    message = "\n".join([lines[0][header.end() :] if header else lines[0], *lines[1:]])
    if len(message) > 1 and message[0] == message[-1] == '"':  # Triton 2.51 quotes its messages
        message = message[1:-1]
    record = {"time": now(), "level": LEVELS[header["level"]] if header else "INFO", "source": "tritonserver"}
    if header:
        record["where"] = header["where"]
    return {**record, "message": message}


def sink(log_format: str, stream: IO[str] | None = None) -> Sink:
    """Where Triton's events go: ``stream`` (stdout by default), in Triton's own text or one JSON object a line."""

    def write(lines: list[str]) -> None:
        out = stream or sys.stdout
        if log_format == "json":
            out.write(json.dumps(triton_event(lines)) + "\n")
        else:
            out.write("\n".join(lines) + "\n")
        out.flush()

    return write


class Events:
    """Reads a process's output on a thread of its own and hands it on event by event; keeps a bounded tail."""

    def __init__(self, stream: IO[bytes], write: Sink) -> None:
        self.stream, self.fd, self.write = stream, stream.fileno(), write
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.thread = threading.Thread(target=self.pump, name="tritonserver-log", daemon=True)
        self.thread.start()

    def text(self) -> str:
        return "\n".join(self.tail)

    def pump(self) -> None:
        pending: list[str] = []
        rest = b""

        def flush() -> None:
            if pending:
                with contextlib.suppress(OSError, ValueError):  # our stdout is gone: read on, or the server blocks
                    self.write(list(pending))
                pending.clear()

        while True:
            readable, _, _ = select.select([self.fd], [], [], QUIET_S)
            if not readable:
                flush()
                continue
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:  # the process closed its output: it is gone
                break
            *lines, rest = (rest + chunk).split(b"\n")
            if len(rest) > LONGEST:
                lines, rest = [*lines, rest], b""
            for raw in lines:
                line = raw.decode(errors="replace")
                self.tail.append(line)
                if HEADER.match(line):
                    flush()
                pending.append(line)
        if rest:
            pending.append(rest.decode(errors="replace"))
        flush()
        self.stream.close()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


class JsonFormatter(logging.Formatter):
    """The supervisor's records in the shape of Triton's events: one JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        body = {"time": now(), "level": record.levelname, "source": "tritonhf", "message": record.getMessage()}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body)


def configure(log_format: str) -> None:
    """The root logger to stderr, in ``log_format``: text as the other commands, or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter("%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
