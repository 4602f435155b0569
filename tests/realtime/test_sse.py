"""``GET /events`` in-process through the full ASGI application, and the event-stream
parser the tests read it with."""

import asyncio
import json
import logging
import uuid
from datetime import datetime, timedelta

import channels.auth
import pytest
from asgiref.testing import ApplicationCommunicator
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.checks import run_checks
from django.db import OperationalError
from django.test import Client, override_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework_simplejwt.tokens import AccessToken

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import TaskSource
from realtime import api, auth, checks, protocol, sse
from realtime.connections import ConnectionManager, Transport, get_connection_manager
from realtime.sources import TaskSnapshot
from tests.conftest import logged_ends, run, token_for
from tests.sse import Event, EventStreamParser, InProcessStream, bearer, parse_all

#: The endpoint's tests: the application reaches the database from threads of its own.
transactional = pytest.mark.django_db(transaction=True)

STREAM_HEADERS = {
    "Content-Type": ["text/event-stream"],
    "Cache-Control": ["no-store"],
    "X-Accel-Buffering": ["no"],
    "Connection": ["keep-alive"],
}


def realtime_override(**values):
    return override_settings(REALTIME={**settings.REALTIME, **values})


def assert_stream_headers(stream: InProcessStream) -> None:
    assert stream.status == 200
    for name, values in STREAM_HEADERS.items():
        assert stream.header(name) == values, name


async def assert_no_connections(task_ids=()) -> None:
    manager = get_connection_manager()
    assert await manager.count_connections() == 0
    for task_id in task_ids:
        assert await manager.count_task_subscribers(task_id) == 0


@pytest.fixture
def disconnected(monkeypatch):
    """Every connection the manager disconnects, as left afterwards."""
    connections = []
    disconnect = ConnectionManager.disconnect

    async def spy(self, connection):
        await disconnect(self, connection)
        connections.append(connection)

    monkeypatch.setattr(ConnectionManager, "disconnect", spy)
    return connections


# The parser, against the examples and rules of the HTML standard


def test_parser_dispatches_per_blank_line_and_joins_data_lines():
    _, events = parse_all(
        b": comment\ndata: YHOO\ndata: +2\ndata: 10\n\ndata:test\n\ndata: test\n\n"
    )
    assert [(event.type, event.data) for event in events] == [
        ("message", "YHOO\n+2\n10"),
        ("message", "test"),
        ("message", "test"),
    ]


def test_parser_empty_data_and_unterminated_block():
    # The standard's example: an empty event, one with a single newline, and a last block
    # that is discarded because no blank line ends it.
    _, events = parse_all(b"data\n\ndata\ndata\n\ndata:")
    assert [event.data for event in events] == ["", "\n"]


def test_parser_line_endings_split_across_chunks():
    parser = EventStreamParser()
    events = []
    for chunk in (b"\xef\xbb\xbfevent: a\r", b"\ndata: 1\r", b"\rdata: \xc3", b"\xa9\n\n"):
        events += parser.feed(chunk)
    assert events == [Event("a", "1", ""), Event("message", "\u00e9", "")]


def test_parser_id_persists_and_bad_fields_are_ignored():
    parser, events = parse_all(
        b"retry: 3000\n\nid: a\ndata: 1\n\ndata: 2\n\nid: b\0c\nretry: 1x\ndata: 3\n\n"
        b"event\nid\ndata: 4\n\n"
    )
    assert parser.retry == 3000
    assert [(event.type, event.data, event.last_event_id) for event in events] == [
        ("message", "1", "a"),
        ("message", "2", "a"),
        ("message", "3", "a"),
        ("message", "4", ""),
    ]


field_text = st.text(st.characters(exclude_characters="\r\n\0"), min_size=1).filter(
    lambda text: not text.startswith(" ")
)


def as_sent(text: str) -> str:
    """Text as the UTF-8 stream carries it: lone surrogates become ``?``."""
    return text.encode("utf-8", "replace").decode()


@given(event=field_text, data=st.text(), event_id=st.none() | field_text)
def test_sse_framing_round_trips_through_the_parser(event, data, event_id):
    parser, events = parse_all(protocol.sse_event(event, data, event_id))
    expected_data = as_sent(data.replace("\r\n", "\n").replace("\r", "\n"))
    assert events == [Event(as_sent(event), expected_data, as_sent(event_id or ""))]
    assert parser.feed(b"") == []


# Opening the stream


@transactional
def test_first_bytes_are_retry_then_connected(user):
    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as stream:
            connected = await stream.next_of("connected")
            assert_stream_headers(stream)
            assert stream.parser.retry == 3000
            data = connected.json()
            assert stream.body == (
                b"retry: 3000\n\nevent: connected\ndata: "
                + protocol.encode(data).encode()
                + b"\n\n"
            )
            assert set(data) == {"connection_id", "user_id", "expires_at"}
            assert data["user_id"] == user.pk
            uuid.UUID(data["connection_id"])
            manager = get_connection_manager()
            assert await manager.count_connections(Transport.SSE) == 1
            assert await manager.count_user_connections(user.pk) == 1

    run(scenario)


@transactional
@pytest.mark.parametrize("how", ["header", "query", "session"])
def test_each_way_of_authenticating(user, how):
    """Each names the user; a token's stream says when it expires, a session's never."""
    headers, query, token = [], {}, token_for(user)
    expires_at = protocol.expiry_iso(AccessToken(token)["exp"])
    if how == "header":
        headers = bearer(token)
    elif how == "query":
        query = {"token": token}
    else:
        expires_at = None
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        headers = [(b"cookie", f"{cookie.key}={cookie.value}".encode())]

    async def scenario():
        async with InProcessStream(query, headers=headers) as stream:
            connected = (await stream.next_of("connected")).json()
            assert (connected["user_id"], connected["expires_at"]) == (user.pk, expires_at)

    run(scenario)


@transactional
def test_a_bearer_header_is_read_as_the_rest_api_reads_it(user):
    """Split on any whitespace, as simplejwt splits it: a tab after ``Bearer`` was a
    header of another scheme here, and a token the REST API accepted was refused."""

    async def scenario():
        headers = [(b"authorization", b"Bearer\t" + token_for(user).encode())]
        async with InProcessStream(headers=headers) as stream:
            assert (await stream.next_of("connected")).json()["user_id"] == user.pk

    run(scenario)


@transactional
def test_one_token_given_in_both_places_is_that_token(user):
    """An ``EventSource`` polyfill that can send headers may put it in both."""
    token = token_for(user)

    async def scenario():
        async with InProcessStream({"token": token}, headers=bearer(token)) as stream:
            assert (await stream.next_of("connected")).json()["user_id"] == user.pk

    run(scenario)


@transactional
def test_other_authorization_schemes_are_left_to_the_token_or_session(user):
    async def scenario():
        async with InProcessStream(
            {"token": token_for(user)}, headers=[(b"authorization", b"Basic dXNlcjpwdw==")]
        ) as stream:
            assert (await stream.next_of("connected")).json()["user_id"] == user.pk

    run(scenario)


def expired_token(user) -> str:
    return token_for(user, lifetime=-timedelta(seconds=1))


@transactional
@pytest.mark.parametrize(
    "credentials, code",
    [
        ("none", "not_authenticated"),
        ("empty query token", "authentication_failed"),
        ("garbage query token", "authentication_failed"),
        ("garbage header token", "authentication_failed"),
        ("empty bearer header", "authentication_failed"),
        ("expired token", "authentication_failed"),
        ("inactive user", "authentication_failed"),
        ("bad token beside a valid session", "authentication_failed"),
        ("bad query token beside a valid one", "authentication_failed"),
        ("bad query token beside a valid header", "authentication_failed"),
        ("another user's query token beside a header", "authentication_failed"),
        ("bad bearer header after a valid one", "authentication_failed"),
        (
            "bad bearer header after another scheme's, beside a valid query token",
            "authentication_failed",
        ),
        ("bad bearer header with a tab, beside a valid session", "authentication_failed"),
    ],
)
def test_missing_or_bad_credentials_are_401_json_without_a_stream(
    make_user, credentials, code, disconnected
):
    user = make_user()
    query, headers = {}, []
    if credentials == "empty query token":
        query = {"token": ""}
    elif credentials == "garbage query token":
        query = {"token": "not-a-jwt"}
    elif credentials == "garbage header token":
        headers = bearer("not-a-jwt")
    elif credentials == "empty bearer header":
        headers = [(b"authorization", b"Bearer")]
    elif credentials == "expired token":
        query = {"token": expired_token(user)}
    elif credentials == "inactive user":
        query = {"token": token_for(make_user(is_active=False))}
    elif credentials == "bad token beside a valid session":
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        query = {"token": "not-a-jwt"}
        headers = [(b"cookie", f"{cookie.key}={cookie.value}".encode())]
    elif credentials == "bad query token beside a valid one":
        query = [("token", "not-a-jwt"), ("token", token_for(user))]
    elif credentials == "bad query token beside a valid header":
        query, headers = {"token": "not-a-jwt"}, bearer(token_for(user))
    elif credentials == "another user's query token beside a header":
        query, headers = {"token": token_for(make_user())}, bearer(token_for(user))
    elif credentials == "bad bearer header after a valid one":
        headers = [*bearer(token_for(user)), *bearer("not-a-jwt")]
    elif credentials == "bad bearer header after another scheme's, beside a valid query token":
        query = {"token": token_for(user)}
        headers = [(b"authorization", b"Basic dXNlcjpwdw=="), *bearer("not-a-jwt")]
    elif credentials == "bad bearer header with a tab, beside a valid session":
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        headers = [
            (b"authorization", b"Bearer\tnot-a-jwt"),
            (b"cookie", f"{cookie.key}={cookie.value}".encode()),
        ]

    async def scenario():
        async with InProcessStream(query, headers=headers) as stream:
            assert stream.status == 401
            assert stream.header("Content-Type") == ["application/json"]
            assert stream.header("WWW-Authenticate") == ['Bearer realm="api"']
            body = stream.json()
            assert body["code"] == code and body["detail"]
            assert "not-a-jwt" not in body["detail"]
        await assert_no_connections()

    run(scenario)
    assert disconnected == []


@transactional
@pytest.mark.parametrize("header", [b"Bearer", b"Bearer a b"])
@pytest.mark.parametrize("with_query_token", [False, True])
def test_a_malformed_bearer_header_is_refused_with_the_rest_apis_reason(
    user, header, with_query_token
):
    """It was "No token given.", and beside a valid ?token= "More than one token given."."""
    query = {"token": token_for(user)} if with_query_token else {}

    async def scenario():
        async with InProcessStream(query, headers=[(b"authorization", header)]) as stream:
            assert stream.status == 401
            return stream.json()["detail"]

    detail = run(scenario)
    rest = Client().get("/api/tasks/", HTTP_AUTHORIZATION=header.decode()).json()["detail"]
    assert detail == rest == "Authorization header must contain two space-delimited values"


@transactional
@pytest.mark.parametrize("method", ["POST", "HEAD", "OPTIONS", "DELETE"])
def test_other_methods_are_405_json(user, method, disconnected):
    async def scenario():
        from channels.testing import HttpCommunicator

        from mcp_platform.asgi import application

        communicator = HttpCommunicator(
            application,
            method,
            f"/events?token={token_for(user)}",
            headers=[(b"host", b"testserver")],
        )
        response = await communicator.get_response(timeout=5)
        assert response["status"] == 405
        assert (b"Allow", b"GET") in response["headers"]
        assert json.loads(response["body"]) == {
            "code": "method_not_allowed",
            "detail": f'Method "{method}" not allowed.',
        }
        await assert_no_connections()

    run(scenario)
    assert disconnected == []


@transactional
@pytest.mark.parametrize(
    "query, status, code",
    [
        ({}, 401, "not_authenticated"),
        ({"token": "not-a-jwt"}, 401, "authentication_failed"),
        ("valid token, bad task_id", 400, "invalid_task_id"),
    ],
)
def test_a_refusal_is_answered_without_the_channel_layer(user, settings, query, status, code):
    """A refusal makes no channel: with Redis away, each was Daphne's 500 page, and an
    error logged with its traceback, for any anonymous client."""
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "tests.realtime.broken_layer.UnreachableLayer"}
    }
    if isinstance(query, str):
        query = {"token": token_for(user), "task_id": "nope"}

    async def scenario():
        async with InProcessStream(query) as stream:
            assert (stream.status, stream.json()["code"]) == (status, code)

    run(scenario)


@transactional
def test_a_stream_the_channel_layer_cannot_serve_is_503_json(user, settings, caplog):
    """Redis away: it was Daphne's 500 page, with a traceback logged each time."""
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "tests.realtime.broken_layer.UnreachableLayer"}
    }

    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as stream:
            assert (stream.status, stream.json()["code"]) == (503, "unavailable")

    run(scenario)
    assert "refused it: ConnectionError: layer is down" in caplog.text


@transactional
def test_a_stream_the_registry_cannot_record_is_503_json_and_leaves_nothing(
    user, task, monkeypatch, caplog
):
    manager = get_connection_manager()

    async def away(entry, limit=0):
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(manager.registry, "add", away)

    async def scenario():
        async with InProcessStream({"token": token_for(user), "task_id": str(task.pk)}) as stream:
            assert (stream.status, stream.json()["code"]) == (503, "unavailable")
        await assert_no_connections([task.pk])
        assert not any(manager.layer.groups.values())

    run(scenario)
    assert "Could not record an event stream; refused it 503: ConnectionError: Redis is" in (
        caplog.text
    )


@transactional
def test_a_host_not_in_allowed_hosts_is_400_json(user):
    async def scenario():
        async with InProcessStream(
            {"token": token_for(user)}, headers=[(b"host", b"evil.example")]
        ) as stream:
            assert stream.status == 400
            assert stream.json() == {"code": "bad_request", "detail": "Invalid Host header."}
        await assert_no_connections()

    run(scenario)


# task_id


@transactional
@pytest.mark.parametrize("value", ["", "42", "not-a-uuid", "a" * 300])
def test_task_id_that_is_not_a_uuid_is_400(user, task, value, disconnected):
    async def scenario():
        query = [("token", token_for(user)), ("task_id", str(task.pk)), ("task_id", value)]
        async with InProcessStream(query) as stream:
            assert stream.status == 400
            assert stream.json() == {
                "code": "invalid_task_id",
                "detail": "task_id must be a UUID.",
            }
        await assert_no_connections([task.pk])

    run(scenario)
    # Refused before connecting: nothing to undo.
    assert disconnected == []


@transactional
def test_more_query_parameters_than_django_reads_is_400(user, task, settings, disconnected):
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10

    async def scenario():
        query = [("token", token_for(user))] + [("task_id", str(task.pk))] * 10
        async with InProcessStream(query) as stream:
            assert stream.status == 400
            assert stream.json() == {
                "code": "bad_request",
                "detail": "More than 10 query parameters.",
            }
        await assert_no_connections([task.pk])

    run(scenario)
    assert disconnected == []


@transactional
@pytest.mark.parametrize(
    "failure",
    [OperationalError("server closed the connection unexpectedly"), RuntimeError("a bug")],
    ids=["database", "source"],
)
def test_a_task_the_source_could_not_read_is_503(user, task, disconnected, monkeypatch, failure):
    """A bug of the source's was a 500, Daphne's HTML page."""

    def unreachable(self, requests):
        raise failure

    monkeypatch.setattr(TaskSource, "get_visible_many", unreachable)

    async def scenario():
        query = {"token": token_for(user), "task_id": str(task.pk)}
        async with InProcessStream(query) as stream:
            assert stream.status == 503
            assert stream.json()["code"] == "unavailable"
        await assert_no_connections([task.pk])

    run(scenario)
    assert [c.groups for c in disconnected] == [set()]


@transactional
def test_a_stream_whose_subscription_the_registry_fails_to_count_is_served(user, task, monkeypatch):
    """Raised, the failed write (Redis away) answered a 500 before the stream began."""

    async def away(entry, task_id):
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(get_connection_manager().registry, "add_subscription", away)

    async def scenario():
        async with InProcessStream({"token": token_for(user), "task_id": str(task.pk)}) as stream:
            assert stream.status == 200
            await stream.next_of("connected")
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            assert (await stream.next_of("task_update")).json()["seq"] == 2

    run(scenario)


@transactional
@pytest.mark.parametrize("how", ["token", "session"])
def test_credentials_the_database_cannot_check_are_503(user, monkeypatch, how):
    async def unreachable(*args):
        raise OperationalError("server closed the connection unexpectedly")

    query, headers = {}, []
    if how == "token":
        query = {"token": token_for(user)}
        monkeypatch.setattr(auth._user_batcher, "fetch_many", unreachable)
    else:
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME]
        headers = [(b"cookie", f"{cookie.key}={cookie.value}".encode())]
        monkeypatch.setattr(channels.auth, "get_user", unreachable)

    async def scenario():
        async with InProcessStream(query, headers=headers) as stream:
            assert stream.status == 503
            assert stream.json()["code"] == "unavailable"

    run(scenario)


@transactional
def test_unknown_task_and_another_users_task_are_the_same_404(user, other_user, task, disconnected):
    foreign = services.create_task(owner=other_user, name="not yours")

    async def refusal(task_ids):
        query = [("token", token_for(user))] + [("task_id", str(t)) for t in task_ids]
        async with InProcessStream(query) as stream:
            assert stream.status == 404
            return stream.json(), stream.header("Content-Type")

    async def scenario():
        unknown = await refusal([task.pk, uuid.uuid4()])
        another = await refusal([task.pk, foreign.pk])
        assert (
            unknown
            == another
            == ({"code": "not_found", "detail": "No such task."}, ["application/json"])
        )
        await assert_no_connections([task.pk, foreign.pk])

    run(scenario)
    # Each refused stream had connected and subscribed to the first task, then let go.
    assert len(disconnected) == 2
    assert all(not c.groups and not c.last_seq for c in disconnected)


@transactional
@pytest.mark.parametrize("known", [True, False], ids=["tasks", "unknown-ids"])
def test_more_task_ids_than_the_subscription_limit_is_400(user, disconnected, known):
    """Counted before any is looked up: ids of no task were 404, as the first was."""
    if known:
        task_ids = [services.create_task(owner=user, name=f"t{i}").pk for i in range(3)]
    else:
        task_ids = [uuid.uuid4() for _ in range(3)]

    async def scenario():
        query = [("token", token_for(user))] + [("task_id", str(t)) for t in task_ids]
        async with InProcessStream(query) as stream:
            assert stream.status == 400
            assert stream.json()["code"] == "subscription_limit"
        await assert_no_connections(task_ids)

    with realtime_override(SUBSCRIPTION_LIMIT=2):
        run(scenario)
    assert disconnected == []  # none was connected


@transactional
def test_repeated_task_ids_count_once(user, task):
    async def scenario():
        query = [("token", token_for(user)), ("task_id", str(task.pk)), ("task_id", str(task.pk))]
        async with InProcessStream(query) as stream:
            await stream.next_of("connected")
            assert await get_connection_manager().count_task_subscribers(task.pk) == 1

    with realtime_override(SUBSCRIPTION_LIMIT=1):
        run(scenario)


@transactional
def test_staff_may_follow_another_users_task(staff_user, task):
    async def scenario():
        async with InProcessStream({"token": token_for(staff_user), "task_id": str(task.pk)}) as s:
            await s.next_of("connected")
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            assert (await s.next_of("task_update")).last_event_id == f"{task.pk}:2"

    run(scenario)


# What the stream carries


def snapshot(task, seq, **state):
    return TaskSnapshot(
        task_id=task.pk,
        owner_id=task.owner_id,
        seq=seq,
        state={"status": "running", "progress": 0, **state},
    )


@transactional
def test_a_task_that_changes_hands_ends_its_place_in_the_stream(user, other_user, task):
    async def scenario():
        async with InProcessStream({"token": token_for(user), "task_id": str(task.pk)}) as s:
            await s.next_of("connected")
            given_away = TaskSnapshot(
                task_id=task.pk, owner_id=other_user.pk, seq=2, state=snapshot(task, 2).state
            )
            await api.apublish_task_update(given_away)
            event = await s.next_event()
            assert (event.type, event.json()) == (
                "unsubscribed",
                {"type": "unsubscribed", "task_id": str(task.pk)},
            )
            await api.apublish_task_update(snapshot(task, 3))  # given back: not followed
            await api.asend_personal_message(user.pk, {"end": True})
            assert (await s.next_event()).type == "message"
            assert await get_connection_manager().count_task_subscribers(task.pk) == 0

    run(scenario)


@transactional
def test_a_deleted_task_is_announced_to_the_streams_that_followed_it(user, task):
    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as following_all:
            async with InProcessStream(
                {"token": token_for(user), "task_id": str(task.pk)}
            ) as subscribed:
                for stream in (following_all, subscribed):
                    await stream.next_of("connected")
                await database_sync_to_async(Task.objects.filter(pk=task.pk).delete)()
                for stream in (following_all, subscribed):
                    event = await stream.next_of("task_deleted")
                    assert event.json()["task_id"] == str(task.pk)
                assert await get_connection_manager().count_task_subscribers(task.pk) == 0
                # An update published before the deletion, arriving after it: dropped.
                await api.apublish_task_update(snapshot(task, 2))
                await api.asend_personal_message(user.pk, {"end": True})
                for stream in (following_all, subscribed):
                    assert (await stream.next_event()).type == "message"

    run(scenario)


@transactional
def test_a_stream_that_fails_ends_its_response(user, task, monkeypatch):
    """Here it fails as it tells the client that its task was deleted."""
    logged = []
    monkeypatch.setattr(sse.logger, "exception", lambda message: logged.append(message))

    async def failing(*args):
        raise RuntimeError("the notice could not be sent")

    async def scenario():
        async with InProcessStream({"token": token_for(user), "task_id": str(task.pk)}) as s:
            await s.next_of("connected")
            monkeypatch.setattr(sse.EventStreamConsumer, "send_notice", failing)
            await database_sync_to_async(Task.objects.filter(pk=task.pk).delete)()
            assert await s.until_end(timeout=5) == []
        await assert_no_connections()

    run(scenario)
    assert logged == ["Event stream failed; it was ended"]


@transactional
def test_task_ids_limit_the_stream_to_those_tasks(user, task):
    other = services.create_task(owner=user, name="unwatched")

    async def scenario():
        async with InProcessStream({"token": token_for(user), "task_id": str(task.pk)}) as s:
            await s.next_of("connected")
            await api.apublish_task_update(snapshot(other, 2))
            # Seq 1 is in the state the subscription started from, so it is not new.
            await api.apublish_task_update(snapshot(task, 1))
            await api.apublish_task_update(snapshot(task, 3, progress=30))
            await api.apublish_task_update(snapshot(task, 2))
            # 3 came ahead of 2, so it waited for it: both arrive, in order.
            assert (await s.next_of("task_update")).last_event_id == f"{task.pk}:2"
            update = await s.next_of("task_update")
            assert update.last_event_id == f"{task.pk}:3"
            assert update.json()["task"]["progress"] == 30
            await api.asend_personal_message(user.pk, {"end": True})
            assert (await s.next_of("message")).json()["payload"] == {"end": True}

    run(scenario)


@transactional
def test_each_gap_waits_a_whole_window_and_a_missing_update_is_given_up_on(user, task):
    window = 1.0

    async def scenario():
        query = {"token": token_for(user), "task_id": str(task.pk)}
        with realtime_override(REORDER_WINDOW_SECONDS=window):
            async with InProcessStream(query) as s:
                await s.next_of("connected")

                async def seqs(count: int) -> list[int]:
                    events = [await s.next_of("task_update", timeout=5) for _ in range(count)]
                    return [int(event.last_event_id.rsplit(":", 1)[1]) for event in events]

                for seq in (3, 2):  # a gap, closed at once; its release is armed
                    await api.apublish_task_update(snapshot(task, seq))
                got = await seqs(2)
                await asyncio.sleep(window / 2)
                await api.apublish_task_update(snapshot(task, 5))  # a second gap
                await asyncio.sleep(window * 0.7)  # past the first release, not the second
                await api.apublish_task_update(snapshot(task, 4))
                got += await seqs(2)
                await api.apublish_task_update(snapshot(task, 7))  # 6 never comes
                got += await seqs(1)
                assert got == [2, 3, 4, 5, 7]

    run(scenario)


@transactional
def test_without_task_ids_the_stream_follows_the_users_own_tasks(user, other_user, task):
    foreign = services.create_task(owner=other_user, name="not yours")

    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as s:
            await s.next_of("connected")
            await database_sync_to_async(services.update_task)(task=foreign, progress=1)
            await database_sync_to_async(services.update_task)(task=task, progress=50)
            update = await s.next_of("task_update")
            assert update.last_event_id == f"{task.pk}:2"
            assert update.json()["task"]["progress"] == 50

    run(scenario)


@transactional
def test_staff_without_task_ids_follow_every_task(staff_user, task):
    async def scenario():
        async with InProcessStream({"token": token_for(staff_user)}) as s:
            await s.next_of("connected")
            await database_sync_to_async(services.update_task)(task=task, status="running")
            assert (await s.next_of("task_update")).json()["status"] == "running"

    run(scenario)


@transactional
def test_broadcast_and_personal_message_pass_their_text_through(user, other_user):
    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as s:
            await s.next_of("connected")
            recipients = await api.asend_broadcast({"type": "announcement", "message": "hi\nthere"})
            assert recipients.sse == 1
            broadcast = await s.next_of("broadcast")
            assert broadcast.json()["payload"] == {"type": "announcement", "message": "hi\nthere"}
            assert broadcast.json()["type"] == "broadcast"
            await api.asend_personal_message(other_user.pk, {"for": "someone else"})
            await api.asend_personal_message(user.pk, {"for": "you"})
            assert (await s.next_of("message")).json()["payload"] == {"for": "you"}

    run(scenario)


@transactional
def test_heartbeat_when_idle(user):
    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as s:
            await s.next_of("connected")
            first = await s.next_of("heartbeat", timeout=2)
            second = await s.next_of("heartbeat", timeout=2)
            times = [datetime.fromisoformat(e.json()["timestamp"]) for e in (first, second)]
            assert set(first.json()) == {"timestamp"}
            assert timedelta(seconds=0.1) <= times[1] - times[0] < timedelta(seconds=2)

    with realtime_override(SSE_HEARTBEAT_SECONDS=0.2):
        run(scenario)


@pytest.mark.parametrize("seconds, refused", [(0.0, True), (-1.0, True), (0.5, False)])
def test_a_heartbeat_that_is_not_positive_fails_the_system_check(seconds, refused):
    with realtime_override(SSE_HEARTBEAT_SECONDS=seconds):
        ids = [message.id for message in run_checks(tags=[checks.TAG])]
    assert ("realtime.E002" in ids) is refused


@transactional
@pytest.mark.parametrize(
    "http_version, connection", [("1.0", None), ("1.1", b"close"), ("2", None)]
)
def test_keep_alive_only_where_http_allows_it(user, http_version, connection):
    headers = [] if connection is None else [(b"connection", connection)]

    async def scenario():
        async with InProcessStream(
            {"token": token_for(user)}, headers=headers, http_version=http_version
        ) as stream:
            await stream.next_of("connected")
            assert stream.header("Connection") == []
            assert stream.header("Content-Type") == ["text/event-stream"]

    run(scenario)


# Cleanup


def layer_state(layer) -> tuple[set[str], set[str]]:
    """The channels this process's layer holds, and those in any group (its internals:
    the in-memory layer's own, or the Redis pub/sub layer's for the running loop)."""
    local = layer._get_layer() if hasattr(layer, "_get_layer") else layer
    return set(local.channels), {c for members in local.groups.values() for c in members}


@transactional
def test_disconnect_leaves_every_group_and_registry_entry(user, task, disconnected):
    async def scenario():
        manager = get_connection_manager()
        stream = InProcessStream({"token": token_for(user), "task_id": str(task.pk)})
        async with stream:
            connected = (await stream.next_of("connected")).json()
            assert await manager.count_task_subscribers(task.pk) == 1
        # Leaving sent http.disconnect and waited for the application to finish.
        await assert_no_connections([task.pk])
        assert await manager.count_user_connections(user.pk) == 0
        [connection] = disconnected
        assert str(connection.connection_id) == connected["connection_id"]
        assert connection.groups == set() and connection.last_seq == {}
        # Nothing reaches the channel any more.
        await api.apublish_task_update(snapshot(task, 5))
        await api.asend_broadcast({"message": "anyone?"})
        await api.asend_personal_message(user.pk, {"x": 1})
        # The layer of this process holds neither the channel nor any membership of it.
        channels, members = layer_state(manager.layer)
        assert connection.channel_name not in channels | members

    run(scenario)


@transactional
def test_a_stream_whose_messages_overflow_ends_and_cleans_up(user, disconnected, caplog):
    """The in-process layer reports a full queue instead of dropping messages silently."""

    async def scenario():
        manager = get_connection_manager()
        async with InProcessStream({"token": token_for(user)}) as stream:
            await stream.next_of("connected")
            # group_send does not yield, so the stream cannot drain its queue of 2 meanwhile.
            for number in range(5):
                await api.asend_personal_message(user.pk, {"number": number})
            events = await stream.until_end()
            assert [event.json()["payload"]["number"] for event in events] == [0]
        await assert_no_connections()
        [connection] = disconnected
        channels, members = layer_state(manager.layer)
        assert connection.channel_name not in channels | members

    layers = {
        "default": {"BACKEND": "realtime.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 2}}
    }
    caplog.set_level(logging.INFO, logger="realtime")
    with override_settings(CHANNEL_LAYERS=layers):
        run(scenario)
    assert logged_ends(caplog) == ["its messages piled up unsent, a slow client"]


@transactional
def test_a_stream_ends_with_token_expired_when_its_token_expires(user, task, disconnected):
    token = token_for(user, lifetime=timedelta(seconds=2))
    expires_at = protocol.expiry_iso(AccessToken(token)["exp"])

    async def scenario():
        async with InProcessStream({"token": token, "task_id": str(task.pk)}) as stream:
            assert (await stream.next_of("connected")).json()["expires_at"] == expires_at
            events = await asyncio.wait_for(stream.until_end(), 5)
            assert [event.type for event in events] == ["token_expired"]
            assert events[0].json() == {"expires_at": expires_at}
        await assert_no_connections([task.pk])
        assert len(disconnected) == 1

    run(scenario)


@transactional
def test_a_session_stream_ends_with_token_expired_once_its_session_ends(user, task, disconnected):
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    headers = [(b"cookie", f"{cookie.key}={cookie.value}".encode())]

    async def scenario():
        async with InProcessStream({"task_id": str(task.pk)}, headers=headers) as stream:
            await stream.next_of("connected")
            await asyncio.sleep(0.5)  # checked, and still valid
            await database_sync_to_async(client.logout)()
            events = await asyncio.wait_for(stream.until_end(), 5)
            assert [event.type for event in events] == ["token_expired"]
            assert events[0].json() == {"expires_at": None}
        await assert_no_connections([task.pk])
        assert len(disconnected) == 1

    with realtime_override(SESSION_RECHECK_SECONDS=0.2):
        run(scenario)


@transactional
def test_a_staff_users_stream_of_every_task_ends_once_a_check_finds_them_demoted(staff_user):
    """It went on streaming every user's tasks to a user no longer staff."""
    client = Client()
    client.force_login(staff_user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    headers = [(b"cookie", f"{cookie.key}={cookie.value}".encode())]

    def demote():
        staff_user.is_staff = False
        staff_user.save()

    async def scenario():
        async with InProcessStream({}, headers=headers) as stream:
            await stream.next_of("connected")
            await database_sync_to_async(demote)()
            events = await asyncio.wait_for(stream.until_end(), 5)
            assert [event.type for event in events] == ["token_expired"]

    with realtime_override(SESSION_RECHECK_SECONDS=0.2):
        run(scenario)


@transactional
@pytest.mark.parametrize("read_first", [False, True])
def test_a_client_gone_at_once_still_cleans_up(user, task, read_first, disconnected):
    """``http.disconnect`` right behind the request: queued before the stream started, or
    after its first bytes."""

    async def scenario():
        from mcp_platform.asgi import application

        stream = InProcessStream({"token": token_for(user), "task_id": str(task.pk)})
        communicator = ApplicationCommunicator(application, stream.scope)
        await communicator.send_input({"type": "http.request", "body": b""})
        if read_first:
            assert (await communicator.receive_output(timeout=5))["status"] == 200
        await communicator.send_input({"type": "http.disconnect"})
        await communicator.wait(timeout=5)
        await assert_no_connections([task.pk])

    run(scenario)
    assert len(disconnected) == 1


@transactional
def test_a_stream_whose_application_is_cancelled_still_cleans_up(user, task, disconnected):
    """As when Daphne gives up on an application that does not finish (or shuts down)."""

    async def scenario():
        from mcp_platform.asgi import application

        stream = InProcessStream({"token": token_for(user), "task_id": str(task.pk)})
        communicator = ApplicationCommunicator(application, stream.scope)
        await communicator.send_input({"type": "http.request", "body": b""})
        assert (await communicator.receive_output(timeout=5))["status"] == 200
        communicator.future.cancel()
        await asyncio.wait([communicator.future], timeout=5)
        assert communicator.future.cancelled()
        await assert_no_connections([task.pk])
        channels, members = layer_state(get_connection_manager().layer)
        assert disconnected[0].channel_name not in channels | members

    run(scenario)
    assert len(disconnected) == 1


# Property 46


STATUSES = ["pending", "running", "completed", "failed", "cancelled"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
states = st.fixed_dictionaries(
    {
        "status": st.sampled_from(STATUSES),
        "progress": st.integers(0, 100),
        "name": st.text(max_size=40),
    },
    optional={"result": json_values},
)


def operations(n_tasks):
    # "update" publishes a task's next seq; "repeat" publishes its latest seq again.
    update = st.tuples(st.sampled_from(["update", "repeat"]), st.integers(0, n_tasks - 1), states)
    broadcast = st.tuples(
        st.just("broadcast"), st.fixed_dictionaries({"message": st.text(min_size=1)})
    )
    message = st.tuples(
        st.just("message"), st.dictionaries(st.text(max_size=5), json_values, max_size=2)
    )
    return st.lists(st.one_of(update, broadcast, message), max_size=12)


@pytest.fixture
def property_world(make_user):
    owner, stranger, staff = make_user(), make_user(), make_user(is_staff=True)
    tasks = [services.create_task(owner=owner, name=f"t{i}") for i in range(3)]
    tasks.append(services.create_task(owner=stranger, name="stranger's"))
    return {"owner": owner, "staff": staff, "tasks": tasks}


@transactional
@hypothesis_settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.data(),
    as_staff=st.booleans(),
    via_header=st.booleans(),
    ops=operations(4),
)
def test_property_46_events_parse_into_the_expected_event_id_and_data(
    property_world, data, as_staff, via_header, ops
):
    """For any set of updates, an SSE subscriber receives events whose wire format parses
    per WHATWG event-stream rules into the expected event, id and JSON data."""
    tasks = property_world["tasks"]
    viewer = property_world["staff" if as_staff else "owner"]
    visible = range(len(tasks)) if as_staff else range(3)
    subscribed = data.draw(st.none() | st.sets(st.sampled_from(visible), min_size=1))
    token = token_for(viewer)
    query = [("task_id", str(tasks[i].pk)) for i in sorted(subscribed or ())]
    headers = bearer(token) if via_header else []
    if not via_header:
        query.append(("token", token))

    # The model: what a browser's EventSource would dispatch, in order.
    # Seqs are published as the model allots them: each task's next one, or its latest
    # again (a duplicate), never with a gap, since committed changes have none.
    watched = set(visible) if subscribed is None else subscribed
    seen = {} if subscribed is None else {i: 1 for i in subscribed}
    latest = {i: 1 for i in range(len(tasks))}
    published, expected, last_id = [], [], ""
    for op in ops:
        if op[0] in ("update", "repeat"):
            kind, index, state = op
            if kind == "update":
                latest[index] += 1
            seq = latest[index]
            published.append(("update", index, seq, state))
            if index in watched and seq > seen.get(index, 0):
                seen[index] = seq
                last_id = f"{tasks[index].pk}:{seq}"
                expected.append(("task_update", last_id, (index, seq, state)))
        else:
            published.append(op)
            expected.append((op[0], last_id, op[1]))
    expected.append(("message", last_id, {"end": True}))

    async def scenario():
        async with InProcessStream(query, headers=headers) as stream:
            assert_stream_headers(stream)
            connected = await stream.next_of("connected")
            assert connected.json()["user_id"] == viewer.pk
            for op in published:
                if op[0] == "update":
                    _, index, seq, state = op
                    await api.apublish_task_update(snapshot(tasks[index], seq, **state))
                elif op[0] == "broadcast":
                    await api.asend_broadcast(op[1])
                else:
                    await api.asend_personal_message(viewer.pk, op[1])
            await api.asend_personal_message(viewer.pk, {"end": True})
            received = [await stream.next_event() for _ in expected]
        assert stream.parser.retry == 3000
        # One event per block, its JSON on one data line.
        for block in stream.body.split(b"\n\n")[1:-1]:
            assert sum(line.startswith(b"data:") for line in block.split(b"\n")) == 1
        for event, (event_type, last_event_id, content) in zip(received, expected, strict=True):
            assert (event.type, event.last_event_id) == (event_type, last_event_id)
            body = event.json()
            if event_type == "task_update":
                index, seq, state = content
                assert body["task_id"] == str(tasks[index].pk)
                assert (body["seq"], body["status"], body["progress"]) == (
                    seq,
                    state["status"],
                    state["progress"],
                )
                assert body["task"] == state
            else:
                assert body["type"] == ("broadcast" if event_type == "broadcast" else "message")
                assert body["payload"] == content
            datetime.fromisoformat(body["timestamp"])
        await assert_no_connections()

    run(scenario)
