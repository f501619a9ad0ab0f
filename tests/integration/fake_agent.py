#!/usr/bin/env python3
"""A stand-in for loraplane-agent's management API in operator tests.

Serves, like the agent (docs/api.md, sections 3 and 5):
  both ports:   GET /v1/models (base model first with "parent": null, then
                each loaded adapter), GET /health
  admin port:   POST /v1/loras {"lora_name", "source": {"uri", "sha256"?},
                "credentials"?, "load_inplace"?} -> 201 loaded, 200 already loaded from the
                same uri and digest, 409 loaded from another source without
                load_inplace, 400 malformed, 404 source not found (a uri
                containing "missing"); GET /v1/loras; DELETE /v1/loras/{name}
                (percent-encoded) -> 200, 404 unknown
The digest of an adapter is sha256(uri) unless the request pins one, so a
new source means a new digest.

Test controls on the admin port (not part of the agent's API):
  POST /_mode {"mode": "ok" | "fail" | "hang", "hang_s": 30, "status": 500}
      fail: every /v1/loras call answers `status`; hang: they sleep hang_s
  GET  /_calls  -> {"POST": n, "GET": n, "DELETE": n, "models": n}
  GET  /_credentials -> {name: source.credentials of its last load, or null}
  POST /_reset  -> forgets every adapter (as a restarted agent would)

Run: python3 tests/integration/fake_agent.py --port P --admin-port A --base-model NAME
Prints "ready" once both ports listen."""

import argparse
import hashlib
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class State:
    def __init__(self, base):
        self.base = base
        self.lock = threading.Lock()
        self.loras = {}
        self.mode = {"mode": "ok"}
        self.calls = {"POST": 0, "GET": 0, "DELETE": 0, "models": 0}
        self.credentials = {}


def lora_id(name):
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & 0x7FFFFFFF


def make_handler(state, admin):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # like the real agent (civetweb's tcp_nodelay): on a kept-alive
        # connection Nagle would hold the body behind the headers until
        # the client's delayed ACK
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):
            pass

        def send_json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, code, msg, typ="invalid_request_error"):
            self.send_json(code, {"error": {"message": msg, "type": typ, "param": None, "code": code}})

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def injected(self, method):
            """Applies the test mode to /v1/loras calls; True when answered."""
            with state.lock:
                state.calls[method] += 1
                mode = dict(state.mode)
            if mode["mode"] == "hang":
                time.sleep(float(mode.get("hang_s", 30)))
            if mode["mode"] == "fail":
                self.error(int(mode.get("status", 500)), "injected failure", "server_error")
                return True
            return False

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/health":
                return self.send_json(200, {"status": "ok"})
            if path == "/v1/models":
                with state.lock:
                    state.calls["models"] += 1
                    data = [{"id": state.base, "object": "model", "created": 0, "owned_by": "loraplane",
                             "root": state.base, "parent": None}]
                    for name, l in state.loras.items():
                        data.append({"id": name, "object": "model", "created": 0, "owned_by": "loraplane",
                                     "root": l["source"], "parent": state.base})
                return self.send_json(200, {"object": "list", "data": data})
            if admin and path == "/v1/loras":
                if self.injected("GET"):
                    return
                with state.lock:
                    loras = {n: dict(l) for n, l in state.loras.items()}
                return self.send_json(200, {"status": "success", "loras": loras, "count": len(loras)})
            if admin and path == "/_calls":
                with state.lock:
                    return self.send_json(200, dict(state.calls))
            if admin and path == "/_credentials":
                with state.lock:
                    return self.send_json(200, dict(state.credentials))
            return self.error(404, f"no route GET {path}")

        def do_POST(self):
            path = urllib.parse.urlsplit(self.path).path
            raw = self.body()
            if admin and path == "/_mode":
                with state.lock:
                    state.mode = json.loads(raw or b"{}")
                return self.send_json(200, state.mode)
            if admin and path == "/_reset":
                with state.lock:
                    state.loras.clear()
                    for k in state.calls:
                        state.calls[k] = 0
                return self.send_json(200, {})
            if not (admin and path == "/v1/loras"):
                return self.error(404, f"no route POST {path}")
            if self.injected("POST"):
                return
            try:
                req = json.loads(raw)
                name = req["lora_name"]
                uri = req["source"]["uri"]
                pin = req["source"].get("sha256")
                inplace = bool(req.get("load_inplace"))
                creds = req["source"].get("credentials")
                assert isinstance(name, str) and isinstance(uri, str) and name and uri
                assert creds is None or (isinstance(creds, dict) and all(
                    isinstance(v, str) for v in creds.values()))
            except (ValueError, KeyError, TypeError, AssertionError):
                return self.error(400, "malformed request: need lora_name and source.uri")
            if "missing" in uri:
                return self.error(404, f"source '{uri}' not found", "not_found")
            digest = (pin or hashlib.sha256(uri.encode()).hexdigest()).lower()
            with state.lock:
                state.credentials[name] = creds
                cur = state.loras.get(name)
                if cur and cur["source"] == uri and cur["sha256"] == digest:
                    return self.send_json(200, dict(cur, status="success", lora_name=name))
                if cur and not inplace:
                    return self.error(409, f"'{name}' is loaded from '{cur['source']}'; set load_inplace")
                entry = {"lora_id": lora_id(name), "source": uri, "sha256": digest, "rank": 8,
                         "tier": "device", "requests_running": 0}
                state.loras[name] = entry
            return self.send_json(201, dict(entry, status="success", lora_name=name, load_ms=1))

        def do_DELETE(self):
            path = urllib.parse.urlsplit(self.path).path
            if not (admin and path.startswith("/v1/loras/")):
                return self.error(404, f"no route DELETE {path}")
            if self.injected("DELETE"):
                return
            name = urllib.parse.unquote(path[len("/v1/loras/"):])
            with state.lock:
                if name not in state.loras:
                    return self.error(404, f"adapter '{name}' is not loaded", "not_found")
                del state.loras[name]
            return self.send_json(200, {"status": "success", "lora_name": name})

    return H


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--admin-port", type=int, required=True)
    p.add_argument("--base-model", required=True)
    a = p.parse_args()
    state = State(a.base_model)
    servers = []
    for port, admin in ((a.port, False), (a.admin_port, True)):
        srv = ThreadingHTTPServer((a.host, port), make_handler(state, admin))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    print("ready", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
