#!/usr/bin/env python3
"""The --lora-dir watcher of loraplane-agent under load: while 8 clients
stream completions (base model and adapters), adapter directories are
added, replaced in place, removed, unloaded through the API (and come
back), and a broken one appears. Every stream must complete ([DONE], a
finish reason); /v1/models must follow the directory. Every wait is for a
condition, with a generous deadline against hangs only: nothing asserts how
long a change took, so a loaded machine cannot fail the test. Prints one
PASS/FAIL line per test."""

import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import harness as A  # noqa: E402

INTERVAL = 0.5
# hang guard for every wait: far longer than a scan takes on a busy machine
WAIT_S = 60
TMP = tempfile.mkdtemp(prefix="lp-agent-watch-")
LORAS = os.path.join(TMP, "loras")
_agent = None


def agent():
    global _agent
    if _agent is None:
        os.makedirs(LORAS)
        for name, src in (("alpha", "r4-qv"), ("beta", "r8-all"), ("doomed", "r16-attn")):
            A.copy_adapter(os.path.join(A.TINY_LORAS, src), os.path.join(LORAS, name))
        _agent = A.Agent("--lora-dir", LORAS, "--lora-refresh-interval", str(INTERVAL),
                         "--max-cpu-loras", "8", *A.TINY_ARGS)
    return _agent


def model_ids(a):
    status, obj = a.json("GET", "/v1/models")
    assert status == 200, obj
    return [m["id"] for m in obj["data"]]


def wait_until(cond, what, limit=WAIT_S):
    """Polls cond() until true; returns the seconds it took (reported, not
    asserted)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {limit:.0f}s")


class Clients:
    """8 threads streaming completions until stopped."""

    MODELS = ["tiny-llama", "alpha", "beta", "doomed", "alpha", "beta", "tiny-llama", "gamma"]
    MAY_BE_MISSING = {"doomed", "gamma", "alpha"}  # removed, added or unloaded during the test

    def __init__(self, a):
        self.a = a
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = {m: 0 for m in set(self.MODELS)}
        self.missing = 0
        self.errors = []
        self.threads = [threading.Thread(target=self.run, args=(m,), daemon=True)
                        for m in self.MODELS]
        for t in self.threads:
            t.start()

    def one(self, model):
        c = http.client.HTTPConnection("127.0.0.1", self.a.port, timeout=60)
        try:
            c.request("POST", "/v1/completions",
                      body=json.dumps({"model": model, "prompt": "Stream for me", "stream": True,
                                       "max_tokens": 48, "ignore_eos": True}),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
        finally:
            c.close()
        if r.status == 404 and model in self.MAY_BE_MISSING:
            with self.lock:
                self.missing += 1
            return
        if r.status != 200:
            raise AssertionError(f"{model}: status {r.status}: {data[:300]!r}")
        events, done = A.sse_events(data)
        if not done:
            raise AssertionError(f"{model}: stream without [DONE]")
        finals = [e["choices"][0]["finish_reason"] for e in events
                  if e["choices"][0]["finish_reason"]]
        if finals != ["length"]:
            raise AssertionError(f"{model}: finish reasons {finals}")
        with self.lock:
            self.done[model] += 1

    def run(self, model):
        while not self.stop.is_set():
            try:
                self.one(model)
            except Exception as e:  # recorded, checked by the test
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
            time.sleep(0.01)

    def completed(self, model):
        with self.lock:
            return self.done[model]

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)


@A.test
def directory_changes_while_8_clients_stream():
    a = agent()
    assert sorted(model_ids(a)) == sorted(["tiny-llama", "alpha", "beta", "doomed"])
    clients = Clients(a)
    timings = {}
    try:
        # every model streams before anything changes
        wait_until(lambda: all(clients.completed(m) >= 1 for m in ("tiny-llama", "alpha", "beta", "doomed")),
                   "a stream of every model")
        # a new directory, prepared under a hidden name and renamed in
        tmp = os.path.join(LORAS, ".gamma.tmp")
        A.copy_adapter(os.path.join(A.TINY_LORAS, "r8-pattern"), tmp)
        os.rename(tmp, os.path.join(LORAS, "gamma"))
        timings["add"] = wait_until(lambda: "gamma" in model_ids(a), "a new directory")
        # new weights for beta, file by file (each replaced whole)
        src = os.path.join(A.TINY_LORAS, "r16-attn")
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy(os.path.join(src, f), os.path.join(LORAS, "beta", f + ".new"))
            os.replace(os.path.join(LORAS, "beta", f + ".new"), os.path.join(LORAS, "beta", f))

        def beta_rank():
            status, obj = a.json("GET", "/v1/loras/beta", admin=True)
            return status == 200 and obj["rank"] == 16
        timings["replace"] = wait_until(beta_rank, "an in-place reload")
        a.wait_log(r"reloaded adapter 'beta'")
        # a directory goes away
        shutil.rmtree(os.path.join(LORAS, "doomed"))
        timings["remove"] = wait_until(lambda: "doomed" not in model_ids(a),
                                       "a removed directory")
        a.wait_log(r"unloaded adapter 'doomed': its directory .* is gone")
        # unloaded through the API while its directory stays: it comes back
        status, obj = a.json("DELETE", "/v1/loras/alpha", admin=True)
        assert status == 200, obj
        timings["comeback"] = wait_until(lambda: "alpha" in model_ids(a),
                                         "an API-unloaded adapter coming back")
        # a broken directory is skipped with its reason; nothing else changes
        bad = A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(LORAS, ".bad"))
        f = os.path.join(bad, "adapter_model.safetensors")
        open(f, "r+b").truncate(os.path.getsize(f) - 500)
        os.rename(bad, os.path.join(LORAS, "broken"))
        a.wait_log(r"skipped adapter 'broken' .*", timeout=WAIT_S)
        # streams go on after all that, the new adapter included
        wait_until(lambda: clients.completed("tiny-llama") >= 5 and clients.completed("beta") >= 5
                   and clients.completed("gamma") >= 1, "streams after the changes")
    finally:
        clients.finish()
    assert not clients.errors, f"{len(clients.errors)} failed streams: {clients.errors[:5]}"
    assert sorted(model_ids(a)) == sorted(["tiny-llama", "alpha", "beta", "gamma"])
    for m in ("tiny-llama", "beta"):
        assert clients.done[m] >= 5, clients.done
    assert clients.done["gamma"] >= 1 and clients.done["doomed"] >= 1, clients.done
    # the broken directory is reported once, not at every scan
    assert a.log().count("skipped adapter 'broken'") == 1, a.log()
    m = a.metrics()
    assert m["loraplane_kv_blocks_used"] == 0 and m["loraplane_requests_running"] == 0, m
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()) +
          f"; streams completed {sum(clients.done.values())}, 404s {clients.missing}",
          flush=True)


@A.test
def a_fixed_broken_directory_loads_at_the_next_scan():
    a = agent()
    bad = os.path.join(LORAS, "broken")
    shutil.copy(os.path.join(A.TINY_LORAS, "r4-qv", "adapter_model.safetensors"),
                os.path.join(bad, "adapter_model.safetensors.new"))
    os.replace(os.path.join(bad, "adapter_model.safetensors.new"),
               os.path.join(bad, "adapter_model.safetensors"))
    wait_until(lambda: "broken" in model_ids(a), "a repaired directory")
    r = a.json("POST", "/v1/completions", {"model": "broken", "prompt": "x", "max_tokens": 2})
    assert r[0] == 200, r


@A.test
def a_name_taken_by_another_source_is_left_alone():
    a = agent()
    other = os.path.join(TMP, "elsewhere")
    A.copy_adapter(os.path.join(A.TINY_LORAS, "r8-all"), other)
    # the admin API (no allowed roots here) cannot load file:// sources, so
    # take the name through the lora dir's own rules: a name loaded from a
    # --lora-modules source in a second agent
    with A.Agent("--lora-dir", LORAS, "--lora-refresh-interval", str(INTERVAL),
                 "--lora-modules", "alpha=" + other, *A.TINY_ARGS) as b:
        b.wait_log(r"skipped adapter 'alpha' .*already loaded from another source")
        status, obj = b.json("GET", "/v1/loras/alpha", admin=True)
        assert status == 200 and obj["source"] == "file://" + os.path.realpath(other), obj
        # two more scans (each picks up a new directory), then count again
        for probe in ("probe-1", "probe-2"):
            A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(TMP, "." + probe))
            os.rename(os.path.join(TMP, "." + probe), os.path.join(LORAS, probe))
            wait_until(lambda: probe in model_ids(b), f"a scan that loads '{probe}'")
        assert b.log().count("skipped adapter 'alpha'") == 1
        assert b.json("GET", "/v1/loras/alpha", admin=True)[1]["rank"] == 8


if __name__ == "__main__":
    failed = 0
    try:
        failed = A.run_tests("test-agent-watch")
    finally:
        if _agent is not None:
            failed += A.stop_agent(_agent, "test-agent-watch:shutdown")
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)
