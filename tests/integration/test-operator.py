#!/usr/bin/env python3
"""loraplane-operator end to end: real processes over real sockets.

The Kubernetes API is tests/kube/apiserver.py (run in this process, over
HTTPS with a bearer token; the operator and kubectl reach it through a
kubeconfig with certificate-authority-data). Agents are
tests/integration/fake_agent.py processes, or real bin/loraplane-agent
ones with the tiny model when that binary exists (one test). Pods are
created the way a kubelet would report them: phase Running, a Ready
condition, podIP 127.0.0.1 — so every agent listens on its own ports, and
the pod names them as container ports "http" and "admin", which is where
the operator looks (podIP + named container ports).

Prints one PASS/FAIL line per test (counted by tests/run.sh)."""

import base64
import hashlib
import json
import threading
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))
from apiserver import KubeApiServer  # noqa: E402

BIN = os.environ.get("BIN", "bin")
OPERATOR = os.path.join(BIN, "loraplane-operator")
AGENT = os.path.join(BIN, "loraplane-agent")
FIX = os.environ.get("LP_FIXTURES", "tests/fixtures")
NS = "team-a"
BASE = "meta-llama/Llama-3.2-3B-Instruct"
BASE_HASH = hashlib.sha256(BASE.encode()).hexdigest()[:8]
RESYNC = 3.0
# Waits are for conditions; their timeouts only guard against hangs, and
# none is shorter than this, so that a loaded machine cannot fail a test.
WAIT_S = 60
TOKEN = "operator-token-1"

failures = 0
procs = []


def test(fn):
    global failures
    t0 = time.monotonic()
    try:
        if fn() == "skip":
            print(f"SKIP test-operator:{fn.__name__}", flush=True)  # counted neither way
            return fn
        print(f"PASS test-operator:{fn.__name__} ({time.monotonic() - t0:.1f}s)", flush=True)
    except AssertionError as e:
        failures += 1
        print(f"FAIL test-operator:{fn.__name__}: {e}", flush=True)
    except Exception as e:  # a broken test is a failure too
        failures += 1
        print(f"FAIL test-operator:{fn.__name__}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
    return fn


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(pred, timeout, what):
    timeout = max(timeout, WAIT_S)
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = pred()
            if last:
                return last
        except (urllib.error.URLError, ConnectionError, KeyError, TypeError, IndexError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http(method, url, body=None, timeout=5):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ---------------------------------------------------------------- the world

class World:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="lp-operator-")
        key, cert = os.path.join(self.dir, "key.pem"), os.path.join(self.dir, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        self.api = KubeApiServer(token=TOKEN, tls_cert=cert, tls_key=key, gc=False,
                                 bookmark_interval_s=1.0).start()
        ca = base64.b64encode(open(cert, "rb").read()).decode()
        self.kubeconfig = os.path.join(self.dir, "kubeconfig")
        with open(self.kubeconfig, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {{cluster: test-cluster, user: test-user, namespace: {NS}}}
clusters:
- name: test-cluster
  cluster:
    server: {self.api.url}
    certificate-authority-data: {ca}
users:
- name: test-user
  user: {{token: {TOKEN}}}
""")
        self.agents = {}  # pod name -> agent dict
        global KUBECONFIG
        KUBECONFIG = self.kubeconfig
        kubectl("apply", "-f", "crds/loraplane.io_loraadapters.yaml")
        kubectl("create", "namespace", NS)
        kubectl("create", "namespace", "team-b")

    # agents and pods
    def start_agent(self, pod, base=BASE):
        port, admin = free_port(), free_port()
        p = subprocess.Popen([sys.executable, "tests/integration/fake_agent.py", "--port", str(port),
                              "--admin-port", str(admin), "--base-model", base],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready", f"fake agent for {pod} did not start"
        a = {"proc": p, "port": port, "admin": admin, "base": base}
        self.agents[pod] = a
        return a

    def agent_url(self, pod, path):
        return f"http://127.0.0.1:{self.agents[pod]['admin']}{path}"

    def agent_loras(self, pod):
        code, body = http("GET", self.agent_url(pod, "/v1/loras"))
        return json.loads(body)["loras"] if code == 200 else None

    def agent_calls(self, pod):
        return json.loads(http("GET", self.agent_url(pod, "/_calls"))[1])

    def agent_mode(self, pod, **mode):
        http("POST", self.agent_url(pod, "/_mode"), mode)

    def run_pod(self, name, ns=NS, base=BASE, ready=True):
        a = self.agents[name]
        return self.api.run_pod(name, namespace=ns, ip="127.0.0.1", ready=ready,
                                labels={"loraplane.io/base-model-hash": hashlib.sha256(base.encode()).hexdigest()[:8],
                                        "app": "loraplane-agent"},
                                annotations={"loraplane.io/base-model": base},
                                ports=[{"name": "http", "containerPort": a["port"]},
                                       {"name": "admin", "containerPort": a["admin"]}])

    # objects
    def get(self, path):
        code, obj = self.api.request("GET", path)
        return obj if code == 200 else None

    def adapter(self, name, ns=NS):
        return self.get(f"/apis/loraplane.io/v1alpha1/namespaces/{ns}/loraadapters/{name}")

    def status(self, name, ns=NS):
        a = self.adapter(name, ns)
        return (a or {}).get("status") or {}

    def events(self, name, ns=NS):
        code, obj = self.api.request("GET", f"/api/v1/namespaces/{ns}/events")
        return [e for e in obj.get("items", []) if e["involvedObject"].get("name") == name]

    def slices(self, svc, ns=NS):
        code, obj = self.api.request(
            "GET", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices?labelSelector="
                   f"kubernetes.io/service-name%3D{svc}")
        return obj.get("items", [])

    def stop(self):
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.api.stop()


W = None
KUBECONFIG = None


def kubectl(*args, check=True, stdin=None):
    p = subprocess.run(["kubectl", "--kubeconfig", KUBECONFIG, *args], capture_output=True,
                       text=True, input=stdin, timeout=60)
    if check and p.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {p.stderr.strip()}")
    return p.stdout


class Operator:
    def __init__(self, *extra, leader_elect=False, name="op", lease_duration="3s"):
        self.metrics_port, self.health_port = free_port(), free_port()
        self.log_path = os.path.join(W.dir, f"{name}-{len(procs)}.log")
        args = [OPERATOR, "--kubeconfig", W.kubeconfig, "--metrics-port", str(self.metrics_port),
                "--health-port", str(self.health_port), "--bind-address", "127.0.0.1", "--resync", f"{RESYNC}s",
                "--load-timeout", "2s", "--agent-timeout", "1s", "--retry-max-delay", "2s", "--watch-timeout", "20",
                "--delete-attempts", "3", *extra]
        if leader_elect:
            args += ["--leader-elect", "--leader-elect-namespace", "kube-system", "--lease-duration", lease_duration,
                     "--renew-deadline", "2s", "--retry-period", "0.5s"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        procs.append(self.proc)

    def get(self, path):
        return http("GET", f"http://127.0.0.1:{self.health_port if path != '/metrics' else self.metrics_port}{path}")

    def metric(self, name):
        code, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                if line.split(" ")[0] == name:
                    return float(line.split(" ")[1])
        return None

    def is_leader(self):
        try:
            return self.metric("loraplane_operator_leader") == 1
        except (urllib.error.URLError, ConnectionError):
            return False

    def logs(self):
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path).read()

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


ADAPTER = """apiVersion: loraplane.io/v1alpha1
kind: LoraAdapter
metadata:
  name: {name}
  namespace: {ns}
spec:
  modelName: {model}
  baseModelName: {base}
  source:
    uri: {uri}
"""


def apply_adapter(name, uri, model=None, ns=NS, base=BASE, extra=""):
    kubectl("apply", "-f", "-", stdin=ADAPTER.format(name=name, ns=ns, model=model or name, base=base, uri=uri) + extra)


def ready_counts(name, ns=NS):
    st = W.status(name, ns)
    return st.get("totalEndpoints"), st.get("readyEndpoints")


def condition(name, ns=NS):
    for c in W.status(name, ns).get("conditions", []):
        if c["type"] == "Ready":
            return c
    return {}


def wait_counts(name, total, ready, timeout=15, ns=NS):
    return wait_for(lambda: ready_counts(name, ns) == (total, ready), timeout,
                    f"{name} TOTAL {total} READY {ready}, have {ready_counts(name, ns)}")


def digest(uri):
    return hashlib.sha256(uri.encode()).hexdigest()


def holds(pod, model, uri):
    l = (W.agent_loras(pod) or {}).get(model)
    return bool(l) and l["source"] == uri and l["sha256"] == digest(uri)


# ---------------------------------------------------------------- tests

OP = None
SQL_URI = "s3://loras/sql/v3"


def test_bad_usage():
    p = subprocess.run([OPERATOR, "--no-such-flag"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "unknown flag '--no-such-flag'" in p.stderr, p.stderr
    p = subprocess.run([OPERATOR, "--resync", "soon"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 2 and "invalid duration 'soon' for '--resync'" in p.stderr, p.stderr
    p = subprocess.run([OPERATOR, "--kubeconfig", os.path.join(W.dir, "nope")], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 1 and "kubeconfig: cannot open" in p.stderr, p.stderr
    bad = os.path.join(W.dir, "bad-kubeconfig")
    with open(bad, "w") as f:
        f.write("current-context: x\ncontexts: []\n")
    p = subprocess.run([OPERATOR, "--kubeconfig", bad], capture_output=True, text=True, timeout=10)
    assert p.returncode == 1 and "context 'x' not found" in p.stderr, p.stderr


def test_apply_three_pods_ready():
    global OP
    for i in range(3):
        W.start_agent(f"agent-{i}")
        W.run_pod(f"agent-{i}")
    OP = Operator()
    wait_for(lambda: OP.get("/readyz")[0] == 200, 10, "/readyz")
    assert OP.get("/healthz")[0] == 200
    apply_adapter("sql", SQL_URI, model="sql-lora")
    wait_counts("sql", 3, 3)
    a = W.adapter("sql")
    assert "loraplane.io/unload" in a["metadata"]["finalizers"], a["metadata"]
    st = a["status"]
    assert st["observedGeneration"] == a["metadata"]["generation"]
    c = condition("sql")
    assert c["status"] == "True" and c["reason"] == "AllEndpointsReady", c
    assert sorted(e["podName"] for e in st["endpoints"]) == ["agent-0", "agent-1", "agent-2"]
    for e in st["endpoints"]:
        assert e["ready"] and e["sha256"] == digest(SQL_URI), e
        assert e["address"] == f"127.0.0.1:{W.agents[e['podName']]['port']}", e
    for i in range(3):
        assert holds(f"agent-{i}", "sql-lora", SQL_URI)
    # kubectl shows the printer columns
    out = kubectl("get", "loraadapters", "-n", NS)
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "BASE", "TOTAL", "READY", "MODEL", "REASON", "AGE"], out
    row = lines[1].split()
    assert row[:6] == ["sql", BASE, "3", "3", "sql-lora", "AllEndpointsReady"], out
    # the selector-less Service and a slice listing exactly the three pods
    svc = W.get(f"/api/v1/namespaces/{NS}/services/sql")
    assert svc and "selector" not in svc["spec"], svc
    assert svc["metadata"]["ownerReferences"][0]["uid"] == a["metadata"]["uid"]
    want = sorted((W.agents[f"agent-{i}"]["port"], f"agent-{i}") for i in range(3))
    eps = sorted((s["ports"][0]["port"], ep["targetRef"]["name"]) for s in W.slices("sql") for ep in s["endpoints"])
    assert eps == want, eps
    reasons = [e["reason"] for e in W.events("sql")]
    assert "AllEndpointsReady" in reasons and reasons.count("Loaded") == 3, reasons
    m = OP.metric("loraplane_operator_adapters")
    assert m == 1, m


def test_fourth_pod_joins():
    W.start_agent("agent-3")
    W.run_pod("agent-3")
    wait_counts("sql", 4, 4, timeout=10)
    assert holds("agent-3", "sql-lora", SQL_URI)
    wait_for(lambda: len([ep for s in W.slices("sql") for ep in s["endpoints"]]) == 4, 10, "4 endpoints in slices")
    # the kubelet reports the pod not Ready: it still counts, but gets no traffic
    W.api.set_pod_status("agent-3", NS, ip="127.0.0.1", ready=False)
    wait_counts("sql", 4, 3, timeout=10)
    c = condition("sql")
    assert c["reason"] == "PartiallyReady" and "pod agent-3: pod is not Ready" in c["message"], c
    wait_for(lambda: "agent-3" not in [ep["targetRef"]["name"] for s in W.slices("sql") for ep in s["endpoints"]],
             10, "agent-3 out of the slices")
    W.api.set_pod_status("agent-3", NS, ip="127.0.0.1", ready=True)
    wait_counts("sql", 4, 4, timeout=10)


def test_steady_state_does_not_reload():
    before = {p: W.agent_calls(p) for p in W.agents}

    def verified_since(earlier):
        now = {p: W.agent_calls(p) for p in W.agents}
        return now if all(now[p]["GET"] > earlier[p]["GET"] for p in W.agents) else None

    # two resyncs, each verifying every agent (GET), reload nothing (POST)
    mid = wait_for(lambda: verified_since(before), 2 * RESYNC, "every agent verified on resync")
    after = wait_for(lambda: verified_since(mid), 2 * RESYNC, "every agent verified on a second resync")
    for p in W.agents:
        assert after[p]["POST"] == before[p]["POST"], (p, before[p], after[p])
    assert ready_counts("sql") == (4, 4)


def test_agent_restarted_empty_is_reloaded():
    http("POST", W.agent_url("agent-1", "/_reset"))
    assert not holds("agent-1", "sql-lora", SQL_URI)
    # no API event tells the operator: only its resync can notice
    wait_for(lambda: holds("agent-1", "sql-lora", SQL_URI), RESYNC * 2, "agent-1 reloaded on resync")
    assert ready_counts("sql") == (4, 4)


def test_source_change_reloads_in_place():
    new = "s3://loras/sql/v4"
    gen = W.adapter("sql")["metadata"]["generation"]
    kubectl("patch", "loraadapter", "sql", "-n", NS, "--type", "merge", "-p",
            json.dumps({"spec": {"source": {"uri": new}}}))
    wait_for(lambda: all(holds(p, "sql-lora", new) for p in W.agents), 15, "new source on every agent")
    wait_for(lambda: W.status("sql").get("observedGeneration") == gen + 1, 10, "observedGeneration")
    wait_for(lambda: all(e["sha256"] == digest(new) and e["ready"] for e in W.status("sql")["endpoints"]), 10,
             "new digest in status")
    assert ready_counts("sql") == (4, 4)


def test_agent_errors_then_recovery():
    uri = "s3://loras/sql/v4"
    # agent-2 fails every call with 500 and forgets its adapters
    W.agent_mode("agent-2", mode="fail", status=500)
    http("POST", W.agent_url("agent-2", "/_reset"))
    W.agent_mode("agent-2", mode="fail", status=500)
    wait_counts("sql", 4, 3, timeout=RESYNC * 2 + 5)
    c = condition("sql")
    assert c["status"] == "False" and c["reason"] == "LoadFailed", c
    assert "agent-2" in c["message"] and "500" in c["message"], c
    ep = [e for e in W.status("sql")["endpoints"] if e["podName"] == "agent-2"][0]
    assert not ep["ready"] and "500" in ep["message"], ep
    # the real kubectl shows why READY is short: the Ready condition's reason
    lines = kubectl("get", "loraadapters", "sql", "-n", NS).splitlines()
    head, row = lines[0].split(), lines[1].split()
    got = dict(zip(head, row))
    assert got["READY"] == "3" and got["MODEL"] == "sql-lora" and got["REASON"] == "LoadFailed", lines
    wait_for(lambda: any(e["reason"] == "LoadFailed" and e["type"] == "Warning" and "agent-2" in e["message"]
                         for e in W.events("sql")), 5, "a LoadFailed event")
    wait_for(lambda: sorted(ep["targetRef"]["name"] for s in W.slices("sql") for ep in s["endpoints"]) ==
             ["agent-0", "agent-1", "agent-3"], 5, "agent-2 out of the slices")
    # the agent comes back: within the retry backoff (max 2 s) or a resync
    W.agent_mode("agent-2", mode="ok")
    wait_counts("sql", 4, 4, timeout=RESYNC + 5)
    assert holds("agent-2", "sql-lora", uri)
    assert condition("sql")["reason"] == "AllEndpointsReady"

    # a hanging agent: the load times out (--load-timeout 2s)
    W.agent_mode("agent-0", mode="hang", hang_s=4)
    http("POST", W.agent_url("agent-0", "/_reset"))
    W.agent_mode("agent-0", mode="hang", hang_s=4)
    wait_for(lambda: "timed out" in condition("sql").get("message", ""), RESYNC * 2 + 8, "a timeout in the condition")
    assert ready_counts("sql")[1] < 4
    W.agent_mode("agent-0", mode="ok")
    wait_counts("sql", 4, 4, timeout=RESYNC + 10)


def patch_uri(name, uri):
    """Changes the spec without going through HTTP (so faults do not hit it)."""
    code, obj = W.api.request("PATCH", f"/apis/loraplane.io/v1alpha1/namespaces/{NS}/loraadapters/{name}",
                              {"spec": {"source": {"uri": uri}}}, content_type="application/merge-patch+json")
    assert code == 200, obj


def everywhere(uri, timeout, what):
    wait_for(lambda: all(holds(p, "sql-lora", uri) for p in W.agents), timeout, what)
    wait_for(lambda: all(e["sha256"] == digest(uri) for e in W.status("sql")["endpoints"]), 10, what + " in status")


def expired_relists():
    return OP.metric('loraplane_operator_informer_expired_total{resource="loraadapters"}')


def test_api_faults_lose_no_update():
    # watches closed cleanly, then reset (socket closed), while the spec changes
    W.api.drop_watches()
    patch_uri("sql", "s3://loras/sql/v5")
    everywhere("s3://loras/sql/v5", 15, "v5 after dropped watches")
    W.api.drop_watches(reset=True)
    patch_uri("sql", "s3://loras/sql/v5b")
    everywhere("s3://loras/sql/v5b", 15, "v5b after reset watches")
    # a change the watch cannot deliver before its version expires: 410, relist
    before = expired_relists()
    W.api.faults.set(stall_watches=True)  # in force at once: the watches hold back what follows
    patch_uri("sql", "s3://loras/sql/v6")
    W.api.expire_versions()
    W.api.faults.clear()
    everywhere("s3://loras/sql/v6", 15, "v6 after 410")
    assert expired_relists() > before, (before, expired_relists())
    # the API answers 500 (and the watches end) while the spec changes, until
    # the operator has seen the 500s and backed off; then the fault's time
    # is up (the test server's clock moves on) and the change arrives
    seen = len(OP.logs())
    W.api.faults.set(status=500, for_seconds=3600)
    W.api.drop_watches()
    patch_uri("sql", "s3://loras/sql/v7")
    wait_for(lambda: "500 InternalError" in OP.logs()[seen:] and "retrying in" in OP.logs()[seen:], WAIT_S,
             "the operator to retry after 500s")
    W.api.advance_clock(3600)
    everywhere("s3://loras/sql/v7", 40, "v7 after API 500s")
    # the API server goes away for 3 s (connections refused)
    W.api.go_down(3)
    patch_uri("sql", "s3://loras/sql/v8")
    everywhere("s3://loras/sql/v8", 40, "v8 after the API came back")
    assert ready_counts("sql") == (4, 4)


def test_pod_leaves_and_no_endpoints():
    code, _ = W.api.request("DELETE", f"/api/v1/namespaces/{NS}/pods/agent-3")
    assert code == 200
    wait_counts("sql", 3, 3, timeout=15)
    # an adapter of a base model no pod serves
    apply_adapter("other", "s3://loras/other/v1", base="Qwen/Qwen2.5-7B")
    wait_for(lambda: condition("other").get("reason") == "NoEndpoints", 10, "NoEndpoints")
    assert ready_counts("other") == (0, 0)
    assert "Qwen/Qwen2.5-7B" in condition("other")["message"]
    # a pod whose agent serves another base model than its label says
    W.start_agent("liar", base="some/other-model")
    W.run_pod("liar", base="Qwen/Qwen2.5-7B")
    wait_for(lambda: ready_counts("other") == (1, 0), 10, "the liar counted, not ready")
    assert "serves base model 'some/other-model'" in condition("other")["message"], condition("other")


def test_delete_unloads_and_cleans_up():
    kubectl("delete", "loraadapter", "sql", "-n", NS, "--wait=false")
    wait_for(lambda: W.adapter("sql") is None, 15, "sql gone")
    for p in ("agent-0", "agent-1", "agent-2"):
        assert "sql-lora" not in W.agent_loras(p), p
    assert W.get(f"/api/v1/namespaces/{NS}/services/sql") is None
    assert W.slices("sql") == []
    reasons = [e["reason"] for e in W.events("sql")]
    assert "Unloading" in reasons and "Unloaded" in reasons, reasons


def test_delete_with_unreachable_agent_gives_up_bounded():
    apply_adapter("tmp", "s3://loras/tmp/v1")
    wait_counts("tmp", 3, 3)
    W.agent_mode("agent-1", mode="fail", status=503)
    kubectl("delete", "loraadapter", "tmp", "-n", NS, "--wait=false")
    wait_for(lambda: W.adapter("tmp") is None, 30, "tmp gone after bounded retries")
    W.agent_mode("agent-1", mode="ok")
    assert "tmp" not in W.agent_loras("agent-0")
    assert any(e["reason"] == "UnloadFailed" for e in W.events("tmp"))


def test_two_operators_one_leader_failover():
    global OP
    OP.stop()
    apply_adapter("chat", "s3://loras/chat/v1")
    # a leads (3 s lease); b, started once a leads, writes a lease far too
    # long to expire during the test, so that only a release can hand its
    # lease on: no step below depends on how long anything takes
    a = Operator(leader_elect=True, name="a")
    wait_for(a.is_leader, WAIT_S, "a leads")
    b = Operator(leader_elect=True, name="b", lease_duration="3600s")
    wait_for(lambda: "the leader is " in b.logs(), WAIT_S, "b sees the Lease held")
    assert a.is_leader() and not b.is_leader(), "exactly one leader"
    leader, standby = a, b
    assert standby.get("/readyz")[0] == 200
    wait_counts("chat", 3, 3)
    lease = W.get("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/loraplane-operator")
    holder = lease["spec"]["holderIdentity"]
    assert holder.endswith(f"_{leader.proc.pid}"), holder
    # the leader dies without releasing: the standby takes over after the lease duration
    leader.proc.kill()
    leader.proc.wait()
    wait_for(standby.is_leader, WAIT_S, "standby takes over")
    apply_adapter("chat", "s3://loras/chat/v2")
    wait_for(lambda: all(holds(p, "chat", "s3://loras/chat/v2") for p in ("agent-0", "agent-1", "agent-2")), 15,
             "the new leader reconciles")
    lease = W.get("/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/loraplane-operator")
    assert lease["spec"]["holderIdentity"].endswith(f"_{standby.proc.pid}"), lease["spec"]
    assert lease["spec"]["leaseTransitions"] >= 1
    assert lease["spec"]["leaseDurationSeconds"] == 3600, lease["spec"]
    # a clean stop releases the lease at once: c could not take over the
    # 3600 s lease otherwise
    c = Operator(leader_elect=True, name="c")
    wait_for(lambda: "the leader is " in c.logs(), WAIT_S, "c sees the Lease held")
    assert not c.is_leader()
    assert standby.stop() == 0
    wait_for(c.is_leader, WAIT_S, "takeover after a release")
    OP = c


def test_all_namespaces_and_service_disabled():
    W.start_agent("b-0")
    W.run_pod("b-0", ns="team-b")
    apply_adapter("9-lives.v1", "s3://loras/cat/v1", model="cat", ns="team-b",
                  extra="  service:\n    enabled: false\n")
    wait_counts("9-lives.v1", 1, 1, ns="team-b")
    assert W.slices("lora-9-lives-v1-" + hashlib.sha256(b"9-lives.v1").hexdigest()[:8], ns="team-b") == []
    code, obj = W.api.request("GET", "/api/v1/namespaces/team-b/services")
    assert obj["items"] == [], obj
    # turning the Service on creates it under a DNS-safe derived name
    kubectl("patch", "loraadapter", "9-lives.v1", "-n", "team-b", "--type", "merge", "-p",
            '{"spec":{"service":{"enabled":true}}}')
    svc = "lora-9-lives-v1-" + hashlib.sha256(b"9-lives.v1").hexdigest()[:8]
    wait_for(lambda: W.get(f"/api/v1/namespaces/team-b/services/{svc}") is not None, 10, f"Service {svc}")
    wait_for(lambda: len(W.slices(svc, ns="team-b")) == 1, 10, "its slice")


def test_secret_ref_credentials_reach_the_agents():
    """spec.source.secretRef: the Secret's AWS_/HF_ keys travel with the
    load as source.credentials (other keys stay behind); a missing Secret
    is a LoadFailed that heals once the Secret exists; the values appear in
    no status, Event or log."""
    extra = "    secretRef: {name: s3-creds}\n"
    apply_adapter("private", "s3://private/sql/v1", model="private", ns="team-b", extra=extra)
    wait_for(lambda: condition("private", ns="team-b").get("reason") == "LoadFailed", 15,
             "LoadFailed without the Secret")
    ep = W.status("private", ns="team-b")["endpoints"][0]
    assert "Secret 's3-creds'" in ep["message"] and "not found" in ep["message"], ep
    assert ready_counts("private", ns="team-b") == (1, 0)
    kubectl("create", "secret", "generic", "s3-creds", "-n", "team-b",
            "--from-literal=AWS_ACCESS_KEY_ID=AKIDEXAMPLE",
            "--from-literal=AWS_SECRET_ACCESS_KEY=very-secret-value",
            "--from-literal=AWS_REGION=eu-west-1", "--from-literal=unrelated=not-forwarded")
    wait_counts("private", 1, 1, timeout=20, ns="team-b")
    creds = json.loads(http("GET", W.agent_url("b-0", "/_credentials"))[1])["private"]
    assert creds == {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret-value",
                     "AWS_REGION": "eu-west-1"}, creds
    assert "very-secret-value" not in json.dumps(W.adapter("private", ns="team-b"))
    assert "very-secret-value" not in json.dumps(W.events("private", ns="team-b"))
    assert "very-secret-value" not in OP.logs()
    # an adapter without a secretRef sends no credentials
    assert json.loads(http("GET", W.agent_url("b-0", "/_credentials"))[1])["cat"] is None


def test_start_while_pods_cannot_be_listed():
    """A restarted operator must not mistake an unlisted pod cache for
    'no endpoints'."""
    global OP
    OP.stop()
    assert ready_counts("chat") == (3, 3)
    W.api.faults.set(status=500, path_regex="/pods", for_seconds=3600)
    OP = Operator(name="restarted")
    seen = set()

    def sample(done):
        seen.add(ready_counts("chat"))
        return done()

    # the counts hold while pod lists fail (twice, so the operator retried) ...
    wait_for(lambda: sample(lambda: W.api.faults.snapshot()["injected"] >= 2), WAIT_S, "two failed pod lists")
    W.api.advance_clock(3600)  # ... and once they succeed
    wait_for(lambda: sample(lambda: OP.get("/readyz")[0] == 200), WAIT_S, "/readyz after the pods listed")
    assert seen == {(3, 3)}, seen
    assert ready_counts("chat") == (3, 3)


def scrape():
    """The operator's /metrics through prometheus_client's own parser:
    {family name: family}, checking the exposition's shape on the way."""
    from prometheus_client.parser import text_string_to_metric_families
    code, text = OP.get("/metrics")
    assert code == 200, (code, text)
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), f"a family split or repeated: {sorted(names)}"
    for f in fams:
        assert f.type != "unknown", f"{f.name}: no TYPE (or samples apart from it)"
        assert f.documentation, f"{f.name}: no HELP"
        assert f.samples, f"{f.name}: no samples"
    return {f.name: f for f in fams}


def sample(fams, family, name=None, **labels):
    vals = [s.value for s in fams[family].samples
            if (name is None or s.name == name) and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(vals) == 1, (family, labels, fams[family].samples)
    return vals[0]


def test_metrics():
    fams = scrape()
    for name, typ in (("loraplane_operator_leader", "gauge"), ("loraplane_operator_uptime_seconds", "gauge"),
                      ("loraplane_operator_reconciles", "counter"), ("loraplane_operator_agent_loads", "counter"),
                      ("loraplane_operator_agent_unloads", "counter"), ("loraplane_operator_workqueue_depth", "gauge"),
                      ("loraplane_operator_adapters", "gauge"), ("loraplane_operator_endpoints", "gauge"),
                      ("loraplane_operator_kube_requests", "counter"), ("loraplane_operator_informer_lists", "counter"),
                      ("loraplane_operator_informer_expired", "counter")):
        assert name in fams and fams[name].type == typ, (name, fams.get(name))
    assert sample(fams, "loraplane_operator_leader") == 1
    for res in ("loraadapters", "pods"):
        assert sample(fams, "loraplane_operator_informer_lists", resource=res) >= 1, res
    assert sample(fams, "loraplane_operator_kube_requests", **{"class": "2xx"}) > 0

    # values follow what the test does: one more adapter on the pods that
    # serve "chat", then its deletion
    pods = W.status("chat")["totalEndpoints"]

    seen = {}

    def agreed(extra):
        """A scrape once the operator's view equals the API's: the number of
        LoraAdapters and the endpoints summed over their status."""
        items = W.api.request("GET", "/apis/loraplane.io/v1alpha1/loraadapters")[1]["items"]
        st = [W.status(a["metadata"]["name"], a["metadata"]["namespace"]) for a in items]
        f = scrape()
        seen["operator"] = [sample(f, "loraplane_operator_adapters")] + [
            sample(f, "loraplane_operator_endpoints", state=k) for k in ("total", "ready")]
        seen["api"] = [len(items), sum(x.get("totalEndpoints", 0) for x in st),
                       sum(x.get("readyEndpoints", 0) for x in st)]
        return f if seen["operator"] == seen["api"] == [extra] + seen["api"][1:] else None

    def until_agreed(extra, what):
        try:
            return wait_for(lambda: agreed(extra), WAIT_S, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; [adapters, total, ready]: {seen}") from None

    n = len(W.api.request("GET", "/apis/loraplane.io/v1alpha1/loraadapters")[1]["items"])
    before = until_agreed(n, f"the metrics to agree with the API's {n} adapters")
    apply_adapter("metered", "s3://loras/metered/v1")
    wait_counts("metered", pods, pods)
    after = until_agreed(n + 1, "the metrics to count the new adapter")
    loads = lambda f: sample(f, "loraplane_operator_agent_loads", "loraplane_operator_agent_loads_total",  # noqa: E731
                             result="success")
    assert loads(after) - loads(before) == pods, (pods, loads(before), loads(after))
    ok = lambda f: sample(f, "loraplane_operator_reconciles", "loraplane_operator_reconciles_total",  # noqa: E731
                          result="success")
    assert ok(after) > ok(before), (ok(before), ok(after))
    assert sample(after, "loraplane_operator_endpoints", state="ready") == \
        sample(before, "loraplane_operator_endpoints", state="ready") + pods
    unloads = lambda f: sample(f, "loraplane_operator_agent_unloads", "loraplane_operator_agent_unloads_total",  # noqa: E731
                               result="success")
    kubectl("delete", "loraadapter", "metered", "-n", NS, "--wait=false")
    wait_for(lambda: W.adapter("metered") is None, WAIT_S, "metered gone")
    gone = until_agreed(n, "the metrics to drop the deleted adapter")
    assert unloads(gone) - unloads(after) == pods, (pods, unloads(after), unloads(gone))

    # HTTP: HEAD like GET without a body, other methods 405 with Allow, 404
    for port, path in ((OP.metrics_port, "/metrics"), (OP.health_port, "/healthz"), (OP.health_port, "/readyz")):
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="HEAD")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200 and r.read() == b"" and int(r.headers["Content-Length"]) > 0, (path, r.headers)
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                         data=b"{}" if method in ("POST", "PUT") else None)
            try:
                urllib.request.urlopen(req, timeout=5)
                raise AssertionError(f"{method} {path} answered 2xx")
            except urllib.error.HTTPError as e:
                assert e.code == 405 and e.headers["Allow"] == "GET, HEAD", (method, path, e.code, dict(e.headers))
    assert OP.get("/nope")[0] == 404
    assert OP.get("/healthz?verbose=1")[0] == 200


def test_real_agents():
    """Two real loraplane-agent processes with the tiny model; the operator
    watches one namespace and authenticates to the agents' admin API."""
    global OP
    if not os.path.exists(AGENT):
        print(f"test_real_agents: {AGENT} not built", file=sys.stderr)
        return "skip"
    base = "test/tiny-base"
    loras = os.path.abspath(os.path.join(FIX, "lora", "tiny"))
    token_file = os.path.join(W.dir, "admin-token")
    with open(token_file, "w") as f:
        f.write("agent-admin-secret\n")
    kubectl("create", "namespace", "team-r")
    for i in range(2):
        name = f"real-{i}"
        port, admin = free_port(), free_port()
        log = open(os.path.join(W.dir, f"{name}.log"), "w")
        p = subprocess.Popen([AGENT, "--model", os.path.join(FIX, "tiny-llama"), "--served-model-name", base,
                              "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin),
                              "--threads", "1", "--kv-cache-bytes", "4194304", "--allowed-local-roots", loras,
                              "--admin-token-file", token_file], stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        W.agents[name] = {"proc": p, "port": port, "admin": admin, "base": base}
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/health")[0] == 200, 30, f"{name} up")
        W.run_pod(name, ns="team-r", base=base)
    OP.stop()
    OP = Operator("--namespace", "team-r", "--agent-token-file", token_file, name="real")
    uri = f"file://{loras}/r4-qv"
    apply_adapter("tiny-qv", uri, model="tiny/qv", ns="team-r", base=base)
    wait_counts("tiny-qv", 2, 2, timeout=30, ns="team-r")

    def agent_view(name):
        req = urllib.request.Request(f"http://127.0.0.1:{W.agents[name]['admin']}/v1/loras",
                                     headers={"Authorization": "Bearer agent-admin-secret"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())["loras"]

    first = agent_view("real-0")["tiny/qv"]
    assert first["source"] == uri, first
    assert all(e["sha256"] == first["sha256"] for e in W.status("tiny-qv", ns="team-r")["endpoints"])
    # the adapter answers requests on the agent's public port
    code, body = http("POST", f"http://127.0.0.1:{W.agents['real-1']['port']}/v1/completions",
                      {"model": "tiny/qv", "prompt": "hello", "max_tokens": 2, "temperature": 0}, timeout=60)
    assert code == 200, body
    # a new source reloads in place with its own digest, while clients keep
    # calling the adapter on both agents: no request fails during the swap
    stop_calls, results = threading.Event(), []

    def caller(port):
        while not stop_calls.is_set():
            results.append(http("POST", f"http://127.0.0.1:{port}/v1/completions",
                                {"model": "tiny/qv", "prompt": "hello", "max_tokens": 4,
                                 "temperature": 0}, timeout=60)[0])

    callers = [threading.Thread(target=caller, args=(W.agents[n]["port"],), daemon=True)
               for n in ("real-0", "real-1") for _ in range(2)]
    for t in callers:
        t.start()
    uri2 = f"file://{loras}/r8-all"
    kubectl("patch", "loraadapter", "tiny-qv", "-n", "team-r", "--type", "merge", "-p",
            json.dumps({"spec": {"source": {"uri": uri2}}}))
    try:
        wait_for(lambda: all(agent_view(n).get("tiny/qv", {}).get("source") == uri2 for n in ("real-0", "real-1")),
                 30, "r8-all on both real agents")
        n = len(results)
        wait_for(lambda: len(results) >= n + 4, WAIT_S, "calls after the swap")
    finally:
        stop_calls.set()
        for t in callers:
            t.join(60)
    assert results and all(c == 200 for c in results), f"requests during the swap: {results}"
    second = agent_view("real-1")["tiny/qv"]
    assert second["sha256"] != first["sha256"]
    wait_for(lambda: all(e["sha256"] == second["sha256"] and e["ready"]
                         for e in W.status("tiny-qv", ns="team-r")["endpoints"]), 15, "new digest in status")
    # an adapter the agent refuses (source missing): LoadFailed with the agent's reason
    apply_adapter("broken", f"file://{loras}/does-not-exist", ns="team-r", base=base)
    wait_for(lambda: condition("broken", ns="team-r").get("reason") == "LoadFailed", 15, "LoadFailed")
    assert "404" in condition("broken", ns="team-r")["message"], condition("broken", ns="team-r")
    # resources in other namespaces are not this operator's business
    assert "sql" not in OP.logs()
    kubectl("delete", "loraadapter", "tiny-qv", "broken", "-n", "team-r", "--wait=false")
    wait_for(lambda: W.adapter("tiny-qv", ns="team-r") is None, 15, "tiny-qv gone")
    assert "tiny/qv" not in agent_view("real-0") and "tiny/qv" not in agent_view("real-1")


def test_clean_shutdown():
    code = OP.stop()
    assert code == 0, f"exit status {code}: {OP.logs()[-1500:]}"
    assert "shutting down" in OP.logs()


def test_client_certificate_auth():
    """kubeconfig with client-certificate-data / client-key-data (base64)
    and a certificate-authority file given relative to the kubeconfig."""
    d = os.path.join(W.dir, "certauth")
    os.makedirs(d)

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
         "-subj", "/CN=test-ca")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj",
         "/CN=loraplane-operator")
    ossl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
         "client.pem", "-days", "1")
    api2 = KubeApiServer(token="not-the-operators", tls_cert=os.path.join(W.dir, "cert.pem"),
                         tls_key=os.path.join(W.dir, "key.pem"), client_ca=os.path.join(d, "ca.pem")).start()
    try:
        shutil.copy(os.path.join(W.dir, "cert.pem"), os.path.join(d, "server-ca.pem"))
        b64 = lambda f: base64.b64encode(open(os.path.join(d, f), "rb").read()).decode()  # noqa: E731
        kc = os.path.join(d, "kubeconfig")
        with open(kc, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
current-context: certs
contexts:
- name: certs
  context: {{cluster: c, user: u}}
clusters:
- name: c
  cluster: {{server: "{api2.url}", certificate-authority: server-ca.pem}}
users:
- name: u
  user:
    client-certificate-data: {b64("client.pem")}
    client-key-data: {b64("client.key")}
""")
        code, obj = api2.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                 yaml.safe_load(open("crds/loraplane.io_loraadapters.yaml")))
        assert code == 201, obj
        code, obj = api2.request("POST", "/apis/loraplane.io/v1alpha1/namespaces/default/loraadapters",
                                 {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
                                  "metadata": {"name": "x", "namespace": "default"},
                                  "spec": {"baseModelName": "nobody/serves-this", "source": {"uri": "s3://b/x"}}})
        assert code == 201, obj
        op = Operator("--kubeconfig", kc, "--namespace", "default", name="certs")
        try:
            def reason():
                code, obj = api2.request("GET", "/apis/loraplane.io/v1alpha1/namespaces/default/loraadapters/x")
                return [c.get("reason") for c in (obj.get("status") or {}).get("conditions", [])]
            wait_for(lambda: reason() == ["NoEndpoints"], 15, "status written with a client certificate")
        finally:
            assert op.stop() == 0, op.logs()[-1500:]
    finally:
        api2.stop()


def main():
    global W
    if not os.path.exists(OPERATOR):
        print(f"FAIL test-operator:setup: {OPERATOR} not built", flush=True)
        return 1
    only = [t for t in os.environ.get("OPERATOR_TESTS", "").split(",") if t]
    W = World()
    try:
        for t in (test_bad_usage, test_apply_three_pods_ready, test_fourth_pod_joins,
                  test_steady_state_does_not_reload, test_agent_restarted_empty_is_reloaded,
                  test_source_change_reloads_in_place, test_agent_errors_then_recovery,
                  test_api_faults_lose_no_update, test_pod_leaves_and_no_endpoints,
                  test_delete_unloads_and_cleans_up, test_delete_with_unreachable_agent_gives_up_bounded,
                  test_two_operators_one_leader_failover, test_all_namespaces_and_service_disabled,
                  test_secret_ref_credentials_reach_the_agents,
                  test_start_while_pods_cannot_be_listed, test_metrics, test_real_agents, test_client_certificate_auth,
                  test_clean_shutdown):
            if only and t.__name__ not in only:
                continue
            test(t)
    finally:
        if failures and OP:
            sys.stderr.write("---- operator log (tail) ----\n" + OP.logs()[-6000:])
        W.stop()
        if not failures:
            shutil.rmtree(W.dir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
