#!/usr/bin/env python3
"""When the device fails: the real agent with its backend made to fail on
purpose after a few steps (LORAPLANE_TEST_BACKEND_FAIL_AFTER, the hook of
kernels/fault.h), so that what a CUDA error does is seen from outside: a
request running at the time ends with 500 (or, streaming, an error event
and [DONE]), later requests get 500 at once, /ready says 503 with the
reason, /health stays 200, and SIGTERM still exits 0."""

import json

from harness import TINY_ARGS, Agent, main, sse_events, stop_agent, test

_agents = []


def failing_agent(after):
    a = Agent(*TINY_ARGS, env={"LORAPLANE_TEST_BACKEND_FAIL_AFTER": str(after)})
    _agents.append(a)
    a.wait_log(r"test hook: the backend fails after \d+ steps")
    return a


def completion(stream, max_tokens=40):
    return {"model": "tiny-llama", "prompt": "Good morning", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


@test
def running_request_fails_with_500_and_ready_turns_503():
    a = failing_agent(5)
    status, body = a.json("POST", "/v1/completions", completion(False))
    assert status == 500, (status, body)
    assert "injected backend failure" in body["error"]["message"], body
    status, body = a.json("GET", "/ready", admin=True)
    assert status == 503, (status, body)
    assert body["reason"].startswith("the engine failed: "), body
    assert "injected backend failure" in body["reason"], body
    status, body = a.json("GET", "/ready")
    assert status == 503, (status, body)
    assert a.json("GET", "/health")[0] == 200
    # later requests fail at once, with the same reason
    status, body = a.json("POST", "/v1/completions", completion(False, 2))
    assert status == 500 and "injected backend failure" in body["error"]["message"], \
        (status, body)


@test
def stream_ends_with_an_error_event():
    a = failing_agent(6)
    status, hdrs, data = a.request("POST", "/v1/completions", completion(True))
    assert status == 200, (status, data[:300])
    events, done = sse_events(data)
    assert done, "the stream has no [DONE]"
    assert any("choices" in e for e in events), events[:3]
    assert "error" in events[-1], events[-1]
    err = events[-1]["error"]
    assert err["code"] == 500 and err["type"] == "internal_error", err
    assert "injected backend failure" in err["message"], err


def cleanup():
    failed = 0
    for i, a in enumerate(_agents):
        failed += stop_agent(a, f"test-engine-failure:agent{i}")
    return failed


if __name__ == "__main__":
    main("test-engine-failure", cleanup)
