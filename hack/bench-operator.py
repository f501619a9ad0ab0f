#!/usr/bin/env python3
"""loraplane-operator at scale: N LoraAdapters x M agent pods.

The world is the operator integration test's (tests/integration/test-operator.py,
imported, not copied): tests/kube/apiserver.py in this process over HTTPS
with a bearer token, the CRD, namespace team-a, pods created the way a
kubelet reports them. The M agents are tests/integration/fake_agent.py's
handler (management API only: POST/GET /v1/loras, GET /v1/models), all in
ONE child process of this script, each agent on two 127.0.0.1 ports (with
--same-ports: each on its own 127.0.x.y with the same two ports, as real
pods are), with every call and connection counted per endpoint and status
code. Keeping the agents out of this process keeps them off the API
server's GIL. The operator runs with its documented defaults (the test
harness's short resync and timeouts are overridden).

Measured, from the first create until every adapter's status says
TOTAL = READY = M with Ready=True:
  time to ready, agent calls (loads, lists, model reads, unloads) and
  connections, operator CPU seconds (utime+stime from /proc/PID/stat) and
  peak RSS (VmHWM from /proc/PID/status), the operator's API requests.
Agent call counts are read after a settle period, so loads that trail the
READY status are counted too.

--api-latency-ms delays the operator's API requests (a remote API server);
--agent-call-ms makes every agent /v1/loras call take that long (a real
load reads and copies weights).

Prints each figure as `bench: NAME VALUE UNIT`. Exits 1, with a message
naming what was missing, when not everything is READY within --timeout or
when an agent does not hold every adapter at the end.

Run:  python3 hack/bench-operator.py --bin bin [--adapters 200] [--agents 20]
(--serve-agents is the internal mode of the agents' child process.)"""

import argparse
import collections
import importlib.util
import json
import os
import queue
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
import fake_agent  # noqa: E402

NAME = "bench-operator"
# the operator's documented defaults; the test harness tunes these for
# speed, a benchmark should run what users run
OPERATOR_DEFAULTS = ["--resync", "60s", "--load-timeout", "300s", "--agent-timeout", "5s",
                     "--retry-max-delay", "30s", "--delete-attempts", "5", "--watch-timeout", "600"]


# ---------------------------------------------------------------- agents (child process)

class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 would drop bursts of connects


def counting_handler(state, admin, counts, lock):
    """fake_agent's handler, counting calls per endpoint and status code
    and connections into counts (a Counter guarded by lock)."""
    base = fake_agent.make_handler(state, admin)

    class Counting(base):
        def setup(self):
            super().setup()
            with lock:
                counts["connections"] += 1

        def send_response(self, code, message=None):
            path = self.path.split("?", 1)[0]
            if path.startswith("/v1/loras/"):
                path = "/v1/loras/{name}"
            with lock:
                counts[f"{self.command} {path} {code}"] += 1
            super().send_response(code, message)

    return Counting


def agent_ip(i, same_ports):
    """Agent i's address: all on 127.0.0.1, or its own loopback address."""
    return f"127.0.{(i + 2) >> 8}.{(i + 2) & 255}" if same_ports else "127.0.0.1"


def serve_agents(n, base_model, same_ports, call_ms):
    """Starts n agents (2 ports each; with same_ports every agent on its own
    127.0.x.y with the same two ports), prints their addresses as one JSON
    line, then answers each `stats` line on stdin with one JSON line; exits
    at end of input (the parent went away). call_ms > 0 delays every
    /v1/loras call that long (fake_agent's "hang" mode), like a real load."""
    agents = []
    for i in range(n):
        state = fake_agent.State(base_model)
        if call_ms > 0:
            state.mode = {"mode": "hang", "hang_s": call_ms / 1000}
        lock = threading.Lock()
        counts = collections.Counter()
        ip = agent_ip(i, same_ports)
        ports = []
        for k, admin in enumerate((False, True)):
            port = agents[0]["ports"][k] if same_ports and agents else 0
            srv = AgentServer((ip, port), counting_handler(state, admin, counts, lock))
            threading.Thread(target=srv.serve_forever, daemon=True).start()
            ports.append(srv.server_address[1])
        agents.append({"state": state, "counts": counts, "lock": lock, "ip": ip, "ports": ports})
    print(json.dumps([{"ip": a["ip"], "port": a["ports"][0], "admin": a["ports"][1]} for a in agents]), flush=True)
    for line in sys.stdin:
        if line.strip() != "stats":
            continue
        out = []
        for a in agents:
            with a["lock"]:
                counts = dict(a["counts"])
            with a["state"].lock:
                held = len(a["state"].loras)
            out.append({"counts": counts, "held": held})
        print(json.dumps(out), flush=True)
    return 0


class Agents:
    """The parent's handle on the child process serving the agents."""

    def __init__(self, n, base_model, same_ports, call_ms, procs, timeout):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-agents", str(n),
                                      "--base-model", base_model, "--agent-call-ms", str(call_ms)] +
                                     (["--same-ports"] if same_ports else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(self.proc)  # the test world kills it on stop
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ports = json.loads(self._line(timeout, "the agents' ports"))
        if len(self.ports) != n:
            raise RuntimeError(f"the agents' process started {len(self.ports)} agents, not {n}")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _line(self, timeout, what):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no answer from the agents' process within {timeout:.0f} s ({what})") from None
        if line is None:
            raise RuntimeError(f"the agents' process exited ({what}), status {self.proc.poll()}")
        return line

    def stats(self, timeout=30):
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self._line(timeout, "stats"))


# ---------------------------------------------------------------- measuring

def cpu_seconds(pid):
    """utime + stime of every thread of pid, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def load_test_module():
    path = os.path.join(ROOT, "tests", "integration", "test-operator.py")
    spec = importlib.util.spec_from_file_location("test_operator", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def adapter_obj(t, i):
    name = f"bench-{i:04d}"
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
            "metadata": {"name": name, "namespace": t.NS},
            "spec": {"modelName": name, "baseModelName": t.BASE, "source": {"uri": f"s3://bench/{name}/v1"}}}


def readiness(W, t, agents):
    """(adapters READY everywhere, adapters seen, sum of readyEndpoints)."""
    code, obj = W.api.request("GET", f"/apis/loraplane.io/v1alpha1/namespaces/{t.NS}/loraadapters")
    if code != 200:
        raise RuntimeError(f"listing the adapters failed ({code}): {obj.get('message')}")
    done = ready_eps = 0
    for a in obj["items"]:
        st = a.get("status") or {}
        ready_eps += st.get("readyEndpoints") or 0
        cond = [c for c in st.get("conditions", []) if c.get("type") == "Ready"]
        if (st.get("totalEndpoints") == agents and st.get("readyEndpoints") == agents and cond
                and cond[0].get("status") == "True"):
            done += 1
    return done, len(obj["items"]), ready_eps


def api_requests(W, since):
    """The operator's requests to the API server after sequence `since`
    (the server keeps the last 20000), and whether some were lost."""
    ctx = ssl.create_default_context(cafile=os.path.join(W.dir, "cert.pem"))
    with urllib.request.urlopen(f"{W.api.url}/_requests?since={since}", context=ctx, timeout=30) as r:
        log = json.loads(r.read())
    reqs = log["requests"]
    lost = bool(reqs) and reqs[0]["seq"] > since + 1
    return [q for q in reqs if q.get("userAgent", "").startswith("loraplane-operator")], lost


def request_kind(q):
    """'create events', 'patch loraadapters/status', ... for one logged request."""
    parts = q["path"].strip("/").split("/")
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2:]
    else:
        rest = parts[2:] if parts[0] == "api" else parts[3:]
    what = rest[0] if rest else q["path"]
    if len(rest) >= 3:
        what += "/" + rest[2]
    return f"{q['verb']} {what}"


# ---------------------------------------------------------------- the run

def bench(a):
    n, m = a.adapters, a.agents
    t = load_test_module()
    t.OPERATOR = os.path.join(a.bin, "loraplane-operator")

    def stuck():
        print(f"{NAME}: stuck outside the timed wait (start-up or stop); giving up", file=sys.stderr, flush=True)
        for p in t.procs:
            p.kill()
        os._exit(1)

    # a backstop for hangs outside the timed wait
    guard = threading.Timer(a.timeout + 180, stuck)
    guard.daemon = True
    guard.start()
    W = None
    op = None
    ok = False
    try:
        agents = Agents(m, t.BASE, a.same_ports, a.agent_call_ms, t.procs, timeout=60)
        W = t.World()
        t.W = W
        for i, p in enumerate(agents.ports):
            name = f"agent-{i:02d}"
            W.agents[name] = {"proc": agents.proc, "port": p["port"], "admin": p["admin"], "base": t.BASE}
            if p["ip"] == "127.0.0.1":
                W.run_pod(name)
            else:  # World.run_pod puts every pod on 127.0.0.1
                W.api.run_pod(name, namespace=t.NS, ip=p["ip"],
                              labels={"loraplane.io/base-model-hash": t.BASE_HASH, "app": "loraplane-agent"},
                              annotations={"loraplane.io/base-model": t.BASE},
                              ports=[{"name": "http", "containerPort": p["port"]},
                                     {"name": "admin", "containerPort": p["admin"]}])
        op = t.Operator(*OPERATOR_DEFAULTS, *a.operator_arg, name="bench")
        t.wait_for(lambda: op.get("/readyz")[0] == 200, 30, "the operator's /readyz")
        time.sleep(0.5)  # let start-up settle; calls made so far are subtracted anyway
        base_stats = agents.stats()
        if a.api_latency_ms:
            W.api.faults.set(latency_ms=a.api_latency_ms)
        seq0 = W.api.app.request_seq
        cpu0 = cpu_seconds(op.proc.pid)

        t0 = time.monotonic()
        for i in range(n):
            W.api.create(adapter_obj(t, i))
        t_applied = time.monotonic() - t0
        deadline = t0 + a.timeout
        last_report = t0
        while True:
            if op.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with status {op.proc.returncode}")
            done, seen, ready_eps = readiness(W, t, m)
            now = time.monotonic()
            if done == n:
                break
            if now >= deadline:
                raise RuntimeError(f"timed out after {a.timeout:.0f} s: {done}/{n} adapters READY "
                                   f"({ready_eps}/{n * m} endpoints ready)")
            if now - last_report >= 10:
                print(f"{NAME}: {now - t0:.0f} s: {done}/{n} adapters READY, {ready_eps}/{n * m} endpoints",
                      file=sys.stderr, flush=True)
                last_report = now
            time.sleep(a.poll)
        t_ready = time.monotonic() - t0
        cpu = cpu_seconds(op.proc.pid) - cpu0
        rss = peak_rss_mib(op.proc.pid)
        reconcile_s = op.metric("loraplane_operator_reconcile_seconds_total")
        time.sleep(a.settle)  # loads trailing the status would show now
        stats = agents.stats()
        reqs, lost = api_requests(W, seq0)
        events = op.metric("loraplane_operator_events_total")

        def total(key, which=stats):
            return sum(v for s in which for k, v in s["counts"].items() if k.startswith(key))

        def delta(key):
            return total(key) - total(key, base_stats)

        loads = delta("POST /v1/loras ")
        loads_new = delta("POST /v1/loras 201")
        loads_again = delta("POST /v1/loras 200")  # the agent already held it: a wasted call
        held = [s["held"] for s in stats]
        by_kind = collections.Counter(request_kind(q) for q in reqs)
        ms_kind = collections.Counter()
        for q in reqs:
            ms_kind[request_kind(q)] += q["ms"]
        figures = [
            (f"operator_{n}x{m}_time_to_ready", f"{t_ready:.2f}", "s"),
            ("operator_apply_time", f"{t_applied:.2f}", "s"),
            ("operator_agent_loads", loads, "count"),
            ("operator_agent_loads_new", loads_new, "count"),
            ("operator_agent_loads_redundant", loads_again, "count"),
            ("operator_agent_loads_failed", loads - loads_new - loads_again, "count"),
            ("operator_loads_per_adapter_pod", f"{loads / (n * m):.2f}", "ratio"),
            ("operator_agent_lists", delta("GET /v1/loras "), "count"),
            ("operator_agent_model_reads", delta("GET /v1/models "), "count"),
            ("operator_agent_unloads", delta("DELETE "), "count"),
            ("operator_agent_connections", delta("connections"), "count"),
            ("operator_cpu_seconds", f"{cpu:.2f}", "s"),
            ("operator_cpu_per_load", f"{1000 * cpu / max(loads, 1):.2f}", "ms"),
            ("operator_peak_rss", f"{rss:.1f}", "MiB"),
            ("operator_reconcile_seconds", f"{reconcile_s or 0:.2f}", "s"),
            ("operator_kube_requests", len(reqs), "count"),
            ("operator_kube_request_ms", f"{sum(q['ms'] for q in reqs):.0f}", "ms"),
            ("operator_events", int(events or 0), "count"),
        ]
        for kind, count in sorted(by_kind.items()):
            fig = f"operator_kube_{kind.replace(' ', '_').replace('/', '_')}"
            figures.append((fig, count, "count"))
            figures.append((fig + "_server_ms", f"{ms_kind[kind]:.0f}", "ms"))
        for fig in figures:
            print(f"bench: {fig[0]} {fig[1]} {fig[2]}", flush=True)
        if lost:
            print(f"{NAME}: the API server's request log overflowed; kube request counts are low",
                  file=sys.stderr)
        short = [i for i, h in enumerate(held) if h != n]
        if short:
            raise RuntimeError(f"agents {short} hold {[held[i] for i in short]} adapters, not {n}")
        if loads_again:
            print(f"{NAME}: {loads_again} loads of adapters the agent already held "
                  "(beyond one per adapter per pod, not retries)", file=sys.stderr)
        ok = True
    except (RuntimeError, AssertionError, OSError) as e:
        print(f"{NAME}: {e}", file=sys.stderr)
        if op:
            print(f"---- operator log (tail) ----\n{op.logs()[-3000:]}", file=sys.stderr)
        if W:
            print(f"{NAME}: logs kept in {W.dir}", file=sys.stderr)
    finally:
        if op:
            op.stop()
        if W:
            W.stop()
            if ok:
                shutil.rmtree(W.dir, ignore_errors=True)
        else:
            for p in t.procs:
                p.kill()
        guard.cancel()
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default="bin", help="directory holding loraplane-operator (default bin)")
    p.add_argument("--adapters", type=int, default=200, help="LoraAdapters to create (default 200)")
    p.add_argument("--agents", type=int, default=20, help="agent pods (default 20)")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed until all are READY (default 300)")
    p.add_argument("--settle", type=float, default=3, help="seconds to wait after READY before counting calls")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between status checks (default 0.1)")
    p.add_argument("--same-ports", action="store_true",
                   help="give each agent pod its own 127.0.x.y and the same two ports, as real pods have "
                        "(one EndpointSlice per adapter instead of one per pod)")
    p.add_argument("--api-latency-ms", type=float, default=0,
                   help="delay every API request of the operator by this much (a remote API server)")
    p.add_argument("--agent-call-ms", type=float, default=0,
                   help="every agent /v1/loras call takes this long (a real load reads and copies weights)")
    p.add_argument("--operator-arg", action="append", default=[], metavar="ARG",
                   help="extra operator argument, repeatable (e.g. --operator-arg=--workers --operator-arg=4)")
    p.add_argument("--serve-agents", type=int, help=argparse.SUPPRESS)
    p.add_argument("--base-model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve_agents is not None:
        return serve_agents(a.serve_agents, a.base_model, a.same_ports, a.agent_call_ms)
    if a.adapters < 1 or a.agents < 1 or a.agents > 60000:
        p.error("--adapters must be at least 1 and --agents 1 to 60000")
    op = os.path.join(a.bin, "loraplane-operator")
    if not os.access(op, os.X_OK):
        print(f"{NAME}: '{op}' not found (make bin/loraplane-operator)", file=sys.stderr)
        return 1
    a.bin = os.path.abspath(a.bin)
    return bench(a)


if __name__ == "__main__":
    sys.exit(main())
