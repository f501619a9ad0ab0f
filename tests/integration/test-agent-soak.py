#!/usr/bin/env python3
"""64 concurrent streaming clients for 60 s against one agent on the tiny
model, over the base model and two adapters: zero failed requests, every
stream ends with [DONE], and the agent's resident memory at the end is
within 10% of what it was after warm-up. SOAK_SECONDS overrides the 60 s.

Uses the Agent helper of test-agent.py. Prints PASS/FAIL lines."""

import http.client
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
import harness as at  # noqa: E402

CLIENTS = 64
SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
WARMUP = 10.0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def client(agent, base, i, stop, stats, lock):
    model = [base, "a", "b"][i % 3]
    n_ok = n_bad = 0
    errors = []
    k = 0
    while not stop.is_set():
        body = {"model": model, "prompt": f"Client {i} request {k}: once upon a time",
                "max_tokens": 8 + (i + k) % 24, "temperature": 0.7, "seed": i * 1000 + k,
                "stream": True, "ignore_eos": True}
        k += 1
        try:
            c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=120)
            c.request("POST", "/v1/completions", body=json.dumps(body),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            c.close()
            if r.status != 200 or not data.rstrip().endswith(b"data: [DONE]"):
                n_bad += 1
                errors.append(f"{r.status} {data[-200:]!r}")
            else:
                n_ok += 1
        except Exception as e:  # every failure counts
            n_bad += 1
            errors.append(repr(e))
    with lock:
        stats["ok"] += n_ok
        stats["bad"] += n_bad
        stats["errors"] += errors[:3]


def main():
    failures = 0
    name = "sixty_four_streaming_clients_no_failures_stable_memory"
    agent = None
    try:
        agent = at.Agent("--threads", "2", "--kv-cache-bytes", str(16 << 20),
                         "--max-num-seqs", "64", "--max-batched-tokens", "512",
                         "--lora-modules", f"a={os.path.join(at.TINY_LORAS, 'r8-all')}",
                         f"b={os.path.join(at.TINY_LORAS, 'r4-qv')}")
        stop = threading.Event()
        stats = {"ok": 0, "bad": 0, "errors": []}
        lock = threading.Lock()
        base = agent.base_name()
        threads = [threading.Thread(target=client, args=(agent, base, i, stop, stats, lock),
                                    daemon=True)
                   for i in range(CLIENTS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(min(WARMUP, SECONDS / 3))
        rss_warm = rss_kib(agent.proc.pid)
        time.sleep(max(0.0, SECONDS - (time.monotonic() - start)))
        stop.set()
        for t in threads:
            t.join(180)
        rss_end = rss_kib(agent.proc.pid)
        print(f"  {stats['ok']} requests in {time.monotonic() - start:.0f} s by {CLIENTS} clients; "
              f"RSS after warm-up {rss_warm / 1024:.1f} MiB, at the end {rss_end / 1024:.1f} MiB")
        assert stats["bad"] == 0, f"{stats['bad']} failed requests: {stats['errors'][:5]}"
        assert stats["ok"] >= CLIENTS, f"only {stats['ok']} requests completed"
        assert abs(rss_end - rss_warm) <= 0.10 * rss_warm, \
            f"resident memory went from {rss_warm} KiB to {rss_end} KiB"
        m = agent.metrics()
        used = [v for k, v in m.items() if "kv_blocks_used" in k]
        assert used and all(v == 0 for v in used), f"KV blocks still used: {used}"
        rc = agent.stop()
        assert rc == 0, f"exit status {rc}"
        at.check_clean(agent.log())
        print(f"PASS test-agent-soak:{name}", flush=True)
    except AssertionError as e:
        failures += 1
        print(f"FAIL test-agent-soak:{name}: {e}", flush=True)
    except Exception as e:
        failures += 1
        print(f"FAIL test-agent-soak:{name}: {type(e).__name__}: {e}", flush=True)
    finally:
        if agent is not None:
            agent.kill()
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
