#!/usr/bin/env python3
"""The Helm chart, installed for real: the real helm and kubectl against our
Kubernetes API test server, whose kubelet stand-in (tests/kube/kubelet.py)
runs the pods the chart renders as real loraplane-operator and
loraplane-agent processes, each pod in its own network namespace, with
exactly the rendered command, args, environment, volumes and security
context.

One story, in order (each step needs the one before):
  template   helm template | kubectl apply, an adapter READY, kubectl delete
  install    helm install --wait: the operator (2 replicas, leader
             election) and a pool of 2 agents whose init container fetches
             the tiny model from S3 (moto) with the pool's secretRef
  adapter    kubectl apply a Secret and a LoraAdapter from s3:// with that
             secretRef: kubectl get loraadapters shows READY 2 of TOTAL 2
  serve      completions through each endpoint of the adapter's Service
  upgrade    helm upgrade with 4 agents: TOTAL and READY follow to 4
  drift      an edited adapter Service is put back by the operator
  rbac       every request the operator made is allowed by the rendered
             Role/ClusterRole, and every verb they grant was used
  uninstall  helm uninstall: the pre-delete hook deletes the adapter, the
             operator unloads it, nothing is left with a finalizer, every
             process is gone
Needs root (network namespaces) and .tools/helm (make deps)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

from harness import BIN_DIR, FIX, ROOT, main, test

sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))
from cluster import Cluster  # noqa: E402


CHART = os.path.join(ROOT, "charts", "loraplane")
NS = "lp"
REL = "rel"
BASE = "test/tiny-llama"
OPERATOR_SA = f"system:serviceaccount:{NS}:{REL}-loraplane-operator"
CLEANUP_SA = f"system:serviceaccount:{NS}:{REL}-loraplane-cleanup"
TMP = tempfile.mkdtemp(prefix="lp-chart-")
os.chmod(TMP, 0o755)
state = {}


def start_moto(host):
    port_sock = __import__("socket").socket()
    port_sock.bind((host, 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", host, "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://{host}:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)


def upload(url, bucket, prefix, directory):
    import boto3
    s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="AKIDTEST", aws_secret_access_key="secret",
                      region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            s3.put_object(Bucket=bucket, Key=f"{prefix}{name}", Body=f.read())


def values(replicas):
    v = {
        "operator": {"replicas": 2, "resync": "10s", "cleanupTimeout": "60s",
                     "resources": {}},
        "pools": [{
            "name": "tiny",
            "baseModelName": BASE,
            "replicas": replicas,
            "model": {"uri": "s3://models/tiny-llama/", "secretRef": {"name": "model-s3"}, "size": "1Gi"},
            # the LoraAdapter's secretRef names moto, a plain-http endpoint
            "engine": {"threads": 1, "kv-cache-bytes": 8 << 20, "max-loras": 2,
                       "allow-insecure-source-endpoints": True},
            "startupSeconds": 120,
            "terminationGracePeriodSeconds": 10,
        }],
    }
    path = os.path.join(TMP, f"values-{replicas}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(v, f)
    return path


def secret(name, url):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "secret",
                           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}}


def kubectl_json(*args):
    return json.loads(state["c"].kubectl(*args, "-o", "json").stdout)


def adapter_counts():
    obj = kubectl_json("-n", NS, "get", "loraadapter", "tiny-sql")
    st = obj.get("status") or {}
    return st.get("totalEndpoints"), st.get("readyEndpoints")


def wait_counts(total, ready, timeout=180):
    c = state["c"]
    try:
        c.wait(lambda: adapter_counts() == (total, ready), timeout, f"TOTAL {total} READY {ready}")
    except Exception:
        raise AssertionError(f"adapter counts {adapter_counts()}, wanted {(total, ready)}\n{c.dump(NS)}")


def fail_with_dump(what):
    return AssertionError(f"{what}\n{state['c'].dump(NS)}")


def lora_adapter(ns):
    return yaml.safe_dump({
        "apiVersion": "loraplane.io/v1alpha1", "kind": "LoraAdapter",
        "metadata": {"name": "tiny-sql", "namespace": ns},
        "spec": {"baseModelName": BASE, "modelName": "sql", "source": {
            "uri": "s3://loras/tiny-sql/", "secretRef": {"name": "lora-s3"}}}})


@test
def template_apply():
    """helm template | kubectl apply (no Helm release): the same chart, one
    agent; an adapter gets READY 1; then kubectl delete leaves nothing."""
    c = state["c"] = Cluster(bin_dir=os.path.abspath(BIN_DIR)).start()
    state["moto"], url = start_moto(c.gateway)
    state["s3"] = url
    upload(url, "models", "tiny-llama/", os.path.join(FIX, "tiny-llama"))
    upload(url, "loras", "tiny-sql/", os.path.join(FIX, "lora", "tiny", "r4-qv"))
    ns = "lp0"
    c.kubectl("create", "namespace", ns)
    for name in ("model-s3", "lora-s3"):
        sec = secret(name, url)
        sec["metadata"]["namespace"] = ns
        c.kubectl("apply", "-f", "-", input=json.dumps(sec))
    rendered = c.helm("template", "rel0", CHART, "-n", ns, "-f", values(1), "--no-hooks",
                      "--include-crds").stdout
    path = os.path.join(TMP, "rendered.yaml")
    with open(path, "w") as f:
        f.write(rendered)
    c.kubectl("apply", "-f", path)
    c.wait_ready(ns, "app.kubernetes.io/component=agent", count=1, timeout=120)
    c.kubectl("apply", "-f", "-", input=lora_adapter(ns))
    c.wait(lambda: (kubectl_json("-n", ns, "get", "loraadapter", "tiny-sql").get("status") or {})
           .get("readyEndpoints") == 1, 120, "READY 1")
    # delete the adapters while the operator runs, then everything else
    c.kubectl("-n", ns, "delete", "loraadapter", "tiny-sql", "--wait", "--timeout=60s")
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] != "CustomResourceDefinition"]
    rest = os.path.join(TMP, "rendered-no-crd.yaml")
    with open(rest, "w") as f:
        yaml.safe_dump_all(docs, f)
    c.kubectl("delete", "-f", rest, "--wait", "--timeout=60s")
    c.wait(lambda: not c.pods(ns), 60, "every pod of lp0 gone")
    c.kubectl("delete", "namespace", ns, "--wait", "--timeout=60s")


@test
def install():
    c = state["c"]
    c.kubectl("create", "namespace", NS)
    c.kubectl("apply", "-f", "-", input=json.dumps(secret("model-s3", state["s3"])))
    p = c.helm("install", REL, CHART, "-n", NS, "-f", values(2), "--wait", "--timeout", "240s", check=False)
    if p.returncode != 0:
        raise fail_with_dump(f"helm install failed: {p.stderr}")
    assert "kubectl -n lp get loraadapters" in p.stdout, p.stdout  # NOTES
    agents = c.wait_ready(NS, "app.kubernetes.io/component=agent", count=2)
    ops = c.wait_ready(NS, "app.kubernetes.io/component=operator", count=2)
    assert len(agents) == 2 and len(ops) == 2
    pod = agents[0]
    name = pod["metadata"]["name"]
    # the rendered pod, as the operator finds it
    import hashlib
    assert pod["metadata"]["labels"]["loraplane.io/base-model-hash"] == hashlib.sha256(BASE.encode()).hexdigest()[:8]
    assert pod["metadata"]["annotations"]["loraplane.io/base-model"] == BASE
    # the agent runs with exactly the rendered args, as uid 65532
    pid = c.pid(name, "agent", NS)
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:-1]
    rendered = pod["spec"]["containers"][0]
    assert [a.decode() for a in argv[1:]] == rendered["args"], (argv, rendered["args"])
    status = open(f"/proc/{pid}/status").read()
    assert "\nUid:\t65532\t65532" in status, status
    # the model came through the init container from S3
    assert "model at" in c.logs(name, "fetch-model", NS), c.logs(name, "fetch-model", NS)
    models = json.load(urllib.request.urlopen(c.pod_url(name, "http", NS) + "/v1/models", timeout=10))
    assert models["data"][0]["id"] == BASE, models


@test
def adapter():
    c = state["c"]
    c.kubectl("apply", "-f", "-", input=json.dumps(secret("lora-s3", state["s3"])))
    c.kubectl("apply", "-f", "-", input=lora_adapter(NS))
    wait_counts(2, 2)
    table = c.kubectl("-n", NS, "get", "loraadapters").stdout.split("\n")
    assert table[0].split()[:4] == ["NAME", "BASE", "TOTAL", "READY"], table
    assert table[1].split()[:4] == ["tiny-sql", BASE, "2", "2"], table


def endpoints():
    slices = kubectl_json("-n", NS, "get", "endpointslices", "-l", "kubernetes.io/service-name=tiny-sql")["items"]
    out = []
    for s in slices:
        port = s["ports"][0]["port"]
        for e in s["endpoints"]:
            if (e.get("conditions") or {}).get("ready", True):
                out += [f"http://{a}:{port}" for a in e["addresses"]]
    return sorted(out)


def complete(url):
    req = urllib.request.Request(url + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "sql", "prompt": "hello", "max_tokens": 4}).encode())
    return json.load(urllib.request.urlopen(req, timeout=60))


@test
def serve():
    c = state["c"]
    svc = kubectl_json("-n", NS, "get", "service", "tiny-sql")
    assert svc["spec"]["ports"][0]["port"] == 80
    eps = endpoints()
    pod_ips = sorted(p["status"]["podIP"] for p in c.pods(NS, "app.kubernetes.io/component=agent"))
    assert [e.split("//")[1].split(":")[0] for e in eps] == pod_ips, (eps, pod_ips)
    for e in eps:
        r = complete(e)
        assert r["model"] == "sql" and r["usage"]["completion_tokens"] >= 1, r


@test
def upgrade():
    c = state["c"]
    p = c.helm("upgrade", REL, CHART, "-n", NS, "-f", values(4), "--wait", "--timeout", "240s", check=False)
    if p.returncode != 0:
        raise fail_with_dump(f"helm upgrade failed: {p.stderr}")
    c.wait_ready(NS, "app.kubernetes.io/component=agent", count=4, timeout=180)
    wait_counts(4, 4)
    c.wait(lambda: len(endpoints()) == 4, 60, "4 endpoints in the adapter's slices")
    for e in endpoints():
        complete(e)


def parse_path(path):
    """(group, resource, namespace) of an API request path, or None."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        return None
    ns = None
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        ns, rest = rest[1], rest[2:]
    if not rest:
        return None
    resource = rest[0]
    if len(rest) >= 3:
        resource += "/" + rest[2]
    return group, resource, ns


def granted(user):
    """Rules bound to user's ServiceAccount: [(rule, namespace or None)]."""
    c = state["c"]
    _, _, sa_ns, sa = user.split(":")
    out = []
    for kind, rkind in (("clusterrolebindings", "ClusterRole"), ("rolebindings", None)):
        code, lst = c.api.request("GET", f"/apis/rbac.authorization.k8s.io/v1/{kind}")
        for b in lst["items"]:
            if not any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == sa_ns
                       for s in b.get("subjects") or []):
                continue
            ref = b["roleRef"]
            ns = b["metadata"].get("namespace")
            path = (f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{ref['name']}" if ref["kind"] == "ClusterRole"
                    else f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{ref['name']}")
            code, role = c.api.request("GET", path)
            assert code == 200, (path, code)
            out += [(r, ns) for r in role["rules"]]
    return out


@test
def service_drift_repaired():
    """Someone edits the adapter's Service: the operator puts it back."""
    c = state["c"]
    c.kubectl("-n", NS, "patch", "service", "tiny-sql", "--type=merge",
              "-p", '{"spec": {"ports": [{"name": "http", "port": 81, "targetPort": 8000}]}}')
    c.wait(lambda: kubectl_json("-n", NS, "get", "service", "tiny-sql")["spec"]["ports"][0]["port"] == 80,
           60, "the operator to restore the Service's port")


@test
def rbac():
    c = state["c"]
    reqs = c.requests(user=OPERATOR_SA)
    assert len(reqs) > 20, f"only {len(reqs)} requests of {OPERATOR_SA}"
    rules = granted(OPERATOR_SA)
    assert rules, "no role bound to the operator's ServiceAccount"
    used = set()
    denied = []
    for r in reqs:
        parsed = parse_path(r["path"])
        if parsed is None:
            denied.append(f"{r['method']} {r['path']} (not a resource path)")
            continue
        group, resource, ns = parsed
        ok = False
        for i, (rule, rule_ns) in enumerate(rules):
            if group in rule["apiGroups"] and resource in rule["resources"] and r["verb"] in rule["verbs"] \
                    and (rule_ns is None or rule_ns == ns):
                used.add((i, r["verb"]))
                ok = True
                break
        if not ok:
            denied.append(f"{r['verb']} {group}/{resource} in {ns}: {r['method']} {r['path']}")
    assert not denied, f"requests the rendered RBAC does not allow: {sorted(set(denied))}"
    unused = [f"{'/'.join(rule['apiGroups'])}:{','.join(rule['resources'])}:{v}"
              for i, (rule, _) in enumerate(rules) for v in rule["verbs"] if (i, v) not in used]
    state["unused"] = unused
    # what is not used yet must be used by the uninstall (checked there)
    print(f"  operator verbs not used before uninstall: {unused}", flush=True)


@test
def uninstall():
    c = state["c"]
    since = c.requests(user=OPERATOR_SA)[-1]["seq"] if c.requests(user=OPERATOR_SA) else 0
    # a concurrent writer: the operator's first finalizer removal conflicts,
    # and it reads the adapter again (the get it is granted)
    c.api.faults.set(status=409, count=1, verbs=["patch"], path_regex="/loraadapters/tiny-sql$")
    p = c.helm("uninstall", REL, "-n", NS, "--wait", "--timeout", "240s", check=False)
    if p.returncode != 0:
        raise fail_with_dump(f"helm uninstall failed: {p.stderr} {p.stdout}")
    code, lst = c.api.request("GET", "/apis/loraplane.io/v1alpha1/loraadapters")
    assert code == 200 and lst["items"] == [], lst
    # the hook's Job ran loraplane-operator cleanup with its own ServiceAccount
    creq = c.requests(user=CLEANUP_SA)
    verbs = {r["verb"] for r in creq}
    assert {"list", "delete", "watch"} <= verbs, creq
    # the agents were asked to unload before they went
    c.wait(lambda: not c.pods(NS), 120, "every pod gone")
    # the verbs granted but unused before are used by the deletion
    c.api.faults.clear()
    later = [r for r in c.requests(user=OPERATOR_SA) if r["seq"] > since]
    missing = []
    for u in state.get("unused", []):
        groups, resources, verb = u.split(":")
        if not any(r["verb"] == verb and (parse_path(r["path"]) or ("", "", ""))[1] in resources.split(",")
                   for r in later):
            missing.append(u)
    assert not missing, f"granted to the operator but never used: {missing}"
    assert not [p for p in subprocess.run(["pgrep", "-f", "loraplane-(agent|operator)"], capture_output=True,
                                          text=True).stdout.split()], "loraplane processes left"


def cleanup():
    failures = 0
    c = state.get("c")
    if c:
        c.stop()
    if state.get("moto"):
        state["moto"].kill()
    shutil.rmtree(TMP, ignore_errors=True)
    return failures


if __name__ == "__main__":
    main("test-chart", cleanup)
