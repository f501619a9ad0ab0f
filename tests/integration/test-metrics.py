#!/usr/bin/env python3
"""The agent's Prometheus metrics as the Gateway API Inference Extension's
endpoint picker and vLLM dashboards read them (docs/api.md, section 5.4).

One agent on the tiny model with two tiny adapters, --max-num-seqs 3 and
the test hook that makes every engine step last 20 ms longer
(LORAPLANE_TEST_STEP_DELAY_MS), so that requests visibly run and wait.
While a mixed load runs (streams on the base model and both adapters, two
of them with n=2) the public port's /metrics must show what the engine
does: requests (not sequences) running and waiting, KV use, the adapters
of each; afterwards the counters and histograms must match the requests
made and the usage their responses reported. The whole exposition of both
ports goes through prometheus_client's parser. Every wait is for a
condition. Prints one PASS/FAIL line per test."""

import http.client
import json
import os
import sys
import tempfile
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

import harness as H  # noqa: E402

TMP = tempfile.mkdtemp(prefix="lp-metrics-")
KEY, TOKEN = "metrics-test-key", "metrics-admin-token"
STEP_MS = 20
LONG = 120  # tokens of the requests that hold the running batch
WAIT_S = 60  # hang guard of every wait
MAX_LORAS = 4
_agent = None
# what the requests of the tests made, from their responses
made = {"prompt": 0, "completion": 0, "finish": {}, "choices": 0, "tokens_choices": 0}


def agent():
    global _agent
    if _agent is None:
        for name, text in (("key", KEY), ("token", TOKEN)):
            with open(os.path.join(TMP, name), "w") as f:
                f.write(text + "\n")
        _agent = H.Agent("--api-key-file", os.path.join(TMP, "key"),
                         "--admin-token-file", os.path.join(TMP, "token"),
                         "--lora-modules", "ta=" + os.path.join(H.TINY_LORAS, "r8-all"),
                         "--lora-modules", "tb=" + os.path.join(H.TINY_LORAS, "r4-qv"),
                         "--max-num-seqs", "3", "--max-loras", str(MAX_LORAS), *H.TINY_ARGS,
                         env={"LORAPLANE_TEST_STEP_DELAY_MS": str(STEP_MS)})
    return _agent


def base_name():
    status, obj = agent().json("GET", "/v1/models", token=KEY)
    assert status == 200, obj
    return obj["data"][0]["id"]


def scrape(admin=False):
    """(families by name, raw text) of one port's /metrics."""
    status, hdrs, data = agent().request("GET", "/metrics", admin=admin,
                                         token=TOKEN if admin else None)
    assert status == 200, (admin, status, data[:300])
    assert hdrs["content-type"].startswith("text/plain; version=0.0.4"), hdrs
    text = data.decode()
    fams = {}
    for f in text_string_to_metric_families(text):
        assert f.name not in fams, f"family {f.name} twice"
        fams[f.name] = f
    return fams, text


def value(fams, family, sample=None, **labels):
    """The value of the one sample of family (sample name defaults to the
    family's own, or family_total for counters) whose labels include labels."""
    f = fams[family]
    name = sample or (family + "_total" if f.type == "counter" else family)
    hits = [s.value for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (family, name, labels, f.samples[:5])
    return hits[0]


def lora_info(fams):
    f = fams["vllm:lora_requests_info"]
    assert f.type == "gauge" and len(f.samples) == 1, f.samples
    s = f.samples[0]
    assert set(s.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}, s
    split = (lambda v: set(v.split(",")) if v else set())
    return (split(s.labels["running_lora_adapters"]), split(s.labels["waiting_lora_adapters"]),
            s.labels["max_lora"], s.value)


def wait_until(cond, what):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.01)
    raise AssertionError(f"{what}: not within {WAIT_S}s")


class Stream:
    """A streamed completion read on its own thread; records the finish
    reason of each choice and the usage of the final chunk."""

    def __init__(self, model, n=1, max_tokens=LONG, prompt="Once upon a time"):
        self.body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "n": n,
                     "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}}
        self.started, self.done = threading.Event(), threading.Event()
        self.finish, self.usage, self.error, self.status = {}, None, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            c = agent().conn()
            c.request("POST", "/v1/completions", body=json.dumps(self.body),
                      headers={"Content-Type": "application/json",
                               "Authorization": "Bearer " + KEY})
            r = c.getresponse()
            self.status = r.status
            buf = b""
            while True:
                piece = r.read1(65536)
                if not piece:
                    break
                buf += piece
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    self._event(event.decode())
            c.close()
        except Exception as e:  # reported through .error
            self.error = e
        finally:
            self.started.set()
            self.done.set()

    def _event(self, event):
        assert event.startswith("data: "), event
        payload = event[len("data: "):]
        if payload == "[DONE]":
            return
        obj = json.loads(payload)
        for ch in obj.get("choices", []):
            self.started.set()
            if ch.get("finish_reason"):
                self.finish[ch["index"]] = ch["finish_reason"]
        if obj.get("usage"):
            self.usage = obj["usage"]

    def wait_started(self):
        assert self.started.wait(WAIT_S), "the stream did not start"
        assert self.status == 200 and self.error is None, (self.status, self.error)

    def join(self):
        self.thread.join(WAIT_S)
        assert self.done.is_set() and self.error is None, self.error
        assert self.status == 200 and self.usage, (self.status, self.usage)
        n = self.body["n"]
        assert sorted(self.finish) == list(range(n)), self.finish
        record(self.usage, self.finish.values(), n)


def record(usage, finishes, n):
    made["prompt"] += usage["prompt_tokens"]
    made["completion"] += usage["completion_tokens"]
    made["choices"] += n
    if usage["completion_tokens"]:
        made["tokens_choices"] += n
    for f in finishes:
        made["finish"][f] = made["finish"].get(f, 0) + 1


def check_histogram(fams, name, labels, count=None):
    """Buckets cumulative, +Inf equal to the count; returns (count, sum, buckets)."""
    f = fams[name]
    assert f.type == "histogram", (name, f.type)
    buckets = sorted(((float(s.labels["le"]), s.value) for s in f.samples
                      if s.name == name + "_bucket"), key=lambda b: b[0])
    for s in f.samples:
        assert all(s.labels.get(k) == v for k, v in labels.items()), (name, s)
    assert buckets[-1][0] == float("inf"), buckets
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), (name, buckets)
    n = value(fams, name, name + "_count")
    assert buckets[-1][1] == n and value(fams, name, name + "_sum") >= 0, (name, buckets)
    if count is not None:
        assert n == count, (name, n, count)
    return n, value(fams, name, name + "_sum"), dict(buckets)


# ---- the tests ---------------------------------------------------------------


@H.test
def metrics_served_on_both_ports_public_without_the_api_key():
    a = agent()
    # the key is in force on /v1, not on /metrics (vLLM's rule: the
    # endpoint picker scrapes without credentials)
    assert a.request("GET", "/v1/models")[0] == 401
    assert a.request("GET", "/metrics")[0] == 200
    assert a.request("GET", "/metrics", token="wrong")[0] == 200
    # the admin port keeps its token
    assert a.request("GET", "/metrics", admin=True)[0] == 401
    assert a.request("GET", "/metrics", admin=True, token=TOKEN)[0] == 200
    for admin in (False, True):
        token = TOKEN if admin else None
        status, hdrs, body = a.request("HEAD", "/metrics", admin=admin, token=token)
        assert status == 200 and body == b"", (admin, status, body[:100])
        assert hdrs["content-type"].startswith("text/plain"), hdrs
        assert int(hdrs["content-length"]) > 1000, hdrs
        status, hdrs, _ = a.request("POST", "/metrics", admin=admin, token=token)
        assert status == 405 and hdrs["allow"] == "GET, HEAD", (status, hdrs)
    fams, _ = scrape()
    model = base_name()
    labels = {"model_name": model, "engine": "0"}
    assert value(fams, "vllm:num_requests_running", **labels) == 0
    assert value(fams, "vllm:num_requests_waiting", **labels) == 0
    assert value(fams, "vllm:kv_cache_usage_perc", **labels) == 0
    info = fams["vllm:cache_config_info"]
    assert info.type == "gauge" and len(info.samples) == 1, info.samples
    cc = info.samples[0]
    assert cc.value == 1 and cc.labels["block_size"] == "16" and cc.labels["engine"] == "0"
    blocks = int(cc.labels["num_gpu_blocks"])
    assert blocks == value(fams, "loraplane_kv_blocks_total") and blocks > 0, cc
    assert cc.labels["enable_prefix_caching"] in ("True", "False"), cc
    running, waiting, max_lora, stamp = lora_info(fams)
    assert running == set() and waiting == set() and max_lora == str(MAX_LORAS)
    assert abs(stamp - time.time()) < 60, stamp


@H.test
def mixed_load_running_and_waiting_as_the_engine_has_them():
    a = agent()
    model = base_name()
    labels = {"model_name": model, "engine": "0"}
    # the running batch: the base model with n=2 (two sequences, one
    # request) and adapter ta: 3 sequences, --max-num-seqs
    hold = [Stream(model, n=2)]
    hold[0].wait_started()
    hold.append(Stream("ta"))
    hold[1].wait_started()
    # then tb and ta (n=2) must wait: in the engine, or for a moment in
    # the submit queue; both count
    wait = [Stream("tb", max_tokens=4), Stream("ta", n=2, max_tokens=4)]

    def loaded():
        fams, _ = scrape()
        return fams if value(fams, "vllm:num_requests_waiting", **labels) == 2 else None

    fams = wait_until(loaded, "two requests waiting")
    assert value(fams, "vllm:num_requests_running", **labels) == 2
    assert value(fams, "loraplane_requests_running") == 3  # sequences
    assert value(fams, "loraplane_requests_waiting") == 3
    kv = value(fams, "vllm:kv_cache_usage_perc", **labels)
    used, total = value(fams, "loraplane_kv_blocks_used"), value(fams, "loraplane_kv_blocks_total")
    assert 0 < kv < 1 and abs(kv - used / total) < 1e-6, (kv, used, total)
    running, waiting, _, _ = lora_info(fams)
    assert running == {"ta"} and waiting == {"ta", "tb"}, (running, waiting)
    # the same picture on the admin port while the batch still runs
    assert not any(s.done.is_set() for s in hold), "the running requests ended too soon"
    afams, _ = scrape(admin=True)
    assert value(afams, "vllm:num_requests_running", **labels) == 2
    assert value(afams, "vllm:num_requests_waiting", **labels) == 2
    assert lora_info(afams)[:2] == ({"ta"}, {"ta", "tb"})
    for s in hold + wait:
        s.join()
    # everything over: nothing runs, waits or holds KV blocks
    fams, _ = scrape()
    assert value(fams, "vllm:num_requests_running", **labels) == 0
    assert value(fams, "vllm:num_requests_waiting", **labels) == 0
    assert value(fams, "vllm:kv_cache_usage_perc", **labels) == 0
    assert lora_info(fams)[:2] == (set(), set())


@H.test
def counters_and_histograms_match_the_requests_made():
    a = agent()
    model = base_name()
    labels = {"model_name": model, "engine": "0"}
    # a stop string cut short: finished_reason "stop"
    body = {"model": model, "prompt": "The weather today", "max_tokens": 12,
            "temperature": 0}
    status, obj = a.json("POST", "/v1/completions", body, token=KEY)
    assert status == 200, obj
    record(obj["usage"], [c["finish_reason"] for c in obj["choices"]], 1)
    text = obj["choices"][0]["text"]
    stop = next((ch for ch in text[1:] if ch.isascii() and ch.isalnum()), None)
    assert stop, f"no letter to stop at in {text!r}"
    status, obj = a.json("POST", "/v1/completions", dict(body, stop=[stop]), token=KEY)
    assert status == 200 and obj["choices"][0]["finish_reason"] == "stop", obj
    record(obj["usage"], ["stop"], 1)

    fams, text = scrape()
    assert value(fams, "vllm:prompt_tokens", **labels) == made["prompt"]
    assert value(fams, "vllm:generation_tokens", **labels) == made["completion"]
    for reason in ("stop", "length", "abort", "error"):
        assert value(fams, "vllm:request_success", finished_reason=reason, **labels) == \
            made["finish"].get(reason, 0), (reason, made)
    n = made["choices"]
    check_histogram(fams, "vllm:e2e_request_latency_seconds", labels, n)
    check_histogram(fams, "vllm:request_prefill_time_seconds", labels, n)
    check_histogram(fams, "vllm:time_to_first_token_seconds", labels, made["tokens_choices"])
    check_histogram(fams, "vllm:request_decode_time_seconds", labels, made["tokens_choices"])
    # one inter-token gap per token after each choice's first
    check_histogram(fams, "vllm:inter_token_latency_seconds", labels,
                    made["completion"] - made["tokens_choices"])
    # the three waiting choices waited for the whole running batch (LONG
    # steps of at least STEP_MS), the three running ones decoded as long
    _, _, queue = check_histogram(fams, "vllm:request_queue_time_seconds", labels, n)
    assert queue[1.0] <= n - 3, queue
    _, _, decode = check_histogram(fams, "vllm:request_decode_time_seconds", labels)
    assert decode[1.0] <= made["tokens_choices"] - 3, decode
    _, _, e2e = check_histogram(fams, "vllm:e2e_request_latency_seconds", labels)
    assert e2e[1.0] <= n - 6, e2e
    assert value(fams, "vllm:num_preemptions", **labels) == \
        value(fams, "loraplane_engine_preemptions")
    queries = value(fams, "vllm:prefix_cache_queries", **labels)
    hits = value(fams, "vllm:prefix_cache_hits", **labels)
    assert 0 <= hits <= queries, (hits, queries)
    if fams["vllm:cache_config_info"].samples[0].labels["enable_prefix_caching"] == "True":
        assert queries >= made["prompt"], (queries, made)
    # the loraplane_ metrics are still there, per adapter
    assert value(fams, "loraplane_requests", model="ta", status="200") == 2
    assert value(fams, "loraplane_requests", model="tb", status="200") == 1
    assert value(fams, "loraplane_requests", model=model, status="200") == 3


@H.test
def a_client_that_leaves_counts_as_abort():
    a = agent()
    model = base_name()
    labels = {"model_name": model, "engine": "0"}
    fams, _ = scrape()
    aborts = value(fams, "vllm:request_success", finished_reason="abort", **labels)
    prompt = value(fams, "vllm:prompt_tokens", **labels)
    c = a.conn()
    c.request("POST", "/v1/completions",
              body=json.dumps({"model": "tb", "prompt": "Tell me", "max_tokens": 200,
                               "ignore_eos": True, "stream": True}),
              headers={"Content-Type": "application/json", "Authorization": "Bearer " + KEY})
    r = c.getresponse()
    assert r.status == 200 and r.read1(65536).startswith(b"data: ")
    c.close()

    def aborted():
        fams, _ = scrape()
        done = value(fams, "vllm:request_success", finished_reason="abort", **labels)
        return fams if done == aborts + 1 else None

    fams = wait_until(aborted, "the abandoned stream counted as abort")
    assert value(fams, "vllm:prompt_tokens", **labels) > prompt
    assert value(fams, "loraplane_client_disconnects") >= 1
    # the engine lets go of it before its next step
    wait_until(lambda: value(scrape()[0], "vllm:num_requests_running", **labels) == 0,
               "the abandoned request left the engine")


@H.test
def whole_exposition_parses_on_both_ports():
    model = base_name()
    want_types = {"counter", "gauge", "histogram"}
    protocol = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
                "vllm:kv_cache_usage_perc": "gauge", "vllm:cache_config_info": "gauge",
                "vllm:lora_requests_info": "gauge", "vllm:prompt_tokens": "counter",
                "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
                "vllm:num_preemptions": "counter", "vllm:prefix_cache_queries": "counter",
                "vllm:prefix_cache_hits": "counter",
                "vllm:e2e_request_latency_seconds": "histogram",
                "vllm:request_queue_time_seconds": "histogram",
                "vllm:request_prefill_time_seconds": "histogram",
                "vllm:request_decode_time_seconds": "histogram",
                "vllm:time_to_first_token_seconds": "histogram",
                "vllm:inter_token_latency_seconds": "histogram"}
    for admin in (False, True):
        fams, text = scrape(admin)
        # every family announced once, with HELP and TYPE, before its samples
        helps = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP ")]
        types = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")]
        assert len(helps) == len(set(helps)) == len(types) == len(fams), (len(helps), len(fams))
        for name, f in fams.items():
            assert f.documentation, f"{name} has no HELP"
            assert f.type in want_types, f"{name} is of type {f.type}"
            assert f.samples, f"{name} has no sample"
        for name, kind in protocol.items():
            assert fams[name].type == kind, (name, fams[name].type)
            if name in ("vllm:cache_config_info", "vllm:lora_requests_info"):
                continue  # vLLM's info metrics carry no model_name
            for s in fams[name].samples:
                assert s.labels.get("model_name") == model and s.labels.get("engine") == "0", s
        for name in ("loraplane_adapter_loads", "loraplane_requests",
                     "loraplane_engine_prompt_tokens", "loraplane_engine_generated_tokens",
                     "loraplane_kv_blocks_used", "loraplane_adapters"):
            assert name in fams, name


def cleanup():
    return H.stop_agent(_agent, "test-metrics.py:agent")


if __name__ == "__main__":
    H.main("test-metrics.py", cleanup)
