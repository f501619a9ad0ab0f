#!/usr/bin/env python3
"""The Kubernetes API test server (tests/kube/apiserver.py) against real
clients: kubectl over TLS with a bearer token and with a client certificate
(certificates made here with openssl), and plain HTTP requests that check the
API's rules one by one (409, 410, generation, status subresource,
finalizers, selectors, pagination, watch, patches, Leases, Events,
EndpointSlices, Tables) and the fault injection the operator tests use.
Prints one PASS/FAIL line per test (counted by tests/run.sh)."""

import http.client
import json
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))

import apiserver  # noqa: E402
import harness as H  # noqa: E402
import yaml  # noqa: E402

CRD = "crds/loraplane.io_loraadapters.yaml"
SAMPLE = "tests/kube/sample-loraadapter.yaml"
TOKEN = "t0ken-for-tests"
LORA = "/apis/loraplane.io/v1alpha1"
TMP = tempfile.mkdtemp(prefix="kube-apiserver-test-")
# Hang guard for waits on the server's threads: far longer than anything
# takes even on a loaded machine; reaching it is a failure.
WAIT_S = 60


def wait_until(pred, what, timeout=WAIT_S):
    """Polls pred() until it is true; fails naming what it waited for."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------ setup

def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certs():
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    p = lambda n: os.path.join(TMP, n)  # noqa: E731
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", p("ca.key"), "-out", p("ca.crt"),
            "-days", "2", "-subj", "/CN=loraplane-test-ca")
    with open(p("san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p("server.key"), "-out", p("server.csr"),
            "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", p("server.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"),
            "-CAcreateserial", "-out", p("server.crt"), "-days", "2", "-extfile", p("san.ext"))
    with open(p("client.ext"), "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", p("client.key"), "-out", p("client.csr"),
            "-subj", "/CN=operator-test/O=loraplane")
    openssl("x509", "-req", "-in", p("client.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"),
            "-CAcreateserial", "-out", p("client.crt"), "-days", "2", "-extfile", p("client.ext"))


def write_kubeconfig(name, server, user):
    path = os.path.join(TMP, name)
    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
           "clusters": [{"name": "test", "cluster": {"server": server,
                                                     "certificate-authority": os.path.join(TMP, "ca.crt")}}],
           "users": [{"name": "test", "user": user}],
           "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "default"}}]}
    with open(path, "w") as f:
        json.dump(cfg, f)  # JSON is YAML: kubectl reads it
    return path


for tool in ("kubectl", "openssl"):
    if shutil.which(tool) is None:
        print(f"FAIL test-kube-apiserver:setup: '{tool}' is not installed (make deps)", flush=True)
        sys.exit(1)
make_certs()
TLS = apiserver.KubeApiServer(token=TOKEN, tls_cert=os.path.join(TMP, "server.crt"),
                              tls_key=os.path.join(TMP, "server.key"), client_ca=os.path.join(TMP, "ca.crt")).start()
PLAIN = apiserver.KubeApiServer(bookmark_interval_s=0.3).start()
KCFG = write_kubeconfig("kubeconfig", TLS.url, {"token": TOKEN})
KCFG_CERT = write_kubeconfig("kubeconfig-cert", TLS.url, {"client-certificate": os.path.join(TMP, "client.crt"),
                                                          "client-key": os.path.join(TMP, "client.key")})
KCFG_BAD = write_kubeconfig("kubeconfig-bad", TLS.url, {"token": "wrong"})
CACHE = os.path.join(TMP, "kube-cache")


def kubectl(*args, stdin=None, config=KCFG, check=True, timeout=30):
    p = subprocess.run(["kubectl", "--kubeconfig", config, "--cache-dir", CACHE, *args], capture_output=True,
                       text=True, input=stdin, timeout=timeout)
    if check:
        assert p.returncode == 0, f"kubectl {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}"
    return p


def sample(changes):
    """The sample LoraAdapter with text replacements applied."""
    text = open(SAMPLE).read()
    for old, new in changes.items():
        assert old in text, f"no '{old}' in the sample"
        text = text.replace(old, new)
    return text


class Http:
    """Plain HTTP client for one server; returns (code, parsed body, headers)."""

    def __init__(self, srv, token=None):
        self.srv = srv
        self.token = token

    def conn(self, timeout=10):
        if self.srv.scheme == "https":
            ctx = ssl.create_default_context(cafile=os.path.join(TMP, "ca.crt"))
            return http.client.HTTPSConnection("127.0.0.1", self.srv.port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=timeout)

    def call(self, method, path, body=None, ctype=None, accept="application/json", headers=None):
        ctype = ctype or ("application/merge-patch+json" if method == "PATCH" else "application/json")
        c = self.conn()
        h = {"Accept": accept}
        if body is not None:
            h["Content-Type"] = ctype
            body = body if isinstance(body, (bytes, str)) else json.dumps(body)
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        h.update(headers or {})
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            data = r.read()
            try:
                obj = json.loads(data) if data else None
            except ValueError:
                obj = data.decode(errors="replace")
            return r.status, obj, r
        finally:
            c.close()

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.call("POST", path, body, **kw)

    def put(self, path, body, **kw):
        return self.call("PUT", path, body, **kw)

    def patch(self, path, body, ctype="application/merge-patch+json", **kw):
        return self.call("PATCH", path, body, ctype=ctype, **kw)

    def delete(self, path, body=None, **kw):
        return self.call("DELETE", path, body, **kw)

    def ok(self, method, path, body=None, want=(200, 201), **kw):
        code, obj, _ = self.call(method, path, body, **kw)
        assert code in want, f"{method} {path}: HTTP {code}: {obj}"
        return obj

    def watch(self, path, timeout=10):
        """Opens a watch; returns (response, connection); read with events()."""
        c = self.conn(timeout=timeout)
        h = {"Accept": "application/json"}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        c.request("GET", path, headers=h)
        return c.getresponse(), c


def events(resp, n=None, until=None):
    """Reads watch events (one JSON per line) until n, a predicate, or the end."""
    out = []
    while True:
        line = resp.readline()
        if not line:
            return out
        ev = json.loads(line)
        out.append(ev)
        if (n is not None and len(out) >= n) or (until is not None and until(ev)):
            return out


API = Http(PLAIN)


def lora(name, ns="default", base="base/model", uri="s3://b/a", **spec):
    s = {"baseModelName": base, "source": {"uri": uri}}
    s.update(spec)
    return {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter", "metadata": {"name": name, "namespace": ns},
            "spec": s}


def cm(name, ns="default", labels=None, data=None):
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "data": data or {}}


def load_crd_plain():
    """The CRD on the plain server, through kubectl over plain HTTP (no token)."""
    cfg = os.path.join(TMP, "kubeconfig-plain")
    with open(cfg, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "p",
                   "clusters": [{"name": "p", "cluster": {"server": PLAIN.url}}],
                   "users": [{"name": "p", "user": {}}],
                   "contexts": [{"name": "p", "context": {"cluster": "p", "user": "p"}}]}, f)
    kubectl("apply", "-f", CRD, config=cfg)


load_crd_plain()


# ------------------------------------------------------------ kubectl

@H.test
def kubectl_version_and_discovery():
    p = kubectl("version", "-o", "json")
    v = json.loads(p.stdout)
    assert v["serverVersion"]["gitVersion"] == "v1.32.4", v
    p = kubectl("api-resources", "--api-group=coordination.k8s.io")
    assert "leases" in p.stdout, p.stdout


@H.test
def kubectl_rejects_bad_token():
    p = kubectl("get", "namespaces", config=KCFG_BAD, check=False)
    assert p.returncode != 0, "a wrong token was accepted"
    assert "Unauthorized" in p.stderr or "credentials" in p.stderr, p.stderr
    code, body, _ = Http(TLS, token="wrong").get("/api/v1/namespaces")
    assert code == 401 and body["reason"] == "Unauthorized" and body["kind"] == "Status", (code, body)
    code, _, _ = Http(TLS, token=TOKEN).get("/api/v1/namespaces")
    assert code == 200, code


@H.test
def kubectl_client_certificate():
    p = kubectl("get", "namespace", "default", "-o", "name", config=KCFG_CERT)
    assert p.stdout.strip() == "namespace/default", p.stdout


@H.test
def kubectl_apply_crd_and_wait_established():
    kubectl("apply", "-f", CRD)
    kubectl("wait", "--for", "condition=established", "crd/loraadapters.loraplane.io", "--timeout=10s")
    p = kubectl("api-resources", "--api-group=loraplane.io", "-o", "wide")
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("loraadapters")]
    assert line and "lora,loras" in line[0] and "LoraAdapter" in line[0], p.stdout


@H.test
def kubectl_apply_sample_and_get_columns():
    kubectl("create", "namespace", "team-a")  # a protobuf body, as kubectl sends it
    p = kubectl("apply", "-f", SAMPLE)
    assert "loraadapter.loraplane.io/sql created" in p.stdout, p.stdout
    out = kubectl("get", "loraadapters", "-n", "team-a").stdout.splitlines()
    assert out[0].split() == ["NAME", "BASE", "TOTAL", "READY", "MODEL", "REASON", "AGE"], out
    # no status yet: TOTAL, READY, MODEL (status.modelName) and REASON are empty
    assert out[1].split()[:2] == ["sql", "meta-llama/Llama-3.2-3B-Instruct"] and \
        len(out[1].split()) == 3, out


@H.test
def kubectl_short_names():
    for name in ("lora", "loras", "loraadapter"):
        out = kubectl("get", name, "-A").stdout.splitlines()
        assert out[0].split()[:2] == ["NAMESPACE", "NAME"] and out[1].split()[:2] == ["team-a", "sql"], (name, out)


@H.test
def kubectl_get_json_has_defaults():
    items = json.loads(kubectl("get", "loraadapters", "-n", "team-a", "-o", "json").stdout)["items"]
    assert len(items) == 1, items
    o = items[0]
    assert o["kind"] == "LoraAdapter" and o["metadata"]["generation"] == 1, o
    assert o["spec"]["modelType"] == "lora" and o["spec"]["service"] == {"enabled": True}, o["spec"]
    assert "status" not in o, "status set on create"


@H.test
def kubectl_describe_shows_spec_and_events():
    h = Http(TLS, TOKEN)
    uid = h.ok("GET", f"{LORA}/namespaces/team-a/loraadapters/sql")["metadata"]["uid"]
    ev = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "sql.1", "namespace": "team-a"},
          "involvedObject": {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter", "name": "sql",
                             "namespace": "team-a", "uid": uid},
          "reason": "Loaded", "message": "adapter loaded on 2 of 2 pods", "type": "Normal",
          "source": {"component": "loraplane-operator"}, "count": 1,
          "firstTimestamp": "2025-01-01T00:00:00Z", "lastTimestamp": "2025-01-01T00:00:00Z"}
    h.ok("POST", "/api/v1/namespaces/team-a/events", ev)
    out = kubectl("describe", "loraadapter", "sql", "-n", "team-a").stdout
    assert "Base Model Name:  meta-llama/Llama-3.2-3B-Instruct" in out, out
    assert "Loaded" in out and "adapter loaded on 2 of 2 pods" in out, out


@H.test
def kubectl_status_subresource_shows_in_columns():
    st = {"status": {"observedGeneration": 1, "modelName": "sql-lora", "totalEndpoints": 4,
                     "readyEndpoints": 3,
                     "conditions": [{"type": "Ready", "status": "False", "reason": "PartiallyReady",
                                     "lastTransitionTime": "2025-01-01T00:00:00Z"}]}}
    kubectl("patch", "lora", "sql", "-n", "team-a", "--subresource=status", "--type=merge", "-p", json.dumps(st))
    row = kubectl("get", "lora", "sql", "-n", "team-a", "--no-headers").stdout.split()
    assert row[2:6] == ["4", "3", "sql-lora", "PartiallyReady"], row
    # REASON is the Ready condition's, wherever it is in the list
    st = {"status": {"conditions": [
        {"type": "Progressing", "status": "True", "reason": "Loading", "lastTransitionTime": "2025-01-01T00:00:00Z"},
        {"type": "Ready", "status": "False", "reason": "LoadFailed", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}}
    kubectl("patch", "lora", "sql", "-n", "team-a", "--subresource=status", "--type=merge", "-p", json.dumps(st))
    row = kubectl("get", "lora", "sql", "-n", "team-a", "--no-headers").stdout.split()
    assert row[2:6] == ["4", "3", "sql-lora", "LoadFailed"], row
    # the main resource ignores status
    kubectl("patch", "lora", "sql", "-n", "team-a", "--type=merge", "-p", '{"status":{"totalEndpoints":9}}')
    row = kubectl("get", "lora", "sql", "-n", "team-a", "--no-headers").stdout.split()
    assert row[2:4] == ["4", "3"], row
    bad = kubectl("patch", "lora", "sql", "-n", "team-a", "--subresource=status", "--type=merge", "-p",
                  '{"status":{"readyEndpoints":"three"}}', check=False)
    assert bad.returncode != 0 and "must be of type integer" in bad.stderr, bad.stderr


@H.test
def kubectl_explain_describes_every_field():
    """Every field of the CRD's schema has a description, so kubectl
    explain shows one at every level (spec, status and below)."""
    crd = yaml.safe_load(open(CRD))
    missing = []

    def walk(node, path):
        if path and not node.get("description"):
            missing.append(path)
        for k, v in (node.get("properties") or {}).items():
            if path or k != "metadata":  # the API server supplies ObjectMeta's
                walk(v, f"{path}.{k}" if path else k)
        for k, v in ((node.get("items") or {}).get("properties") or {}).items():
            walk(v, f"{path}[].{k}")

    for v in crd["spec"]["versions"]:
        walk(v["schema"]["openAPIV3Schema"], "")
    assert not missing, f"fields without a description: {missing}"
    for field in ("spec", "status", "spec.source", "spec.service", "status.endpoints", "status.conditions"):
        out = kubectl("explain", f"loraadapter.{field}").stdout
        desc = out.split("DESCRIPTION:", 1)[1].split("FIELDS:", 1)[0].strip()
        assert desc and "<no description>" not in out, (field, out)


@H.test
def kubectl_rejects_immutable_changes():
    p = kubectl("apply", "-f", "-", stdin=sample({"meta-llama/Llama-3.2-3B-Instruct": "other/base"}), check=False)
    assert p.returncode != 0 and "baseModelName is immutable" in p.stderr, p.stderr
    p = kubectl("apply", "-f", "-", stdin=sample({"modelType: lora": "modelType: adapter"}), check=False)
    assert p.returncode != 0 and "modelType is immutable" in p.stderr, p.stderr
    p = kubectl("apply", "-f", "-", stdin=sample({"s3://loras/sql/v3": "s3://loras/sql/v4"}))
    assert "configured" in p.stdout, p.stdout
    o = json.loads(kubectl("get", "lora", "sql", "-n", "team-a", "-o", "json").stdout)
    assert o["metadata"]["generation"] == 2 and o["spec"]["source"]["uri"] == "s3://loras/sql/v4", o


@H.test
def kubectl_schema_rejects_invalid():
    cases = [({"name: sql": "name: bad1", "enabled: true": "enabled: \"yes\""},
              "spec.service.enabled in body must be of type boolean"),
             ({"name: sql": "name: bad2", "s3://loras/sql/v3": "ftp://host/x"},
              "spec.source.uri in body should match '^(file|s3|hf|https)://.+'"),
             ({"name: sql": "name: bad3", "baseModelName: meta-llama/Llama-3.2-3B-Instruct": "baseModelName: \"\""},
              "spec.baseModelName in body should be at least 1 chars long"),
             ({"name: sql": "name: bad4", "modelType: lora": "modelType: qlora"},
              "Unsupported value: \"qlora\": supported values: \"lora\", \"adapter\""),
             ({"name: sql": "name: bad5", "    sha256: 9f86d0": "    sha256: XYZ9f86d0"},
              "spec.source.sha256 in body should match"),
             ({"name: sql": "name: bad6", "  baseModelName: meta-llama/Llama-3.2-3B-Instruct\n": ""},
              "spec.baseModelName: Required value"),
             ({"name: sql": "name: bad7", "  modelType: lora": "  modelType: lora\n  replicas: 3"},
              "unknown field \"spec.replicas\"")]
    for changes, want in cases:
        p = kubectl("apply", "-f", "-", stdin=sample(changes), check=False)
        assert p.returncode != 0 and want in p.stderr, f"want '{want}', got: {p.stderr.strip()}"
    names = kubectl("get", "lora", "-n", "team-a", "-o", "name").stdout.split()
    assert names == ["loraadapter.loraplane.io/sql"], names


@H.test
def kubectl_server_side_apply_and_diff():
    text = sample({"name: sql": "name: ssa"})
    p = kubectl("apply", "--server-side", "-f", "-", stdin=text)
    assert "serverside-applied" in p.stdout, p.stdout
    changed = text.replace("s3://loras/sql/v3", "s3://loras/sql/v9")
    p = kubectl("diff", "-f", "-", stdin=changed, check=False)
    assert p.returncode == 1 and "s3://loras/sql/v9" in p.stdout, (p.returncode, p.stdout, p.stderr)
    assert "s3://loras/sql/v3" in kubectl("get", "lora", "ssa", "-n", "team-a", "-o", "yaml").stdout, "diff wrote"
    p = kubectl("apply", "--server-side", "--field-manager=other", "-f", "-", stdin=changed, check=False)
    assert p.returncode != 0 and "conflict" in p.stderr.lower(), p.stderr
    kubectl("apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", "-", stdin=changed)
    o = json.loads(kubectl("get", "lora", "ssa", "-n", "team-a", "-o", "json").stdout)
    assert o["spec"]["source"]["uri"] == "s3://loras/sql/v9", o["spec"]


@H.test
def kubectl_get_watch():
    proc = subprocess.Popen(["kubectl", "--kubeconfig", KCFG, "--cache-dir", CACHE, "get", "lora", "-n", "team-a",
                             "-w", "--output-watch-events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not lines and time.monotonic() < deadline:  # the initial list is out: the watch follows it
            time.sleep(0.05)
        kubectl("label", "lora", "sql", "-n", "team-a", "watched=yes")
        while time.monotonic() < deadline and not any(ln.split()[:2] == ["MODIFIED", "sql"] for ln in lines):
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=5)
    assert lines and lines[0].split()[:3] == ["EVENT", "NAME", "BASE"], lines
    assert any(ln.split()[:2] == ["MODIFIED", "sql"] for ln in lines), lines


@H.test
def kubectl_delete_with_finalizer():
    kubectl("patch", "lora", "ssa", "-n", "team-a", "--type=json", "-p",
            '[{"op":"add","path":"/metadata/finalizers","value":["loraplane.io/unload"]}]')
    kubectl("delete", "lora", "ssa", "-n", "team-a", "--wait=false")
    o = json.loads(kubectl("get", "lora", "ssa", "-n", "team-a", "-o", "json").stdout)
    assert o["metadata"].get("deletionTimestamp"), "no deletionTimestamp while the finalizer is there"
    kubectl("patch", "lora", "ssa", "-n", "team-a", "--type=json", "-p",
            '[{"op":"test","path":"/metadata/finalizers","value":["loraplane.io/unload"]},'
            '{"op":"remove","path":"/metadata/finalizers"}]')
    p = kubectl("get", "lora", "ssa", "-n", "team-a", check=False)
    assert p.returncode != 0 and "NotFound" in p.stderr, p.stderr
    p = kubectl("delete", "-f", SAMPLE)
    assert "deleted" in p.stdout, p.stdout
    p = kubectl("get", "lora", "-n", "team-a")
    assert "No resources found" in p.stderr, (p.stdout, p.stderr)


@H.test
def kubectl_delete_crd_removes_resources():
    kubectl("apply", "-f", SAMPLE)
    kubectl("delete", "crd", "loraadapters.loraplane.io", "--timeout=10s")
    p = kubectl("get", "loraadapters", "-A", check=False)
    assert p.returncode != 0 and ("the server doesn't have a resource type" in p.stderr or
                                  "the server could not find the requested resource" in p.stderr), p.stderr
    code, _, _ = Http(TLS, TOKEN).get(f"{LORA}/namespaces/team-a/loraadapters")
    assert code == 404, code


# ------------------------------------------------------------ HTTP rules

@H.test
def create_sets_server_fields():
    o = API.ok("POST", f"{LORA}/namespaces/default/loraadapters", lora("c1"))
    m = o["metadata"]
    assert m["uid"] and m["creationTimestamp"].endswith("Z") and int(m["resourceVersion"]) > 0, m
    assert m["generation"] == 1 and o["spec"]["modelType"] == "lora", o
    g = API.ok("POST", "/api/v1/namespaces/default/configmaps",
             {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "gen-"}})
    assert g["metadata"]["name"].startswith("gen-") and len(g["metadata"]["name"]) == 9, g["metadata"]
    code, st, _ = API.post(f"{LORA}/namespaces/default/loraadapters", lora("c1"))
    assert code == 409 and st["reason"] == "AlreadyExists", st
    assert st["message"] == 'loraadapters.loraplane.io "c1" already exists', st["message"]
    assert st["details"] == {"name": "c1", "group": "loraplane.io", "kind": "loraadapters"}, st["details"]
    code, st, _ = API.get(f"{LORA}/namespaces/default/loraadapters/nope")
    assert code == 404 and st == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "message": 'loraadapters.loraplane.io "nope" not found', "reason": "NotFound",
                                  "details": {"name": "nope", "group": "loraplane.io", "kind": "loraadapters"},
                                  "code": 404}, st
    code, st, _ = API.post("/api/v1/namespaces/missing/configmaps", cm("x", ns="missing"))
    assert code == 404 and st["message"] == 'namespaces "missing" not found', st
    code, st, _ = API.post(f"{LORA}/namespaces/default/loraadapters", dict(lora("c2"), metadata={"name": "c2", "resourceVersion": "5"}))
    assert code == 400, (code, st)


@H.test
def stale_update_gets_409():
    o = API.ok("GET", f"{LORA}/namespaces/default/loraadapters/c1")
    o1 = json.loads(json.dumps(o))
    o1["spec"]["source"]["uri"] = "s3://b/v2"
    API.ok("PUT", f"{LORA}/namespaces/default/loraadapters/c1", o1)
    o["spec"]["source"]["uri"] = "s3://b/v3"
    code, st, _ = API.put(f"{LORA}/namespaces/default/loraadapters/c1", o)
    assert code == 409 and st["reason"] == "Conflict", st
    assert "the object has been modified; please apply your changes to the latest version" in st["message"], st
    del o["metadata"]["resourceVersion"]
    code, st, _ = API.put(f"{LORA}/namespaces/default/loraadapters/c1", o)
    assert code == 422 and "must be specified for an update" in st["message"], st
    # a built-in kind allows an unconditional update
    API.ok("POST", "/api/v1/namespaces/default/configmaps", cm("u1"))
    API.ok("PUT", "/api/v1/namespaces/default/configmaps/u1", cm("u1", data={"a": "b"}))


@H.test
def generation_bumps_on_spec_only():
    p = f"{LORA}/namespaces/default/loraadapters/c1"
    g0 = API.ok("GET", p)["metadata"]["generation"]
    o = API.ok("PATCH", p, {"metadata": {"labels": {"x": "y"}}}, ctype="application/merge-patch+json")
    assert o["metadata"]["generation"] == g0, "label change bumped generation"
    o = API.ok("PATCH", p + "/status", {"status": {"totalEndpoints": 1}}, ctype="application/merge-patch+json")
    assert o["metadata"]["generation"] == g0 and o["status"]["totalEndpoints"] == 1, o
    rv = o["metadata"]["resourceVersion"]
    o = API.ok("PATCH", p, {"spec": {"source": {"uri": "s3://b/v5"}}}, ctype="application/merge-patch+json")
    assert o["metadata"]["generation"] == g0 + 1 and int(o["metadata"]["resourceVersion"]) > int(rv), o["metadata"]
    same = API.ok("PATCH", p, {"spec": {"source": {"uri": "s3://b/v5"}}}, ctype="application/merge-patch+json")
    assert same["metadata"]["resourceVersion"] == o["metadata"]["resourceVersion"], "a no-op patch wrote"


@H.test
def status_subresource_semantics():
    p = f"{LORA}/namespaces/default/loraadapters/c1"
    o = API.ok("GET", p)
    o["spec"]["source"]["uri"] = "s3://changed/by-status"
    o["status"] = {"totalEndpoints": 2, "readyEndpoints": 2}
    s = API.ok("PUT", p + "/status", o)
    assert s["status"]["readyEndpoints"] == 2 and s["spec"]["source"]["uri"] != "s3://changed/by-status", s
    s["status"] = {"totalEndpoints": 7}
    s["spec"]["source"]["uri"] = "s3://b/v6"
    m = API.ok("PUT", p, s)
    assert m["status"] == {"totalEndpoints": 2, "readyEndpoints": 2} and m["spec"]["source"]["uri"] == "s3://b/v6", m
    got = API.ok("GET", p + "/status")
    assert got["status"]["totalEndpoints"] == 2, got
    code, st, _ = API.call("POST", p + "/status", {})
    assert code == 405, (code, st)


@H.test
def finalizers_and_deletion_timestamp():
    API.ok("POST", f"{LORA}/namespaces/default/loraadapters",
         dict(lora("fin"), metadata={"name": "fin", "namespace": "default", "finalizers": ["loraplane.io/unload"]}))
    start = API.ok("GET", f"{LORA}/namespaces/default/loraadapters/fin")["metadata"]["resourceVersion"]
    resp, c = API.watch(f"{LORA}/namespaces/default/loraadapters?watch=1&resourceVersion={start}&fieldSelector=metadata.name%3Dfin&timeoutSeconds=5")
    d = API.ok("DELETE", f"{LORA}/namespaces/default/loraadapters/fin")
    assert d["metadata"]["deletionTimestamp"] and d["metadata"]["generation"] == 2, d["metadata"]
    again = API.ok("DELETE", f"{LORA}/namespaces/default/loraadapters/fin")
    assert again["metadata"]["resourceVersion"] == d["metadata"]["resourceVersion"], "second delete wrote"
    code, st, _ = API.patch(f"{LORA}/namespaces/default/loraadapters/fin",
                          {"metadata": {"finalizers": ["loraplane.io/unload", "other.io/x"]}})
    assert code == 422 and "no new finalizers can be added" in st["message"], st
    API.ok("PATCH", f"{LORA}/namespaces/default/loraadapters/fin",
         [{"op": "test", "path": "/metadata/finalizers/0", "value": "loraplane.io/unload"},
          {"op": "remove", "path": "/metadata/finalizers/0"}], ctype="application/json-patch+json")
    evs = events(resp, n=2)
    c.close()
    assert [e["type"] for e in evs] == ["MODIFIED", "DELETED"], evs
    assert evs[0]["object"]["metadata"]["deletionTimestamp"], evs[0]
    code, _, _ = API.get(f"{LORA}/namespaces/default/loraadapters/fin")
    assert code == 404, code


@H.test
def label_selectors():
    for i, labels in enumerate([{"app": "a", "tier": "web"}, {"app": "a", "tier": "db"}, {"app": "b"}, {}]):
        API.ok("POST", "/api/v1/namespaces/default/configmaps", cm(f"sel-{i}", labels=labels))

    def names(sel):
        q = urllib.parse.urlencode({"labelSelector": sel})
        items = API.ok("GET", f"/api/v1/namespaces/default/configmaps?{q}")["items"]
        return sorted(o["metadata"]["name"] for o in items if o["metadata"]["name"].startswith("sel-"))

    assert names("app=a") == ["sel-0", "sel-1"], names("app=a")
    assert names("app==a,tier!=db") == ["sel-0"], names("app==a,tier!=db")
    assert names("app!=a") == ["sel-2", "sel-3"], names("app!=a")
    assert names("tier in (web, db)") == ["sel-0", "sel-1"], names("tier in (web, db)")
    assert names("app notin (a)") == ["sel-2", "sel-3"], names("app notin (a)")
    assert names("tier") == ["sel-0", "sel-1"], names("tier")
    assert names("!app") == ["sel-3"], names("!app")
    code, st, _ = API.get("/api/v1/namespaces/default/configmaps?labelSelector=" + urllib.parse.quote("app in (a"))
    assert code == 400 and st["reason"] == "BadRequest", st


@H.test
def field_selectors():
    items = API.ok("GET", "/api/v1/configmaps?fieldSelector=metadata.name%3Dsel-1")["items"]
    assert [o["metadata"]["name"] for o in items] == ["sel-1"], items
    items = API.ok("GET", "/api/v1/namespaces?fieldSelector=metadata.name!%3Ddefault")["items"]
    assert "default" not in [o["metadata"]["name"] for o in items], items
    code, st, _ = API.get(f"{LORA}/loraadapters?fieldSelector=spec.baseModelName%3Dx")
    assert code == 400 and "spec.baseModelName" in st["message"], st
    PLAIN.run_pod("fs-run", ip="10.1.0.1")
    PLAIN.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "fs-pend", "namespace": "default"},
                  "spec": {"containers": [{"name": "c", "image": "x"}]}})
    items = API.ok("GET", "/api/v1/namespaces/default/pods?fieldSelector=status.phase%3DRunning")["items"]
    assert [o["metadata"]["name"] for o in items] == ["fs-run"], items


@H.test
def pagination_is_a_consistent_snapshot():
    API.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "pages"}})
    for i in range(5):
        API.ok("POST", "/api/v1/namespaces/pages/configmaps", cm(f"p{i}", ns="pages"))
    first = API.ok("GET", "/api/v1/namespaces/pages/configmaps?limit=2")
    rv = first["metadata"]["resourceVersion"]
    assert [o["metadata"]["name"] for o in first["items"]] == ["p0", "p1"], first
    assert first["metadata"]["remainingItemCount"] == 3 and first["metadata"]["continue"], first["metadata"]
    # changes between pages do not show up in the rest of the list
    API.ok("DELETE", "/api/v1/namespaces/pages/configmaps/p3")
    API.ok("POST", "/api/v1/namespaces/pages/configmaps", cm("p9", ns="pages"))
    API.ok("PUT", "/api/v1/namespaces/pages/configmaps/p4", cm("p4", ns="pages", data={"changed": "yes"}))
    seen, token = [], first["metadata"]["continue"]
    while token:
        page = API.ok("GET", "/api/v1/namespaces/pages/configmaps?limit=2&continue=" + urllib.parse.quote(token))
        assert page["metadata"]["resourceVersion"] == rv, page["metadata"]
        seen += page["items"]
        token = page["metadata"].get("continue")
    assert [o["metadata"]["name"] for o in seen] == ["p2", "p3", "p4"], [o["metadata"]["name"] for o in seen]
    assert "data" not in seen[2] or seen[2]["data"] == {}, seen[2]
    now = API.ok("GET", "/api/v1/namespaces/pages/configmaps")
    assert [o["metadata"]["name"] for o in now["items"]] == ["p0", "p1", "p2", "p4", "p9"], now
    exact = API.ok("GET", f"/api/v1/namespaces/pages/configmaps?resourceVersion={rv}&resourceVersionMatch=Exact")
    assert len(exact["items"]) == 5, exact
    code, st, _ = API.get("/api/v1/namespaces/pages/configmaps?continue=" + urllib.parse.quote(first["metadata"]["continue"]) + "&resourceVersion=1")
    assert code == 422, (code, st)


@H.test
def watch_initial_events_and_selector_transitions():
    API.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "w1"}})
    API.ok("POST", "/api/v1/namespaces/w1/configmaps", cm("a", ns="w1", labels={"team": "x"}))
    resp, c = API.watch("/api/v1/namespaces/w1/configmaps?watch=true&labelSelector=team%3Dx&timeoutSeconds=5")
    first = events(resp, n=1)
    assert first[0]["type"] == "ADDED" and first[0]["object"]["metadata"]["name"] == "a", first
    assert first[0]["object"]["kind"] == "ConfigMap", first
    API.ok("PATCH", "/api/v1/namespaces/w1/configmaps/a", {"metadata": {"labels": {"team": "y"}}})
    API.ok("POST", "/api/v1/namespaces/w1/configmaps", cm("b", ns="w1", labels={"team": "x"}))
    API.ok("PATCH", "/api/v1/namespaces/w1/configmaps/a", {"metadata": {"labels": {"team": "x"}}})
    API.ok("DELETE", "/api/v1/namespaces/w1/configmaps/b")
    evs = events(resp, n=4)
    c.close()
    got = [(e["type"], e["object"]["metadata"]["name"]) for e in evs]
    assert got == [("DELETED", "a"), ("ADDED", "b"), ("ADDED", "a"), ("DELETED", "b")], got
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in evs]
    assert rvs == sorted(rvs) and len(set(rvs)) == 4, rvs


@H.test
def watch_from_version_bookmarks_and_timeout():
    rv = API.ok("GET", "/api/v1/namespaces/w1/configmaps")["metadata"]["resourceVersion"]
    API.ok("POST", "/api/v1/namespaces/w1/configmaps", cm("c", ns="w1"))
    t0 = time.monotonic()
    resp, c = API.watch(f"/api/v1/namespaces/w1/configmaps?watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1")
    evs = events(resp)  # until the server ends the stream
    took = time.monotonic() - t0
    c.close()
    assert evs[0]["type"] == "ADDED" and evs[0]["object"]["metadata"]["name"] == "c", evs
    marks = [e for e in evs if e["type"] == "BOOKMARK"]
    assert len(marks) >= 2, f"expected periodic and final bookmarks, got {evs}"
    assert evs[-1]["type"] == "BOOKMARK" and marks[-1]["object"]["kind"] == "ConfigMap", evs[-1]
    assert int(marks[-1]["object"]["metadata"]["resourceVersion"]) >= int(evs[0]["object"]["metadata"]["resourceVersion"])
    assert took >= 0.9, f"watch with timeoutSeconds=1 ended after {took:.2f}s"  # and it did end
    resp, c = API.watch("/api/v1/namespaces/w1/configmaps?watch=1&sendInitialEvents=true&allowWatchBookmarks=true"
                      "&resourceVersionMatch=NotOlderThan&resourceVersion=&timeoutSeconds=1")
    evs = events(resp, until=lambda e: e["type"] == "BOOKMARK")
    c.close()
    assert [e["type"] for e in evs] == ["ADDED", "ADDED", "BOOKMARK"], evs
    assert evs[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}, evs[-1]


@H.test
def watch_410_after_compaction():
    old = API.ok("GET", "/api/v1/namespaces/w1/configmaps")["metadata"]["resourceVersion"]
    PLAIN.configure(history_events=3)
    try:
        for i in range(5):
            API.ok("POST", "/api/v1/namespaces/w1/configmaps", cm(f"h{i}", ns="w1"))
        resp, c = API.watch(f"/api/v1/namespaces/w1/configmaps?watch=1&resourceVersion={old}&timeoutSeconds=5")
        evs = events(resp)
        c.close()
        assert resp.status == 200 and len(evs) == 1 and evs[0]["type"] == "ERROR", evs
        st = evs[0]["object"]
        assert st["code"] == 410 and st["reason"] == "Expired" and "too old resource version" in st["message"], st
        PLAIN.configure(watch_gone_mode="http")
        code, st, _ = API.get(f"/api/v1/namespaces/w1/configmaps?watch=1&resourceVersion={old}")
        assert code == 410 and st["reason"] == "Expired", (code, st)
        code, st, _ = API.get(f"/api/v1/namespaces/w1/configmaps?resourceVersion={old}&resourceVersionMatch=Exact")
        assert code == 410, (code, st)
    finally:
        PLAIN.configure(history_events=10000, watch_gone_mode="event")


@H.test
def patches_merge_json_strategic():
    p = f"{LORA}/namespaces/default/loraadapters/c1"
    o = API.ok("PATCH", p, {"metadata": {"finalizers": ["a.io/x", "b.io/y"]}})
    o = API.ok("PATCH", p, {"metadata": {"finalizers": ["b.io/y"]}})
    assert o["metadata"]["finalizers"] == ["b.io/y"], "a merge patch must replace lists"
    o = API.ok("PATCH", p, {"spec": {"modelName": None}})
    assert "modelName" not in o["spec"], o["spec"]
    rv = o["metadata"]["resourceVersion"]
    code, st, _ = API.patch(p, [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                              {"op": "replace", "path": "/spec/source/uri", "value": "s3://b/t"}],
                          ctype="application/json-patch+json")
    assert code == 422 and "test failed" in st["message"], (code, st)
    o = API.ok("PATCH", p, [{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                          {"op": "remove", "path": "/metadata/finalizers"},
                          {"op": "add", "path": "/spec/modelName", "value": "c1-model"}],
             ctype="application/json-patch+json")
    assert "finalizers" not in o["metadata"] and o["spec"]["modelName"] == "c1-model", o
    code, st, _ = API.patch(p, {"spec": {}}, ctype="application/strategic-merge-patch+json")
    assert code == 415 and st["reason"] == "UnsupportedMediaType", (code, st)
    code, st, _ = API.patch(p, {"metadata": {"resourceVersion": "1"}, "spec": {"modelName": "x"}})
    assert code == 409, (code, st)
    PLAIN.run_pod("smp", ip="10.1.0.9")
    o = API.ok("PATCH", "/api/v1/namespaces/default/pods/smp",
             {"spec": {"containers": [{"name": "agent", "image": "loraplane-agent:v2"}]}},
             ctype="application/strategic-merge-patch+json")
    c = o["spec"]["containers"]
    assert len(c) == 1 and c[0]["image"] == "loraplane-agent:v2" and c[0]["imagePullPolicy"], c


@H.test
def leases_for_leader_election():
    base = "/apis/coordination.k8s.io/v1/namespaces/default/leases"
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "loraplane-operator"},
             "spec": {"holderIdentity": "op-a", "leaseDurationSeconds": 15,
                      "acquireTime": "2025-01-01T00:00:00Z", "renewTime": "2025-01-01T00:00:00.5Z",
                      "leaseTransitions": 0}}
    o = API.ok("POST", base, lease)
    assert o["spec"]["acquireTime"] == "2025-01-01T00:00:00.000000Z", o["spec"]
    assert o["spec"]["renewTime"] == "2025-01-01T00:00:00.500000Z", o["spec"]
    a = json.loads(json.dumps(o))
    b = json.loads(json.dumps(o))
    a["spec"]["renewTime"] = "2025-01-01T00:00:10.000000Z"
    API.ok("PUT", base + "/loraplane-operator", a)
    b["spec"].update(holderIdentity="op-b", leaseTransitions=1)
    code, st, _ = API.put(base + "/loraplane-operator", b)
    assert code == 409, "two candidates both took the lease"
    bad = json.loads(json.dumps(lease))
    bad["metadata"]["name"] = "bad"
    bad["spec"]["leaseDurationSeconds"] = 0
    code, st, _ = API.post(base, bad)
    assert code == 422 and "spec.leaseDurationSeconds" in st["message"], st
    bad["spec"]["leaseDurationSeconds"] = 5
    bad["spec"]["renewTime"] = "yesterday"
    code, st, _ = API.post(base, bad)
    assert code == 422 and "spec.renewTime" in st["message"], st


@H.test
def events_core_and_events_k8s_io():
    ev = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "c1.abc", "namespace": "default"},
          "eventTime": "2025-01-01T00:00:00.123Z", "reportingController": "loraplane.io/operator",
          "reportingInstance": "op-a", "action": "Load", "reason": "AllEndpointsReady", "type": "Normal",
          "note": "2/2 ready", "regarding": {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
                                              "name": "c1", "namespace": "default"}}
    o = API.ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events", ev)
    assert o["eventTime"] == "2025-01-01T00:00:00.123000Z" and o["note"] == "2/2 ready", o
    core = API.ok("GET", "/api/v1/namespaces/default/events/c1.abc")
    assert core["message"] == "2/2 ready" and core["involvedObject"]["name"] == "c1", core
    assert core["reportingComponent"] == "loraplane.io/operator", core
    items = API.ok("GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dc1,involvedObject.kind%3DLoraAdapter")["items"]
    assert [i["metadata"]["name"] for i in items] == ["c1.abc"], items
    bad = dict(ev, metadata={"name": "c1.bad", "namespace": "default"})
    del bad["reportingController"]
    code, st, _ = API.post("/apis/events.k8s.io/v1/namespaces/default/events", bad)
    assert code == 422 and "reportingController" in st["message"], st
    wrong = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "x.1", "namespace": "default"},
             "involvedObject": {"kind": "Pod", "name": "p", "namespace": "other"}, "reason": "R", "message": "m"}
    code, st, _ = API.post("/api/v1/namespaces/default/events", wrong)
    assert code == 422 and "does not match event.namespace" in st["message"], st


@H.test
def endpointslices_and_services():
    svc = API.ok("POST", "/api/v1/namespaces/default/services",
               {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "sql-lora"},
                "spec": {"ports": [{"name": "http", "port": 8000}]}})
    assert svc["spec"]["clusterIP"].startswith("10.96.") and svc["spec"]["ports"][0]["targetPort"] == 8000, svc
    svc["spec"]["clusterIP"] = "10.96.99.99"
    code, st, _ = API.put("/api/v1/namespaces/default/services/sql-lora", svc)
    assert code == 422 and "may not change once set" in st["message"], st
    base = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "sql-lora-1", "labels": {"kubernetes.io/service-name": "sql-lora"}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": 8000}],
          "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "p1"}}]}
    o = API.ok("POST", base, es)
    assert o["ports"][0]["protocol"] == "TCP", o
    items = API.ok("GET", base + "?labelSelector=kubernetes.io%2Fservice-name%3Dsql-lora")["items"]
    assert [i["metadata"]["name"] for i in items] == ["sql-lora-1"], items
    o["addressType"] = "IPv6"
    code, st, _ = API.put(base + "/sql-lora-1", o)
    assert code == 422 and "addressType" in st["message"], st
    bad = json.loads(json.dumps(es))
    bad["metadata"]["name"] = "bad"
    bad["endpoints"][0]["addresses"] = ["not-an-ip"]
    code, st, _ = API.post(base, bad)
    assert code == 422 and "must be a valid IPv4 address" in st["message"], st


@H.test
def pods_status_and_termination():
    p = PLAIN.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-0", "namespace": "default"},
                      "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 30,
                               "containers": [{"name": "agent", "image": "a:1"}]},
                      "status": {"phase": "Running", "podIP": "10.9.9.9"}})
    assert p["status"]["phase"] == "Pending" and "podIP" not in p["status"], "status taken on create"
    run = PLAIN.set_pod_status("agent-0", ip="10.1.2.3")
    assert run["status"]["phase"] == "Running" and run["status"]["podIPs"] == [{"ip": "10.1.2.3"}], run["status"]
    t = API.ok("GET", "/api/v1/namespaces/default/pods", accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    row = [r["cells"] for r in t["rows"] if r["cells"][0] == "agent-0"][0]
    assert row[1:4] == ["1/1", "Running", 0], row
    PLAIN.configure(pod_termination_s=0.5)
    d = API.ok("DELETE", "/api/v1/namespaces/default/pods/agent-0")
    assert d["metadata"]["deletionTimestamp"] and d["metadata"]["deletionGracePeriodSeconds"] == 30, d["metadata"]
    wait_until(lambda: API.get("/api/v1/namespaces/default/pods/agent-0")[0] == 404, "the terminating pod to go away")
    code, st, _ = API.post("/api/v1/namespaces/default/pods", {"apiVersion": "v1", "kind": "Pod",
                                                            "metadata": {"name": "nocontainers"}, "spec": {}})
    assert code == 422 and "spec.containers: Required value" in st["message"], st


@H.test
def garbage_collection_and_namespace_deletion():
    API.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gc"}})
    owner = API.ok("POST", f"{LORA}/namespaces/gc/loraadapters", lora("own", ns="gc"))
    ref = {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter", "name": "own",
           "uid": owner["metadata"]["uid"], "controller": True}
    dep = cm("own-svc", ns="gc")
    dep["metadata"]["ownerReferences"] = [ref]
    API.ok("POST", "/api/v1/namespaces/gc/configmaps", dep)
    API.ok("DELETE", f"{LORA}/namespaces/gc/loraadapters/own")
    wait_until(lambda: API.get("/api/v1/namespaces/gc/configmaps/own-svc")[0] == 404,
               "the owned object to go with its owner")
    API.ok("POST", f"{LORA}/namespaces/gc/loraadapters",
         dict(lora("held", ns="gc"), metadata={"name": "held", "namespace": "gc", "finalizers": ["loraplane.io/unload"]}))
    ns = API.ok("DELETE", "/api/v1/namespaces/gc")
    assert ns["status"]["phase"] == "Terminating", ns
    code, st, _ = API.post("/api/v1/namespaces/gc/configmaps", cm("late", ns="gc"))
    assert code == 403 and "being terminated" in st["message"], st
    wait_until(lambda: API.ok("GET", f"{LORA}/namespaces/gc/loraadapters/held")["metadata"].get("deletionTimestamp"),
               "namespace deletion to delete its content")
    API.ok("PATCH", f"{LORA}/namespaces/gc/loraadapters/held", {"metadata": {"finalizers": None}})
    wait_until(lambda: API.get("/api/v1/namespaces/gc")[0] == 404, "the namespace to go away")


@H.test
def deletecollection_dry_run_and_propagation():
    API.ok("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dc"}})
    dry = API.ok("POST", "/api/v1/namespaces/dc/configmaps?dryRun=All", cm("dry", ns="dc"))
    assert dry["metadata"]["uid"] and API.get("/api/v1/namespaces/dc/configmaps/dry")[0] == 404, "dry run stored"
    for i in range(3):
        API.ok("POST", "/api/v1/namespaces/dc/configmaps", cm(f"d{i}", ns="dc", labels={"batch": "x" if i < 2 else "y"}))
    gone = API.ok("DELETE", "/api/v1/namespaces/dc/configmaps?labelSelector=batch%3Dx")
    assert sorted(o["metadata"]["name"] for o in gone["items"]) == ["d0", "d1"], gone
    left = API.ok("GET", "/api/v1/namespaces/dc/configmaps")["items"]
    assert [o["metadata"]["name"] for o in left] == ["d2"], left
    st = API.ok("DELETE", "/api/v1/namespaces/dc/configmaps/d2")
    assert st["kind"] == "Status" and st["status"] == "Success" and st["details"]["name"] == "d2", st

    def owned(owner, name):
        o = cm(name, ns="dc")
        o["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
                                             "uid": owner["metadata"]["uid"]}]
        return API.ok("POST", "/api/v1/namespaces/dc/configmaps", o)

    orphan_owner = API.ok("POST", "/api/v1/namespaces/dc/configmaps", cm("oo", ns="dc"))
    owned(orphan_owner, "oo-child")
    API.ok("DELETE", "/api/v1/namespaces/dc/configmaps/oo", {"propagationPolicy": "Orphan"})
    fg_owner = API.ok("POST", "/api/v1/namespaces/dc/configmaps", cm("fg", ns="dc"))
    owned(fg_owner, "fg-child")
    d = API.ok("DELETE", "/api/v1/namespaces/dc/configmaps/fg", {"propagationPolicy": "Foreground"})
    assert "foregroundDeletion" in d["metadata"]["finalizers"], d["metadata"]
    wait_until(lambda: API.get("/api/v1/namespaces/dc/configmaps/fg")[0] == 404
               and API.get("/api/v1/namespaces/dc/configmaps/oo")[0] == 404, "both owners to go away")
    assert API.get("/api/v1/namespaces/dc/configmaps/fg-child")[0] == 404, "foreground deletion left the dependent"
    assert API.get("/api/v1/namespaces/dc/configmaps/fg")[0] == 404, "foreground owner stayed"
    child = API.ok("GET", "/api/v1/namespaces/dc/configmaps/oo-child")
    assert "ownerReferences" not in child["metadata"], "orphaned dependent kept its owner reference"


@H.test
def table_output():
    API.ok("PATCH", f"{LORA}/namespaces/default/loraadapters/c1/status",
         {"status": {"modelName": "c1-model", "totalEndpoints": 3, "readyEndpoints": 2}})
    t = API.ok("GET", f"{LORA}/namespaces/default/loraadapters?limit=500",
             accept="application/json;as=Table;v=v1;g=meta.k8s.io,application/json")
    assert t["kind"] == "Table" and t["apiVersion"] == "meta.k8s.io/v1", t
    assert [c["name"] for c in t["columnDefinitions"]] == ["Name", "BASE", "TOTAL", "READY", "MODEL", "REASON",
                                                            "AGE"], t
    row = [r for r in t["rows"] if r["cells"][0] == "c1"][0]
    # MODEL from the status; no condition: a null cell
    assert row["cells"][1:6] == ["base/model", 3, 2, "c1-model", None] and row["cells"][6].endswith("s"), row
    assert row["object"]["kind"] == "PartialObjectMetadata", row["object"]
    t = API.ok("GET", f"{LORA}/namespaces/default/loraadapters/c1?includeObject=Object",
             accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert t["rows"][0]["object"]["spec"]["baseModelName"] == "base/model", t


@H.test
def discovery_and_openapi():
    agg = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
    code, body, resp = API.get("/apis", accept=agg)
    assert code == 200 and body["kind"] == "APIGroupDiscoveryList", body
    assert "as=APIGroupDiscoveryList" in resp.getheader("Content-Type"), resp.getheader("Content-Type")
    lp = [g for g in body["items"] if g["metadata"]["name"] == "loraplane.io"][0]
    res = lp["versions"][0]["resources"][0]
    assert res["resource"] == "loraadapters" and res["shortNames"] == ["lora", "loras"], res
    assert res["subresources"][0]["subresource"] == "status" and res["scope"] == "Namespaced", res
    groups = API.ok("GET", "/apis")
    assert groups["kind"] == "APIGroupList" and any(g["name"] == "loraplane.io" for g in groups["groups"]), groups
    rl = API.ok("GET", LORA)
    names = {r["name"]: r for r in rl["resources"]}
    assert names["loraadapters"]["kind"] == "LoraAdapter" and "loraadapters/status" in names, rl
    assert "watch" in names["loraadapters"]["verbs"] and names["loraadapters"]["categories"] == ["loraplane"], rl
    core = API.ok("GET", "/api/v1")
    assert {"pods", "services", "events", "secrets", "namespaces", "pods/status"} <= {r["name"] for r in core["resources"]}
    v3 = API.ok("GET", "/openapi/v3")
    url = v3["paths"]["apis/loraplane.io/v1alpha1"]["serverRelativeURL"]
    doc = API.ok("GET", url)
    assert "io.loraplane.v1alpha1.LoraAdapter" in doc["components"]["schemas"], doc["components"]
    assert API.get("/openapi/v2")[0] == 404
    assert API.ok("GET", "/version")["gitVersion"] == "v1.32.4"
    code, body, _ = API.get("/healthz")
    assert code == 200 and body == "ok", body


# ------------------------------------------------------------ faults

def admin(method, path, body=None):
    code, obj, _ = API.call(method, path, body)
    assert code == 200, f"{method} {path}: {code} {obj}"
    return obj


@H.test
def fault_status_count_and_filters():
    admin("POST", "/_faults", {"status": 500, "count": 2, "verbs": ["list"], "path_regex": "/configmaps"})
    codes = [API.get("/api/v1/namespaces/default/configmaps")[0] for _ in range(3)]
    assert codes == [500, 500, 200], codes
    assert API.get("/api/v1/namespaces/default/pods")[0] == 200
    admin("POST", "/_faults", {"status": 503, "for_seconds": 30, "methods": ["PUT", "PATCH"]})
    code, st, _ = API.patch(f"{LORA}/namespaces/default/loraadapters/c1", {"metadata": {"labels": {"f": "1"}}})
    assert code == 503 and st["reason"] == "ServiceUnavailable", st
    assert API.get(f"{LORA}/namespaces/default/loraadapters/c1")[0] == 200
    assert 29 < admin("GET", "/_faults")["remaining_s"] <= 30
    admin("POST", "/_clock", {"advance_s": 29.9})
    assert admin("GET", "/_faults")["remaining_s"] <= 0.1
    assert API.patch(f"{LORA}/namespaces/default/loraadapters/c1", {"metadata": {"labels": {"f": "2"}}})[0] == 503
    admin("POST", "/_clock", {"advance_s": 0.2})  # the fault's time is up
    assert API.patch(f"{LORA}/namespaces/default/loraadapters/c1", {"metadata": {"labels": {"f": "1"}}})[0] == 200
    snap = admin("GET", "/_faults")
    assert "status" not in snap, snap


@H.test
def fault_429_and_latency():
    admin("POST", "/_faults", {"rate_429": 1.0, "retry_after_s": 2, "count": 1, "path_regex": "^/api/v1/namespaces$"})
    code, st, resp = API.get("/api/v1/namespaces")
    assert code == 429 and resp.getheader("Retry-After") == "2" and st["details"]["retryAfterSeconds"] == 2, st
    admin("POST", "/_faults", {"latency_ms": 300, "for_seconds": 60})
    n = admin("GET", "/_requests")["next"]
    t0 = time.monotonic()
    API.get("/api/v1/namespaces")
    assert time.monotonic() - t0 >= 0.3, "no latency"
    admin("DELETE", "/_faults")
    API.get("/api/v1/namespaces")

    def log():
        # the server records a request after its response is sent
        return [r for r in admin("GET", f"/_requests?since={n}")["requests"]
                if r["path"] == "/api/v1/namespaces"]

    wait_until(lambda: len(log()) >= 2, "both requests in the request log")
    got = log()
    assert [r["faultLatencyMs"] for r in got] == [300.0, 0.0], f"latency stayed after DELETE /_faults: {got}"


@H.test
def fault_drop_connection():
    admin("POST", "/_faults", {"drop_connection_rate": 1.0, "verbs": ["get"], "path_regex": "configmaps"})
    try:
        API.get("/api/v1/namespaces/default/configmaps/u1")
        raise AssertionError("the connection was not dropped")
    except (http.client.HTTPException, ConnectionError, OSError):
        pass
    finally:
        admin("DELETE", "/_faults")
    assert API.get("/api/v1/namespaces/default/configmaps/u1")[0] == 200


@H.test
def fault_watch_drops_gone_and_stalls():
    # timeoutSeconds far beyond the read timeout: the stream ends only if dropped
    resp, c = API.watch("/api/v1/namespaces/w1/configmaps?watch=1&timeoutSeconds=3600", timeout=WAIT_S)
    events(resp, n=1)
    admin("POST", "/_faults", {"drop_watches": True})
    rest = events(resp)
    c.close()
    assert all(e["type"] == "ADDED" for e in rest), rest
    resp, c = API.watch("/api/v1/namespaces/w1/configmaps?watch=1&timeoutSeconds=10&resourceVersion=0")
    events(resp, n=1)
    admin("POST", "/_faults", {"gone_watches": True})
    evs = events(resp, until=lambda e: e["type"] == "ERROR")
    c.close()
    assert evs[-1]["type"] == "ERROR" and evs[-1]["object"]["code"] == 410, evs[-1]
    rv = API.ok("GET", "/api/v1/namespaces/w1/configmaps")["metadata"]["resourceVersion"]
    resp, c = API.watch(f"/api/v1/namespaces/w1/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=10")
    admin("POST", "/_faults", {"stall_watches": True, "for_seconds": 30})
    API.ok("POST", "/api/v1/namespaces/w1/configmaps", cm("stalled", ns="w1"))
    assert admin("GET", "/_faults")["stall_watches"] is True
    # held back (a check that can miss on a slow machine but never fails wrongly)
    assert not select.select([c.sock], [], [], 0.3)[0], "an event came through a stalled watch"
    PLAIN.advance_clock(31)  # the stall's time is up
    evs = events(resp, n=1)
    c.close()
    assert evs[0]["object"]["metadata"]["name"] == "stalled", evs
    page = API.ok("GET", "/api/v1/namespaces/w1/configmaps?limit=1")
    API.ok("POST", "/api/v1/namespaces/w1/configmaps", cm("after-page", ns="w1"))
    admin("POST", "/_faults", {"expire_versions": True})
    code, st, _ = API.get(f"/api/v1/namespaces/w1/configmaps?resourceVersion={rv}&resourceVersionMatch=Exact")
    assert code == 410, (code, st)
    code, st, _ = API.get("/api/v1/namespaces/w1/configmaps?limit=1&continue=" + urllib.parse.quote(page["metadata"]["continue"]))
    assert code == 410 and st["reason"] == "Expired" and "continue parameter is too old" in st["message"], (code, st)
    code, st, _ = API.call("POST", "/_faults", {"status": 200})
    assert code == 400 and "status" in st["error"], (code, st)
    stats = admin("GET", "/_stats")
    assert stats["compactedResourceVersion"] == stats["resourceVersion"], stats


@H.test
def fault_server_down_and_back():
    def answers():
        try:
            API.get("/version")
            return True
        except (ConnectionError, OSError, http.client.HTTPException):
            return False

    admin("POST", "/_faults", {"down_for_seconds": 30})
    wait_until(lambda: not answers(), "the server to go down")
    PLAIN.advance_clock(29)
    assert not answers(), "the server came back before its time"
    PLAIN.advance_clock(1.5)
    wait_until(answers, "the server to come back")
    assert API.ok("GET", "/api/v1/namespaces/default/configmaps/u1")["metadata"]["name"] == "u1", "state lost"


@H.test
def request_log():
    n = admin("GET", "/_requests")["next"]
    API.get("/api/v1/namespaces/default/configmaps?limit=1")

    def mine():
        # the server records a request after its response is sent
        log = admin("GET", f"/_requests?since={n}")["requests"]
        return [r for r in log if r["path"] == "/api/v1/namespaces/default/configmaps"]

    wait_until(mine, "the list request in the request log")
    got = mine()
    assert got[0]["verb"] == "list" and got[0]["code"] == 200 and got[0]["query"] == "limit=1", got


@H.test
def command_line_server():
    p = subprocess.Popen([sys.executable, "tests/kube/apiserver.py", "--port", "0", "--token", "abc"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline().split()
        assert line[0] == "ready" and line[1].startswith("http://127.0.0.1:"), line
        port = int(line[1].rsplit(":", 1)[1])
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer abc\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        assert data.startswith(b"HTTP/1.1 200") and b"kube-system" in data, data[:200]
    finally:
        p.terminate()
        p.wait(timeout=10)
    bad = subprocess.run([sys.executable, "tests/kube/apiserver.py", "--tls-cert", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--tls-cert and --tls-key go together" in bad.stderr, bad.stderr


failures = H.run_tests("test-kube-apiserver")
TLS.stop()
PLAIN.stop()
shutil.rmtree(TMP, ignore_errors=True)
sys.exit(1 if failures else 0)
