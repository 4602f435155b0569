"""``manage.py broadcast``: counts, payload, and failures as one line on stderr."""

import os
import subprocess
import sys

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.core.management import CommandError, call_command

from realtime.models import Broadcast
from tests.conftest import (
    ROOT,
    connect_user,
    free_port,
    open_websocket,
    server_database_url,
    token_for,
)

pytestmark = pytest.mark.django_db


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``manage.py broadcast`` in a process of its own, as an operator runs it, on the
    test database."""
    return subprocess.run(
        [sys.executable, "manage.py", "broadcast", *args],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": server_database_url(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, text: str) -> None:
    """Exit status 1 and the reason on the last line of stderr; no traceback. (System
    check warnings, such as realtime.W001 for the in-memory layer, may come first.)"""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"CommandError: {text}"), result.stderr
    assert result.stdout == ""


@pytest.mark.django_db(transaction=True)
def test_prints_the_counts_and_clients_get_the_payload(user, capsys):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await sync_to_async(call_command)(
                "broadcast", "Back in 5", "--type", "maintenance", "--data", '{"eta": 300}'
            )
            message = await ws.receive_json_from(timeout=5)
            assert message["type"] == "broadcast"
            assert message["payload"] == {"eta": 300, "message": "Back in 5", "type": "maintenance"}

    async_to_sync(scenario)()
    assert capsys.readouterr().out == "Broadcast sent to 1 connection(s): 1 WebSocket, 0 SSE.\n"
    record = Broadcast.objects.get()
    assert record.sent_by is None
    assert record.payload["type"] == "maintenance"


def test_type_defaults_to_announcement(capsys):
    call_command("broadcast", "hello")
    assert capsys.readouterr().out == "Broadcast sent to 0 connection(s): 0 WebSocket, 0 SSE.\n"
    assert Broadcast.objects.get().payload == {"message": "hello", "type": "announcement"}


@pytest.mark.parametrize(
    "args, error",
    [
        (
            [
                "",
            ],
            "message: This field may not be blank.",
        ),
        (["x" * 2001], "message: Ensure this field has no more than 2000 characters."),
        (["m", "--type", ""], "--type: This field may not be blank."),
        (["m", "--data", "[1]"], "--data: Must be a JSON object."),
        (["m", "--data", '"text"'], "--data: Must be a JSON object."),
        (["m", "--data", '{"message": "again"}'], "--data: Must not set message."),
        (["m", "--data", '{"x": NaN}'], "--data: Not valid JSON: NaN is not JSON"),
        (["m", "--data", "[" * 5000], "--data: Not valid JSON: maximum recursion depth"),
        (["m", "--data", '{"x": "\\u0000"}'], "Text must not contain NUL"),
        (["m", "--data", "{oops"], "--data: Not valid JSON: Expecting property name"),
        (["m", "--data", '{"pad": "' + "p" * 16384 + '"}'], "A broadcast must encode to at most"),
    ],
)
def test_bad_arguments_are_refused(args, error):
    with pytest.raises(CommandError) as caught:
        call_command("broadcast", *args)
    assert str(caught.value).startswith(error)
    assert not Broadcast.objects.exists()


# The command is another process: it must be able to write to the database.
@pytest.mark.django_db(transaction=True)
def test_bad_argument_from_the_command_line_is_one_line_on_stderr():
    result = run_command("hi", "--data", "[1, 2]")
    assert_one_line_error(result, "--data: Must be a JSON object.")


# The command is another process: it must be able to write to the database.
@pytest.mark.django_db(transaction=True)
def test_unreachable_redis_is_one_line_on_stderr():
    closed = f"redis://127.0.0.1:{free_port()}/0"
    result = run_command("hi", env={"REDIS_URL": closed})
    assert_one_line_error(
        result, "Nothing was sent. Could not reach the channel layer or connection registry:"
    )
    assert not Broadcast.objects.exists()


# The command is another process: it must be able to write to the database.
@pytest.mark.django_db(transaction=True)
def test_unreachable_database_is_one_line_on_stderr():
    closed = f"postgres://postgres@127.0.0.1:{free_port()}/nothing"
    result = run_command("hi", env={"DATABASE_URL": closed})
    assert_one_line_error(result, "Could not record the broadcast: connection failed:")
