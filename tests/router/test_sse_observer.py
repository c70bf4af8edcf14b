"""The SSE observer on its own: framing across arbitrary chunk boundaries, usage, stripping, bad input."""

from __future__ import annotations

import json

import pytest

from router import usage as usage_mod
from router.transports import _sse


def event(doc: object, *, name: str | None = None, eol: str = "\n") -> bytes:
    head = f"event: {name}{eol}" if name else ""
    return f"{head}data: {json.dumps(doc)}{eol}{eol}".encode()


CHUNK = event({"choices": [{"index": 0, "delta": {"content": 'the word "usage" in text'}}], "usage": None})
USAGE = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
STREAM = event({"choices": [], "prompt_filter_results": []}) + CHUNK + USAGE + b"data: [DONE]\n\n"


def run(observer: _sse.StreamObserver, data: bytes, size: int) -> bytes:
    out = b"".join(observer.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + observer.finish()


@pytest.mark.parametrize("size", [1, 2, 7, 64, 10_000])
def test_any_chunking_gives_the_same_events(size: int) -> None:
    kept = _sse.StreamObserver(strip_usage_chunk=False)
    assert run(kept, STREAM, size) == STREAM
    assert kept.usage == usage_mod.Usage(3, 4, 7)
    stripped = _sse.StreamObserver(strip_usage_chunk=True)
    assert run(stripped, STREAM, size) == STREAM.replace(USAGE, b"")
    assert stripped.usage == usage_mod.Usage(3, 4, 7)


def test_crlf_framing_and_multi_line_data() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    crlf = event({"choices": [], "usage": usage}, eol="\r\n")
    multi = b'data: {"choices": [],\ndata:  "usage": {"prompt_tokens": 5, "total_tokens": 5}}\n\n'
    obs = _sse.StreamObserver(strip_usage_chunk=True)
    assert obs.feed(crlf) == b""
    assert obs.usage == usage_mod.Usage(1, 2, 3)
    assert obs.feed(multi) == b""
    assert obs.usage == usage_mod.Usage(5, 0, 5)


def test_only_the_usage_chunk_is_stripped() -> None:
    # A chunk that has choices and usage (some providers do this) is content: never dropped.
    both = event({"choices": [{"delta": {"content": "x"}}], "usage": {"prompt_tokens": 2, "total_tokens": 2}})
    obs = _sse.StreamObserver(strip_usage_chunk=True)
    assert obs.feed(both) == both
    assert obs.usage == usage_mod.Usage(2, 0, 2)


def test_responses_completed_event_carries_usage() -> None:
    done = event(
        {
            "type": "response.completed",
            "response": {"usage": {"input_tokens": 8, "output_tokens": 2, "total_tokens": 10}},
        },
        name="response.completed",
    )
    obs = _sse.StreamObserver(strip_usage_chunk=True)
    assert obs.feed(done) == done  # Responses events are never stripped
    assert obs.usage == usage_mod.Usage(8, 2, 10)


@pytest.mark.parametrize(
    "raw",
    [
        b'data: {"usage": \n\n',  # malformed JSON
        b'data: ["usage"]\n\n',  # not an object
        b'data: {"usage": {"prompt_tokens": -1}}\n\n',  # nonsense counts
        b'data: {"usage": {"prompt_tokens": true}}\n\n',
        b"data: \xff\xfe usage\n\n",  # not UTF-8
        b': comment with "usage"\n\n',
    ],
)
def test_bad_events_pass_through_and_report_nothing(raw: bytes) -> None:
    obs = _sse.StreamObserver(strip_usage_chunk=True)
    assert obs.feed(raw) == raw
    assert obs.usage is None


def test_unterminated_tail_is_flushed_at_the_end() -> None:
    obs = _sse.StreamObserver(strip_usage_chunk=False)
    assert obs.feed(b'data: {"usage": {"prompt_tokens": 1, "total_tokens": 1}}') == b""
    assert obs.finish() == b'data: {"usage": {"prompt_tokens": 1, "total_tokens": 1}}'
    assert obs.usage == usage_mod.Usage(1, 0, 1)


def test_error_event_is_what_the_sdk_raises_for() -> None:
    raw = _sse.error_event({"error": {"message": "gone", "code": "upstream_error"}})
    assert raw == b'event: error\ndata: {"error":{"message":"gone","code":"upstream_error"}}\n\ndata: [DONE]\n\n'
