"""The Pipes message reader every training job uses parses a message only once its whole line is written."""

from __future__ import annotations

import json
import threading
import time

import dagster as dg
import pytest

from resources.launcher import WholeLineMessageReader, whole_lines

MESSAGE = {"__dagster_pipes_version": "0.1", "method": "log", "params": {"message": "step 520 " + "x" * 200,
                                                                          "level": "INFO"}}


class Handler:
    """What a reader thread calls: the messages it parsed and the exceptions it reported."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.errors: list[str] = []

    def handle_message(self, message: dict) -> None:
        self.messages.append(message)

    def report_pipes_framework_exception(self, origin: str, exc_info: tuple) -> None:
        self.errors.append(f"{origin}: {exc_info[1]!r}")


def write_in_two_parts(path: str, text: str, pause: float = 0.3) -> None:
    """A trainer's message caught mid-write: half the line, a pause, the rest (what a reader can see on Linux
    when its read lands during the writer's)."""
    half = len(text) // 2
    with open(path, "a", encoding="utf-8") as f:
        f.write(text[:half])
        f.flush()
        time.sleep(pause)
        f.write(text[half:])
        f.flush()


def read_while_writing(reader: dg.PipesMessageReader, lines: list[str]) -> Handler:
    handler = Handler()
    with reader.read_messages(handler) as params:
        path = params["path"]
        for line in lines:
            write_in_two_parts(path, line)
    return handler


def test_a_half_written_message_waits_for_its_line():
    line = json.dumps(MESSAGE) + "\n"
    handler = read_while_writing(WholeLineMessageReader(), [line, line])
    assert handler.errors == [] and handler.messages == [MESSAGE, MESSAGE]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its thread dies
def test_dagsters_own_reader_loses_it():
    # why WholeLineMessageReader exists: the stock reader parses the half line and its thread dies; if a Dagster
    # release fixes this, this test fails and the subclass can go
    line = json.dumps(MESSAGE) + "\n"
    handler = read_while_writing(dg.PipesTempFileMessageReader(), [line, line])
    assert handler.messages == [] and "JSONDecodeError" in handler.errors[0], handler.errors


def test_whole_lines_reads_what_landed_just_before_the_stop(tmp_path):
    path = tmp_path / "messages"
    path.write_text("first\n")
    stop = threading.Event()
    seen = []

    def should_stop() -> bool:
        # the writer's last line lands after the reader found the file empty but before it looks at the stop
        if seen == ["first\n"] and not stop.is_set():
            with open(path, "a") as f:
                f.write("last\n")
            stop.set()
        return stop.is_set()

    for line in whole_lines(str(path), should_stop):
        seen.append(line)
    assert seen == ["first\n", "last\n"]


def test_a_line_left_unfinished_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "messages"
    path.write_text('{"method": "log"}\n{"meth')
    lines = whole_lines(str(path), lambda: True)
    assert next(lines) == '{"method": "log"}\n'
    try:
        next(lines)
    except ValueError as exc:
        assert str(path) in str(exc) and "no end of line" in str(exc) and '{"meth' in str(exc)
    else:
        raise AssertionError("an unfinished last line passed silently")
