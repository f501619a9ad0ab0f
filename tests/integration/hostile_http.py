#!/usr/bin/env python3
"""Hostile HTTP clients against the agent's front door (agent/api/gate.c):
slow heads that once starved the public port (slowloris), NUL and other
control characters in adapter and model names, 'Expect: 100-continue',
HEAD on GET routes, malformed heads, chunked bodies and keep-alive through
the gate. Each case asserts the exact status and error code, and that the
agent still answers /health and serves a completion afterwards.

A module of tests/integration/test-hostile.py; runs alone too."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import harness as H

HEADER_TIMEOUT = 3  # --http-header-timeout of the shared agent
MAX_CONNS = 160     # --http-max-connections: below the flood, so eviction runs too
TMP = None
_agent = None


def agent():
    global _agent, TMP
    if _agent is None:
        TMP = tempfile.mkdtemp(prefix="lp-hostile-http-")
        H.copy_adapter(os.path.join(H.TINY_LORAS, "r4-qv"), os.path.join(TMP, "good"))
        _agent = H.Agent("--allowed-local-roots", TMP, "--http-header-timeout",
                         str(HEADER_TIMEOUT), "--http-max-connections", str(MAX_CONNS),
                         *H.TINY_ARGS)
    return _agent


def raw(port, data, timeout=10):
    """Sends data on a fresh connection and reads until the server closes
    or the deadline passes: the bytes received."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                b = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not b:
                break
            out += b
        return out
    finally:
        s.close()


def status_of(resp):
    assert resp.startswith(b"HTTP/1.1 "), resp[:200]
    return int(resp[9:12])


def error_code(resp):
    body = resp.split(b"\r\n\r\n", 1)[1]
    return json.loads(body)["error"]["code"]


def load(a, name):
    status, obj = a.json("POST", "/v1/loras",
                         {"lora_name": name, "source": {"uri": "file://" + TMP + "/good"}},
                         admin=True)
    assert status in (200, 201), (status, obj)


def loaded(a, name):
    status, obj = a.json("GET", "/v1/loras/" + name, admin=True)
    return status == 200


# ---- slowloris -------------------------------------------------------------


@H.test
def http_slow_heads_do_not_starve_health_and_ready():
    a = agent()
    slow = []
    try:
        # 200 connections on the public port and 40 on the admin port, each
        # with a head that never ends (one more byte now and then)
        for i in range(240):
            s = socket.create_connection(("127.0.0.1", a.admin_port if i >= 200 else a.port),
                                         timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        stop = threading.Event()

        def dribble():
            while not stop.wait(0.5):
                for s in slow:
                    try:
                        s.send(b"a")
                    except OSError:
                        pass
        t = threading.Thread(target=dribble, daemon=True)
        t.start()
        try:
            for _ in range(3):
                for admin in (False, True):
                    for path in ("/health", "/ready"):
                        c = http.client.HTTPConnection(
                            "127.0.0.1", a.admin_port if admin else a.port, timeout=3)
                        try:
                            c.request("GET", path)
                            r = c.getresponse()
                            r.read()
                            assert r.status == 200, f"{path} admin={admin}: {r.status}"
                        finally:
                            c.close()
            assert a.serving(), "no completion while slow heads were open"
        finally:
            stop.set()
            t.join(5)
        # every slow connection is closed by the server (header timeout, or
        # evicted at the connection cap)
        deadline = time.time() + HEADER_TIMEOUT + 30
        for s in slow:
            s.settimeout(max(0.1, deadline - time.time()))
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            except socket.timeout:
                raise AssertionError("a slow connection was still open after the header timeout")
    finally:
        for s in slow:
            s.close()
    H.assert_healthy(a)


@H.test
def http_late_and_oversized_heads_are_refused():
    a = agent()
    # a head that stops: 408, then closed
    resp = raw(a.port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n", timeout=HEADER_TIMEOUT + 20)
    assert status_of(resp) == 408 and error_code(resp) == "request_timeout", resp[:300]
    # a head over 16 KiB: 431
    resp = raw(a.port, b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    assert status_of(resp) == 431, resp[:300]
    # a NUL in the head, a folded header, two Content-Lengths that differ,
    # an unknown transfer coding, HTTP/2's preface
    for data, status in ((b"GET /health\x00 HTTP/1.1\r\n\r\n", 400),
                         (b"GET /health HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n", 400),
                         (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n"
                          b"Content-Length: 3\r\n\r\n{}", 400),
                         (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
                          501),
                         (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505)):
        resp = raw(a.port, data)
        assert status_of(resp) == status, (data, resp[:300])
    H.assert_healthy(a)


# ---- names -------------------------------------------------------------------


@H.test
def http_nul_and_control_characters_in_names_are_400_invalid_name():
    a = agent()
    load(a, "a")
    for path in ("/v1/loras/a%00anything", "/v1/loras/a%00", "/v1/loras/a%01x",
                 "/v1/loras/a%0a", "/v1/loras/a%7f", "/v1/loras/a%1F"):
        for method in ("DELETE", "GET"):
            status, obj = a.json(method, path, admin=True)
            assert status == 400 and obj["error"]["code"] == "invalid_name", \
                (method, path, status, obj)
            assert loaded(a, "a"), f"{method} {path} touched adapter 'a'"
    good = "file://" + TMP + "/good"
    for path, body in (("/v1/loras", {"lora_name": "a\u0000x", "source": {"uri": good}}),
                       ("/v1/loras", {"lora_name": "b\u0001", "source": {"uri": good}}),
                       ("/v1/load_lora_adapter", {"lora_name": "c\u0000", "lora_path": good}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a\u0000x"})):
        status, obj = a.json("POST", path, body, admin=True)
        assert status == 400 and obj["error"]["code"] == "invalid_name", (path, status, obj)
        assert loaded(a, "a"), f"POST {path} touched adapter 'a'"
    for route, body in (("/v1/completions", {"model": "a\u0000x", "prompt": "hi",
                                             "max_tokens": 2}),
                        ("/v1/chat/completions", {"model": "a\u0000", "max_tokens": 2,
                                                  "messages": [{"role": "user",
                                                                "content": "hi"}]})):
        status, obj = a.json("POST", route, body)
        assert status == 400 and obj["error"]["code"] == "invalid_name" and \
            obj["error"]["param"] == "model", (route, status, obj)
    status, obj = a.json("DELETE", "/v1/loras/a", admin=True)
    assert status == 200, (status, obj)
    H.assert_healthy(a)


# ---- Expect: 100-continue ----------------------------------------------------


def expect_continue(port, path, body):
    """Sends a head with 'Expect: 100-continue', waits for the 100 with a
    deadline, then sends the body: the final response (status, raw bytes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    try:
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n")
        got = b""
        s.settimeout(10)  # the client waits this long for the 100
        while b"\r\n\r\n" not in got:
            b = s.recv(4096)
            assert b, f"closed before the 100: {got!r}"
            got += b
        assert got.startswith(cont), got[:200]
        s.sendall(body)
        s.settimeout(60)
        while True:
            b = s.recv(65536)
            if not b:
                break
            got += b
        final = got[len(cont):]
        return status_of(final), final
    finally:
        s.close()


@H.test
def http_expect_100_continue_is_answered():
    a = agent()
    base = a.base_name()
    status, data = expect_continue(a.port, "/v1/completions", json.dumps(
        {"model": base, "prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200, (status, data[:300])
    status, data = expect_continue(a.admin_port, "/v1/loras", json.dumps(
        {"lora_name": "e", "source": {"uri": "file://" + TMP + "/good"}}).encode())
    assert status == 201, (status, data[:300])
    # refused before the body is read: the final status, no 100
    for port, path, cl, want in ((a.port, "/v1/nothing", 10, 404),
                                 (a.port, "/v1/completions", 5 << 20, 413)):
        resp = raw(port, b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                   b"Expect: 100-continue\r\nContent-Length: " + str(cl).encode() +
                   b"\r\n\r\n")
        assert status_of(resp) == want, (path, resp[:300])
    # an expectation other than 100-continue: 417
    resp = raw(a.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n"
               b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert status_of(resp) == 417 and error_code(resp) == "expectation_failed", resp[:300]
    # curl sends 'Expect: 100-continue' for a large body and waits for it
    big = os.path.join(TMP, "big.json")
    with open(big, "w") as f:
        f.write('{"lora_name": "big", "source": {"uri": "file://' + TMP + '/good"}' +
                " " * (2 << 20) + "}")
    p = subprocess.run(["curl", "-sS", "-v", "--expect100-timeout", "60", "-o", "/dev/null",
                        "-w", "%{http_code}", "-H", "Content-Type: application/json",
                        "--data-binary", "@" + big, a.url("/v1/loras", admin=True)],
                       capture_output=True, text=True, timeout=120)
    assert p.stdout == "201", (p.stdout, p.stderr[-2000:])
    assert "< HTTP/1.1 100 Continue" in p.stderr, p.stderr[-2000:]
    H.assert_healthy(a)


# ---- HEAD, chunked bodies, keep-alive ----------------------------------------


@H.test
def http_head_on_get_routes_answers_headers_only():
    a = agent()
    for path, admin in (("/health", False), ("/ready", False), ("/v1/models", False),
                        ("/health", True), ("/metrics", True), ("/v1/loras", True)):
        st_get, h_get, body = a.request("GET", path, admin=admin)
        st_head, h_head, empty = a.request("HEAD", path, admin=admin)
        assert st_get == 200 and st_head == 200, (path, st_get, st_head)
        assert empty == b"", (path, empty[:100])
        assert h_head.get("content-type") == h_get.get("content-type"), (path, h_head)
        if path not in ("/metrics",):  # metrics change between the two requests
            assert int(h_head["content-length"]) == len(body), (path, h_head, len(body))
    status, hdrs, _ = a.request("HEAD", "/v1/completions")
    assert status == 405 and "POST" in hdrs["allow"], (status, hdrs)
    status, hdrs, _ = a.request("PUT", "/health")
    assert status == 405 and hdrs["allow"] == "GET, HEAD", (status, hdrs)
    H.assert_healthy(a)


@H.test
def http_chunked_bodies_and_keep_alive_pass_the_gate():
    a = agent()
    base = a.base_name()
    body = json.dumps({"model": base, "prompt": "hi", "max_tokens": 2}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                       for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    # two requests pipelined on one connection, the first chunked, then a probe
    resp = raw(a.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" +
               chunked + b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " +
               str(len(body)).encode() + b"\r\n\r\n" + body +
               b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=60)
    assert resp.count(b"HTTP/1.1 200 OK") == 3, resp[:1000]
    # keep-alive through http.client: one connection, several requests
    c = a.conn()
    try:
        for path in ("/health", "/v1/models", "/health"):
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            assert r.status == 200, (path, r.status)
    finally:
        c.close()
    H.assert_healthy(a)


def cleanup():
    failures = H.stop_agent(_agent, "hostile_http:shutdown")
    if TMP:
        shutil.rmtree(TMP, ignore_errors=True)
    return failures


if __name__ == "__main__":
    H.main("hostile_http", cleanup)
