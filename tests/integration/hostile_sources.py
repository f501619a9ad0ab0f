#!/usr/bin/env python3
"""Hostile adapter sources (issue 9, findings 1, 4 and 5) against a real
agent and local hubs: an endpoint named in a load request never receives
the agent's own HF token or AWS keys (and plain http ones need
--allow-insecure-source-endpoints), the download cache directory must be
the agent's alone, a download that is no adapter leaves no cache entry,
and --lora-cache-max-bytes evicts only what no loaded adapter uses. Each
API case asserts the status and error, and that the agent still answers
/health and serves a completion afterwards.

A module of tests/integration/test-hostile.py; runs alone too."""

import hashlib
import http.server
import json
import os
import shutil
import socketserver
import sys
import tempfile
import threading
import urllib.request

import harness as H

ENV_TOKEN = "hf_agent_own_token_must_not_leak"
ENV_AWS = {"AWS_ACCESS_KEY_ID": "AKIAAGENTOWNKEY", "AWS_SECRET_ACCESS_KEY": "agent-own-secret",
           "AWS_SESSION_TOKEN": "agent-own-session-token"}
REQ_TOKEN = "hf_request_token"
BUDGET = 15000  # one tiny adapter (~10 kB with its metadata), not two

TMP = None
_agents = {}
_servers = []


def _adapter(name):
    d = os.path.join(H.TINY_LORAS, name)
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


REPOS = {}  # repo -> {file: bytes}


class Hub(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass


class HubHandler(http.server.BaseHTTPRequestHandler):
    """A Hugging Face hub (public repos; private ones need REQ_TOKEN) that
    records every request's headers."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        with self.server.lock:
            self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = urllib.request.unquote(self.path)
        if path.startswith("/api/models/"):
            repo = path[len("/api/models/"):].partition("/revision/")[0]
        else:
            repo = path[1:].partition("/resolve/")[0]
        files = REPOS.get(repo)
        if files is None:
            return self.send(404, b'{"error":"Repository not found"}')
        if repo.startswith("private/") and self.headers.get("Authorization") != \
                f"Bearer {REQ_TOKEN}":
            return self.send(401, b'{"error":"Invalid credentials in Authorization header"}')
        if path.startswith("/api/models/"):
            body = {"siblings": [{"rfilename": n} for n in files]}
            return self.send(200, json.dumps(body).encode())
        name = path.rpartition("/")[2]
        if name not in files:
            return self.send(404, b'{"error":"Entry not found"}')
        self.send(200, files[name])


def _hub():
    srv = Hub(("127.0.0.1", 0), HubHandler)
    srv.lock = threading.Lock()
    srv.seen = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _servers.append(srv)
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _setup():
    global TMP, HUB, HUB_URL, OTHER, OTHER_URL
    if TMP is not None:
        return
    TMP = tempfile.mkdtemp(prefix="lp-hostile-sources-")
    good = _adapter("r4-qv")
    REPOS.update({"team/good": good, "team/good2": good, "private/good": good,
                  "team/bad": {"adapter_config.json": good["adapter_config.json"],
                               "adapter_model.safetensors": b"\xff" * 9000}})
    HUB, HUB_URL = _hub()        # the agent's own (HF_ENDPOINT in its environment)
    OTHER, OTHER_URL = _hub()    # one a load request names


def agent(kind):
    """'strict': the agent's own secrets in its environment, a cache
    budget; 'insecure': the same with --allow-insecure-source-endpoints."""
    _setup()
    if kind not in _agents:
        cache = os.path.join(TMP, "cache-" + kind)
        args = [*H.TINY_ARGS, "--lora-cache-dir", cache, "--lora-cache-max-bytes", str(BUDGET)]
        if kind == "insecure":
            args.append("--allow-insecure-source-endpoints")
        env = {"HF_ENDPOINT": HUB_URL, "HF_TOKEN": ENV_TOKEN, **ENV_AWS,
               "AWS_ENDPOINT_URL": HUB_URL, "NO_PROXY": "*"}
        _agents[kind] = (H.Agent(*args, env=env), cache)
    return _agents[kind]


def load(a, name, uri, creds=None):
    src = {"uri": uri}
    if creds is not None:
        src["credentials"] = creds
    return a.json("POST", "/v1/loras", {"lora_name": name, "source": src}, admin=True)


def unload(a, name):
    status, obj = a.json("DELETE", f"/v1/loras/{name}", admin=True)
    assert status in (200, 204), (status, obj)


def refused(status, obj, code, etype, param, *needles):
    assert status == code, (status, obj)
    err = obj["error"]
    assert err["type"] == etype or err.get("code") == etype, obj
    assert err.get("param") == param, obj
    for n in needles:
        assert n in err["message"], (n, obj)


def seen(srv):
    with srv.lock:
        out = list(srv.seen)
        srv.seen.clear()
    return out


def entries(cache):
    return sorted(n for n in os.listdir(cache) if not n.startswith("."))


def entry_of(uri):
    return "hf-" + hashlib.sha256(uri.encode()).hexdigest()[:32]


@H.test
def sources_http_request_endpoint_refused_without_flag():
    a, _ = agent("strict")
    seen(OTHER)
    for key, uri in (("HF_ENDPOINT", "hf://team/good"), ("AWS_ENDPOINT_URL", "s3://loras/x")):
        status, obj = load(a, "ep", uri, {key: OTHER_URL})
        refused(status, obj, 400, "invalid_credentials", "source.credentials", key,
                "plain http", "--allow-insecure-source-endpoints")
    assert seen(OTHER) == [], "a refused endpoint was contacted"
    H.assert_healthy(a)


@H.test
def sources_request_endpoint_gets_no_agent_secrets():
    a, _ = agent("insecure")
    seen(OTHER)
    # the hub the request names answers 404 for an unknown repo
    status, obj = load(a, "leak-hf", "hf://team/nothing-here", {"HF_ENDPOINT": OTHER_URL})
    refused(status, obj, 404, "source_not_found", "source.uri")
    status, obj = load(a, "leak-s3", "s3://loras/x", {"AWS_ENDPOINT_URL": OTHER_URL})
    assert status in (404, 502), (status, obj)
    reqs = seen(OTHER)
    assert len(reqs) >= 2, reqs
    for path, headers in reqs:
        for h in ("authorization", "x-amz-security-token", "x-amz-date"):
            assert h not in headers, f"{path}: the agent's own {h} reached a request's endpoint"
        for v in headers.values():
            assert ENV_TOKEN not in v and ENV_AWS["AWS_SESSION_TOKEN"] not in v, headers
    # the request's own token does go to the request's endpoint
    status, obj = load(a, "own-token", "hf://private/good",
                       {"HF_ENDPOINT": OTHER_URL, "HF_TOKEN": REQ_TOKEN})
    assert status == 201, (status, obj)
    assert all(h.get("authorization") == f"Bearer {REQ_TOKEN}" for _, h in seen(OTHER))
    unload(a, "own-token")
    H.assert_healthy(a)


@H.test
def sources_invalid_download_leaves_no_entry():
    a, cache = agent("strict")
    status, obj = load(a, "bad", "hf://team/bad")
    refused(status, obj, 422, "invalid_adapter", "source.uri")
    assert entry_of("hf://team/bad") not in entries(cache), entries(cache)
    H.assert_healthy(a)


@H.test
def sources_cache_budget_spares_loaded_adapters():
    a, cache = agent("strict")
    status, obj = load(a, "one", "hf://team/good")
    assert status == 201, (status, obj)
    # a second adapter does not fit beside the loaded one's entry: 507
    status, obj = load(a, "two", "hf://team/good2")
    refused(status, obj, 507, "no_room", "source.uri", "no room", str(BUDGET))
    assert entries(cache) == [entry_of("hf://team/good")], entries(cache)
    status, obj = a.json("POST", "/v1/completions", {"model": "one", "prompt": "hi",
                                                     "max_tokens": 2})
    assert status == 200, (status, obj)
    # once nothing uses it, the older entry makes room
    unload(a, "one")
    status, obj = load(a, "two", "hf://team/good2")
    assert status == 201, (status, obj)
    assert entries(cache) == [entry_of("hf://team/good2")], entries(cache)
    unload(a, "two")
    H.assert_healthy(a)


def _start_refused(cache, *needles):
    rc, out = H.run_agent_once("--model", H.TINY, *H.TINY_ARGS, "--host", "127.0.0.1",
                               "--port", "0", "--admin-port", "0", "--lora-cache-dir", cache,
                               timeout=120)
    assert rc == 1, (rc, out[-2000:])
    for n in needles:
        assert n in out, (n, out[-2000:])
    H.check_clean(out)


@H.test
def sources_cache_dir_of_others_refused_at_start():
    _setup()
    cache = os.path.join(TMP, "shared-cache")
    os.makedirs(cache)
    os.chmod(cache, 0o777)
    _start_refused(cache, "writable by group or others")
    if os.geteuid() == 0:  # another user's directory: only root can make one
        os.chmod(cache, 0o700)
        os.chown(cache, 12345, 12345)
        _start_refused(cache, "owned by uid 12345")


def cleanup():
    failed = 0
    for name, (a, _) in _agents.items():
        failed += H.stop_agent(a, f"hostile_sources:shutdown-{name}")
    _agents.clear()
    for s in _servers:
        s.shutdown()
        s.server_close()
    _servers.clear()
    if TMP:
        shutil.rmtree(TMP, ignore_errors=True)
    return failed


if __name__ == "__main__":
    H.main("hostile_sources", cleanup)
