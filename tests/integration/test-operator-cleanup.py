#!/usr/bin/env python3
"""loraplane-operator cleanup (the Helm pre-delete hook) end to end.

The Kubernetes API is tests/kube/apiserver.py (in this process, HTTPS with
a bearer token); agents are tests/integration/fake_agent.py processes, two
pods in team-a and two in team-b, as in test-operator.py; the real
operator runs (all namespaces) where a test says so. LoraAdapters are
created through the server's in-process API, so the server's /_requests
log holds only what the operator and `cleanup` sent.

The operator runs with a watch timeout of an hour, so during a test it
sends no list, watch or delete of LoraAdapters (it never deletes them, and
lists and watches once at its start): those requests in the log are
cleanup's.

Prints one PASS/FAIL line per test (counted by tests/run.sh)."""

import base64
import hashlib
import json
import os
import re
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))
from apiserver import KubeApiServer  # noqa: E402

BIN = os.environ.get("BIN", "bin")
OPERATOR = os.path.join(BIN, "loraplane-operator")
BASE = "meta-llama/Llama-3.2-3B-Instruct"
BASE_HASH = hashlib.sha256(BASE.encode()).hexdigest()[:8]
FINALIZER = "loraplane.io/unload"
GROUP_PATH = "/apis/loraplane.io/v1alpha1"
TOKEN = "cleanup-token-1"
# Waits are for conditions; their timeouts only guard against hangs.
WAIT_S = 60
PROG = "test-operator-cleanup"

failures = 0
procs = []


def test(fn):
    global failures
    t0 = time.monotonic()
    try:
        fn()
        print(f"PASS {PROG}:{fn.__name__} ({time.monotonic() - t0:.1f}s)", flush=True)
    except AssertionError as e:
        failures += 1
        print(f"FAIL {PROG}:{fn.__name__}: {e}", flush=True)
    except Exception as e:  # a broken test is a failure too
        failures += 1
        print(f"FAIL {PROG}:{fn.__name__}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(pred, what, timeout=WAIT_S):
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


def kubeconfig(path, url, ca_pem=None, token=None):
    cluster = f"server: {url}"
    if ca_pem:
        cluster += f"\n    certificate-authority-data: {base64.b64encode(ca_pem).decode()}"
    user = f"{{token: {token}}}" if token else "{}"
    with open(path, "w") as f:
        f.write(f"""apiVersion: v1
kind: Config
current-context: test
contexts:
- name: test
  context: {{cluster: c, user: u, namespace: team-a}}
clusters:
- name: c
  cluster:
    {cluster}
users:
- name: u
  user: {user}
""")
    return path


# ---------------------------------------------------------------- the world

class World:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="lp-cleanup-")
        key, cert = os.path.join(self.dir, "key.pem"), os.path.join(self.dir, "cert.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        self.api = KubeApiServer(token=TOKEN, tls_cert=cert, tls_key=key, gc=False,
                                 bookmark_interval_s=1.0).start()
        self.kubeconfig = kubeconfig(os.path.join(self.dir, "kubeconfig"), self.api.url,
                                     open(cert, "rb").read(), TOKEN)
        import yaml
        code, obj = self.api.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                                     yaml.safe_load(open("crds/loraplane.io_loraadapters.yaml")))
        assert code == 201, obj
        self.agents = {}  # pod name -> {"port", "admin", "ns"}
        for ns in ("team-a", "team-b"):
            code, obj = self.api.request("POST", "/api/v1/namespaces",
                                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            assert code == 201, obj
        for pod, ns in (("a0", "team-a"), ("a1", "team-a"), ("b0", "team-b"), ("b1", "team-b")):
            self.start_agent(pod, ns)

    def start_agent(self, pod, ns):
        port, admin = free_port(), free_port()
        p = subprocess.Popen([sys.executable, "tests/integration/fake_agent.py", "--port", str(port),
                              "--admin-port", str(admin), "--base-model", BASE],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "ready", f"fake agent for {pod} did not start"
        self.agents[pod] = {"port": port, "admin": admin, "ns": ns}
        self.api.run_pod(pod, namespace=ns, ip="127.0.0.1",
                         labels={"loraplane.io/base-model-hash": BASE_HASH, "app": "loraplane-agent"},
                         annotations={"loraplane.io/base-model": BASE},
                         ports=[{"name": "http", "containerPort": port}, {"name": "admin", "containerPort": admin}])

    def pods_of(self, ns):
        return [p for p, a in self.agents.items() if a["ns"] == ns]

    def loras(self, pod):
        code, body = http("GET", f"http://127.0.0.1:{self.agents[pod]['admin']}/v1/loras")
        assert code == 200, body
        return json.loads(body)["loras"]

    # objects, through the in-process API (no HTTP: not in the request log)
    def create_adapter(self, name, ns, finalizers=None):
        meta = {"name": name, "namespace": ns}
        if finalizers:
            meta["finalizers"] = finalizers
        code, obj = self.api.request("POST", f"{GROUP_PATH}/namespaces/{ns}/loraadapters", {
            "apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter", "metadata": meta,
            "spec": {"modelName": f"{name}-lora", "baseModelName": BASE,
                     "source": {"uri": f"s3://loras/{name}/v1"}}})
        assert code == 201, obj

    def adapter(self, name, ns):
        code, obj = self.api.request("GET", f"{GROUP_PATH}/namespaces/{ns}/loraadapters/{name}")
        return obj if code == 200 else None

    def adapters(self):
        code, obj = self.api.request("GET", f"{GROUP_PATH}/loraadapters")
        assert code == 200, obj
        return sorted((o["metadata"]["namespace"], o["metadata"]["name"]) for o in obj["items"])

    def wait_loaded(self, name, ns):
        """The operator added its finalizer and every agent of ns holds it."""
        def ok():
            a = self.adapter(name, ns)
            st = (a or {}).get("status") or {}
            return (a and FINALIZER in a["metadata"].get("finalizers", []) and
                    st.get("readyEndpoints") == 2 and st.get("totalEndpoints") == 2 and
                    all(f"{name}-lora" in self.loras(p) for p in self.pods_of(ns)))
        wait_for(ok, f"{ns}/{name} loaded on both agents")

    def held_by_agents(self, name, ns):
        return [p for p in self.pods_of(ns) if f"{name}-lora" in self.loras(p)]

    def requests_since(self, seq):
        return self.api.app.request_log(seq)["requests"]

    def seq(self):
        return self.api.app.request_log(10 ** 12)["next"]

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
OP = None


class Operator:
    def __init__(self):
        self.log_path = os.path.join(W.dir, f"operator-{len(procs)}.log")
        self.health_port = free_port()
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [OPERATOR, "--kubeconfig", W.kubeconfig, "--metrics-port", "0", "--health-port", str(self.health_port),
             "--bind-address", "127.0.0.1", "--resync", "3s", "--agent-timeout", "1s", "--retry-max-delay", "2s",
             "--watch-timeout", "3600"], stdout=self.log, stderr=subprocess.STDOUT)
        procs.append(self.proc)
        wait_for(lambda: http("GET", f"http://127.0.0.1:{self.health_port}/readyz")[0] == 200, "operator /readyz")

    def logs(self):
        if not self.log.closed:
            self.log.flush()
        return open(self.log_path).read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def cleanup(*args, kc=None, timeout=120):
    """Runs `loraplane-operator cleanup`: (rc, stdout, stderr, its requests
    to the API)."""
    seq = W.seq()
    watches = W.api.app.stats()["openWatches"]
    p = subprocess.run([OPERATOR, "cleanup", "--kubeconfig", kc or W.kubeconfig, *args], capture_output=True,
                       text=True, timeout=timeout)
    # a watch is logged when the server sees its end (at its next write)
    wait_for(lambda: W.api.app.stats()["openWatches"] <= watches, "cleanup's watch to be closed")
    return p.returncode, p.stdout, p.stderr, W.requests_since(seq)


def adapter_requests(reqs):
    return [r for r in reqs if "/loraadapters" in r["path"]]


def documented_verbs():
    """The verbs docs/operator.md's "Uninstalling" section grants cleanup."""
    text = open("docs/operator.md").read()
    m = re.search(r"^## Uninstalling: loraplane-operator cleanup$(.*?)(?=^## )", text, re.S | re.M)
    assert m, "docs/operator.md has no 'Uninstalling: loraplane-operator cleanup' section"
    row = re.search(r"^\| `loraadapters\.loraplane\.io` \| ([a-z, ]+) \|$", m.group(1), re.M)
    assert row, "the cleanup section has no RBAC row for loraadapters.loraplane.io"
    return {v.strip() for v in row.group(1).split(",")}


def assert_watched_not_polled(reqs, lists=1):
    ar = adapter_requests(reqs)
    n_list = sum(r["verb"] == "list" for r in ar)
    watches = [r for r in ar if r["verb"] == "watch"]
    assert n_list == lists, f"{n_list} lists, expected {lists}: {[(r['verb'], r['path']) for r in ar]}"
    assert watches, "no watch"
    for w in watches:
        assert re.search(r"(^|&)resourceVersion=[1-9]", w["query"]), w


# ---------------------------------------------------------------- tests

def test_bad_usage():
    seq = W.seq()
    for args, msg in ((["--bogus"], "unknown flag '--bogus'"),
                      (["--timeout", "soon"], "invalid duration 'soon' for '--timeout'"),
                      (["--force-timeout=-1s"], "invalid duration '-1s' for '--force-timeout'"),
                      (["--namespace"], "flag '--namespace' needs a value"),
                      (["stray"], "unexpected argument 'stray'")):
        p = subprocess.run([OPERATOR, "cleanup", "--kubeconfig", W.kubeconfig, *args], capture_output=True,
                           text=True, timeout=10)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert f"loraplane-operator cleanup: {msg}" in p.stderr, (args, p.stderr)
    p = subprocess.run([OPERATOR, "cleanup", "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0 and p.stdout.startswith("usage: loraplane-operator cleanup"), p.stdout
    for flag in ("--kubeconfig", "--context", "--namespace", "--timeout", "--force-timeout"):
        assert flag in p.stdout, flag
    p = subprocess.run([OPERATOR, "cleanup", "--kubeconfig", os.path.join(W.dir, "nope")], capture_output=True,
                       text=True, timeout=10)
    assert p.returncode == 1 and "kubeconfig: cannot open" in p.stderr, p.stderr
    assert W.requests_since(seq) == [], "bad usage reached the API"


def test_no_adapters_exits_at_once():
    rc, _, err, reqs = cleanup("--timeout", "300s")
    assert rc == 0, err
    assert "0 LoraAdapter(s) in all namespaces" in err and "no LoraAdapter left" in err, err
    ar = adapter_requests(reqs)
    assert [(r["verb"], r["path"]) for r in ar] == [("list", f"{GROUP_PATH}/loraadapters")], ar


def test_crd_absent():
    api2 = KubeApiServer().start()  # plain HTTP, no token, no CRD
    try:
        kc = kubeconfig(os.path.join(W.dir, "kubeconfig-nocrd"), api2.url)
        p = subprocess.run([OPERATOR, "cleanup", "--kubeconfig", kc], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert "the CRD is not installed" in p.stderr and "nothing to clean up" in p.stderr, p.stderr
        reqs = api2.app.request_log(0)["requests"]
        assert [(r["method"], r["path"], r["code"]) for r in reqs] == [
            ("GET", f"{GROUP_PATH}/loraadapters", 404)], reqs
    finally:
        api2.stop()


def test_namespace_limits_the_scope():
    global OP
    OP = Operator()
    for name, ns in (("sql", "team-a"), ("chat", "team-a"), ("code", "team-b"), ("math", "team-b")):
        W.create_adapter(name, ns)
    for name, ns in (("sql", "team-a"), ("chat", "team-a"), ("code", "team-b"), ("math", "team-b")):
        W.wait_loaded(name, ns)
    rc, _, err, reqs = cleanup("--namespace", "team-a", "--timeout", "60s")
    assert rc == 0, err
    assert W.adapters() == [("team-b", "code"), ("team-b", "math")], W.adapters()
    for name in ("sql", "chat"):
        assert W.held_by_agents(name, "team-a") == [], name  # unloaded by the operator
        assert f"deleted LoraAdapter team-a/{name}; waiting for the operator" in err, err
        assert f"LoraAdapter team-a/{name} is gone" in err, err
    for name in ("code", "math"):
        a = W.adapter(name, "team-b")
        assert "deletionTimestamp" not in a["metadata"], a["metadata"]
        assert W.held_by_agents(name, "team-b") == ["b0", "b1"], name
    assert "namespace 'team-a'" in err and "removing its finalizer" not in err, err
    ar = adapter_requests(reqs)
    mine = [r for r in ar if r["verb"] in ("list", "watch", "delete")]
    for r in mine:
        assert r["path"].startswith(f"{GROUP_PATH}/namespaces/team-a/loraadapters"), r
    assert sorted(r["path"] for r in mine if r["verb"] == "delete") == [
        f"{GROUP_PATH}/namespaces/team-a/loraadapters/chat", f"{GROUP_PATH}/namespaces/team-a/loraadapters/sql"]
    assert_watched_not_polled(reqs)


def test_operator_running_unloads_everything():
    W.create_adapter("sql2", "team-a")
    W.create_adapter("extra", "team-b")
    W.wait_loaded("sql2", "team-a")
    W.wait_loaded("extra", "team-b")
    left = W.adapters()
    assert len(left) == 4, left
    rc, _, err, reqs = cleanup("--timeout", "60s")
    assert rc == 0, err
    assert W.adapters() == [], W.adapters()
    for ns, name in left:
        assert W.held_by_agents(name, ns) == [], (ns, name)
        assert f"LoraAdapter {ns}/{name} is gone" in err, err
    assert "4 LoraAdapter(s) in all namespaces" in err and "(4 deleted, 4 gone)" in err, err
    assert "removing its finalizer" not in err, err
    deletes = [r["path"] for r in adapter_requests(reqs) if r["verb"] == "delete"]
    assert len(deletes) == 4, deletes
    assert_watched_not_polled(reqs)


def test_operator_stopped_finalizers_removed():
    names = (("s1", "team-a"), ("s2", "team-b"), ("s3", "team-b"))
    for name, ns in names:
        W.create_adapter(name, ns)
    for name, ns in names:
        W.wait_loaded(name, ns)
    assert OP.stop() == 0, OP.logs()[-2000:]
    # the first finalizer removal meets a conflict: cleanup re-reads and retries
    W.api.faults.set(status=409, count=1, verbs=["patch"])
    try:
        t0 = time.monotonic()
        rc, _, err, reqs = cleanup("--timeout", "1s")
        took = time.monotonic() - t0
        assert W.api.faults.snapshot()["injected"] == 1
    finally:
        W.api.faults.clear()
    assert rc == 0, err
    assert W.adapters() == [], W.adapters()
    assert "3 LoraAdapter(s) left after 1s" in err, err
    for name, ns in names:
        assert re.search(rf"warn +LoraAdapter {ns}/{name}: the operator did not unload it within 1s; removing its "
                         r"finalizer 'loraplane.io/unload' \(agents may still hold the adapter", err), err
        assert f"LoraAdapter {ns}/{name} is gone" in err, err
        # nobody unloaded it: what the warning says
        assert len(W.held_by_agents(name, ns)) == 2, (name, ns)
    assert "3 finalizers removed without an unload" in err, err
    assert took < 30, f"took {took:.1f}s"
    ar = adapter_requests(reqs)
    used = {r["verb"] for r in ar}
    assert used == documented_verbs() == {"get", "list", "watch", "delete", "patch"}, (used, documented_verbs())
    assert [r["code"] for r in ar if r["verb"] == "patch"].count(409) == 1, ar
    assert sum(r["verb"] == "get" for r in ar) == 1, ar  # one re-read after the conflict
    assert_watched_not_polled(reqs)


def test_interrupted_exits_1():
    W.create_adapter("held", "team-a", finalizers=[FINALIZER])  # nobody runs to release it
    log = os.path.join(W.dir, "interrupted.log")
    with open(log, "w") as f:
        p = subprocess.Popen([OPERATOR, "cleanup", "--kubeconfig", W.kubeconfig, "--timeout", "300s"],
                             stderr=f, stdout=subprocess.DEVNULL)
        procs.append(p)
        wait_for(lambda: "waiting for the operator to unload it" in open(log).read(), "cleanup waiting")
        # an adapter created in scope while it waits is deleted too
        W.create_adapter("late", "team-b")
        wait_for(lambda: "LoraAdapter team-b/late is gone" in open(log).read(), "team-b/late deleted")
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=WAIT_S)
    err = open(log).read()
    assert rc == 1 and "interrupted" in err, (rc, err)
    assert "deleted LoraAdapter team-b/late" in err and W.adapter("late", "team-b") is None, err
    assert "LoraAdapter team-a/held is still there (being deleted" in err, err
    a = W.adapter("held", "team-a")
    assert a and a["metadata"]["finalizers"] == [FINALIZER], a


def test_documented_manual_fix():
    # what docs/operator.md tells a user with a stuck adapter to run
    text = open("docs/operator.md").read()
    m = re.search(r"kubectl patch loraadapter NAME (--type=json -p '(\[.*?\])')", text)
    assert m, "no manual fix in docs/operator.md"
    kc_dir = os.path.join(W.dir, "kubectl-cache")
    p = subprocess.run(["kubectl", "--kubeconfig", W.kubeconfig, "--cache-dir", kc_dir, "patch", "loraadapter",
                        "held", "-n", "team-a", "--type=json", "-p", m.group(2)], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert W.adapter("held", "team-a") is None


def test_timeout_zero_does_not_wait():
    # the operator is still stopped
    W.create_adapter("now", "team-a", finalizers=[FINALIZER])
    rc, _, err, _ = cleanup("--timeout", "0", "--force-timeout", "30s")
    assert rc == 0, err
    assert W.adapter("now", "team-a") is None
    assert "LoraAdapter team-a/now: the operator did not unload it within 0s; removing its finalizer" in err, err


def test_expired_watch_relists():
    # the operator is still stopped; this test releases the adapter itself
    W.create_adapter("slow", "team-b", finalizers=[FINALIZER])
    seq, watches = W.seq(), W.api.app.stats()["openWatches"]
    log = os.path.join(W.dir, "relist.log")
    with open(log, "w") as f:
        p = subprocess.Popen([OPERATOR, "cleanup", "--kubeconfig", W.kubeconfig, "--timeout", "300s"],
                             stderr=f, stdout=subprocess.DEVNULL)
        procs.append(p)
        wait_for(lambda: W.api.app.stats()["openWatches"] > watches, "cleanup's watch")
        W.api.gone_watches()  # an ERROR event with a 410 Status
        wait_for(lambda: sum(r["verb"] == "list" for r in adapter_requests(W.requests_since(seq))) == 2,
                 "a relist after the 410")
        wait_for(lambda: W.api.app.stats()["openWatches"] > watches, "cleanup watching again")
        code, obj = W.api.request("PATCH", f"{GROUP_PATH}/namespaces/team-b/loraadapters/slow",
                                  [{"op": "remove", "path": "/metadata/finalizers"}],
                                  content_type="application/json-patch+json")
        assert code == 200, obj
        rc = p.wait(timeout=WAIT_S)
    wait_for(lambda: W.api.app.stats()["openWatches"] <= watches, "cleanup's watch to be closed")
    err = open(log).read()
    assert rc == 0, err
    assert "watch error 410" in err and "LoraAdapter team-b/slow is gone" in err, err
    assert "removing its finalizer" not in err, err
    ws = [r for r in adapter_requests(W.requests_since(seq)) if r["verb"] == "watch"]
    assert len(ws) == 2 and all("resourceVersion=" in r["query"] for r in ws), ws


def test_api_faults_are_retried():
    global OP
    OP = Operator()
    for name, ns in (("f1", "team-a"), ("f2", "team-b"), ("f3", "team-b")):
        W.create_adapter(name, ns)
    for name, ns in (("f1", "team-a"), ("f2", "team-b"), ("f3", "team-b")):
        W.wait_loaded(name, ns)
    # 500s on cleanup's own requests (the operator sends no list, watch or
    # delete of LoraAdapters meanwhile); the seed puts the three on the
    # list, a delete and the watch
    W.api.faults.set(status=500, count=3, rate=0.5, seed=11, verbs=["list", "watch", "delete"],
                     path_regex="/loraadapters")
    try:
        rc, _, err, reqs = cleanup("--timeout", "60s")
        assert W.api.faults.snapshot()["injected"] == 3
    finally:
        W.api.faults.clear()
    assert rc == 0, err
    assert W.adapters() == [], W.adapters()
    for name, ns in (("f1", "team-a"), ("f2", "team-b"), ("f3", "team-b")):
        assert W.held_by_agents(name, ns) == [], (name, ns)
    failed = [r["verb"] for r in adapter_requests(reqs) if r["code"] == 500]
    assert failed == ["list", "delete", "watch"], failed
    assert err.count("retrying in") == 3, err
    assert "500 InternalError" in err, err
    assert "removing its finalizer" not in err, err


def test_foreign_finalizer_is_reported():
    W.create_adapter("kept", "team-b", finalizers=["example.com/keep"])
    W.wait_loaded("kept", "team-b")
    # the operator lets go of it at once: cleanup stops waiting for the
    # operator then (not after --timeout), and for --force-timeout more
    t0 = time.monotonic()
    rc, _, err, reqs = cleanup("--timeout", "300s", "--force-timeout", "1s")
    assert rc == 1, err
    assert time.monotonic() - t0 < 60, "waited for the operator after it had let go"
    assert "1 LoraAdapter(s) left, released by the operator but held by other finalizers" in err, err
    assert re.search(r'LoraAdapter team-b/kept is still there \(being deleted, finalizers \["example.com/keep"\]\)',
                     err), err
    assert "1 LoraAdapter(s) still there after --force-timeout 1s" in err, err
    assert "removing its finalizer" not in err, err
    # the operator had unloaded it and let go of its own finalizer
    assert W.held_by_agents("kept", "team-b") == []
    code, obj = W.api.request("PATCH", f"{GROUP_PATH}/namespaces/team-b/loraadapters/kept",
                              [{"op": "remove", "path": "/metadata/finalizers"}],
                              content_type="application/json-patch+json")
    assert code == 200 and W.adapter("kept", "team-b") is None, obj


def test_api_unreachable_exits_1():
    W.api.go_down()
    try:
        rc, _, err, _ = cleanup("--timeout", "1s", "--force-timeout", "1s")
    finally:
        W.api.come_up()
    assert rc == 1, err
    assert "warn  list LoraAdapters:" in err and "retrying in" in err, err
    assert re.search(r"error cannot list LoraAdapters: GET /apis/loraplane.io/v1alpha1/loraadapters\?limit=500: "
                     r".*(connect|refused)", err), err


def main():
    global W
    if not os.path.exists(OPERATOR):
        print(f"FAIL {PROG}:setup: {OPERATOR} not built", flush=True)
        return 1
    W = World()
    try:
        for t in (test_bad_usage, test_no_adapters_exits_at_once, test_crd_absent, test_namespace_limits_the_scope,
                  test_operator_running_unloads_everything, test_operator_stopped_finalizers_removed,
                  test_interrupted_exits_1, test_documented_manual_fix, test_timeout_zero_does_not_wait,
                  test_expired_watch_relists, test_api_faults_are_retried,
                  test_foreign_finalizer_is_reported, test_api_unreachable_exits_1):
            test(t)
    finally:
        if OP and OP.proc.poll() is None:
            OP.stop()
        if failures and OP:
            sys.stderr.write("---- operator log (tail) ----\n" + OP.logs()[-4000:])
        W.stop()
        if not failures:
            shutil.rmtree(W.dir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
