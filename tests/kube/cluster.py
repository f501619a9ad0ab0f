"""A one-node Kubernetes for tests: the API test server (apiserver.py) over
TLS, the controllers (kube_controllers.py: Deployments, ReplicaSets, Jobs,
scheduling, default ServiceAccount, kube-root-ca.crt, PVC binding) and
the kubelet stand-in (kubelet.py) running pods as real processes, each pod
in its own network namespace. Needs root. Docs: docs/kube-test-server.md,
"The kubelet stand-in".

API (for tests; `sys.path.insert(0, "tests/kube"); from cluster import Cluster`):

    with Cluster(bin_dir="build/bin",                 # mounted at /usr/local/bin in every container
                 pvc_dirs={"models": "/abs/dir"},      # claimName (or "ns/claimName") -> host dir;
                                                       #   other claims get a fresh empty dir
                 host_paths={"/models": "/abs/dir"},   # hostPath path -> host dir (else the real path)
                 node_labels={...},                    # extra labels of the one node (nodeSelector)
                 probe_period_scale=0.1,               # probe periods/initial delays x this
                 ) as c:
        c.kubeconfig            # path, for kubectl/helm/the operator on the host (admin token)
        c.kubectl("apply", "-f", path, input=None, check=True)   # -> CompletedProcess (text)
        c.helm("install", "rel", chart, "-n", "ns", "--create-namespace", "--wait")
        c.api                   # the KubeApiServer (in-process: c.api.request("GET", path) -> (code, obj))
        c.url, c.ca_file, c.gateway   # API URL (https://<bridge .1>:port), CA, the host's address seen from pods
        c.pods("ns", "app=x")   # pod objects (label selector optional)
        c.pod("name", "ns")     # one pod object or None
        c.wait(lambda: ..., timeout=60, what="...")   # re-evaluated on every API write; returns the value
        c.wait_ready("ns", "app=x", count=2)           # -> the Ready pods
        c.logs("pod", "container", "ns")  # this run's output; c.all_logs(...) every run
        c.pid("pod", "container", "ns")   # host pid of the container process (read /proc/PID/...)
        c.netns("pod", "ns")              # the pod's network namespace name (ip netns exec ...)
        c.pod_url("pod", "admin", "ns")   # http://<podIP>:<port of the container port named admin>
        c.requests(user="system:serviceaccount:ns:sa")   # the API's request log entries of a user
        c.dump("ns")                      # pods, container states, events and log tails, for failures
    # stop() (or leaving the with) kills every container and removes the
    # netns, veths, bridge, state directory and the API server.

Status (h4): working and tested (tests/integration/test-kubelet.py, ~20 s):
Deployments (rollout, scale), Jobs, helm install --wait / upgrade /
uninstall with hook Jobs, netns per pod, volumes, env, probes,
securityContext, `kubectl logs` (pods/log through the API server).

Users in the request log: the admin token -> "token", controllers ->
"system:kube-controller-manager", kubelet -> "system:node:<node>", pods ->
"system:serviceaccount:<ns>:<sa>"."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from apiserver import KubeApiServer  # noqa: E402
from kube_client import KubeClient  # noqa: E402
from kube_controllers import Controllers  # noqa: E402
from kubelet import Kubelet, Network, StandInError, require_privileges  # noqa: E402

CONTROLLER_USER = "system:kube-controller-manager"


def find_helm():
    """helm from $HELM, .tools/helm (make deps), PATH, or where the docs
    say to extract it; StandInError when none."""
    for cand in (os.environ.get("HELM"), os.path.join(ROOT, ".tools", "helm"), shutil.which("helm"),
                 "/tmp/helmdl/out/helm/helm"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise StandInError("no helm binary: run `make deps` (it puts helm in .tools/) or set $HELM")


def _openssl(*args):
    p = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise StandInError(f"openssl {' '.join(args[:2])} failed: {p.stderr.strip()}")


def make_certs(d, ip):
    """A CA and a server certificate for ip (plus 127.0.0.1 and the
    kubernetes.default.svc names), EC P-256 keys."""
    os.makedirs(d, exist_ok=True)
    p = lambda n: os.path.join(d, n)  # noqa: E731
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", p("ca.key"), "-out", p("ca.crt"), "-days", "2", "-subj", "/CN=loraplane-test-cluster-ca")
    with open(p("san.ext"), "w") as f:
        f.write(f"subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
                "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
                "extendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             p("server.key"), "-out", p("server.csr"), "-subj", "/CN=kube-apiserver")
    _openssl("x509", "-req", "-in", p("server.csr"), "-CA", p("ca.crt"), "-CAkey", p("ca.key"), "-CAcreateserial",
             "-out", p("server.crt"), "-days", "2", "-extfile", p("san.ext"))
    return p("ca.crt"), p("server.crt"), p("server.key")


class Cluster:
    """See the module docstring."""

    def __init__(self, bin_dir, pvc_dirs=None, host_paths=None, node_name="node-1", node_labels=None,
                 probe_period_scale=0.1, restart_backoff=(0.5, 5.0), job_backoff=(0.5, 5.0), image_env=None,
                 image_entrypoints=None, image_user=None, stop_grace_s=2.0, api_config=None, verbose=False):
        if not os.path.isdir(bin_dir):
            raise StandInError(f"bin_dir {bin_dir} is not a directory")
        for k, v in list((pvc_dirs or {}).items()) + list((host_paths or {}).items()):
            if not os.path.isabs(v):
                raise StandInError(f"{k}: host directory {v!r} must be an absolute path")
        self.bin_dir = os.path.abspath(bin_dir)
        self.pvc_dirs = dict(pvc_dirs or {})
        self.host_paths = dict(host_paths or {})
        self.node_name = node_name
        self.node_labels = dict(node_labels or {})
        self.probe_period_scale = probe_period_scale
        self.restart_backoff = restart_backoff
        self.job_backoff = job_backoff
        self.image_env = image_env
        self.image_entrypoints = image_entrypoints
        self.image_user = image_user
        self.stop_grace_s = stop_grace_s
        self.api_config = dict(api_config or {})
        self.verbose = verbose
        self.network = None
        self.api = None
        self.controllers = None
        self.kubelet = None
        self.state_dir = None
        self.token = secrets.token_urlsafe(24)
        self._stopped = False
        self._old_sigterm = None

    # ---- lifecycle

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def _log(self, msg):
        print(f"cluster: {msg}", file=sys.stderr, flush=True)

    def start(self):
        require_privileges()
        try:
            self.network = Network(log=self._log)
            self.state_dir = tempfile.mkdtemp(prefix=f"lpk-{self.network.prefix[3:]}-")
            os.chmod(self.state_dir, 0o700)
            self.network.up()
            self._trap_sigterm()
            self.ca_file, cert, key = make_certs(os.path.join(self.state_dir, "pki"), self.network.gateway)
            with open(self.ca_file, "rb") as f:
                self.ca_pem = f.read()
            ctl_token, node_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            cfg = {"pod_termination_s": None, "bookmark_interval_s": 0.25}
            cfg.update(self.api_config)
            self.api = KubeApiServer(host=self.network.gateway, port=0, token=self.token, tls_cert=cert,
                                     tls_key=key, token_users={ctl_token: CONTROLLER_USER,
                                                               node_token: f"system:node:{self.node_name}"},
                                     verbose=self.verbose, **cfg).start()
            self.url = self.api.url
            self.gateway = self.network.gateway
            self.kubeconfig = self._write_kubeconfig()
            self.controllers = Controllers(
                KubeClient(self.url, ctl_token, self.ca_file, "kube-controller-manager/standin"), self.node_name,
                self.node_labels, self.ca_pem, self.job_backoff, log=self._log).start()
            self.kubelet = Kubelet(
                KubeClient(self.url, node_token, self.ca_file, "kubelet/standin"), self.network, self.node_name,
                self.bin_dir, self.state_dir, self.api.port, self.ca_pem, self.api.set_token_user, self._pvc_dir,
                host_paths=self.host_paths, probe_period_scale=self.probe_period_scale,
                restart_backoff=self.restart_backoff, image_env=self.image_env,
                image_entrypoints=self.image_entrypoints, image_user=self.image_user, node_labels=self.node_labels,
                stop_grace_s=self.stop_grace_s).start()
            self.api.app.pod_logs = self._pod_logs
            self.wait(lambda: self.api.get({"apiVersion": "v1", "kind": "ServiceAccount",
                                            "metadata": {"name": "default", "namespace": "default"}}),
                      30, "the default ServiceAccount")
        except BaseException:
            self.stop()
            raise
        return self

    def _trap_sigterm(self):
        """A SIGTERM (tests/run.sh's timeout) ends the test through
        SystemExit, so that stop() still cleans up."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            def on_term(signum, frame):
                raise SystemExit(128 + signum)
            self._old_sigterm = signal.SIG_DFL
            signal.signal(signal.SIGTERM, on_term)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        for what, fn in (("kubelet", lambda: self.kubelet and self.kubelet.stop()),
                         ("controllers", lambda: self.controllers and self.controllers.stop()),
                         ("api server", lambda: self.api and self.api.stop()),
                         ("network", lambda: self.network and self.network.down())):
            try:
                fn()
            except Exception as e:  # keep cleaning up
                self._log(f"stopping the {what}: {type(e).__name__}: {e}")
        if self.state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)

    def _write_kubeconfig(self):
        import json
        path = os.path.join(self.state_dir, "kubeconfig")
        cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "standin",
               "clusters": [{"name": "standin", "cluster": {"server": self.url, "certificate-authority": self.ca_file}}],
               "users": [{"name": "admin", "user": {"token": self.token}}],
               "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "admin",
                                                            "namespace": "default"}}]}
        with open(path, "w") as f:
            json.dump(cfg, f)
        os.chmod(path, 0o600)
        return path

    def _pod_logs(self, ns, name, container, previous):
        path = self.kubelet.log_path(ns, name, container, previous)
        try:
            with open(path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            raise KeyError("no output recorded")

    def _pvc_dir(self, pvc):
        m = pvc["metadata"]
        for k in (f"{m['namespace']}/{m['name']}", m["name"]):
            if k in self.pvc_dirs:
                return self.pvc_dirs[k]
        d = os.path.join(self.state_dir, "pvcs", f"{m['namespace']}_{m['name']}_{m['uid'][:8]}")
        if not os.path.isdir(d):
            os.makedirs(d)
            os.chmod(d, 0o777)
        return d

    # ---- clients

    def kubectl(self, *args, input=None, check=True, timeout=60):
        p = subprocess.run(["kubectl", "--kubeconfig", self.kubeconfig, "--cache-dir",
                            os.path.join(self.state_dir, "kube-cache"), *args], capture_output=True, text=True,
                           input=input, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def helm(self, *args, check=True, timeout=300):
        home = os.path.join(self.state_dir, "helm")
        env = dict(os.environ, KUBECONFIG=self.kubeconfig, HELM_CACHE_HOME=os.path.join(home, "cache"),
                   HELM_CONFIG_HOME=os.path.join(home, "config"), HELM_DATA_HOME=os.path.join(home, "data"))
        p = subprocess.run([find_helm(), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return p

    # ---- reading state

    def pods(self, namespace=None, selector=None):
        from urllib.parse import quote
        path = f"/api/v1/namespaces/{namespace}/pods" if namespace else "/api/v1/pods"
        if selector:
            path += "?labelSelector=" + quote(selector)
        code, out = self.api.request("GET", path)
        if code != 200:
            raise AssertionError(f"listing pods: HTTP {code}: {out.get('message')}")
        return out.get("items") or []

    def pod(self, name, namespace="default"):
        code, out = self.api.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        return out if code == 200 else None

    def wait(self, cond, timeout=60, what="a condition"):
        """Evaluates cond() again whenever the API server's state changes
        (at least every 0.25 s, for conditions outside the API) until it
        returns something true, which it returns; AssertionError with the
        cluster's state after timeout seconds."""
        st = self.api.app.store
        deadline = time.monotonic() + timeout
        while True:
            rv = st.rv
            v = cond()
            if v:
                return v
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"gave up after {timeout}s waiting for {what}\n{self.dump()}")
            with st.cond:
                if st.rv == rv:
                    st.cond.wait(min(0.25, left))

    def wait_ready(self, namespace, selector=None, count=1, timeout=90):
        def ready():
            pods = [p for p in self.pods(namespace, selector) if not p["metadata"].get("deletionTimestamp")
                    and any(c.get("type") == "Ready" and c.get("status") == "True"
                            for c in (p.get("status") or {}).get("conditions") or [])]
            return pods if len(pods) == count else None
        return self.wait(ready, timeout, f"{count} Ready pod(s) in {namespace} ({selector or 'any'})")

    def _pod_name(self, pod):
        return pod["metadata"]["name"] if isinstance(pod, dict) else pod

    def logs(self, pod, container=None, namespace="default", previous=False):
        return self.kubelet.logs(namespace, self._pod_name(pod), container, previous)

    def all_logs(self, pod, container=None, namespace="default"):
        return self.kubelet.all_logs(namespace, self._pod_name(pod), container)

    def pid(self, pod, container=None, namespace="default"):
        return self.kubelet.container_pid(namespace, self._pod_name(pod), container)

    def netns(self, pod, namespace="default"):
        return self.kubelet.netns(namespace, self._pod_name(pod))

    def pod_url(self, pod, port_name, namespace="default", scheme="http"):
        p = pod if isinstance(pod, dict) else self.pod(pod, namespace)
        if p is None:
            raise AssertionError(f"no pod {namespace}/{pod}")
        ip = (p.get("status") or {}).get("podIP")
        if not ip:
            raise AssertionError(f"pod {namespace}/{p['metadata']['name']} has no IP yet")
        for c in (p.get("spec") or {}).get("containers") or []:
            for port in c.get("ports") or []:
                if port.get("name") == port_name:
                    return f"{scheme}://{ip}:{port['containerPort']}"
        raise AssertionError(f"pod {p['metadata']['name']} has no container port named {port_name!r}")

    def requests(self, user=None, since=0):
        reqs = self.api.app.request_log(since)["requests"]
        return [r for r in reqs if user is None or r.get("user") == user]

    def dump(self, namespace=None, log_lines=30):
        """Pods (phase, containers' states), recent events and the tail
        of every container's log: what to print when a test fails."""
        out = []
        try:
            for p in self.pods(namespace):
                m, st = p["metadata"], p.get("status") or {}
                out.append(f"pod {m['namespace']}/{m['name']}: phase={st.get('phase')} ip={st.get('podIP')}"
                           f"{' terminating' if m.get('deletionTimestamp') else ''}")
                for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
                    out.append(f"  {cs['name']}: ready={cs.get('ready')} restarts={cs.get('restartCount')} "
                               f"state={cs.get('state')} last={cs.get('lastState') or ''}")
                    try:
                        text = self.kubelet.logs(m["namespace"], m["name"], cs["name"])
                    except KeyError:
                        text = ""
                    for line in text.splitlines()[-log_lines:]:
                        out.append(f"    | {line}")
            path = f"/api/v1/namespaces/{namespace}/events" if namespace else "/api/v1/events"
            code, evs = self.api.request("GET", path)
            for e in (evs.get("items") or [])[-40:] if code == 200 else []:
                io = e.get("involvedObject") or {}
                out.append(f"event {e.get('type')} {e.get('reason')} {io.get('kind')}/{io.get('name')}: "
                           f"{(e.get('message') or '').strip()[:300]}")
        except Exception as e:  # diagnostics must not hide the failure
            out.append(f"(dump failed: {type(e).__name__}: {e})")
        return "\n".join(out)
