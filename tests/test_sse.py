"""The SSE parser: split anywhere, merged, CRLF, comments, multi-line data; bytes kept for unchanged events."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.openai import is_usage_only_chunk, usage_from
from proxy.sse import Event, Parser

STREAM = (Path(__file__).parent / "fixtures" / "sse" / "chat_stream.txt").read_bytes()


def parse_all(chunks: list[bytes]) -> list[Event]:
    p = Parser()
    out: list[Event] = []
    for c in chunks:
        out.extend(p.feed(c))
    out.extend(p.close())
    return out


def test_whole_stream():
    events = parse_all([STREAM])
    assert len(events) == 5 and events[-1].is_done
    assert b"".join(e.encode() for e in events) == STREAM
    assert usage_from(events[3].json).completion_tokens == 2 and is_usage_only_chunk(events[3].json)


def test_split_at_every_byte_gives_the_same_events():
    reference = [e.data for e in parse_all([STREAM])]
    for i in range(1, len(STREAM)):
        assert [e.data for e in parse_all([STREAM[:i], STREAM[i:]])] == reference, i


def test_reads_of_whole_events_and_random_cuts_agree_byte_for_byte():
    import random

    rnd = random.Random(7)
    reference = parse_all([STREAM])
    whole = [b + b"\n\n" for b in STREAM.split(b"\n\n") if b]  # one read per event, the usual case
    assert [e.encode() for e in parse_all(whole)] == [e.encode() for e in reference]
    for _ in range(200):
        cuts = sorted(rnd.sample(range(1, len(STREAM)), 3))
        pieces = [STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(STREAM)])]
        events = parse_all(pieces)
        assert [e.data for e in events] == [e.data for e in reference]
        assert b"".join(e.encode() for e in events) == STREAM


def test_one_byte_at_a_time():
    events = parse_all([bytes([b]) for b in STREAM])
    assert b"".join(e.encode() for e in events) == STREAM


@pytest.mark.parametrize("sep", [b"\r\n", b"\r"])
def test_other_line_endings(sep):
    text = STREAM.replace(b"\n", sep)
    assert [e.data for e in parse_all([text])] == [e.data for e in parse_all([STREAM])]


def test_fields_comments_and_multiline_data():
    raw = b": keep-alive\n\nevent: response.created\nid: 7\nretry: 1000\ndata: {\"a\":\ndata: 1}\n\n"
    events = parse_all([raw])
    assert len(events) == 2
    assert events[0].comments == [" keep-alive"]
    ev = events[1]
    assert (ev.event, ev.id, ev.retry, ev.data) == ("response.created", "7", 1000, '{"a":\n1}')
    assert ev.json == {"a": 1}


def test_a_block_of_only_retry_or_id_is_kept_byte_for_byte():
    """A `retry:` (or `id:`) block carries no data but tells the client something: it was dropped, so a
    route with an on_chunk plugin lost it where the raw relay kept it."""
    raw = b": keep-alive\n\nretry: 3000\n\nid: 41\n\nfoo: bar\n\ndata: {\"a\": 1}\n\n"
    events = parse_all([raw])
    assert [(e.retry, e.id, e.data) for e in events] == [(None, None, ""), (3000, None, ""), (None, "41", ""), (None, None, '{"a": 1}')]
    assert b"".join(e.encode() for e in events) == raw.replace(b"foo: bar\n\n", b"")  # a field nobody reads goes
    assert all(e.json is None for e in events[:3])  # no data: nothing for a plugin to read


def test_unterminated_last_event_is_kept_and_reframed():
    events = parse_all([b"data: {\"x\": 1}\n\ndata: {\"y\": 2}"])
    assert [e.json for e in events] == [{"x": 1}, {"y": 2}]
    assert events[1].encode() == b'data: {"y": 2}\n\n'


def test_changed_event_is_reserialised():
    ev = parse_all([b'event: x\ndata: {"a": 1}\n\n'])[0]
    ev.json = {"a": 2}
    assert ev.encode() == b'event: x\ndata: {"a":2}\n\n'
    ev2 = parse_all([b'data: {"a": 1}\n\n'])[0]
    ev2.json["a"] = 3
    ev2.changed()
    assert ev2.encode() == b'data: {"a":3}\n\n'


def test_non_json_data():
    ev = Event("plain text")
    assert ev.json is None and ev.encode() == b"data: plain text\n\n"
