import gc
import json
import math
import sys
import tracemalloc
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from realtime import protocol
from realtime.http_protocol import as_chunk
from realtime.protocol import Action, ErrorCode, ProtocolError, parse_client_message
from realtime.websocket_protocol import data_frame

request_ids = st.none() | st.text(max_size=20) | st.integers(-(2**53), 2**53)


@given(
    action=st.sampled_from(list(Action)),
    task_id=st.uuids(),
    token=st.text(),
    request_id=request_ids,
)
def test_parse_round_trips_every_valid_message(action, task_id, token, request_id):
    message = {"action": str(action)}
    if action in protocol.TASK_ACTIONS:
        message["task_id"] = str(task_id)
    if action is Action.AUTHENTICATE:
        message["token"] = token
    if request_id is not None:
        message["id"] = request_id
    parsed = parse_client_message(json.dumps(message))
    assert parsed.action == action
    assert parsed.request_id == request_id
    assert parsed.task_id == (task_id if action in protocol.TASK_ACTIONS else None)
    assert parsed.token == (token if action is Action.AUTHENTICATE else None)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("[" * 5_000, ErrorCode.INVALID_JSON),  # nested deeper than Python's parser goes
        # Python's parser reads these; no JSON parser does.
        ('{"action": "ping", "x": NaN}', ErrorCode.INVALID_JSON),
        ('{"action": "ping", "id": Infinity}', ErrorCode.INVALID_JSON),
        ('{"action": "ping", "x": [-Infinity]}', ErrorCode.INVALID_JSON),
        ("[1, 2]", ErrorCode.INVALID_MESSAGE),
        ('"subscribe"', ErrorCode.INVALID_MESSAGE),
        ("{}", ErrorCode.INVALID_MESSAGE),
        ('{"action": 3}', ErrorCode.INVALID_MESSAGE),
        ('{"action": "ping", "id": [1]}', ErrorCode.INVALID_MESSAGE),
        ('{"action": "ping", "id": true}', ErrorCode.INVALID_MESSAGE),
        ('{"action": "dance"}', ErrorCode.UNKNOWN_ACTION),
        ('{"action": "subscribe"}', ErrorCode.INVALID_TASK_ID),
        ('{"action": "subscribe", "task_id": "nope"}', ErrorCode.INVALID_TASK_ID),
        ('{"action": "unsubscribe", "task_id": 12}', ErrorCode.INVALID_TASK_ID),
        ('{"action": "authenticate"}', ErrorCode.INVALID_MESSAGE),
        ('{"action": "authenticate", "token": null}', ErrorCode.INVALID_MESSAGE),
        ('{"action": "authenticate", "token": ["a.b.c"]}', ErrorCode.INVALID_MESSAGE),
        # Valid JSON, but longer than Python converts: it was answered as not JSON.
        ('{"action": "ping", "id": 1%s}' % ("0" * 4300), ErrorCode.INVALID_MESSAGE),
    ],
)
def test_bad_messages_raise_their_code(text, code):
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(text)
    assert caught.value.code == code


def test_an_integer_id_as_long_as_python_converts_is_kept_exactly():
    longest = "9" * sys.get_int_max_str_digits()
    assert parse_client_message(f'{{"action": "ping", "id": {longest}}}').request_id == int(longest)


def test_error_keeps_the_request_id_once_it_is_known():
    with pytest.raises(ProtocolError) as caught:
        parse_client_message('{"action": "subscribe", "task_id": "x", "id": "r1"}')
    assert caught.value.request_id == "r1"


@given(st.text())
def test_any_text_parses_or_raises_protocol_error(text):
    try:
        parse_client_message(text)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)


def test_task_update_carries_status_progress_and_state():
    task_id = uuid.uuid4()
    state = {"id": str(task_id), "status": "running", "progress": 5}
    message = protocol.task_update(task_id, 7, state)
    assert message["type"] == "task_update"
    assert (message["task_id"], message["status"], message["progress"], message["seq"]) == (
        str(task_id),
        "running",
        5,
        7,
    )
    assert message["task"] is state
    assert json.loads(protocol.encode(message)) == message


@given(event=st.text(), data=st.text(), event_id=st.none() | st.text())
def test_sse_event_frames_one_block_with_clean_fields(event, data, event_id):
    block = protocol.sse_event(event, data, event_id).decode()
    assert block.endswith("\n\n")
    lines = block[:-2].split("\n")
    assert lines[0].startswith("event: ") and "\r" not in lines[0] and "\0" not in lines[0]
    data_lines = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    normalised = data.replace("\r\n", "\n").replace("\r", "\n")
    assert "\n".join(data_lines) == normalised


def test_the_framings_of_large_updates_are_not_kept_once_sent():
    """Kept by the hundred, those of a task with a 1.5 MB result held hundreds of MiB
    after their fan-outs were done."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seq in range(100):
            text = json.dumps({"seq": seq, "result": "x" * 1_000_000})
            data_frame(text, False)
            as_chunk(protocol.sse_task_update("t", seq, text))
        del text
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # Each kept: the text, its event, its chunk and its frame, ~1 MB each (before: 100).
    assert kept < 5 * protocol.FRAMINGS_KEPT * 1_000_000, kept


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_a_message_that_json_cannot_carry_is_refused_not_sent_as_nan(number):
    """Written as ``NaN`` or ``Infinity``, every client's JSON parser threw on the frame."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        protocol.encode(protocol.personal_message({"progress": [number]}))
