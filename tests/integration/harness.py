#!/usr/bin/env python3
"""Shared harness of the agent's integration tests: a tiny PASS/FAIL
runner (test, run_tests), the Agent class (one real loraplane-agent process
on 127.0.0.1, ports read back from its log), raw-HTTP and SSE helpers,
loraplane-generate's output for comparison, and the paths of the model and
adapter fixtures. Imported by the test-*.py programs; holds no test."""


import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
BIN_DIR = os.environ.get("BIN", "bin")
AGENT = os.path.join(BIN_DIR, "loraplane-agent")
GENERATE = os.path.join(BIN_DIR, "loraplane-generate")
MODEL = os.environ.get("MODEL", "models/smollm2-135m-instruct-q4_1.gguf")
FIX = os.environ.get("LP_FIXTURES", "tests/fixtures")
TINY = os.path.join(FIX, "tiny-llama")
TINY_LORAS = os.path.join(FIX, "lora", "tiny")
SMOL_LORAS = os.path.join(FIX, "lora", "smollm2")
# small KV budgets: the tests start many agents on shared cores
TINY_ARGS = ["--threads", "1", "--kv-cache-bytes", str(8 << 20)]
SMOL_ARGS = ["--threads", "1", "--max-model-len", "1024", "--kv-cache-bytes", str(96 << 20)]

# ---- a tiny test runner ----------------------------------------------------

_tests = []


def test(fn):
    _tests.append(fn)
    return fn


def run_tests(program):
    """Runs every registered test; one PASS/FAIL line each. Returns the
    number of failures."""
    failures = 0
    for fn in _tests:
        t0 = time.time()
        try:
            fn()
            print(f"PASS {program}:{fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
        except AssertionError as e:
            failures += 1
            print(f"FAIL {program}:{fn.__name__}: {e}", flush=True)
        except Exception as e:  # a broken test is a failure too
            failures += 1
            print(f"FAIL {program}:{fn.__name__}: {type(e).__name__}: {e}", flush=True)
    return failures


# ---- the agent process -----------------------------------------------------


def _die_with_parent():
    """In the child: SIGKILL when the test process dies, so a killed test
    (a timeout) leaves no agent behind."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Agent:
    """One loraplane-agent process. Its output is collected by a thread;
    ports come from its 'listening:' line."""

    def __init__(self, *args, model=TINY, env=None, wait=True, tls_ca=None, timeout=90):
        self.cmd = [AGENT, *(["--model", model] if model else []), "--host", "127.0.0.1",
                    "--port", "0", "--admin-port", "0", *args]
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.lines = []
        self.cond = threading.Condition()
        self.tls_ca = tls_ca
        self.scheme = "http"
        self.port = self.admin_port = None
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=full_env, text=True, errors="replace",
                                     preexec_fn=_die_with_parent)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.kill()
                raise

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def log(self):
        with self.cond:
            return "\n".join(self.lines)

    def wait_log(self, pattern, timeout=30):
        """Waits for a log line matching pattern; returns the match."""
        rx = re.compile(pattern)
        deadline = time.time() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.time()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    break
                self.cond.wait(min(left, 0.5))
        raise AssertionError(f"no log line matching {pattern!r}; log:\n{self.log()[-3000:]}")

    def wait_ready(self, timeout=90):
        m = self.wait_log(r"listening: api (https?)://[^ ]+:(\d+), admin https?://[^ ]+:(\d+)",
                          timeout)
        self.scheme, self.port, self.admin_port = m.group(1), int(m.group(2)), int(m.group(3))
        self.wait_log(r'( ready$|"msg":"ready"\}$)', timeout)

    def url(self, path="", admin=False):
        return f"{self.scheme}://127.0.0.1:{self.admin_port if admin else self.port}{path}"

    def conn(self, admin=False, timeout=120):
        port = self.admin_port if admin else self.port
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method, path, body=None, admin=False, headers=None, token=None,
                timeout=120):
        """One request on a fresh connection: (status, headers dict, body bytes)."""
        c = self.conn(admin, timeout=timeout)
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            body = body.encode()
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            c.close()

    def json(self, method, path, body=None, admin=False, headers=None, token=None, timeout=120):
        status, hdrs, data = self.request(method, path, body, admin, headers, token, timeout)
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            obj = data.decode("utf-8", "replace")
        return status, obj

    def client(self, api_key="unused"):
        import openai
        return openai.OpenAI(base_url=self.url("/v1"), api_key=api_key, max_retries=0,
                             timeout=120)

    def metrics(self, token=None):
        status, _, data = self.request("GET", "/metrics", admin=True, token=token)
        assert status == 200, f"/metrics: {status} {data[:200]!r}"
        return parse_metrics(data.decode())

    def serving(self):
        """True when the agent answers a small completion."""
        status, obj = self.json("POST", "/v1/completions",
                                {"model": self.base_name(), "prompt": "ok", "max_tokens": 2})
        return status == 200 and obj["choices"][0]["finish_reason"] in ("length", "stop")

    def base_name(self):
        status, obj = self.json("GET", "/v1/models")
        assert status == 200, obj
        return obj["data"][0]["id"]

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the agent did not stop within %ds" % timeout)
        self.reader.join(5)
        check_clean(self.log())
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                rc = self.stop()
                assert rc == 0, f"agent exited with {rc}; log:\n{self.log()[-2000:]}"
        finally:
            self.kill()


def check_clean(log):
    assert "AddressSanitizer" not in log and "runtime error:" not in log and \
        "LeakSanitizer" not in log, "sanitizer report:\n" + log[-4000:]


def parse_metrics(text):
    """{'name{labels}': value} of a Prometheus text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def run_agent_once(*args, timeout=60, env=None):
    """Runs an agent that is expected to exit by itself: (rc, output)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    p = subprocess.run([AGENT, *args], capture_output=True, text=True, timeout=timeout,
                       env=full_env, errors="replace")
    return p.returncode, p.stdout + p.stderr


def sse_events(data):
    """The JSON payloads of an SSE body, and whether it ended with [DONE]."""
    events, done = [], False
    for block in data.decode("utf-8").split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), f"not an SSE event: {block!r}"
        payload = block[len("data: "):]
        if payload == "[DONE]":
            done = True
            continue
        assert not done, "an event after [DONE]"
        events.append(json.loads(payload))
    return events, done


def generate_text(model, prompt, adapter=None, adapter_dir=None, max_tokens=16, chat=False,
                  extra=()):
    """loraplane-generate's completion for one prompt (JSON mode)."""
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "p.txt")
        with open(f, "w", encoding="utf-8") as fh:
            fh.write((f"{adapter}\t" if adapter else "") + prompt + "\n")
        args = [GENERATE, "--model", model, "--prompts-file", f, "--max-tokens", str(max_tokens),
                "--threads", "1", *extra]
        if adapter:
            args += ["--lora", f"{adapter}={adapter_dir}"]
        if chat:
            args.append("--chat")
        p = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout.splitlines()[0])


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


class Stream:
    """A streaming completion read on its own thread. `started` is set once
    the first chunk arrived (the request is running in the engine); `done`
    once it ended; then status and data hold the outcome."""

    def __init__(self, agent, body):
        self.agent, self.body = agent, dict(body, stream=True)
        self.started, self.done = threading.Event(), threading.Event()
        self.status, self.data, self.error = None, b"", None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            c = self.agent.conn()
            c.request("POST", "/v1/completions", body=json.dumps(self.body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            self.status = r.status
            chunks = []
            while True:
                piece = r.read1(65536)
                if not piece:
                    break
                chunks.append(piece)
                self.started.set()
            self.data = b"".join(chunks)
            c.close()
        except Exception as e:  # reported by the test through .error
            self.error = e
        finally:
            self.started.set()
            self.done.set()

    def wait_started(self, timeout=60):
        assert self.started.wait(timeout), "the stream did not start"
        assert self.status == 200 and not self.done.is_set(), (self.status, self.data[:300])

    def join(self, timeout=120):
        self.thread.join(timeout)
        assert self.done.is_set() and self.error is None, self.error
        return self.status, self.data


def assert_healthy(agent):
    """Asserts that agent still answers /health and serves a completion
    (after a hostile input)."""
    status, _ = agent.json("GET", "/health")
    assert status == 200, f"/health answered {status}"
    assert agent.serving(), "the agent stopped serving completions"


def stop_agent(agent, label):
    """Stops agent (SIGTERM, then waits) if it is not None; prints
    `FAIL label: why` when it exited non-zero or left a sanitizer report.
    Returns the number of failures, 0 or 1."""
    if agent is None:
        return 0
    try:
        rc = agent.stop()
        if rc != 0:
            print(f"FAIL {label}: agent exited with {rc}", flush=True)
            return 1
        return 0
    except AssertionError as e:
        print(f"FAIL {label}: {e}", flush=True)
        return 1
    finally:
        agent.kill()


def main(program, cleanup):
    """Runs the registered tests as `program`, then cleanup() (which
    returns its own number of failures), and exits non-zero on any."""
    failed = 0
    try:
        failed = run_tests(program)
    finally:
        failed += cleanup()
    sys.exit(1 if failed else 0)
