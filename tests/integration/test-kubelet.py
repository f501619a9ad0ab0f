#!/usr/bin/env python3
"""The kubelet stand-in (tests/kube/kubelet.py, kube_controllers.py,
cluster.py): a small chart of its own (tests/kube/testdata/standin-chart)
installed with the real helm runs as real loraplane-agent processes on the
tiny model, each pod in its own network namespace. Checks that the
processes run exactly the rendered command, args and environment, as uid
65532 with a read-only root, that Ready follows the readiness probe, that
deleted pods are replaced, scaling and a template change roll the
Deployment, Jobs (OnFailure, Never, a service-account client of the API)
run to Complete / Failed, pods wait for missing config, liveness restarts,
init containers, helm uninstall runs its pre-delete hook Job, and that
nothing is left afterwards. Needs root. Prints one PASS/FAIL line per test
(counted by tests/run.sh)."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import harness as H  # noqa: E402

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn

PROG = "test-kubelet"
NS = "standin"
REL = "lp"
SEL = f"app.kubernetes.io/name=agent,app.kubernetes.io/instance={REL}"
CHART = os.path.join(ROOT, "tests", "kube", "testdata", "standin-chart")
BIN = os.path.abspath(H.BIN_DIR)
MODEL = "tiny-base"
SECRET = "s3cret-value"
AGENT_ARGS = ["--threads", "1", "--kv-cache-bytes", "8388608"]
EXPECTED_ARGV = ["loraplane-agent", "--model", "/models", "--served-model-name", MODEL, "--lora-dir", "/loras",
                 *AGENT_ARGS]
SEEN_PIDS = set()


def setup():
    from cluster import Cluster, find_helm
    from kubelet import StandInError
    if not os.path.exists(os.path.join(BIN, "loraplane-agent")):
        raise StandInError(f"{BIN}/loraplane-agent is not built (make, or BIN=...)")
    find_helm()
    c = Cluster(bin_dir=BIN, pvc_dirs={"models": os.path.abspath(H.TINY)},
                host_paths={"/srv/loras": os.path.abspath(H.TINY_LORAS)}, probe_period_scale=0.1)
    return c.start()


try:
    C = setup()
except Exception as e:  # noqa: BLE001 - any setup failure is one clear FAIL line
    print(f"FAIL {PROG}:setup: {type(e).__name__}: {e}", flush=True)
    sys.exit(1)


# ------------------------------------------------------------ helpers

def api(method, path, body=None, ctype="application/json"):
    code, out = C.api.request(method, path, body, content_type=ctype)
    return code, out


def get(path):
    code, out = api("GET", path)
    return out if code == 200 else None


def deployment():
    return get(f"/apis/apps/v1/namespaces/{NS}/deployments/{REL}-agent")


def replicasets():
    return (get(f"/apis/apps/v1/namespaces/{NS}/replicasets") or {}).get("items") or []


def job(name, ns=NS):
    return get(f"/apis/batch/v1/namespaces/{ns}/jobs/{name}")


def cond(obj, type_):
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def ready(pod):
    return cond(pod, "Ready").get("status") == "True"


def live_pods(ns=NS, sel=SEL):
    return [p for p in C.pods(ns, sel) if not p["metadata"].get("deletionTimestamp")]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def proc_env(pid):
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)


def proc_argv(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [x.decode() for x in f.read().split(b"\0")[:-1]]


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def mount_options(pid, where):
    with open(f"/proc/{pid}/mountinfo") as f:
        best = None
        for line in f:
            fields = line.split()
            if fields[4] == where:
                best = fields[5].split(",")
        return best


def kubectl_apply(text):
    C.kubectl("apply", "-n", NS, "-f", "-", input=text)


def http_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def netns_list():
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def link_names():
    p = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return [line.split(":")[1].strip().split("@")[0] for line in p.stdout.splitlines() if ":" in line]


def remember(pods):
    for p in pods:
        pid = C.pid(p, "agent", NS)
        if pid:
            SEEN_PIDS.add(pid)


# ------------------------------------------------------------ tests

@test
def helm_install_wait_runs_the_deployment():
    r = C.helm("install", REL, CHART, "-n", NS, "--create-namespace", "--wait", "--timeout", "90s")
    assert "STATUS: deployed" in r.stdout, r.stdout
    pods = C.wait_ready(NS, SEL, 2)
    remember(pods)
    d = deployment()
    st = d["status"]
    assert st.get("observedGeneration") == d["metadata"]["generation"], st
    assert (st.get("replicas"), st.get("readyReplicas"), st.get("availableReplicas"), st.get("updatedReplicas")) == \
        (2, 2, 2, 2), st
    assert cond(d, "Available")["status"] == "True" and cond(d, "Progressing")["reason"] == "NewReplicaSetAvailable", \
        st["conditions"]
    rss = replicasets()
    assert len(rss) == 1, [r["metadata"]["name"] for r in rss]
    rs = rss[0]
    h = rs["metadata"]["labels"]["pod-template-hash"]
    assert rs["metadata"]["name"] == f"{REL}-agent-{h}", rs["metadata"]["name"]
    ref = rs["metadata"]["ownerReferences"][0]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("Deployment", d["metadata"]["uid"], True), ref
    assert rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "1"
    for p in pods:
        m = p["metadata"]
        assert re.match(rf"^{REL}-agent-{h}-[a-z0-9]{{5}}$", m["name"]), m["name"]
        assert m["labels"] == {"app.kubernetes.io/name": "agent", "app.kubernetes.io/instance": REL,
                               "loraplane.io/base-model-hash": "abcd1234", "pod-template-hash": h}, m["labels"]
        assert m["annotations"] == {"loraplane.io/base-model": MODEL, "rollout": "1"}, m["annotations"]
        assert m["ownerReferences"][0]["uid"] == rs["metadata"]["uid"]
        assert p["spec"]["nodeName"] == "node-1"
        assert [x["name"] for x in p["spec"]["containers"][0]["ports"]] == ["http", "admin"]
        cs = p["status"]["containerStatuses"][0]
        assert cs["ready"] and cs["started"] and "running" in cs["state"], cs
        assert p["status"]["hostIP"] == C.gateway and p["status"]["podIP"] != C.gateway
    r = C.kubectl("rollout", "status", f"deployment/{REL}-agent", "-n", NS, "--timeout=20s")
    assert "successfully rolled out" in r.stdout, r.stdout
    out = C.kubectl("get", "pods", "-n", NS, "-o", "wide").stdout
    assert out.count("1/1     Running") == 2, out


@test
def processes_run_the_rendered_command_and_environment():
    manifest = C.helm("get", "manifest", REL, "-n", NS).stdout
    assert '"--served-model-name"' in manifest and '"$(MODEL_NAME)"' in manifest, "the chart renders $(MODEL_NAME)"
    svc = get(f"/api/v1/namespaces/{NS}/services/{REL}-agent")
    sip = svc["spec"]["clusterIP"]
    host, port = C.gateway, str(C.api.port)
    pods = live_pods()
    assert len(pods) == 2
    netns_ids = set()
    for p in pods:
        name, ip = p["metadata"]["name"], p["status"]["podIP"]
        pid = C.pid(p, "agent", NS)
        assert pid and alive(pid), f"no process for {name}"
        assert os.readlink(f"/proc/{pid}/exe").endswith("/loraplane-agent")
        assert proc_argv(pid) == EXPECTED_ARGV, proc_argv(pid)
        want = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTNAME": name,
                "POD_NAME": name, "POD_NAMESPACE": NS, "POD_IP": ip, "NODE_NAME": "node-1",
                "BASE_MODEL_HASH": "abcd1234", "BASE_MODEL": MODEL, "MODEL_NAME": MODEL, "API_SECRET": SECRET,
                "MEM_LIMIT": "512", "CPU_LIMIT": "2", "TMPDIR": "/tmp", "GREETING": f"hello from {name}",
                "LITERAL": "$(MODEL_NAME) costs $5", "UNRESOLVED": "$(NO_SUCH_VAR)",
                "LORAPLANE_MAX_LORAS": "4", "S_API_SECRET": SECRET,
                "LP_AGENT_SERVICE_HOST": sip, "LP_AGENT_SERVICE_PORT": "8000", "LP_AGENT_SERVICE_PORT_HTTP": "8000",
                "LP_AGENT_PORT": f"tcp://{sip}:8000", "LP_AGENT_PORT_8000_TCP": f"tcp://{sip}:8000",
                "LP_AGENT_PORT_8000_TCP_PROTO": "tcp", "LP_AGENT_PORT_8000_TCP_PORT": "8000",
                "LP_AGENT_PORT_8000_TCP_ADDR": sip,
                "KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://{host}:{port}",
                f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}", f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
                f"KUBERNETES_PORT_{port}_TCP_PORT": port, f"KUBERNETES_PORT_{port}_TCP_ADDR": host}
        got = proc_env(pid)
        assert got == want, f"{name}: extra {sorted(set(got) - set(want))}, missing {sorted(set(want) - set(got))}, " \
                            f"different {[k for k in want if k in got and got[k] != want[k]]}"
        st = proc_status(pid)
        assert st["Uid"].split() == ["65532"] * 4 and st["Gid"].split() == ["65532"] * 4, (st["Uid"], st["Gid"])
        assert st["Groups"].split() == ["65532"], st["Groups"]
        assert st["CapEff"] == "0000000000000000" and st["NoNewPrivs"] == "1", (st["CapEff"], st["NoNewPrivs"])
        net = os.readlink(f"/proc/{pid}/ns/net")
        assert net != os.readlink("/proc/self/ns/net"), "the agent runs in the host's network namespace"
        netns_ids.add(net)
        addrs = subprocess.run(["ip", "-n", C.netns(p, NS), "-4", "-o", "addr", "show", "eth0"], capture_output=True,
                               text=True, check=True).stdout
        assert f" {ip}/24 " in addrs, addrs
        hostname = subprocess.run(["nsenter", "-t", str(pid), "-u", "hostname"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert hostname == name, hostname
        assert "ro" in mount_options(pid, "/"), mount_options(pid, "/")
        assert "ro" in mount_options(pid, "/models") and "ro" in mount_options(pid, "/usr/local/bin")
        assert "rw" in mount_options(pid, "/tmp"), mount_options(pid, "/tmp")
        root = f"/proc/{pid}/root"
        with open(f"{root}/etc/agent/agent.conf") as f:
            assert f.read() == f"model={MODEL}\n"
        s = os.stat(f"{root}/etc/agent/agent.conf")
        assert (s.st_mode & 0o777, s.st_gid) == (0o440, 65532), (oct(s.st_mode), s.st_gid)
        with open(f"{root}/etc/agent-secret/api-secret") as f:
            assert f.read() == SECRET
        assert not os.path.exists(f"{root}/var/run/secrets/kubernetes.io/serviceaccount"), \
            "automountServiceAccountToken: false still mounted a token"
        models = http_json(C.pod_url(p, "http", NS) + "/v1/models")
        ids = {m["id"] for m in models["data"]}
        # the non-root agent read the model from the PVC and adapters from the hostPath (the PEFT ones
        # name another base model and are skipped)
        assert MODEL in ids and "r8-all-trtllm" in ids, ids
    assert len(netns_ids) == 2, "the two pods share a network namespace"
    # writing outside the volumes fails as in a cluster: the root is read-only
    pid = C.pid(pods[0], "agent", NS)
    p = subprocess.run(["nsenter", "-t", str(pid), "-m", "-r", "-S", "65532", "-G", "65532", "--", "/bin/sh", "-c",
                        "touch /x 2>&1; touch /tmp/x && echo tmp-ok"], capture_output=True, text=True)
    assert "Read-only file system" in p.stdout and "tmp-ok" in p.stdout, p.stdout + p.stderr


@test
def ready_follows_the_readiness_probe():
    pods = live_pods()
    victim = pods[0]
    name = victim["metadata"]["name"]
    pid = C.pid(victim, "agent", NS)
    os.kill(pid, signal.SIGSTOP)  # /ready stops answering: the probe times out
    try:
        C.wait(lambda: not ready(C.pod(name, NS)), 30, f"{name} to turn not Ready")
        C.wait(lambda: deployment()["status"].get("readyReplicas") == 1, 30, "readyReplicas 1")
        assert "0/1" in C.kubectl("get", "pod", name, "-n", NS).stdout
    finally:
        os.kill(pid, signal.SIGCONT)
    C.wait(lambda: ready(C.pod(name, NS)), 30, f"{name} to be Ready again")
    C.wait(lambda: deployment()["status"].get("readyReplicas") == 2, 30, "readyReplicas 2")
    assert C.pod(name, NS)["status"]["containerStatuses"][0]["restartCount"] == 0


@test
def deleted_pod_is_replaced_by_a_new_one():
    pods = live_pods()
    victim = pods[0]
    name = victim["metadata"]["name"]
    pid, ns_name = C.pid(victim, "agent", NS), C.netns(victim, NS)
    C.kubectl("delete", "pod", name, "-n", NS, "--timeout=30s")  # waits until the pod is gone
    assert C.pod(name, NS) is None
    assert not alive(pid), "the deleted pod's process still runs"
    assert ns_name not in netns_list(), "the deleted pod's netns is still there"
    assert "received SIGTERM" in C.logs(name, "agent", NS), "the agent did not get SIGTERM"
    now = C.wait_ready(NS, SEL, 2)
    assert name not in [p["metadata"]["name"] for p in now]
    # addresses are not reused at once (stale neighbour entries would stall traffic)
    assert victim["status"]["podIP"] not in [p["status"]["podIP"] for p in now]
    remember(now)


@test
def scaling_up_and_down():
    C.helm("upgrade", REL, CHART, "-n", NS, "--reuse-values", "--set", "replicas=3", "--wait", "--timeout", "90s")
    pods = C.wait_ready(NS, SEL, 3)
    remember(pods)
    assert len({p["status"]["podIP"] for p in pods}) == 3
    pids = {p["metadata"]["name"]: C.pid(p, "agent", NS) for p in pods}
    r = C.kubectl("scale", "deployment", f"{REL}-agent", "-n", NS, "--replicas=1")
    assert "scaled" in r.stdout, r.stdout
    C.wait(lambda: len(C.pods(NS, SEL)) == 1 and ready(C.pods(NS, SEL)[0]), 60, "one pod left")
    left = C.pods(NS, SEL)[0]["metadata"]["name"]
    C.wait(lambda: all(not alive(pid) for n, pid in pids.items() if n != left), 30, "the removed pods' processes to end")
    d = C.wait(lambda: (lambda d: d if d["status"].get("replicas") == 1 and
                        d["status"].get("readyReplicas") == 1 else None)(deployment()), 30, "status replicas 1")
    assert d["status"].get("updatedReplicas") == 1
    C.helm("upgrade", REL, CHART, "-n", NS, "--reuse-values", "--set", "replicas=2", "--wait", "--timeout", "90s")
    remember(C.wait_ready(NS, SEL, 2))


@test
def template_change_rolls_the_deployment():
    old_rs = replicasets()
    assert len(old_rs) == 1
    old_pods = {p["metadata"]["name"]: C.pid(p, "agent", NS) for p in live_pods()}
    C.helm("upgrade", REL, CHART, "-n", NS, "--reuse-values", "--set", "rollout=2", "--wait", "--timeout", "90s")
    r = C.kubectl("rollout", "status", f"deployment/{REL}-agent", "-n", NS, "--timeout=60s")
    assert "successfully rolled out" in r.stdout, r.stdout
    rss = {rs["metadata"]["name"]: rs for rs in replicasets()}
    assert len(rss) == 2, list(rss)
    new = [rs for n, rs in rss.items() if n != old_rs[0]["metadata"]["name"]][0]
    assert new["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == "2"
    C.wait(lambda: rss and get(f"/apis/apps/v1/namespaces/{NS}/replicasets/{old_rs[0]['metadata']['name']}")
           ["spec"]["replicas"] == 0, 30, "the old ReplicaSet scaled to 0")
    C.wait(lambda: len(C.pods(NS, SEL)) == 2, 60, "the old pods to go")
    pods = C.wait_ready(NS, SEL, 2)
    remember(pods)
    h = new["metadata"]["labels"]["pod-template-hash"]
    for p in pods:
        assert p["metadata"]["labels"]["pod-template-hash"] == h and p["metadata"]["annotations"]["rollout"] == "2"
    C.wait(lambda: all(not alive(pid) for pid in old_pods.values()), 30, "the old pods' processes to end")
    d = deployment()
    assert d["status"].get("updatedReplicas") == 2 and d["status"]["observedGeneration"] == d["metadata"]["generation"]


JOBS = """
apiVersion: batch/v1
kind: Job
metadata: {name: retry-once}
spec:
  template:
    spec:
      restartPolicy: OnFailure
      containers:
      - name: work
        image: busybox
        command: ["sh", "-c", "if [ -e /work/once ]; then echo second run; exit 0; fi; touch /work/once; echo first run; exit 3"]
        volumeMounts: [{name: work, mountPath: /work}]
      volumes: [{name: work, emptyDir: {}}]
---
apiVersion: batch/v1
kind: Job
metadata: {name: always-fails}
spec:
  backoffLimit: 1
  template:
    spec:
      restartPolicy: Never
      containers:
      - {name: work, image: busybox, command: ["sh", "-c", "echo failing; exit 7"]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: checker}
---
apiVersion: batch/v1
kind: Job
metadata: {name: api-check}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      serviceAccountName: checker
      securityContext: {runAsUser: 1000}
      containers:
      - name: check
        image: python
        command:
        - python3
        - -c
        - |
          import os, ssl, urllib.request
          d = "/var/run/secrets/kubernetes.io/serviceaccount"
          token = open(d + "/token").read()
          ns = open(d + "/namespace").read()
          ctx = ssl.create_default_context(cafile=d + "/ca.crt")
          url = "https://%s:%s/api/v1/namespaces/%s/pods" % (os.environ["KUBERNETES_SERVICE_HOST"],
                                                              os.environ["KUBERNETES_SERVICE_PORT"], ns)
          req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
          print("api answered", urllib.request.urlopen(req, context=ctx).status)
"""


@test
def jobs_complete_fail_and_reach_the_api():
    kubectl_apply(JOBS)
    j = C.wait(lambda: (lambda j: j if cond(j, "Complete").get("status") == "True" else None)(job("retry-once")), 60,
               "job retry-once to complete")
    assert j["status"].get("succeeded") == 1 and j["status"].get("completionTime") and j["status"].get("startTime")
    assert cond(j, "SuccessCriteriaMet").get("status") == "True"
    pods = C.pods(NS, "batch.kubernetes.io/job-name=retry-once")
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    cs = pods[0]["status"]["containerStatuses"][0]
    assert cs["restartCount"] == 1 and cs["state"]["terminated"]["exitCode"] == 0, cs
    assert cs["lastState"]["terminated"]["exitCode"] == 3, cs
    assert C.logs(pods[0], "work", NS, previous=True).strip() == "first run"
    assert C.logs(pods[0], "work", NS).strip() == "second run"
    name = pods[0]["metadata"]["name"]
    assert C.kubectl("logs", name, "-n", NS, "--previous").stdout.strip() == "first run"
    assert C.kubectl("logs", "job/retry-once", "-n", NS).stdout.strip() == "second run"
    assert pods[0]["status"]["phase"] == "Succeeded"
    r = C.kubectl("wait", "--for=condition=complete", "job/retry-once", "-n", NS, "--timeout=10s")
    assert "condition met" in r.stdout, r.stdout
    j = C.wait(lambda: (lambda j: j if cond(j, "Failed").get("status") == "True" else None)(job("always-fails")), 60,
               "job always-fails to fail")
    assert cond(j, "Failed")["reason"] == "BackoffLimitExceeded" and cond(j, "FailureTarget").get("status") == "True"
    assert j["status"].get("failed") == 2, j["status"]
    for p in C.pods(NS, "batch.kubernetes.io/job-name=always-fails"):
        assert p["status"]["phase"] == "Failed"
        assert p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    j = C.wait(lambda: (lambda j: j if cond(j, "Complete").get("status") == "True" or cond(j, "Failed").get("status")
                        == "True" else None)(job("api-check")), 60, "job api-check to finish")
    p = C.pods(NS, "batch.kubernetes.io/job-name=api-check")[0]
    assert cond(j, "Complete").get("status") == "True", C.logs(p, "check", NS)
    assert "api answered 200" in C.logs(p, "check", NS)
    user = f"system:serviceaccount:{NS}:checker"
    mine = [r for r in C.requests(user=user) if r["path"] == f"/api/v1/namespaces/{NS}/pods"]
    assert mine and mine[-1]["code"] == 200, mine
    table = C.kubectl("get", "jobs", "-n", NS).stdout
    assert re.search(r"retry-once\s+Complete\s+1/1", table) and re.search(r"always-fails\s+Failed\s+0/1", table), table


PENDING = """
apiVersion: v1
kind: Pod
metadata: {name: waits-for-config}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo value=$LATER; sleep 600"]
    env:
    - {name: LATER, valueFrom: {secretKeyRef: {name: later, key: k}}}
---
apiVersion: v1
kind: Pod
metadata: {name: waits-for-claim}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "echo stored > /data/file; sleep 600"]
    volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: late-claim}}]
"""


def waiting(pod_name, reason):
    def check():
        p = C.pod(pod_name, NS)
        w = ((p or {}).get("status") or {}).get("containerStatuses") or [{}]
        st = (w[0].get("state") or {}).get("waiting") or {}
        return st if st.get("reason") == reason else None
    return check


@test
def pods_wait_for_missing_secrets_and_claims():
    kubectl_apply(PENDING)
    st = C.wait(waiting("waits-for-config", "CreateContainerConfigError"), 30, "CreateContainerConfigError")
    assert st["message"] == 'secret "later" not found', st
    assert "CreateContainerConfigError" in C.kubectl("get", "pod", "waits-for-config", "-n", NS).stdout
    C.kubectl("create", "secret", "generic", "later", "-n", NS, "--from-literal=other=x")
    C.wait(lambda: (waiting("waits-for-config", "CreateContainerConfigError")() or {}).get("message") ==
           f"couldn't find key k in Secret {NS}/later", 30, "the missing key to be reported")
    C.kubectl("patch", "secret", "later", "-n", NS, "--type=merge",
              "-p", json.dumps({"data": {"k": base64.b64encode(b"finally").decode()}}))
    C.wait(lambda: ready(C.pod("waits-for-config", NS) or {}), 30, "waits-for-config to run")
    C.wait(lambda: "value=finally" in C.logs("waits-for-config", "main", NS), 10, "the secret's value in the env")
    ev = C.wait(lambda: [e for e in (get(f"/api/v1/namespaces/{NS}/events") or {}).get("items", [])
                         if e["reason"] == "FailedMount" and e["involvedObject"]["name"] == "waits-for-claim"],
                30, "a FailedMount event")
    assert 'persistentvolumeclaim "late-claim" not found' in ev[0]["message"], ev[0]["message"]
    p = C.pod("waits-for-claim", NS)
    assert p["status"]["phase"] == "Pending" and p["spec"]["nodeName"] == "node-1"  # bound by the scheduler
    kubectl_apply("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: late-claim}\n"
                  "spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n")
    C.wait(lambda: ready(C.pod("waits-for-claim", NS) or {}), 30, "waits-for-claim to run")
    pid = C.pid("waits-for-claim", "main", NS)
    C.wait(lambda: os.path.exists(f"/proc/{pid}/root/data/file"), 10, "the file on the claim")
    C.kubectl("delete", "pod", "waits-for-config", "waits-for-claim", "-n", NS, "--timeout=30s")


PROBED = """
apiVersion: v1
kind: Pod
metadata: {name: liveness}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox
    command: ["sh", "-c", "touch /tmp/alive; echo started; sleep 1; rm /tmp/alive; sleep 600"]
    livenessProbe:
      exec: {command: [cat, /tmp/alive]}
      periodSeconds: 2
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {name: with-init}
spec:
  terminationGracePeriodSeconds: 1
  initContainers:
  - {name: prepare, image: busybox, command: ["sh", "-c", "echo prepared > /shared/x"],
     volumeMounts: [{name: shared, mountPath: /shared}]}
  containers:
  - {name: main, image: busybox, command: ["sh", "-c", "cat /shared/x; sleep 600"],
     volumeMounts: [{name: shared, mountPath: /shared}]}
  volumes: [{name: shared, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: init-fails}
spec:
  terminationGracePeriodSeconds: 1
  initContainers:
  - {name: broken, image: busybox, command: ["sh", "-c", "exit 1"]}
  containers:
  - {name: main, image: busybox, command: ["sleep", "600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: on-host-network}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: busybox, command: ["sh", "-c", "echo on $HOSTNAME; sleep 600"]}
"""


@test
def liveness_restarts_and_init_containers():
    kubectl_apply(PROBED)
    p = C.wait(lambda: (lambda p: p if p and p["status"].get("containerStatuses") and
                        p["status"]["containerStatuses"][0]["restartCount"] >= 1 else None)(C.pod("liveness", NS)),
               60, "the liveness probe to restart the container")
    last = p["status"]["containerStatuses"][0]["lastState"]
    assert "terminated" in last, last
    evs = (get(f"/api/v1/namespaces/{NS}/events") or {}).get("items", [])
    assert any(e["reason"] == "Killing" and e["involvedObject"]["name"] == "liveness" for e in evs)
    assert any(e["reason"] == "Unhealthy" and "Liveness probe failed" in e["message"] for e in evs)
    C.wait(lambda: ready(C.pod("with-init", NS) or {}), 30, "with-init to run")
    p = C.pod("with-init", NS)
    ics = p["status"]["initContainerStatuses"][0]
    assert ics["state"]["terminated"]["reason"] == "Completed", ics
    assert cond(p, "Initialized")["status"] == "True"
    C.wait(lambda: "prepared" in C.logs("with-init", "main", NS), 10, "the init container's output")
    assert C.kubectl("logs", "with-init", "-n", NS, "-c", "prepare").stdout == ""
    assert C.kubectl("logs", "with-init", "-n", NS, "--tail=1").stdout == "prepared\n"
    p = C.wait(lambda: (lambda p: p if p and ready(p) else None)(C.pod("on-host-network", NS)), 30, "on-host-network")
    assert p["status"]["podIP"] == C.gateway and C.netns(p, NS) is None
    pid = C.pid(p, "main", NS)
    assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    C.wait(lambda: C.logs(p, "main", NS) == "on node-1\n", 10, "the node's hostname")
    p = C.wait(lambda: (lambda p: p if p and (p["status"].get("initContainerStatuses") or [{}])[0].get("restartCount", 0)
                        >= 2 else None)(C.pod("init-fails", NS)), 60, "the failing init container to be retried")
    assert p["status"]["phase"] == "Pending" and cond(p, "Initialized")["status"] == "False"
    assert p["status"]["containerStatuses"][0]["state"].get("waiting"), p["status"]["containerStatuses"]
    status_col = C.kubectl("get", "pod", "init-fails", "-n", NS).stdout
    assert re.search(r"Init:(CrashLoopBackOff|Error)", status_col), status_col
    C.kubectl("delete", "pod", "liveness", "with-init", "init-fails", "on-host-network", "-n", NS, "--timeout=30s")


@test
def pods_survive_an_api_server_outage():
    pods = live_pods()
    pids = [C.pid(p, "agent", NS) for p in pods]
    informer = C.kubelet.informers["pods"]
    before = informer.failures
    C.api.go_down()
    try:
        C.wait(lambda: informer.failures > before, 30, "the kubelet to notice the API server is gone")
        assert all(alive(pid) for pid in pids), "containers died with the API server"
    finally:
        C.api.come_up()
    C.kubectl("delete", "pod", pods[0]["metadata"]["name"], "-n", NS, "--timeout=30s")
    now = C.wait_ready(NS, SEL, 2)
    assert pods[1]["metadata"]["name"] in [p["metadata"]["name"] for p in now] and alive(pids[1])
    remember(now)


@test
def helm_uninstall_runs_the_pre_delete_hook():
    pids = [C.pid(p, "agent", NS) for p in live_pods()]
    assert all(pids)
    before = C.api.app.request_seq
    r = C.helm("uninstall", REL, "-n", NS, "--wait", "--timeout", "90s")
    assert "uninstalled" in r.stdout, r.stdout
    j = job(f"{REL}-pre-delete")
    assert j is not None and cond(j, "Complete").get("status") == "True", j and j.get("status")
    hook_pod = C.pods(NS, f"batch.kubernetes.io/job-name={REL}-pre-delete")[0]
    assert C.logs(hook_pod, "hook", NS).strip() == f"pre-delete hook of {REL} ran"
    assert deployment() is None
    C.wait(lambda: not C.pods(NS, SEL), 60, "the agent pods to go (garbage collection)")
    C.wait(lambda: all(not alive(pid) for pid in pids), 30, "the agent processes to end")
    secrets = [s["metadata"]["name"] for s in (get(f"/api/v1/namespaces/{NS}/secrets") or {}).get("items", [])]
    assert not [s for s in secrets if s.startswith(f"sh.helm.release.v1.{REL}.")], secrets
    helm_reqs = [r for r in C.api.app.request_log(before)["requests"] if "helm" in r["userAgent"].lower()]
    deletes = [(r["path"], r["code"]) for r in helm_reqs if r["method"] == "DELETE"]
    # helm sends protobuf DeleteOptions; the release Secrets go with them
    assert [d for d in deletes if "/secrets/sh.helm.release.v1." in d[0] and d[1] == 200], deletes
    assert all(code in (200, 404) for _, code in deletes), deletes
    assert all(r["user"] == "token" for r in helm_reqs)


@test
def protobuf_delete_options_are_decoded():
    def ld(n, b):
        return bytes([n << 3 | 2, len(b)]) + b
    C.kubectl("create", "configmap", "proto-del", "-n", NS, "--from-literal=a=b")
    raw = bytes([1 << 3, 0]) + ld(4, b"Background")
    body = b"k8s\x00" + ld(1, ld(1, b"v1") + ld(2, b"DeleteOptions")) + ld(2, raw)
    code, out = api("DELETE", f"/api/v1/namespaces/{NS}/configmaps/proto-del", body,
                    "application/vnd.kubernetes.protobuf")
    assert code == 200 and out.get("status") == "Success", (code, out)


@test
def stop_leaves_nothing_behind():
    from kubelet import cleanup_stale
    prefix, state = C.network.prefix, C.state_dir
    pids = set(SEEN_PIDS)
    C.stop()
    assert not [n for n in netns_list() if n.startswith(prefix + "-")], netns_list()
    assert not [n for n in link_names() if n.startswith(prefix)], link_names()
    assert not [pid for pid in pids if alive(pid)], "container processes survived stop()"
    assert not os.path.exists(state), f"{state} is still there"
    # a crashed run's leftovers (a process that no longer exists) are removed by the next one
    dead = next(pid for pid in range(4190000, 4000000, -1) if not os.path.exists(f"/proc/{pid}"))
    stale = f"lpk{dead:x}x0"
    subprocess.run(["ip", "netns", "add", f"{stale}-2"], check=True)
    subprocess.run(["ip", "link", "add", stale, "type", "bridge"], check=True)
    d = tempfile.mkdtemp(prefix=f"lpk-{dead:x}x0-")
    cleanup_stale()
    assert f"{stale}-2" not in netns_list() and stale not in link_names() and not os.path.exists(d)


def main():
    """Runs the tests in order (they share the cluster); the cluster's
    state is printed after the first failure."""
    failures = 0
    try:
        for fn in TESTS:
            t0 = time.time()
            try:
                fn()
                print(f"PASS {PROG}:{fn.__name__} ({time.time() - t0:.1f}s)", flush=True)
            except Exception as e:  # an AssertionError, or a broken test
                failures += 1
                why = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
                print(f"FAIL {PROG}:{fn.__name__}: {why}", flush=True)
                if failures == 1 and not C._stopped and "gave up after" not in why:
                    print(C.dump(NS), flush=True)
    finally:
        C.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
