"""The controllers the kubelet stand-in needs around it, in the spirit of
kube-controller-manager and kube-scheduler, over the API (informers, a
work queue, writes through the API): Deployments -> ReplicaSets -> Pods,
Jobs -> Pods, scheduling pods onto the one node, a `default`
ServiceAccount and the `kube-root-ca.crt` ConfigMap in every namespace,
and binding PersistentVolumeClaims. What each does, and where it is
simpler than Kubernetes, is in docs/kube-test-server.md ("The kubelet
stand-in")."""

import copy
import http.client
import json
import os
import sys
import threading
import time
import traceback
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from kube_client import Informer, KubeError, WorkQueue, resource_path  # noqa: E402
from kube_select import LabelSelector  # noqa: E402

SAFE_CHARS = "bcdfghjklmnpqrstvwxz2456789"
REVISION = "deployment.kubernetes.io/revision"


def now_iso():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _log(msg):
    print(f"kube-controllers: {msg}", file=sys.stderr, flush=True)


def fnv32a(data):
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def safe_encode(s):
    return "".join(SAFE_CHARS[ord(ch) % len(SAFE_CHARS)] for ch in s)


def template_hash(template, collision_count=0):
    """The pod-template-hash of a Deployment's template (FNV-32a of its
    JSON, encoded with Kubernetes' safe alphabet)."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    if collision_count:
        data += str(collision_count).encode()
    return safe_encode(str(fnv32a(data)))


def selector_of(spec):
    sel = (spec or {}).get("selector") or {}
    parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
    for e in sel.get("matchExpressions") or []:
        op, k, vals = e.get("operator"), e.get("key"), e.get("values") or []
        if op == "In":
            parts.append(f"{k} in ({','.join(vals)})")
        elif op == "NotIn":
            parts.append(f"{k} notin ({','.join(vals)})")
        elif op == "Exists":
            parts.append(k)
        elif op == "DoesNotExist":
            parts.append(f"!{k}")
    return LabelSelector(",".join(parts))


def controller_ref(obj):
    for r in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if r.get("controller"):
            return r
    return None


def owned_by(obj, owner):
    r = controller_ref(obj)
    return r is not None and r.get("uid") == owner["metadata"]["uid"]


def pod_ready(pod):
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("status") == "True"
    return False


def pod_active(pod):
    return not pod["metadata"].get("deletionTimestamp") and \
        (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


def int_or_percent(v, total, round_up):
    if v is None:
        return None
    if isinstance(v, int):
        return v
    s = str(v)
    if s.endswith("%"):
        x = int(s[:-1]) * total / 100.0
        return int(-(-x // 1)) if round_up else int(x // 1)
    return int(s)


def condition(type_, status, reason, message, old_conds):
    t = now_iso()
    prev = next((c for c in old_conds or [] if c.get("type") == type_), None)
    c = {"type": type_, "status": status, "reason": reason, "message": message, "lastUpdateTime": t,
         "lastTransitionTime": prev["lastTransitionTime"] if prev and prev.get("status") == status else t}
    if prev and prev.get("status") == status and prev.get("reason") == reason and prev.get("message") == message:
        c["lastUpdateTime"] = prev.get("lastUpdateTime", t)
    return c


class Controllers:
    """All of the controllers, one work queue and one worker thread.
    client: a KubeClient; node_name / node_labels: the one node pods go
    to; ca_pem: the cluster CA for kube-root-ca.crt; bind_pvc(pvc): True
    when the claim can be bound (the kubelet has a directory for it)."""

    def __init__(self, client, node_name, node_labels=None, ca_pem=b"", job_backoff=(0.5, 5.0), log=_log):
        self.client = client
        self.node_name = node_name
        self.node_labels = dict(node_labels or {})
        self.node_labels.setdefault("kubernetes.io/hostname", node_name)
        self.node_labels.setdefault("kubernetes.io/os", "linux")
        self.node_labels.setdefault("kubernetes.io/arch", "amd64")
        self.ca_pem = ca_pem
        self.job_backoff = job_backoff
        self.log = log
        self.queue = WorkQueue()
        self.inf = {}
        self.thread = None

    # ---- lifecycle

    def start(self):
        specs = [("deployments", "apps/v1", self._on_deployment), ("replicasets", "apps/v1", self._on_rs),
                 ("jobs", "batch/v1", self._on_job), ("pods", "v1", self._on_pod),
                 ("namespaces", "v1", self._on_namespace), ("serviceaccounts", "v1", self._on_ns_object),
                 ("configmaps", "v1", self._on_ns_object), ("persistentvolumeclaims", "v1", self._on_pvc)]
        for plural, av, handler in specs:
            inf = Informer(self.client, resource_path(av, plural), f"ctl-{plural}", log=self.log)
            inf.add_handler(handler)
            self.inf[plural] = inf
        for inf in self.inf.values():
            inf.start()
        for inf in self.inf.values():
            inf.synced.wait(30)
        self.thread = threading.Thread(target=self._work, name="kube-controllers", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.queue.shutdown()
        for inf in self.inf.values():
            inf.stop()
        if self.thread is not None:
            self.thread.join(10)

    def _work(self):
        while True:
            key = self.queue.get()
            if key is None:
                return
            kind, ns, name = key
            try:
                getattr(self, f"_sync_{kind}")(ns, name)
            except KubeError as e:
                if e.code not in (404, 409):
                    self.log(f"sync {kind} {ns}/{name}: {e}")
                self.queue.add_after(key, 0.2 if e.code == 409 else 1.0)
            except (OSError, http.client.HTTPException) as e:  # the API server is away: retry
                self.log(f"sync {kind} {ns}/{name}: {type(e).__name__}: {e}")
                self.queue.add_after(key, 1.0)
            except Exception as e:  # a bug: say so, retry later
                self.log(f"sync {kind} {ns}/{name}: {type(e).__name__}: {e}")
                traceback.print_exc(file=sys.stderr)
                self.queue.add_after(key, 2.0)

    # ---- event handlers

    def _ns_name(self, obj):
        m = obj.get("metadata") or {}
        return m.get("namespace", ""), m.get("name", "")

    def _on_deployment(self, etype, obj, old):
        self.queue.add(("deployment",) + self._ns_name(obj))

    def _on_rs(self, etype, obj, old):
        ns, name = self._ns_name(obj)
        self.queue.add(("replicaset", ns, name))
        ref = controller_ref(obj)
        if ref and ref.get("kind") == "Deployment":
            self.queue.add(("deployment", ns, ref["name"]))

    def _on_job(self, etype, obj, old):
        self.queue.add(("job",) + self._ns_name(obj))

    def _on_pod(self, etype, obj, old):
        ns, name = self._ns_name(obj)
        ref = controller_ref(obj)
        if ref and ref.get("kind") == "ReplicaSet":
            self.queue.add(("replicaset", ns, ref["name"]))
        elif ref and ref.get("kind") == "Job":
            self.queue.add(("job", ns, ref["name"]))
        if etype != "DELETED" and not (obj.get("spec") or {}).get("nodeName"):
            self.queue.add(("schedule", ns, name))

    def _on_namespace(self, etype, obj, old):
        if etype != "DELETED":
            self.queue.add(("namespace", "", obj["metadata"]["name"]))

    def _on_ns_object(self, etype, obj, old):
        ns, name = self._ns_name(obj)
        if etype == "DELETED" and name in ("default", "kube-root-ca.crt"):
            self.queue.add(("namespace", "", ns))

    def _on_pvc(self, etype, obj, old):
        if etype != "DELETED":
            self.queue.add(("pvc",) + self._ns_name(obj))

    # ---- writes (the result goes into the cache at once)

    def _create(self, plural, av, ns, obj):
        out = self.client.must("POST", resource_path(av, plural, ns), obj, ok=(201,))
        if plural in self.inf:
            self.inf[plural].observe(out)
        return out

    def _put_status(self, plural, av, obj, status):
        ns, name = self._ns_name(obj)
        body = dict(obj, status=status)
        out = self.client.must("PUT", resource_path(av, plural, ns, name, "status"), body)
        self.inf[plural].observe(out)
        return out

    def _delete(self, plural, av, obj, propagation=None):
        ns, name = self._ns_name(obj)
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": obj["metadata"]["uid"]}}
        if propagation:
            body["propagationPolicy"] = propagation
        code, out = self.client.request("DELETE", resource_path(av, plural, ns, name), body)
        if code == 200:
            if isinstance(out, dict) and out.get("kind") != "Status" and out.get("metadata", {}).get("name"):
                self.inf[plural].observe(out)
            else:
                self.inf[plural].forget(obj)
        elif code not in (404, 409):
            raise KubeError(code, out, f"delete {plural} {ns}/{name}")

    # ---- namespaces: default ServiceAccount, kube-root-ca.crt

    def _sync_namespace(self, _, name):
        nso = self.inf["namespaces"].get("", name)
        if nso is None or nso["metadata"].get("deletionTimestamp"):
            return
        if self.inf["serviceaccounts"].get(name, "default") is None:
            code, out = self.client.request("POST", resource_path("v1", "serviceaccounts", name),
                                            {"apiVersion": "v1", "kind": "ServiceAccount",
                                             "metadata": {"name": "default", "namespace": name}})
            if code == 201:
                self.inf["serviceaccounts"].observe(out)
            elif code not in (409, 403, 404):
                raise KubeError(code, out, "creating the default ServiceAccount")
        if self.ca_pem and self.inf["configmaps"].get(name, "kube-root-ca.crt") is None:
            code, out = self.client.request("POST", resource_path("v1", "configmaps", name),
                                            {"apiVersion": "v1", "kind": "ConfigMap",
                                             "metadata": {"name": "kube-root-ca.crt", "namespace": name,
                                                          "annotations": {"kubernetes.io/description": (
                                                              "Contains a CA bundle that can be used to verify the "
                                                              "kube-apiserver when using internal endpoints such as "
                                                              "the internal service IP or kubernetes.default.svc. "
                                                              "No other usage is guaranteed across distributions of "
                                                              "Kubernetes clusters.")}},
                                             "data": {"ca.crt": self.ca_pem.decode()}})
            if code == 201:
                self.inf["configmaps"].observe(out)
            elif code not in (409, 403, 404):
                raise KubeError(code, out, "creating kube-root-ca.crt")

    # ---- PersistentVolumeClaims: bound at once (a directory per claim)

    def _sync_pvc(self, ns, name):
        pvc = self.inf["persistentvolumeclaims"].get(ns, name)
        if pvc is None or pvc["metadata"].get("deletionTimestamp"):
            return
        st = pvc.get("status") or {}
        if st.get("phase") == "Bound":
            return
        spec = pvc.get("spec") or {}
        storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
        status = {"phase": "Bound", "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                  "capacity": {"storage": storage}}
        self._put_status("persistentvolumeclaims", "v1", pvc, status)

    # ---- scheduling: every pod goes to the one node, if it fits

    def _sync_schedule(self, ns, name):
        pod = self.inf["pods"].get(ns, name)
        if pod is None or (pod.get("spec") or {}).get("nodeName") or pod["metadata"].get("deletionTimestamp"):
            return
        spec = pod.get("spec") or {}
        if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return
        why = self._unschedulable(spec)
        if why:
            conds = [c for c in (pod.get("status") or {}).get("conditions") or [] if c.get("type") != "PodScheduled"]
            msg = f"0/1 nodes are available: 1 {why}."
            old = next((c for c in (pod.get("status") or {}).get("conditions") or []
                        if c.get("type") == "PodScheduled"), None)
            if old and old.get("message") == msg:
                return
            conds.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg,
                          "lastProbeTime": None, "lastTransitionTime": now_iso()})
            self.client.must("PATCH", resource_path("v1", "pods", ns, name, "status"),
                             {"status": {"conditions": conds}}, "application/merge-patch+json")
            return
        code, out = self.client.request("POST", resource_path("v1", "pods", ns, name, "binding"),
                                        {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                                         "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}})
        if code not in (201, 409, 404):
            raise KubeError(code, out, f"binding pod {ns}/{name}")

    def _unschedulable(self, spec):
        for k, v in (spec.get("nodeSelector") or {}).items():
            if self.node_labels.get(k) != v:
                return "node(s) didn't match Pod's node affinity/selector"
        req = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
               .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        terms = req.get("nodeSelectorTerms") or []
        if terms and not any(self._term_matches(t) for t in terms):
            return "node(s) didn't match Pod's node affinity/selector"
        return None

    def _term_matches(self, term):
        for e in term.get("matchExpressions") or []:
            k, op, vals = e.get("key"), e.get("operator"), e.get("values") or []
            v = self.node_labels.get(k)
            ok = {"In": v in vals, "NotIn": v not in vals, "Exists": v is not None, "DoesNotExist": v is None,
                  "Gt": v is not None and v.isdigit() and vals and int(v) > int(vals[0]),
                  "Lt": v is not None and v.isdigit() and vals and int(v) < int(vals[0])}.get(op, False)
            if not ok:
                return False
        for e in term.get("matchFields") or []:
            if e.get("key") == "metadata.name":
                vals = e.get("values") or []
                if (e.get("operator") == "In") != (self.node_name in vals):
                    return False
        return True

    # ---- pods from a template

    def _new_pod(self, owner, owner_kind, owner_av, template, extra_labels=None):
        tm = template.get("metadata") or {}
        labels = dict(tm.get("labels") or {})
        labels.update(extra_labels or {})
        m = owner["metadata"]
        meta = {"generateName": f"{m['name']}-", "namespace": m["namespace"], "labels": labels,
                "ownerReferences": [{"apiVersion": owner_av, "kind": owner_kind, "name": m["name"], "uid": m["uid"],
                                     "controller": True, "blockOwnerDeletion": True}]}
        if tm.get("annotations"):
            meta["annotations"] = dict(tm["annotations"])
        if tm.get("finalizers"):
            meta["finalizers"] = list(tm["finalizers"])
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": copy.deepcopy(template.get("spec") or {})}
        return self._create("pods", "v1", m["namespace"], pod)

    # ---- ReplicaSets

    def _rs_pods(self, rs):
        ns = rs["metadata"]["namespace"]
        sel = selector_of(rs.get("spec"))
        return [p for p in self.inf["pods"].list(ns) if owned_by(p, rs) and sel.matches(p["metadata"].get("labels"))]

    def _sync_replicaset(self, ns, name):
        rs = self.inf["replicasets"].get(ns, name)
        if rs is None:
            return
        pods = self._rs_pods(rs)
        active = [p for p in pods if pod_active(p)]
        want = int((rs.get("spec") or {}).get("replicas", 1))
        if not rs["metadata"].get("deletionTimestamp"):
            if len(active) < want:
                for _ in range(want - len(active)):
                    active.append(self._new_pod(rs, "ReplicaSet", "apps/v1", rs["spec"].get("template") or {}))
            elif len(active) > want:
                # not ready first, then the newest
                doomed = sorted(active, key=lambda p: (pod_ready(p), _neg_time(p["metadata"].get("creationTimestamp"))))
                for p in doomed[:len(active) - want]:
                    self._delete("pods", "v1", p)
                    active.remove(p)
        ready = [p for p in active if pod_ready(p)]
        labels = (rs["spec"].get("template") or {}).get("metadata", {}).get("labels") or {}
        full = [p for p in active if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in labels.items())]
        status = {"replicas": len(active), "fullyLabeledReplicas": len(full), "readyReplicas": len(ready),
                  "availableReplicas": len(ready), "observedGeneration": rs["metadata"].get("generation", 1)}
        for k in ("readyReplicas", "availableReplicas"):
            if status[k] == 0:
                del status[k]
        old = rs.get("status") or {}
        if {k: v for k, v in old.items() if k != "conditions"} != status:
            if old.get("conditions"):
                status["conditions"] = old["conditions"]
            self._put_status("replicasets", "apps/v1", rs, status)

    # ---- Deployments

    def _sync_deployment(self, ns, name):
        d = self.inf["deployments"].get(ns, name)
        if d is None or d["metadata"].get("deletionTimestamp"):
            return
        spec = d.get("spec") or {}
        want = int(spec.get("replicas", 1))
        sel = selector_of(spec)
        rss = [rs for rs in self.inf["replicasets"].list(ns) if owned_by(rs, d)
               and not rs["metadata"].get("deletionTimestamp")]
        tmpl = spec.get("template") or {}
        h = template_hash(tmpl, (d.get("status") or {}).get("collisionCount", 0))
        new = None
        for rs in rss:
            if _equal_ignore_hash(rs["spec"].get("template") or {}, tmpl):
                new = rs
                break
        old_rss = [rs for rs in rss if rs is not new]
        revisions = [int((rs["metadata"].get("annotations") or {}).get(REVISION, "0") or 0) for rs in rss]
        paused = bool(spec.get("paused"))
        if new is None and not paused:
            new_tmpl = copy.deepcopy(tmpl)
            new_tmpl.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = h
            rs_sel = copy.deepcopy(spec.get("selector") or {})
            rs_sel.setdefault("matchLabels", {})["pod-template-hash"] = h
            recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
            start = 0 if recreate and any(int(r["spec"].get("replicas", 0)) for r in old_rss) else want
            labels = dict((tmpl.get("metadata") or {}).get("labels") or {})
            labels["pod-template-hash"] = h
            ann = {REVISION: str(max(revisions + [0]) + 1), "deployment.kubernetes.io/desired-replicas": str(want),
                   "deployment.kubernetes.io/max-replicas": str(want + self._max_surge(spec, want))}
            rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                  "metadata": {"name": f"{name}-{h}", "namespace": ns, "labels": labels, "annotations": ann,
                               "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                                                    "uid": d["metadata"]["uid"], "controller": True,
                                                    "blockOwnerDeletion": True}]},
                  "spec": {"replicas": start, "minReadySeconds": spec.get("minReadySeconds", 0),
                           "selector": rs_sel, "template": new_tmpl}}
            code, out = self.client.request("POST", resource_path("apps/v1", "replicasets", ns), rs)
            if code == 409:
                existing = self.inf["replicasets"].get(ns, f"{name}-{h}")
                if existing is not None and not owned_by(existing, d):
                    # a hash collision with someone else's ReplicaSet: count it, as Kubernetes does
                    st = dict(d.get("status") or {})
                    st["collisionCount"] = int(st.get("collisionCount", 0)) + 1
                    self._put_status("deployments", "apps/v1", d, st)
                raise KubeError(409, out, "creating a ReplicaSet")
            if code != 201:
                raise KubeError(code, out, "creating a ReplicaSet")
            self.inf["replicasets"].observe(out)
            new = out
        elif new is not None:
            ann = dict(new["metadata"].get("annotations") or {})
            top = max(revisions + [0])
            if int(ann.get(REVISION, "0") or 0) < top and old_rss:
                ann[REVISION] = str(top + 1)
            ann["deployment.kubernetes.io/desired-replicas"] = str(want)
            ann["deployment.kubernetes.io/max-replicas"] = str(want + self._max_surge(spec, want))
            if ann != (new["metadata"].get("annotations") or {}):
                new = self._scale(new, int(new["spec"].get("replicas", 0)), ann)
        if not paused and new is not None:
            self._rollout(d, spec, want, new, old_rss)
        self._cleanup_old(spec, old_rss)
        self._deployment_status(d, spec, want, new, old_rss, sel)

    def _max_surge(self, spec, want):
        st = spec.get("strategy") or {}
        if st.get("type") == "Recreate":
            return 0
        ru = st.get("rollingUpdate") or {}
        v = int_or_percent(ru.get("maxSurge", "25%"), want, True)
        return v or 0

    def _max_unavailable(self, spec, want):
        st = spec.get("strategy") or {}
        if st.get("type") == "Recreate":
            return want
        ru = st.get("rollingUpdate") or {}
        v = int_or_percent(ru.get("maxUnavailable", "25%"), want, False) or 0
        if v == 0 and self._max_surge(spec, want) == 0:
            v = 1
        return min(v, want)

    def _scale(self, rs, replicas, annotations=None):
        body = copy.deepcopy(rs)
        body["spec"]["replicas"] = replicas
        if annotations is not None:
            body["metadata"]["annotations"] = annotations
        ns, name = self._ns_name(rs)
        out = self.client.must("PUT", resource_path("apps/v1", "replicasets", ns, name), body)
        self.inf["replicasets"].observe(out)
        return out

    def _rs_ready(self, rs):
        return len([p for p in self._rs_pods(rs) if pod_active(p) and pod_ready(p)])

    def _rollout(self, d, spec, want, new, old_rss):
        """Simple rollout: the new ReplicaSet goes to the full count at once
        (Recreate: once the old pods are gone); old ones shrink as new pods
        become Ready (Recreate: to zero first)."""
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        if recreate:
            old_pods = [p for rs in old_rss for p in self._rs_pods(rs)]
            for rs in old_rss:
                if int(rs["spec"].get("replicas", 0)) != 0:
                    self._scale(rs, 0)
            if old_pods:
                return
            if int(new["spec"].get("replicas", 0)) != want:
                self._scale(new, want)
            return
        if int(new["spec"].get("replicas", 0)) != want:
            new = self._scale(new, want)
        ready_new = self._rs_ready(new)
        old_budget = max(0, want - ready_new)
        for rs in sorted(old_rss, key=lambda r: r["metadata"].get("creationTimestamp", "")):
            cur = int(rs["spec"].get("replicas", 0))
            keep = min(cur, old_budget)
            old_budget -= keep
            if keep != cur:
                self._scale(rs, keep)

    def _cleanup_old(self, spec, old_rss):
        limit = spec.get("revisionHistoryLimit", 10)
        idle = [rs for rs in old_rss if int(rs["spec"].get("replicas", 0)) == 0
                and int((rs.get("status") or {}).get("replicas", 0)) == 0]
        idle.sort(key=lambda r: int((r["metadata"].get("annotations") or {}).get(REVISION, "0") or 0))
        for rs in idle[:max(0, len(idle) - int(limit))]:
            self._delete("replicasets", "apps/v1", rs)

    def _deployment_status(self, d, spec, want, new, old_rss, sel):
        all_rss = ([new] if new is not None else []) + old_rss
        pods = [p for rs in all_rss for p in self._rs_pods(rs) if pod_active(p)]
        new_pods = [p for p in self._rs_pods(new) if pod_active(p)] if new is not None else []
        ready = [p for p in pods if pod_ready(p)]
        old = d.get("status") or {}
        st = {"observedGeneration": d["metadata"].get("generation", 1), "replicas": len(pods),
              "updatedReplicas": len(new_pods), "readyReplicas": len(ready), "availableReplicas": len(ready)}
        unavailable = max(0, want - len(ready))
        if unavailable:
            st["unavailableReplicas"] = unavailable
        for k in ("replicas", "updatedReplicas", "readyReplicas", "availableReplicas"):
            if st[k] == 0:
                del st[k]
        if old.get("collisionCount"):
            st["collisionCount"] = old["collisionCount"]
        conds = old.get("conditions") or []
        min_avail = want - self._max_unavailable(spec, want)
        avail = len(ready) >= min_avail
        out = [condition("Available", "True" if avail else "False",
                         "MinimumReplicasAvailable" if avail else "MinimumReplicasUnavailable",
                         "Deployment has minimum availability." if avail else
                         "Deployment does not have minimum availability.", conds)]
        new_name = new["metadata"]["name"] if new is not None else ""
        complete = new is not None and len(new_pods) == want and len(pods) == want and \
            len([p for p in new_pods if pod_ready(p)]) == want
        if spec.get("paused"):
            out.append(condition("Progressing", "Unknown", "DeploymentPaused", "Deployment is paused", conds))
        elif complete:
            out.append(condition("Progressing", "True", "NewReplicaSetAvailable",
                                 f"ReplicaSet \"{new_name}\" has successfully progressed.", conds))
        else:
            out.append(condition("Progressing", "True", "ReplicaSetUpdated",
                                 f"ReplicaSet \"{new_name}\" is progressing.", conds))
        st["conditions"] = out
        cmp_old = {k: v for k, v in old.items() if k != "conditions"}
        cmp_new = {k: v for k, v in st.items() if k != "conditions"}
        strip = lambda cs: [{k: v for k, v in c.items() if k not in ("lastUpdateTime", "lastTransitionTime")}  # noqa
                            for c in cs]
        if cmp_old != cmp_new or strip(old.get("conditions") or []) != strip(out):
            self._put_status("deployments", "apps/v1", d, st)

    # ---- Jobs

    def _sync_job(self, ns, name):
        job = self.inf["jobs"].get(ns, name)
        if job is None:
            return
        spec = job.get("spec") or {}
        st = copy.deepcopy(job.get("status") or {})
        conds = st.get("conditions") or []
        finished = any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conds)
        pods = [p for p in self.inf["pods"].list(ns) if owned_by(p, job)]
        if finished:
            self._job_ttl(job, st)
            return
        if job["metadata"].get("deletionTimestamp"):
            return
        if spec.get("suspend"):
            for p in pods:
                if pod_active(p):
                    self._delete("pods", "v1", p)
            return
        completions = spec.get("completions")
        parallelism = int(spec.get("parallelism", 1))
        backoff_limit = int(spec.get("backoffLimit", 6))
        policy = ((spec.get("template") or {}).get("spec") or {}).get("restartPolicy", "Never")
        active = [p for p in pods if pod_active(p)]
        succeeded = [p for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        restarts = 0
        if policy == "OnFailure":
            for p in active:
                restarts += sum(int(c.get("restartCount", 0)) for c in (p.get("status") or {}).get("containerStatuses")
                                or [])
        if not st.get("startTime"):
            st["startTime"] = now_iso()
        failures = len(failed) + restarts
        want_done = completions if completions is not None else 1
        now = now_iso()
        new_conds = list(conds)
        fail_reason = None
        if failures > backoff_limit:
            fail_reason = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        dl = spec.get("activeDeadlineSeconds")
        if dl is not None and _age_s(st["startTime"]) >= int(dl):
            fail_reason = ("DeadlineExceeded", "Job was active longer than specified deadline")
        if fail_reason is not None:
            for p in active:
                self._delete("pods", "v1", p)
            new_conds = [c for c in new_conds if c.get("type") not in ("FailureTarget", "Failed")]
            new_conds.append({"type": "FailureTarget", "status": "True", "reason": fail_reason[0],
                              "message": fail_reason[1], "lastProbeTime": now, "lastTransitionTime": now})
            new_conds.append({"type": "Failed", "status": "True", "reason": fail_reason[0],
                              "message": fail_reason[1], "lastProbeTime": now, "lastTransitionTime": now})
            active = []
        elif len(succeeded) >= want_done:
            for p in active:
                self._delete("pods", "v1", p)
            active = []
            new_conds.append({"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                              "message": "Reached expected number of succeeded pods", "lastProbeTime": now,
                              "lastTransitionTime": now})
            new_conds.append({"type": "Complete", "status": "True", "reason": "CompletionsReached",
                              "message": "Reached expected number of succeeded pods", "lastProbeTime": now,
                              "lastTransitionTime": now})
            st["completionTime"] = now
        else:
            need = min(parallelism, want_done - len(succeeded)) - len(active)
            if need > 0:
                delay = 0.0
                if failed and policy == "Never":
                    base, cap = self.job_backoff
                    delay = min(cap, base * 2 ** (len(failed) - 1))
                    last = max((_finish_time(p) for p in failed), default=0.0)
                    delay = last + delay - time.time()
                if delay > 0:
                    self.queue.add_after(("job", ns, name), delay)
                else:
                    for _ in range(need):
                        active.append(self._new_pod(job, "Job", "batch/v1", spec.get("template") or {}))
        st["active"] = len(active)
        st["succeeded"] = len(succeeded)
        st["failed"] = len(failed)
        st["ready"] = len([p for p in active if pod_ready(p)])
        st["terminating"] = len([p for p in pods if p["metadata"].get("deletionTimestamp")])
        for k in ("active", "succeeded", "failed"):
            if st[k] == 0:
                del st[k]
        if new_conds:
            st["conditions"] = new_conds
        if dl is not None and fail_reason is None and "completionTime" not in st:
            self.queue.add_after(("job", ns, name), max(0.1, int(dl) - _age_s(st["startTime"])))
        if st != (job.get("status") or {}):
            job = self._put_status("jobs", "batch/v1", job, st)
        if any(c.get("type") in ("Complete", "Failed") for c in new_conds):
            self._job_ttl(job, st)

    def _job_ttl(self, job, st):
        ttl = (job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if ttl is None or job["metadata"].get("deletionTimestamp"):
            return
        done = next((c.get("lastTransitionTime") for c in st.get("conditions") or []
                     if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"), None)
        left = int(ttl) - _age_s(done) if done else int(ttl)
        if left > 0:
            self.queue.add_after(("job",) + self._ns_name(job), left)
        else:
            self._delete("jobs", "batch/v1", job, propagation="Background")


def _equal_ignore_hash(a, b):
    a = copy.deepcopy(a)
    b = copy.deepcopy(b)
    for t in (a, b):
        (t.get("metadata") or {}).get("labels", {}).pop("pod-template-hash", None)
        if "metadata" in t and "labels" in t["metadata"] and not t["metadata"]["labels"]:
            del t["metadata"]["labels"]
    return a == b


def _parse(ts):
    try:
        return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


def _age_s(ts):
    t = _parse(ts)
    return 0.0 if t is None else time.time() - t


def _neg_time(ts):
    t = _parse(ts)
    return -(t or 0.0)


def _finish_time(pod):
    best = 0.0
    for c in (pod.get("status") or {}).get("containerStatuses") or []:
        t = _parse(((c.get("state") or {}).get("terminated") or {}).get("finishedAt"))
        if t:
            best = max(best, t)
    return best

