#!/usr/bin/env python3
"""Serving workloads of issue 12, each measured side by side in one run.

Starts two loraplane-agents on free 127.0.0.1 ports with the SmolLM2 model
and four adapters (r4-qv, r8-od, r16-k, and r4-qv again as 'a4'): agent ON
with automatic prefix caching (the default), agent OFF with
--no-enable-prefix-caching. Both stay up for the whole run; the rounds
alternate between them, so that both meet about the same load from other
jobs, and only one of them works at a time.

1. shared-prefix: a chat workload. Every request has the same system
   prompt of about SYSTEM_TOKENS tokens and a short user message of its
   own; CLIENTS concurrent clients over the four adapters send one
   streaming request each per round (max_tokens 16). One warm-up round on
   each agent, then ROUNDS measured rounds on each. Reported: time to first
   token p50 on each agent and their ratio (ON / OFF: the issue's target is
   <= 0.3), and the prompt tokens each agent computed per request (from
   its loraplane_engine_prompt_tokens_total counter).
2. unique-prefix: the cost of caching where nothing can be shared. CLIENTS
   clients over the four adapters, REQUESTS completions each per round,
   every prompt different from its first tokens on, max_tokens 64; tokens
   per second on each agent and their ratio (ON / OFF: target >= 0.97).
3. adapters: the price of 32 adapters at once. A third agent, with 32
   adapters loaded (copies of the three fixtures under 32 names) and
   --max-loras 32, serves 32 concurrent clients with the same prompts, once
   each on its own adapter and once all on the base model, alternated;
   tokens per second and their ratio (adapters / base: target >= 0.9).

Output: 'bench: NAME VALUE UNIT' lines on stdout; progress on stderr.
Exit status 0 on success, 1 when anything failed or ran out of time.

  python3 hack/bench-workloads.py --bin bin --model models/smollm2-135m-instruct-q4_1.gguf
"""

import argparse
import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA_DIR = os.path.join(ROOT, "tests", "fixtures", "lora", "smollm2")
ADAPTERS = [("r4-qv", "r4-qv"), ("r8-od", "r8-od"), ("r16-k", "r16-k"), ("a4", "r4-qv")]
WORDS = ("river mountain lantern harbor meadow copper violet thunder quiet orchard "
         "silver canyon ember glacier willow compass marble falcon prairie summit").split()


class BenchError(Exception):
    pass


def log(msg):
    print("bench-workloads: " + msg, file=sys.stderr, flush=True)


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100.0 * len(s)) - 1))]


def system_prompt(n_words):
    """A long system prompt, the same for every request."""
    rules = []
    for i in range(n_words // 12):
        w = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(4)]
        rules.append("Rule %d: when the user mentions the %s, answer about the %s, "
                     "never the %s or the %s." % (i + 1, w[0], w[1], w[2], w[3]))
    return "You are a careful assistant for a travel company. " + " ".join(rules)


class Agent:
    def __init__(self, bindir, model, extra, logpath):
        self.cmd = [os.path.join(bindir, "loraplane-agent"), "--model", model,
                    "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
                    "--device", "cpu", "--drain-timeout", "10"] + extra
        self.logf = open(logpath, "w+")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.logf)

    def wait_ready(self, deadline):
        rx = re.compile(r"listening: api http://[0-9.]+:(\d+), admin http://[0-9.]+:(\d+)")
        while True:
            if self.proc.poll() is not None:
                raise BenchError("an agent exited %d: see its log" % self.proc.returncode)
            self.logf.seek(0)
            m = rx.search(self.logf.read())
            if m:
                self.port, self.admin_port = int(m.group(1)), int(m.group(2))
                try:
                    if get(self.port, "/ready")[0] == 200:
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise BenchError("an agent was not ready in time")
            time.sleep(0.2)

    def counter(self, name):
        status, body = get(self.admin_port, "/metrics")
        m = re.search(r"^%s(?:\{[^}]*\})? ([0-9.e+]+)$" % re.escape(name), body.decode(), re.M)
        if status != 200 or not m:
            raise BenchError("no %s in the admin /metrics" % name)
        return float(m.group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = -9
        self.logf.close()
        return rc


def get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stream(port, path, body, timeout):
    """One streaming request: (seconds to the first text, completion tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise BenchError("%s answered %d: %s" % (path, resp.status, resp.read()[:200]))
        ttft, usage = None, None
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            ch = obj.get("choices") or []
            if ch and ttft is None and (ch[0].get("text") or
                                        (ch[0].get("delta") or {}).get("content")):
                ttft = time.perf_counter() - t0
            if obj.get("usage"):
                usage = obj["usage"]
        if ttft is None or usage is None:
            raise BenchError("a stream carried no text or no usage")
        return ttft, usage["completion_tokens"]
    finally:
        conn.close()


def round_of(port, bodies, path, timeout):
    """The bodies at once, one client each: ([ttft], tokens, wall seconds)."""
    results, errors = [None] * len(bodies), []

    def one(i):
        try:
            results[i] = stream(port, path, bodies[i], timeout)
        except Exception as e:  # reported below
            errors.append("%s: %s" % (type(e).__name__, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    wall = time.perf_counter() - t0
    if errors or any(r is None for r in results):
        raise BenchError("a client failed: %s" % (errors[0] if errors else "timed out"))
    return [r[0] for r in results], sum(r[1] for r in results), wall


def shared_prefix(args, on, off):
    system = system_prompt(args.system_words)
    n_round = [0]

    def bodies():
        n_round[0] += 1
        return [{"model": ADAPTERS[i % 4][0], "max_tokens": 16, "temperature": 0,
                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                 "messages": [{"role": "system", "content": system},
                              {"role": "user", "content": "Question %d of round %d: what "
                               "should I pack for the %s?" %
                               (i, n_round[0], WORDS[i % len(WORDS)])}]}
                for i in range(args.clients)]

    ttft = {"on": [], "off": []}
    computed = {"on": 0.0, "off": 0.0}
    n_requests = 0
    for r in range(args.rounds + 1):
        for name, agent in (("on", on), ("off", off)):
            p0 = agent.counter("loraplane_engine_prompt_tokens_total")
            t, _, wall = round_of(agent.port, bodies(), "/v1/chat/completions", args.timeout)
            p1 = agent.counter("loraplane_engine_prompt_tokens_total")
            log("shared-prefix round %d, caching %s: TTFT p50 %.0f ms, %d prompt tokens "
                "computed, %.1f s%s" % (r, name, percentile(t, 50) * 1e3, p1 - p0, wall,
                                        " (warm-up)" if r == 0 else ""))
            if r:
                ttft[name] += t
                computed[name] += p1 - p0
        n_requests += args.clients if r else 0
    p50 = {k: percentile(v, 50) for k, v in ttft.items()}
    out("prefix_shared_system_prompt_tokens", "%d" % prompt_tokens(on, system), "tokens")
    out("prefix_shared_ttft_p50_on_ms", "%.1f" % (p50["on"] * 1e3), "ms")
    out("prefix_shared_ttft_p50_off_ms", "%.1f" % (p50["off"] * 1e3), "ms")
    out("prefix_shared_ttft_ratio", "%.3f" % (p50["on"] / p50["off"]), "ratio")
    out("prefix_shared_prompt_tokens_computed_on", "%.1f" % (computed["on"] / n_requests),
        "tokens/request")
    out("prefix_shared_prompt_tokens_computed_off", "%.1f" % (computed["off"] / n_requests),
        "tokens/request")


def prompt_tokens(agent, system):
    """How many tokens a request of the system prompt alone is."""
    body = {"model": ADAPTERS[0][0], "max_tokens": 1,
            "messages": [{"role": "system", "content": system}]}
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Content-Type": "application/json"})
        return json.loads(conn.getresponse().read())["usage"]["prompt_tokens"]
    finally:
        conn.close()


def unique_prefix(args, on, off):
    n = [0]

    def bodies():
        out_ = []
        for i in range(args.clients):
            n[0] += 1
            out_.append({"model": ADAPTERS[i % 4][0], "max_tokens": 64, "temperature": 0,
                         "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True},
                         "prompt": "%d %s: the quick brown fox number %d jumps over the lazy "
                         "dog while the farmer watches from the old wooden barn, and then" %
                         (n[0] * 7919 % 100003, WORDS[n[0] % len(WORDS)], n[0])})
        return out_

    tokens = {"on": 0, "off": 0}
    wall = {"on": 0.0, "off": 0.0}
    for r in range(args.rounds + 1):
        for name, agent in (("on", on), ("off", off)):
            tok, w = 0, 0.0
            for _ in range(args.requests):
                _, t, wl = round_of(agent.port, bodies(), "/v1/completions", args.timeout)
                tok, w = tok + t, w + wl
            log("unique-prefix round %d, caching %s: %.1f tokens/s%s" %
                (r, name, tok / w, " (warm-up)" if r == 0 else ""))
            if r:
                tokens[name] += tok
                wall[name] += w
    tps = {k: tokens[k] / wall[k] for k in tokens}
    out("prefix_unique_tokens_per_s_on", "%.1f" % tps["on"], "tokens/s")
    out("prefix_unique_tokens_per_s_off", "%.1f" % tps["off"], "tokens/s")
    out("prefix_unique_throughput_ratio", "%.3f" % (tps["on"] / tps["off"]), "ratio")


def many_adapters(args, agent, names):
    def bodies(base):
        return [{"model": "base" if base else names[i], "max_tokens": 64, "temperature": 0,
                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                 "prompt": "The quick brown %s number %d jumps over the lazy dog while the "
                 "farmer watches from the old wooden barn, and then" %
                 (WORDS[i % len(WORDS)], i)} for i in range(32)]

    tokens = {"adapters": 0, "base": 0}
    wall = {"adapters": 0.0, "base": 0.0}
    for r in range(args.rounds + 1):
        for name in ("adapters", "base"):
            _, tok, w = round_of(agent.port, bodies(name == "base"), "/v1/completions",
                                 args.timeout)
            log("32 clients round %d, %s: %.1f tokens/s%s" %
                (r, name, tok / w, " (warm-up)" if r == 0 else ""))
            if r:
                tokens[name] += tok
                wall[name] += w
    tps = {k: tokens[k] / wall[k] for k in tokens}
    out("adapters32_tokens_per_s", "%.1f" % tps["adapters"], "tokens/s")
    out("adapters32_base_tokens_per_s", "%.1f" % tps["base"], "tokens/s")
    out("adapters32_to_base_ratio", "%.3f" % (tps["adapters"] / tps["base"]), "ratio")


def out(name, value, unit):
    print("bench: %s %s %s" % (name, value, unit), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default="bin")
    ap.add_argument("--model", default="models/smollm2-135m-instruct-q4_1.gguf")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="measured rounds per workload and "
                    "agent, after one warm-up round (default 2)")
    ap.add_argument("--requests", type=int, default=1,
                    help="unique-prefix: requests per client per round (default 1)")
    ap.add_argument("--system-words", type=int, default=500,
                    help="words of the shared system prompt (default 500: about 1,000 tokens)")
    ap.add_argument("--only", choices=["shared", "unique", "adapters"], action="append",
                    help="run only these workloads (repeatable)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    only = set(args.only or ["shared", "unique", "adapters"])
    if not os.access(os.path.join(args.bin, "loraplane-agent"), os.X_OK):
        ap.error("no %s/loraplane-agent (build it with make)" % args.bin)
    if not os.path.isfile(args.model):
        ap.error("model '%s' not found (run bash hack/deps.sh)" % args.model)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    loras = ["%s=%s" % (n, os.path.join(LORA_DIR, d)) for n, d in ADAPTERS]
    common = ["--served-model-name", "base", "--max-num-seqs", str(max(args.clients, 32)),
              "--kv-cache-bytes", str(1 << 30), "--lora-modules"] + loras
    agents = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-workloads-") as tmp:
            if only & {"shared", "unique"}:
                on = Agent(args.bin, args.model, common, os.path.join(tmp, "on.log"))
                off = Agent(args.bin, args.model, common + ["--no-enable-prefix-caching"],
                            os.path.join(tmp, "off.log"))
                agents += [on, off]
                for a in (on, off):
                    a.wait_ready(time.monotonic() + 120)
                if "shared" in only:
                    shared_prefix(args, on, off)
                if "unique" in only:
                    unique_prefix(args, on, off)
                for a in (on, off):
                    if a.stop():
                        raise BenchError("an agent did not exit 0 on SIGTERM")
                agents = []
            if "adapters" in only:
                fixtures = ["r4-qv", "r8-od", "r16-k"]
                names = ["lora%02d" % i for i in range(32)]
                mods = ["%s=%s" % (n, os.path.join(LORA_DIR, fixtures[i % 3]))
                        for i, n in enumerate(names)]
                many = Agent(args.bin, args.model,
                             ["--served-model-name", "base", "--max-num-seqs", "32",
                              "--max-loras", "32", "--max-cpu-loras", "32",
                              "--lora-modules"] + mods, os.path.join(tmp, "many.log"))
                agents.append(many)
                many.wait_ready(time.monotonic() + 300)
                many_adapters(args, many, names)
                if many.stop():
                    raise BenchError("an agent did not exit 0 on SIGTERM")
                agents = []
    except BenchError as ex:
        print("bench-workloads: %s" % ex, file=sys.stderr)
        return 1
    finally:
        for a in agents:
            a.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
