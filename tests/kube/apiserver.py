#!/usr/bin/env python3
"""A Kubernetes API server for tests: one process, memory only, no etcd, no
controllers beyond the few a client would notice missing (namespace and CRD
cleanup, garbage collection of owned objects, pod termination).

It obeys the rules clients depend on: one global resourceVersion, 409 on a
stale update, generation bumps on spec changes only, the status subresource,
finalizers and deletionTimestamp, label and field selectors, paginated lists
with consistent snapshots, watches with bookmarks, timeouts and 410 after
compaction, merge / JSON / strategic / server-side-apply patches, CRDs with
schema validation and the CEL rule `self == oldSelf`, discovery (legacy and
aggregated), OpenAPI v3 for kubectl, and Table output for `kubectl get`.
Faults are injected on purpose through POST /_faults or the Python API.
See tests/kube/README.md and docs/kube-test-server.md.

Run:    python3 tests/kube/apiserver.py --port 0 --token secret   (prints "ready <url>")
Import: from apiserver import KubeApiServer; s = KubeApiServer(token="t").start()"""

import argparse
import base64
import copy
import hashlib
import hmac
import json
import os
import random
import re
import select
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from bisect import bisect_right
from collections import deque, namedtuple
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kube_crd  # noqa: E402
import kube_patch  # noqa: E402
import kube_proto  # noqa: E402
import kube_schema  # noqa: E402
from kube_select import FieldSelector, LabelSelector, SelectorError  # noqa: E402
from kube_types import VERBS, builtin_types, fmt_time, now_utc, shape_error, validate_meta  # noqa: E402

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.4", "gitCommit": "loraplane-test-apiserver",
                  "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.0",
                  "compiler": "gc", "platform": "linux/amd64"}
MAX_BODY = 3 * 1024 * 1024
GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
POD_KEY = ("", "pods")
NS_KEY = ("", "namespaces")

Event = namedtuple("Event", "rv key ns name type obj prev")


# ---------------------------------------------------------------- errors

def status_obj(code, reason, message, details=None):
    s = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
         "reason": reason, "code": code}
    if details:
        s["details"] = details
    return s


class ApiError(Exception):
    def __init__(self, code, reason, message, details=None, headers=None):
        super().__init__(message)
        self.code = code
        self.status = status_obj(code, reason, message, details)
        self.headers = headers or {}


def _details(ti, name):
    d = {}
    if name:
        d["name"] = name
    if ti is not None:
        if ti.group:
            d["group"] = ti.group
        d["kind"] = ti.plural
    return d


def not_found(ti, name):
    return ApiError(404, "NotFound", f"{ti.group_resource} \"{name}\" not found", _details(ti, name))


def already_exists(ti, name):
    return ApiError(409, "AlreadyExists", f"{ti.group_resource} \"{name}\" already exists", _details(ti, name))


def conflict(ti, name, why="the object has been modified; please apply your changes to the latest version and try again"):
    return ApiError(409, "Conflict", f"Operation cannot be fulfilled on {ti.group_resource} \"{name}\": {why}",
                    _details(ti, name))


def invalid(ti, name, causes):
    parts = [f"{c['field']}: {c['message']}" if c.get("field") else c["message"] for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    d = {"name": name, "kind": ti.kind, "causes": causes}
    if ti.group:
        d["group"] = ti.group
    return ApiError(422, "Invalid", f"{ti.group_kind} \"{name}\" is invalid: {joined}", d)


def bad_request(msg):
    return ApiError(400, "BadRequest", msg)


def expired(msg):
    return ApiError(410, "Expired", msg)


def path_not_found():
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def method_not_allowed():
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {})


FAULT_REASONS = {400: ("BadRequest", "injected fault"), 401: ("Unauthorized", "Unauthorized"),
                 403: ("Forbidden", "forbidden: injected fault"),
                 404: ("NotFound", "the server could not find the requested resource"),
                 409: ("Conflict", "Operation cannot be fulfilled: injected conflict"),
                 410: ("Expired", "too old resource version: injected fault"),
                 429: ("TooManyRequests", "Too many requests, please try again later."),
                 500: ("InternalError", "Internal error occurred: injected fault"),
                 503: ("ServiceUnavailable", "the server is currently unable to handle the request"),
                 504: ("Timeout", "the server was unable to return a response in the time allotted, but may "
                              "still be processing the request")}


def fault_error(code, retry_after=None):
    reason, msg = FAULT_REASONS.get(code, ("InternalError", f"injected fault (HTTP {code})"))
    details = {"causes": [{"reason": "UnexpectedServerResponse", "message": "injected fault"}]} if code >= 500 else None
    headers = {}
    if code == 429:
        details = {"retryAfterSeconds": int(retry_after or 1)}
        headers["Retry-After"] = str(int(retry_after or 1))
    return ApiError(code, reason, msg, details, headers)


# ---------------------------------------------------------------- faults

class Faults:
    """What goes wrong on purpose. Standing faults (status, rate_429,
    latency_ms, drop_connection_rate, stall_watches) apply to API requests
    that match methods / verbs / path_regex until for_seconds pass or count
    requests have failed; one-shot actions run when set."""

    STANDING = ("status", "rate", "count", "rate_429", "retry_after_s", "latency_ms", "drop_connection_rate",
                "stall_watches", "for_seconds", "methods", "verbs", "path_regex", "users")
    ACTIONS = ("drop_watches", "gone_watches", "expire_versions", "down_for_seconds")

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.spec = {}
        self.until = None
        self.injected = 0
        self.rng = random.Random()

    def set(self, **spec):
        """Replaces the standing faults with spec and runs its actions.
        Unknown keys raise ValueError."""
        self._check(spec)
        standing = {k: v for k, v in spec.items() if k in self.STANDING and v not in (None, False)}
        with self.lock:
            self.spec = standing
            self.until = self.app.now() + float(spec["for_seconds"]) if spec.get("for_seconds") else None
            self.injected = 0
            if "seed" in spec:
                self.rng.seed(spec["seed"])
        if spec.get("expire_versions"):
            self.app.expire_versions()
        if spec.get("gone_watches"):
            self.app.gone_watches()
        if spec.get("drop_watches"):
            self.app.drop_watches(reset=spec["drop_watches"] == "reset")
        if spec.get("down_for_seconds"):
            self.app.go_down_later(float(spec["down_for_seconds"]))

    def _check(self, spec):
        for k, v in spec.items():
            if k not in self.STANDING + self.ACTIONS + ("seed",):
                raise ValueError(f"unknown fault knob '{k}'")
            if v is None:
                continue
            if k == "status" and not (isinstance(v, int) and 400 <= v <= 599):
                raise ValueError("'status' must be an HTTP error code (400-599)")
            if k in ("rate", "rate_429", "drop_connection_rate") and not (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1):
                raise ValueError(f"'{k}' must be a probability between 0 and 1")
            if k in ("latency_ms", "for_seconds", "retry_after_s", "down_for_seconds", "count") and not (
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"'{k}' must be a non-negative number")
            if k in ("methods", "verbs", "users") and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise ValueError(f"'{k}' must be a list of strings")
            if k == "path_regex":
                re.compile(v)
            if k == "drop_watches" and v not in (True, False, "clean", "reset"):
                raise ValueError("'drop_watches' must be true, \"clean\" or \"reset\"")

    def clear(self):
        with self.lock:
            self.spec = {}
            self.until = None

    def snapshot(self):
        with self.lock:
            self._expire()
            out = dict(self.spec)
            if self.until is not None:
                out["remaining_s"] = round(max(0.0, self.until - self.app.now()), 3)
            out["injected"] = self.injected
            return out

    def _expire(self):
        if self.until is not None and self.app.now() >= self.until:
            self.spec = {}
            self.until = None

    def stalled(self):
        with self.lock:
            self._expire()
            return bool(self.spec.get("stall_watches"))

    def decide(self, method, verb, path, user=None):
        """Returns (latency_s, action) with action None, 'drop' or an ApiError."""
        with self.lock:
            self._expire()
            s = self.spec
            if not s:
                return 0.0, None
            if s.get("methods") and method not in s["methods"]:
                return 0.0, None
            if s.get("users") and user not in s["users"]:
                return 0.0, None
            if s.get("verbs") and verb not in s["verbs"]:
                return 0.0, None
            if s.get("path_regex") and not re.search(s["path_regex"], path):
                return 0.0, None
            latency = float(s.get("latency_ms", 0)) / 1000.0
            if s.get("drop_connection_rate") and self.rng.random() < float(s["drop_connection_rate"]):
                self.injected += 1
                return latency, "drop"
            if s.get("rate_429") and self.rng.random() < float(s["rate_429"]):
                self.injected += 1
                return latency, fault_error(429, s.get("retry_after_s", 1))
            if s.get("status"):
                if s.get("count") is not None and self.injected >= int(s["count"]):
                    return latency, None
                if self.rng.random() < float(s.get("rate", 1.0)):
                    self.injected += 1
                    return latency, fault_error(int(s["status"]), s.get("retry_after_s", 1))
            return latency, None


# ---------------------------------------------------------------- storage

class Store:
    """Objects by storage key (group, plural) and (namespace, name), the
    global resourceVersion, and the event history watches and snapshots
    read. Stored objects are never modified in place."""

    def __init__(self, history_events):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.rv = 0
        self.data = {}
        self.log = []
        self.log_rvs = []
        self.compacted = 0  # versions below this are gone
        self.history_events = history_events

    def get(self, key, ns, name):
        return self.data.get(key, {}).get((ns or "", name))

    def commit(self, key, ns, name, etype, obj, prev):
        """Writes obj (None to delete) as the next resourceVersion; returns
        the object as stored (or, for a delete, the final state)."""
        self.rv += 1
        rv = str(self.rv)
        if etype == "DELETED":
            final = copy.deepcopy(prev)
            final["metadata"]["resourceVersion"] = rv
            self.data.get(key, {}).pop((ns or "", name), None)
            stored = final
        else:
            obj["metadata"]["resourceVersion"] = rv
            self.data.setdefault(key, {})[(ns or "", name)] = obj
            stored = obj
        self.log.append(Event(self.rv, key, ns or "", name, etype, stored, prev))
        self.log_rvs.append(self.rv)
        if len(self.log) > self.history_events:
            self.compact(len(self.log) - self.history_events)
        self.cond.notify_all()
        return stored

    def compact(self, n_events):
        """Forgets the n oldest events: versions before what remains expire."""
        n_events = min(n_events, len(self.log))
        if n_events <= 0:
            return
        self.compacted = self.log[n_events - 1].rv
        del self.log[:n_events]
        del self.log_rvs[:n_events]

    def compact_all(self):
        self.log.clear()
        self.log_rvs.clear()
        self.compacted = self.rv
        self.cond.notify_all()

    def events_after(self, rv):
        return self.log[bisect_right(self.log_rvs, rv):]

    def snapshot(self, key, at_rv):
        """The objects of one storage key as they were at resourceVersion at_rv."""
        if at_rv < self.compacted:
            raise expired(f"too old resource version: {at_rv} ({self.compacted})")
        objs = dict(self.data.get(key, {}))
        for ev in reversed(self.events_after(at_rv)):
            if ev.key != key:
                continue
            k = (ev.ns, ev.name)
            if ev.prev is None:
                objs.pop(k, None)
            else:
                objs[k] = ev.prev
        return objs


# ---------------------------------------------------------------- requests

class Request:
    def __init__(self, method, path, query="", headers=None, body=b"", user="admin"):
        self.method = method
        self.path = path
        self.raw_query = query
        q = parse_qs(query, keep_blank_values=True)
        self.query = {k: v[0] for k, v in q.items()}
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = body or b""
        self.user = user
        self.warnings = []

    def q(self, key, default=None):
        return self.query.get(key, default)

    @property
    def content_type(self):
        return (self.headers.get("content-type") or "application/json").split(";")[0].strip().lower()

    @property
    def accept(self):
        return self.headers.get("accept") or "application/json"

    def json_body(self):
        if not self.body:
            raise bad_request("the request body is empty; an object is required")
        if self.content_type == "application/vnd.kubernetes.protobuf":
            try:
                return kube_proto.decode(self.body)
            except kube_proto.ProtoError as e:
                raise ApiError(415, "UnsupportedMediaType", f"this test API server cannot decode the protobuf body: {e}")
        if self.content_type not in ("application/json", "application/apply-patch+yaml", "application/yaml"):
            raise ApiError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           "application/json, application/yaml")
        try:
            return json.loads(self.body)
        except ValueError as e:
            if self.content_type == "application/apply-patch+yaml":
                return _load_yaml(self.body)
            raise bad_request(f"the body of the request is not valid JSON: {e}")


def _load_yaml(body):
    try:
        import yaml  # optional: only for YAML server-side-apply bodies
    except ImportError:
        raise ApiError(415, "UnsupportedMediaType",
                       "this test API server reads apply patches as JSON (PyYAML is not installed)")
    try:
        return yaml.safe_load(body)
    except yaml.YAMLError as e:
        raise bad_request(f"error decoding YAML: {e}")


class Route:
    """Where a request goes: discovery, or (type, namespace, name, subresource)."""

    def __init__(self):
        self.kind = None  # "resource" or a discovery / special endpoint name
        self.group = ""
        self.version = ""
        self.ti = None
        self.ns = None
        self.name = None
        self.sub = None
        self.watch = False
        self.extra = None


def _accepts_table(accept):
    return "as=table" in accept.replace(" ", "").lower()


def _accepts_partial(accept):
    a = accept.replace(" ", "").lower()
    return "as=partialobjectmetadata" in a


def _accepts_aggregated(accept):
    a = accept.replace(" ", "").lower()
    return "as=apigroupdiscoverylist" in a and "v=v2" in a and "g=apidiscovery.k8s.io" in a


def _accepts_json(accept):
    a = accept.lower()
    return "json" in a or "*/*" in a or a.strip() == ""


def _encode_continue(rv, last_key):
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(last_key)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_continue(token):
    try:
        pad = "=" * (-len(token) % 4)
        d = json.loads(base64.urlsafe_b64decode(token + pad))
        return int(d["rv"]), tuple(d["start"])
    except (ValueError, KeyError, TypeError):
        raise bad_request(f"continue key is not valid: invalid continue token '{token[:40]}'")


def _meta(o):
    return o.setdefault("metadata", {})


CONFIG_KEYS = ("bookmark_interval_s", "history_events", "watch_gone_mode", "pod_termination_s", "gc",
               "default_watch_timeout_s", "tokens", "token_users", "verbose")


class App:
    """The API itself, independent of HTTP: dispatch(Request) -> (code, body, headers)."""

    def __init__(self, token=None, history_events=10000, bookmark_interval_s=5.0, watch_gone_mode="event",
                 pod_termination_s=1.0, gc=True, default_watch_timeout_s=1800.0, verbose=False, token_users=None):
        self.tokens = set([token] if isinstance(token, str) else (token or []))
        # token -> user name (service-account tokens: "system:serviceaccount:<ns>:<name>")
        self.token_users = _check_token_users(token_users or {})
        self.bookmark_interval_s = bookmark_interval_s
        self.watch_gone_mode = watch_gone_mode
        self.pod_termination_s = pod_termination_s
        self.gc = gc
        self.default_watch_timeout_s = default_watch_timeout_s
        self.verbose = verbose
        self.store = Store(history_events)
        self.faults = Faults(self)
        self.types = {}  # (group, version, plural) -> TypeInfo
        self._ip_next = 1
        for ti in builtin_types(self._alloc_ip):
            self.types[(ti.group, ti.version, ti.plural)] = ti
        crd_ti = kube_crd.CRDs()
        self.types[(crd_ti.group, crd_ti.version, crd_ti.plural)] = crd_ti
        self.applied = {}  # (key, ns, name, uid) -> {manager: set(paths)}
        self.pod_deadlines = {}  # (ns, name, uid) -> monotonic time the "kubelet" finishes
        self.watch_epoch = 0  # bumped by drop_watches
        self.watch_reset = False
        self.gone_epoch = 0  # bumped by gone_watches
        self.open_watches = 0
        self.requests = deque(maxlen=20000)
        self.request_seq = 0
        self.server = None  # the HttpFrontend, for down_for_seconds
        self.clock_offset = 0.0  # seconds advance_clock() added to the real monotonic clock
        # pods/NAME/log: fn(namespace, pod, container, previous) -> text, set by a kubelet (the
        # stand-in in tests/kube/kubelet.py); KeyError when it never ran that container
        self.pod_logs = None
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create_internal({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        self._stop = threading.Event()
        self._ctl_thread = threading.Thread(target=self._controllers, name="kube-controllers", daemon=True)
        self._ctl_thread.start()

    def close(self):
        self._stop.set()

    def now(self):
        """The clock faults' for_seconds and down_for_seconds run on: the
        real monotonic clock plus whatever advance_clock() added, so that a
        test can end a fault without waiting for it (watch timeouts,
        bookmarks and latency stay on real time)."""
        return time.monotonic() + self.clock_offset

    def advance_clock(self, seconds):
        if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0):
            raise ValueError("'advance_s' must be a non-negative number")
        with self.store.lock:
            self.clock_offset += float(seconds)
            self.store.cond.notify_all()
        return {"advanced_s": float(seconds), "offset_s": self.clock_offset}

    def _alloc_ip(self):
        n = self._ip_next
        self._ip_next += 1
        return f"10.96.{(n >> 8) & 255}.{n & 255}"

    # ------------------------------------------------------------ types

    def type_for(self, group, version, plural):
        return self.types.get((group, version, plural))

    def type_by_kind(self, api_version, kind):
        group, _, version = api_version.rpartition("/")
        for ti in self.types.values():
            if ti.group == group and ti.version == version and ti.kind == kind:
                return ti
        return None

    def _register_crd(self, crd):
        self._unregister_crd(crd["metadata"]["name"])
        for ti in kube_crd.crd_types(crd):
            self.types[(ti.group, ti.version, ti.plural)] = ti

    def _unregister_crd(self, crd_name):
        for k, ti in list(self.types.items()):
            if ti.is_cr and ti.crd["metadata"]["name"] == crd_name:
                del self.types[k]

    def served_groups(self):
        """[(group, [versions...])] in discovery order."""
        order = ["", "apps", "batch", "events.k8s.io", "rbac.authorization.k8s.io", "policy", "coordination.k8s.io",
                 "discovery.k8s.io", "apiextensions.k8s.io"]
        groups = {}
        for ti in self.types.values():
            groups.setdefault(ti.group, [])
            if ti.version not in groups[ti.group]:
                groups[ti.group].append(ti.version)
        names = [g for g in order if g in groups] + sorted(g for g in groups if g not in order)
        return [(g, sorted(groups[g], key=_version_priority)) for g in names]

    def types_in(self, group, version):
        return [ti for ti in self.types.values() if ti.group == group and ti.version == version]

    # ------------------------------------------------------------ routing

    def route(self, path):
        r = Route()
        segs = [s for s in path.split("/") if s]
        if not segs:
            r.kind = "root"
            return r
        if segs[0] in ("version", "healthz", "livez", "readyz") and len(segs) == 1:
            r.kind = segs[0]
            return r
        if segs[0] in ("healthz", "livez", "readyz"):
            r.kind = segs[0]
            return r
        if segs[0] == "openapi":
            r.kind = "openapi"
            r.extra = segs[1:]
            return r
        if segs[0] == "api":
            if len(segs) == 1:
                r.kind = "api"
                return r
            r.group, r.version, rest = "", segs[1], segs[2:]
            if r.version != "v1":
                raise path_not_found()
        elif segs[0] == "apis":
            if len(segs) == 1:
                r.kind = "apis"
                return r
            if len(segs) == 2:
                r.kind = "group"
                r.group = segs[1]
                if not any(g == segs[1] for g, _ in self.served_groups()):
                    raise path_not_found()
                return r
            r.group, r.version, rest = segs[1], segs[2], segs[3:]
        else:
            raise path_not_found()
        if not self.types_in(r.group, r.version):
            raise path_not_found()
        if not rest:
            r.kind = "resourcelist"
            return r
        if rest[0] == "watch":
            r.watch = True
            rest = rest[1:]
        if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
            r.ns = rest[1]
            rest = rest[2:]
        if not rest or len(rest) > 3:
            raise path_not_found()
        ti = self.type_for(r.group, r.version, rest[0])
        if ti is None:
            raise path_not_found()
        if r.ns is not None and not ti.namespaced:
            raise path_not_found()
        r.kind = "resource"
        r.ti = ti
        r.name = rest[1] if len(rest) > 1 else None
        r.sub = rest[2] if len(rest) > 2 else None
        if r.sub is not None and r.sub not in [s for s, _ in ti.subresources()]:
            raise path_not_found()
        if ti.namespaced and r.name is not None and r.ns is None:
            raise path_not_found()
        return r

    @staticmethod
    def verb_of(method, r, req):
        if r is None or r.kind != "resource":
            return "get" if method == "GET" else method.lower()
        watch = r.watch or req.q("watch") in ("true", "1")
        if method == "GET":
            return "watch" if watch else ("get" if r.name else "list")
        if method == "DELETE":
            return "delete" if r.name else "deletecollection"
        return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())

    # ------------------------------------------------------------ dispatch

    def dispatch(self, req, r=None):
        """Serves one non-watch request; returns (code, body_obj, headers)."""
        try:
            with self.store.lock:
                r = r or self.route(req.path)
                return self._dispatch(req, r)
        except ApiError as e:
            return e.code, e.status, e.headers

    def _dispatch(self, req, r):
        if r.kind == "root":
            return 200, {"paths": sorted(self._root_paths())}, {}
        if r.kind == "version":
            return 200, SERVER_VERSION, {}
        if r.kind in ("healthz", "livez", "readyz"):
            return 200, "ok", {"Content-Type": "text/plain; charset=utf-8"}
        if r.kind == "openapi":
            return self._openapi(r.extra, req)
        if req.method != "GET" and r.kind != "resource":
            raise method_not_allowed()
        if r.kind in ("api", "apis"):
            return self._discovery_root(r.kind, req)
        if r.kind == "group":
            return 200, self._api_group(r.group), {}
        if r.kind == "resourcelist":
            return 200, self._resource_list(r.group, r.version), {}
        ti = r.ti
        if not _accepts_json(req.accept) and not _accepts_table(req.accept):
            raise ApiError(406, "NotAcceptable", "only the following media types are accepted: application/json")
        verb = self.verb_of(req.method, r, req)
        if verb == "get" and r.sub == "log" and ti.storage_key == POD_KEY:
            return self._pod_log(r.ns, r.name, req)
        if r.sub == "scale" and verb in ("get", "update", "patch"):
            return self._scale(ti, r.ns, r.name, verb, req)
        if verb == "get":
            if r.sub not in (None, "status"):
                raise method_not_allowed()
            obj = self.store.get(ti.storage_key, r.ns, r.name)
            if obj is None:
                raise not_found(ti, r.name)
            return 200, self._present(ti, obj, req), {}
        if verb == "list":
            return 200, self._list(ti, r.ns, req), {}
        if verb == "create":
            if r.name is not None and r.sub == "binding" and ti.storage_key == POD_KEY:
                return 201, self._bind_pod(r.ns, r.name, req.json_body()), {}
            if r.name is not None:
                raise method_not_allowed()
            if ti.namespaced and r.ns is None:
                raise path_not_found()
            code, obj = self._create(ti, r.ns, req.json_body(), req)
            return code, self._present(ti, obj, req), self._warn_headers(req)
        if verb == "update":
            code, obj = self._update(ti, r.ns, r.name, r.sub, req.json_body(), req)
            return code, self._present(ti, obj, req), self._warn_headers(req)
        if verb == "patch":
            if r.sub == "finalize":
                raise method_not_allowed()
            code, obj = self._patch(ti, r.ns, r.name, r.sub, req)
            return code, self._present(ti, obj, req), self._warn_headers(req)
        if verb == "delete":
            if r.sub is not None:
                raise method_not_allowed()
            code, obj = self._delete(ti, r.ns, r.name, self._delete_options(req), req)
            cur = self.store.get(ti.storage_key, r.ns, r.name)
            gone = cur is None or cur["metadata"]["uid"] != obj["metadata"]["uid"]
            if gone and not ti.return_deleted_object:
                # what the generic registry answers once an object is really gone
                d = dict(_details(ti, r.name), uid=obj["metadata"]["uid"])
                return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                              "details": d}, {}
            return code, self._present(ti, obj, req), {}
        if verb == "deletecollection":
            if r.sub is not None:
                raise method_not_allowed()
            return 200, self._delete_collection(ti, r.ns, req), {}
        raise method_not_allowed()

    @staticmethod
    def _warn_headers(req):
        if not req.warnings:
            return {}
        return {"Warning": [f'299 - "{w}"' for w in req.warnings]}

    # ------------------------------------------------------------ output

    def _view(self, ti, obj):
        """The stored object as this endpoint's version shows it."""
        out = ti.from_storage(obj)
        if out is obj:
            out = dict(obj)
        out["apiVersion"] = ti.api_version
        out["kind"] = ti.kind
        return out

    def _present(self, ti, obj, req):
        view = self._view(ti, obj)
        if _accepts_table(req.accept):
            return self._table(ti, [view], {"resourceVersion": obj["metadata"].get("resourceVersion", "")}, req)
        if _accepts_partial(req.accept):
            return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": view.get("metadata", {})}
        return view

    def _table(self, ti, views, list_meta, req):
        cols = ti.table_columns()
        mode = req.q("includeObject", "Metadata")
        rows = []
        for v in views:
            row = {"cells": ti.table_cells(v)}
            if mode == "Object":
                row["object"] = v
            elif mode != "None":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": v.get("metadata", {})}
            rows.append(row)
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta,
                "columnDefinitions": cols, "rows": rows}

    # ------------------------------------------------------------ list

    def _selectors(self, ti, req):
        try:
            ls = LabelSelector(req.q("labelSelector", ""))
            fs = FieldSelector(req.q("fieldSelector", ""))
            fs.check(ti.field_labels, ti.kind if ti.is_cr else None)
        except SelectorError as e:
            raise bad_request(str(e))
        return ls, fs

    def _matches(self, ti, obj, ns, ls, fs):
        m = obj.get("metadata") or {}
        if ns is not None and m.get("namespace", "") != ns:
            return False
        if not ls.empty() and not ls.matches(m.get("labels")):
            return False
        if not fs.empty() and not fs.matches(ti.fields(obj)):
            return False
        return True

    def _list(self, ti, ns, req):
        ls, fs = self._selectors(ti, req)
        limit = req.q("limit")
        try:
            limit = int(limit) if limit not in (None, "") else 0
        except ValueError:
            raise bad_request(f"invalid limit '{limit}'")
        cont = req.q("continue")
        rv_param = req.q("resourceVersion")
        match = req.q("resourceVersionMatch")
        st = self.store
        start = None
        if match and match not in ("Exact", "NotOlderThan"):
            raise bad_request(f"resourceVersionMatch: Unsupported value: \"{match}\"")
        if match and not rv_param:
            raise invalid_list("resourceVersionMatch is forbidden unless resourceVersion is provided")
        if cont:
            if rv_param:
                raise invalid_list("specifying resource version is not allowed when using continue")
            at, start = _decode_continue(cont)
            if at < st.compacted:
                raise expired("The provided continue parameter is too old to display a consistent list result. "
                              "You can start a new list without the continue parameter, or use the continue "
                              "token in this response to retrieve the remainder of the results. Continuing with "
                              "the provided token results in an inconsistent list - objects that were created, "
                              "modified, or deleted between the time the first chunk was returned and now may "
                              "show up in the list.")
            objs = st.snapshot(ti.storage_key, at)
        elif match == "Exact":
            at = _int_rv(rv_param)
            if at > st.rv:
                raise too_large(at, st.rv)
            objs = st.snapshot(ti.storage_key, at)
        else:
            if rv_param not in (None, "", "0"):
                want = _int_rv(rv_param)
                if want > st.rv:
                    raise too_large(want, st.rv)
            at = st.rv
            objs = st.data.get(ti.storage_key, {})
        keys = sorted(k for k in objs if start is None or k > start)
        items = [objs[k] for k in keys if self._matches(ti, objs[k], ns, ls, fs)]
        meta = {"resourceVersion": str(at)}
        if limit > 0 and len(items) > limit:
            last = items[limit - 1]["metadata"]
            meta["continue"] = _encode_continue(at, (last.get("namespace", ""), last["name"]))
            if ls.empty() and fs.empty():
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        views = [self._view(ti, o) for o in items]
        if _accepts_table(req.accept):
            return self._table(ti, views, meta, req)
        if _accepts_partial(req.accept):
            return {"kind": "PartialObjectMetadataList", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                    "items": [{"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                               "metadata": v.get("metadata", {})} for v in views]}
        if not ti.is_cr:
            for v in views:
                v.pop("kind", None)
                v.pop("apiVersion", None)
        return {"kind": ti.list_kind, "apiVersion": ti.api_version, "metadata": meta, "items": views}

    # ------------------------------------------------------------ writes

    def _check_namespace(self, ti, ns, creating):
        if not ti.namespaced:
            return
        nso = self.store.get(NS_KEY, "", ns)
        if nso is None:
            raise ApiError(404, "NotFound", f"namespaces \"{ns}\" not found", {"name": ns, "kind": "namespaces"})
        if creating and nso["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden",
                           f"{ti.group_resource} \"{ns}\" is forbidden: unable to create new content in namespace "
                           f"{ns} because it is being terminated",
                           {"name": ns, "kind": ti.plural, "causes": [{"reason": "NamespaceTerminating",
                                                                       "message": f"namespace {ns} is being terminated",
                                                                       "field": "metadata.namespace"}]})

    def _check_type_meta(self, ti, obj):
        if not isinstance(obj, dict):
            raise bad_request("the body of the request must be a JSON object")
        kind, av = obj.get("kind"), obj.get("apiVersion")
        if not kind:
            raise bad_request(f"Object 'Kind' is missing in '{json.dumps(obj)[:200]}'")
        if not av:
            raise bad_request(f"Object 'apiVersion' is missing in '{json.dumps(obj)[:200]}'")
        if av != ti.api_version or kind != ti.kind:
            raise bad_request(f"the API version in the data ({av}) does not match the expected API version "
                              f"({ti.api_version})" if av != ti.api_version else
                              f"the kind in the data ({kind}) does not match the expected kind ({ti.kind})")
        why = shape_error(ti, obj)
        if why:
            raise bad_request(why)

    def _field_validation(self, req):
        fv = req.q("fieldValidation", "Warn") or "Warn"
        if fv not in ("Ignore", "Warn", "Strict"):
            raise bad_request(f"fieldValidation must be one of Ignore, Warn, Strict, got '{fv}'")
        return fv

    def _admit_cr(self, ti, obj, old, req):
        """Pruning, defaulting and schema validation of a custom resource."""
        if not ti.is_cr or ti.schema is None:
            return []
        dropped = kube_schema.prune(ti.schema, obj)
        if dropped and req is not None:
            fv = self._field_validation(req)
            if fv == "Strict":
                raise bad_request("strict decoding error: " + ", ".join(f"unknown field \"{d}\"" for d in dropped))
            if fv == "Warn":
                req.warnings += [f"unknown field \\\"{d}\\\"" for d in dropped]
        kube_schema.apply_defaults(ti.schema, obj)
        causes = kube_schema.validate(ti.schema, obj)
        if old is not None:
            causes += kube_schema.validate_transitions(ti.schema, obj, ti.from_storage(old))
        return causes

    def _create(self, ti, ns, body, req):
        self._check_type_meta(ti, body)
        obj = copy.deepcopy(body)
        m = _meta(obj)
        if ti.namespaced:
            if m.get("namespace") and m["namespace"] != ns:
                raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
            m["namespace"] = ns
        else:
            m.pop("namespace", None)
        if m.get("resourceVersion"):
            raise bad_request("resourceVersion should not be set on objects to be created")
        dry = req is not None and req.q("dryRun") == "All"
        self._check_namespace(ti, ns, True)
        generated = False
        if not m.get("name"):
            if not m.get("generateName"):
                raise invalid(ti, "", [kube_schema.cause("FieldValueRequired", "metadata.name",
                                                         "Required value: name or generateName is required")])
            m["name"] = m["generateName"] + "".join(random.choice(GENERATE_CHARS) for _ in range(5))
            generated = True
        for k in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink",
                  "managedFields", "generation"):
            m.pop(k, None)
        m["uid"] = str(uuid.uuid4())
        m["creationTimestamp"] = fmt_time(now_utc())
        if ti.tracks_generation:
            m["generation"] = 1
        if ti.is_cr and ti.has_status:
            obj.pop("status", None)
        causes = self._admit_cr(ti, obj, None, req)
        obj = ti.to_storage(obj)
        ti.prepare_create(obj)
        if hasattr(ti, "validate_v1") and req is not None:
            causes += ti.validate_v1(body)
        causes += validate_meta(ti, obj) + ti.validate(obj, None)
        if causes:
            raise invalid(ti, m["name"], causes)
        if self.store.get(ti.storage_key, ns, m["name"]) is not None:
            if generated:
                return self._create(ti, ns, body, req)
            raise already_exists(ti, m["name"])
        if dry:
            return 201, obj
        stored = self.store.commit(ti.storage_key, ns if ti.namespaced else "", m["name"], "ADDED", obj, None)
        if ti.storage_key == CRD_KEY:
            self._register_crd(stored)
        return 201, stored

    def create_internal(self, obj):
        ti = self.type_by_kind(obj["apiVersion"], obj["kind"])
        with self.store.lock:
            return self._create(ti, obj.get("metadata", {}).get("namespace", "") if ti.namespaced else None,
                                obj, None)[1]

    def _update(self, ti, ns, name, sub, body, req):
        self._check_type_meta(ti, body)
        m = body.get("metadata") or {}
        if m.get("name") and m["name"] != name:
            raise bad_request(f"the name of the object ({m['name']}) does not match the name on the URL ({name})")
        if ti.namespaced and m.get("namespace") and m["namespace"] != ns:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        old = self.store.get(ti.storage_key, ns, name)
        if old is None:
            if ti.create_on_update and sub is None:
                return self._create(ti, ns, dict(body, metadata=dict(m, name=name)), req)
            raise not_found(ti, name)
        rv = m.get("resourceVersion")
        if not rv:
            if not ti.unconditional_update:
                raise invalid(ti, name, [kube_schema.cause("FieldValueInvalid", "metadata.resourceVersion",
                                                           "Invalid value: 0x0: must be specified for an update")])
        elif rv != old["metadata"]["resourceVersion"]:
            raise conflict(ti, name)
        if m.get("uid") and m["uid"] != old["metadata"]["uid"]:
            raise conflict(ti, name, f"Precondition failed: UID in precondition: {old['metadata']['uid']}, "
                                     f"UID in object meta: {m['uid']}")
        new = copy.deepcopy(body)
        _meta(new)["name"] = name
        return self._finish_update(ti, ns, name, sub, new, old, req)

    def _finish_update(self, ti, ns, name, sub, new, old, req):
        """Runs the update strategy on new (a private copy, in this
        endpoint's version) against the stored old, then writes it."""
        old_view = ti.from_storage(old)
        if sub == "status":
            result = copy.deepcopy(old_view)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
            new = result
        elif sub == "finalize":
            result = copy.deepcopy(old_view)
            result.setdefault("spec", {})["finalizers"] = (new.get("spec") or {}).get("finalizers") or []
            new = result
        else:
            m, om = _meta(new), old_view["metadata"]
            for k in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds",
                      "namespace"):
                if k in om:
                    m[k] = om[k]
                else:
                    m.pop(k, None)
            m.pop("managedFields", None)
            m.pop("selfLink", None)
            if ti.has_status:
                if "status" in old_view:
                    new["status"] = copy.deepcopy(old_view["status"])
                else:
                    new.pop("status", None)
        _meta(new)["resourceVersion"] = old["metadata"]["resourceVersion"]
        causes = self._admit_cr(ti, new, old, req)
        new = ti.to_storage(new)
        ti.prepare_update(new, old, sub)
        if old["metadata"].get("deletionTimestamp"):
            added = set(new["metadata"].get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                causes.append(kube_schema.cause("FieldValueForbidden", "metadata.finalizers",
                                                "Forbidden: no new finalizers can be added if the object is being deleted, "
                                                f"found new finalizers []string{{\"{sorted(added)[0]}\"}}"))
        causes += validate_meta(ti, new) + ti.validate(new, old)
        if causes:
            raise invalid(ti, name, causes)
        if ti.tracks_generation and _spec_part(new, ti.has_status) != _spec_part(old, ti.has_status):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if ti.storage_key == CRD_KEY:
            kube_crd.CRDs.refresh_status(new, old)
        if req is not None and req.q("dryRun") == "All":
            return 200, new
        if new == old:
            return 200, old
        if old["metadata"].get("deletionTimestamp") and self._finalized(ti, new):
            stored = self.store.commit(ti.storage_key, ns or "", name, "DELETED", None, old)
            self._after_delete(ti, stored)
            return 200, stored
        stored = self.store.commit(ti.storage_key, ns or "", name, "MODIFIED", new, old)
        if ti.storage_key == CRD_KEY:
            self._register_crd(stored)
        return 200, stored

    def _finalized(self, ti, obj):
        """True when a terminating object may go: no finalizers left, and no
        grace period running (pods) or namespace content finalizers."""
        m = obj["metadata"]
        if m.get("finalizers"):
            return False
        if ti.storage_key == NS_KEY and (obj.get("spec") or {}).get("finalizers"):
            return False
        if ti.storage_key == POD_KEY and int(m.get("deletionGracePeriodSeconds") or 0) > 0:
            return False
        return True

    def _after_delete(self, ti, final):
        if ti.storage_key == CRD_KEY:
            self._unregister_crd(final["metadata"]["name"])
            grp, plural = final["spec"]["group"], final["spec"]["names"]["plural"]
            self.store.data.pop((grp, plural), None)

    def _patch(self, ti, ns, name, sub, req):
        ct = req.content_type
        if ct == "application/apply-patch+yaml":
            return self._apply(ti, ns, name, sub, req)
        old = self.store.get(ti.storage_key, ns, name)
        accepted = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
        if not ti.is_cr:
            accepted.insert(2, "application/strategic-merge-patch+json")
        if ct not in accepted:
            raise ApiError(415, "UnsupportedMediaType",
                           "the body of the request was in an unknown format - accepted media types include: "
                           + ", ".join(accepted))
        try:
            patch = json.loads(req.body or b"null")
        except ValueError as e:
            raise bad_request(f"error decoding patch: {e}")
        if old is None:
            raise not_found(ti, name)
        cur = ti.from_storage(old)
        cur = dict(cur, apiVersion=ti.api_version, kind=ti.kind)
        try:
            if ct == "application/json-patch+json":
                new = kube_patch.json_patch(cur, patch)
            elif ct == "application/merge-patch+json":
                if not isinstance(patch, dict):
                    raise kube_patch.PatchError("a merge patch must be a JSON object")
                new = kube_patch.merge_patch(cur, patch)
            else:
                if not isinstance(patch, dict):
                    raise kube_patch.PatchError("a strategic merge patch must be a JSON object")
                new = kube_patch.strategic_merge_patch(cur, patch)
        except kube_patch.PatchError as e:
            raise bad_request(str(e))
        except kube_patch.PatchConflict as e:
            raise ApiError(422, "Invalid", str(e), _details(ti, name))
        if not isinstance(new, dict):
            raise ApiError(422, "Invalid", "the patched object is not a JSON object", _details(ti, name))
        self._check_type_meta(ti, new)
        m = _meta(new)
        if m.get("name") != name:
            raise bad_request(f"the name of the object ({m.get('name')}) does not match the name on the URL ({name})")
        if m.get("resourceVersion") != old["metadata"]["resourceVersion"]:
            raise conflict(ti, name)
        if m.get("uid") != old["metadata"].get("uid"):
            raise conflict(ti, name, f"Precondition failed: UID in precondition: {old['metadata']['uid']}, "
                                     f"UID in object meta: {m.get('uid')}")
        return self._finish_update(ti, ns, name, sub, new, old, req)

    def _apply(self, ti, ns, name, sub, req):
        """Server-side apply: see docs/kube-test-server.md for what is kept
        of field ownership."""
        manager = req.q("fieldManager")
        if not manager:
            raise bad_request("PATCH /apply requires fieldManager to be set")
        force = req.q("force") in ("true", "1")
        config = req.json_body()
        if not isinstance(config, dict):
            raise bad_request("an apply configuration must be an object")
        self._check_type_meta(ti, config)
        cm = config.get("metadata") or {}
        if cm.get("name") not in (None, name):
            raise bad_request(f"the name of the object ({cm.get('name')}) does not match the name on the URL ({name})")
        old = self.store.get(ti.storage_key, ns, name)
        paths = {p for p in kube_patch.leaf_paths({k: v for k, v in config.items() if k not in ("apiVersion", "kind")})
                 if p[:2] not in (("metadata", "name"), ("metadata", "namespace"), ("metadata", "resourceVersion"))}
        if old is None:
            if sub is not None:
                raise not_found(ti, name)
            body = copy.deepcopy(config)
            _meta(body)["name"] = name
            code, stored = self._create(ti, ns, body, req)
            if req.q("dryRun") != "All":
                self.applied[(ti.storage_key, ns or "", name, stored["metadata"]["uid"])] = {manager: paths}
            return code, stored
        key = (ti.storage_key, ns or "", name, old["metadata"]["uid"])
        owners = self.applied.setdefault(key, {})
        cur = dict(ti.from_storage(old), apiVersion=ti.api_version, kind=ti.kind)
        conflicts = []
        for other, owned in owners.items():
            if other == manager:
                continue
            for p in sorted(paths & owned):
                if kube_patch.get_path(cur, p) != kube_patch.get_path(config, p):
                    conflicts.append((other, p))
        if conflicts and not force:
            causes = [{"reason": "FieldManagerConflict", "message": f"conflict with \"{o}\": .{'.'.join(p)}",
                       "field": "." + ".".join(p)} for o, p in conflicts]
            msg = f"Apply failed with {len(conflicts)} conflict{'s' if len(conflicts) > 1 else ''}: " + \
                  "; ".join(c["message"] for c in causes)
            raise ApiError(409, "Conflict", msg, dict(_details(ti, name), causes=causes))
        merged = kube_patch.apply_merge(cur, config)
        others = set().union(*[o for mgr, o in owners.items() if mgr != manager])
        for p in owners.get(manager, set()) - paths - others:
            kube_patch.remove_path(merged, p)
        m = _meta(merged)
        if cm.get("resourceVersion") and cm["resourceVersion"] != old["metadata"]["resourceVersion"]:
            raise conflict(ti, name)
        m["resourceVersion"] = old["metadata"]["resourceVersion"]
        code, stored = self._finish_update(ti, ns, name, sub, merged, old, req)
        if req.q("dryRun") != "All":
            if force:
                for other in owners:
                    if other != manager:
                        owners[other] -= paths
            owners[manager] = paths
        return code, stored

    def _scale_view(self, ti, obj):
        m = obj["metadata"]
        sel = ((obj.get("spec") or {}).get("selector") or {})
        parts = [f"{k}={v}" for k, v in sorted((sel.get("matchLabels") or {}).items())]
        for e in sel.get("matchExpressions") or []:
            op, k, vals = e.get("operator"), e.get("key"), ",".join(e.get("values") or [])
            parts.append({"In": f"{k} in ({vals})", "NotIn": f"{k} notin ({vals})", "Exists": k,
                          "DoesNotExist": f"!{k}"}.get(op, k))
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {k: m[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                             if k in m},
                "spec": {"replicas": int((obj.get("spec") or {}).get("replicas", 0))},
                "status": {"replicas": int((obj.get("status") or {}).get("replicas", 0)), "selector": ",".join(parts)}}

    def _scale(self, ti, ns, name, verb, req):
        """The scale subresource (autoscaling/v1 Scale) of Deployments,
        ReplicaSets and StatefulSets: `kubectl scale`."""
        old = self.store.get(ti.storage_key, ns, name)
        if old is None:
            raise not_found(ti, name)
        cur = self._scale_view(ti, old)
        if verb == "get":
            return 200, cur, {}
        if verb == "update":
            new = req.json_body()
        else:
            try:
                patch = json.loads(req.body or b"null")
                if req.content_type == "application/json-patch+json":
                    new = kube_patch.json_patch(cur, patch)
                elif req.content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                    new = kube_patch.merge_patch(cur, patch)
                else:
                    raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {req.content_type}")
            except (ValueError, kube_patch.PatchError) as e:
                raise bad_request(f"error decoding patch: {e}")
        if not isinstance(new, dict) or not isinstance((new.get("spec") or {}).get("replicas"), int) or \
                new["spec"]["replicas"] < 0:
            raise invalid(ti, name, [kube_schema.cause("FieldValueInvalid", "spec.replicas",
                                                       "Invalid value: must be greater than or equal to 0")])
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise conflict(ti, name)
        obj = copy.deepcopy(ti.from_storage(old))
        obj["spec"]["replicas"] = new["spec"]["replicas"]
        code, stored = self._finish_update(ti, ns, name, None, obj, old, req)
        return code, self._scale_view(ti, stored), {}

    def _pod_log(self, ns, name, req):
        """GET pods/NAME/log (kubectl logs): what the kubelet stand-in
        recorded; container, previous, tailLines and limitBytes are
        honoured, follow returns what there is so far."""
        ti = self.type_for("", "v1", "pods")
        pod = self.store.get(POD_KEY, ns, name)
        if pod is None:
            raise not_found(ti, name)
        names = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []]
        inits = [c.get("name") for c in (pod.get("spec") or {}).get("initContainers") or []]
        container = req.q("container")
        if not container:
            if len(names) != 1:
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                  f"[{' '.join(names)}]" + (f" or one of the init containers: [{' '.join(inits)}]"
                                                              if inits else ""))
            container = names[0]
        if container not in names + inits:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if self.pod_logs is None:
            raise bad_request(f"no kubelet runs pod {name}: this test API server has logs only with the kubelet "
                              "stand-in (tests/kube/kubelet.py)")
        try:
            text = self.pod_logs(ns, name, container, req.q("previous") in ("true", "1"))
        except KeyError as e:
            raise bad_request(f"container \"{container}\" in pod \"{name}\" is waiting to start: {e}")
        tail = req.q("tailLines")
        if tail not in (None, "") and tail.lstrip("-").isdigit() and int(tail) >= 0:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[len(lines) - int(tail):]) if int(tail) else ""
        limit = req.q("limitBytes")
        if limit not in (None, "") and limit.isdigit():
            text = text.encode()[:int(limit)].decode(errors="ignore")
        return 200, text, {"Content-Type": "text/plain"}

    def _bind_pod(self, ns, name, body):
        """POST pods/NAME/binding, what a scheduler does: sets spec.nodeName
        (which no update may change) and the PodScheduled condition."""
        ti = self.type_for("", "v1", "pods")
        if not isinstance(body, dict) or body.get("kind") != "Binding":
            raise bad_request("the body must be a Binding")
        target = body.get("target") or {}
        node = target.get("name") if isinstance(target, dict) else None
        if not node:
            raise invalid(ti, name, [kube_schema.cause("FieldValueRequired", "target.name", "Required value")])
        old = self.store.get(POD_KEY, ns, name)
        if old is None:
            raise not_found(ti, name)
        if (old.get("spec") or {}).get("nodeName"):
            raise conflict(ti, name, f"pod {name} is already assigned to node \"{old['spec']['nodeName']}\"")
        if old["metadata"].get("deletionTimestamp"):
            raise conflict(ti, name, f"pod {name} is being deleted, cannot be assigned to a host")
        new = copy.deepcopy(old)
        new["spec"]["nodeName"] = node
        st = new.setdefault("status", {})
        conds = [c for c in st.get("conditions") or [] if c.get("type") != "PodScheduled"]
        st["conditions"] = [{"type": "PodScheduled", "status": "True", "lastProbeTime": None,
                             "lastTransitionTime": fmt_time(now_utc())}] + conds
        self.store.commit(POD_KEY, ns, name, "MODIFIED", new, old)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}

    def _delete_options(self, req):
        opts = {}
        if req.body and (req.content_type == "application/vnd.kubernetes.protobuf"
                         or req.body.startswith(kube_proto.MAGIC)):
            try:
                opts = kube_proto.decode_delete_options(req.body)
            except kube_proto.ProtoError as e:
                raise bad_request(f"invalid DeleteOptions: {e}")
        elif req.body:
            try:
                opts = json.loads(req.body)
            except ValueError as e:
                raise bad_request(f"invalid DeleteOptions: {e}")
            if not isinstance(opts, dict):
                raise bad_request("DeleteOptions must be an object")
        for k in ("gracePeriodSeconds", "propagationPolicy", "dryRun"):
            if req.q(k) is not None and k not in opts:
                v = req.q(k)
                opts[k] = int(v) if k == "gracePeriodSeconds" and v.lstrip("-").isdigit() else (
                    [v] if k == "dryRun" else v)
        if req.q("orphanDependents") is not None:
            opts.setdefault("orphanDependents", req.q("orphanDependents") == "true")
        return opts

    def _delete(self, ti, ns, name, opts, req):
        old = self.store.get(ti.storage_key, ns, name)
        if old is None:
            raise not_found(ti, name)
        pre = opts.get("preconditions") or {}
        om = old["metadata"]
        if pre.get("uid") and pre["uid"] != om["uid"]:
            raise conflict(ti, name, f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {om['uid']}")
        if pre.get("resourceVersion") and pre["resourceVersion"] != om["resourceVersion"]:
            raise conflict(ti, name, f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                                     f"ResourceVersion in object meta: {om['resourceVersion']}")
        policy = opts.get("propagationPolicy")
        if policy is None and opts.get("orphanDependents") is True:
            policy = "Orphan"
        if policy not in (None, "Orphan", "Background", "Foreground"):
            raise invalid(ti, name, [kube_schema.cause("FieldValueNotSupported", "propagationPolicy",
                                                       f"Unsupported value: \"{policy}\": supported values: "
                                                       "\"Foreground\", \"Background\", \"Orphan\", \"nil\"")])
        dry = "All" in (opts.get("dryRun") or [])
        if om.get("deletionTimestamp"):
            grace = opts.get("gracePeriodSeconds")
            if ti.storage_key == POD_KEY and grace == 0 and int(om.get("deletionGracePeriodSeconds") or 0) > 0:
                new = copy.deepcopy(old)
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                if dry:
                    return 200, new
                if self._finalized(ti, new):
                    return 200, self.store.commit(ti.storage_key, ns or "", name, "DELETED", None, old)
                return 200, self.store.commit(ti.storage_key, ns or "", name, "MODIFIED", new, old)
            return 200, old
        new = copy.deepcopy(old)
        m = new["metadata"]
        fins = list(m.get("finalizers") or [])
        if policy == "Orphan" and "orphan" not in fins:
            fins.append("orphan")
        if policy == "Foreground" and "foregroundDeletion" not in fins:
            fins.append("foregroundDeletion")
        grace = 0
        if ti.storage_key == POD_KEY:
            g = opts.get("gracePeriodSeconds")
            grace = int(g if g is not None else (new.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            if not (new.get("spec") or {}).get("nodeName") or grace < 0:
                grace = 0
        is_ns = ti.storage_key == NS_KEY
        if fins or grace > 0 or is_ns:
            if fins:
                m["finalizers"] = fins
            when = now_utc()
            m["deletionTimestamp"] = fmt_time(when + timedelta(seconds=grace))
            m["deletionGracePeriodSeconds"] = grace
            if ti.tracks_generation:
                m["generation"] = int(m.get("generation", 1)) + 1
            if is_ns:
                new["status"] = {"phase": "Terminating"}
            if ti.storage_key == CRD_KEY:
                kube_crd.CRDs.refresh_status(new, old)
            if dry:
                return 200, new
            if grace > 0 and self.pod_termination_s is not None:
                self.pod_deadlines[(ns, name, om["uid"])] = time.monotonic() + min(grace, self.pod_termination_s)
            return 200, self.store.commit(ti.storage_key, ns or "", name, "MODIFIED", new, old)
        if dry:
            return 200, old
        stored = self.store.commit(ti.storage_key, ns or "", name, "DELETED", None, old)
        self._after_delete(ti, stored)
        return 200, stored

    def _delete_collection(self, ti, ns, req):
        ls, fs = self._selectors(ti, req)
        opts = self._delete_options(req)
        objs = self.store.data.get(ti.storage_key, {})
        targets = [o for k, o in sorted(objs.items()) if self._matches(ti, o, ns, ls, fs)]
        items = []
        for o in targets:
            try:
                _, out = self._delete(ti, o["metadata"].get("namespace"), o["metadata"]["name"], opts, req)
                items.append(self._view(ti, out))
            except ApiError:
                continue
        return {"kind": ti.list_kind, "apiVersion": ti.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)}, "items": items}

    # ------------------------------------------------------------ watch

    def prepare_watch(self, r, req):
        """Checks a watch request before any byte is sent; returns the
        watch state or raises ApiError."""
        ti = r.ti
        ls, fs = self._selectors(ti, req)
        if r.name:
            fs.reqs.append(("metadata.name", "=", r.name))
        rv = req.q("resourceVersion")
        bookmarks = req.q("allowWatchBookmarks") in ("true", "1")
        send_initial = req.q("sendInitialEvents") in ("true", "1")
        if send_initial and (req.q("resourceVersionMatch") != "NotOlderThan" or not bookmarks):
            raise invalid_list("sendInitialEvents requires resourceVersionMatch=NotOlderThan and allowWatchBookmarks=true")
        timeout = req.q("timeoutSeconds")
        try:
            timeout = float(timeout) if timeout not in (None, "") else self.default_watch_timeout_s
        except ValueError:
            raise bad_request(f"invalid timeoutSeconds '{timeout}'")
        st = self.store
        w = {"ti": ti, "ns": r.ns, "ls": ls, "fs": fs, "bookmarks": bookmarks, "timeout": timeout,
             "initial": [], "send_initial_end": send_initial, "error": None, "table": _accepts_table(req.accept),
             "req": req, "epoch": self.watch_epoch, "gone": self.gone_epoch}
        with st.lock:
            if rv in (None, "", "0") or send_initial:
                objs = st.data.get(ti.storage_key, {})
                w["initial"] = [objs[k] for k in sorted(objs) if self._matches(ti, objs[k], r.ns, ls, fs)]
                w["pos"] = st.rv
            else:
                pos = _int_rv(rv)
                if pos < st.compacted:
                    msg = f"too old resource version: {pos} ({st.compacted})"
                    if self.watch_gone_mode == "http":
                        raise expired(msg)
                    w["error"] = status_obj(410, "Expired", msg)
                w["pos"] = pos
        return w

    def _watch_event(self, w, etype, obj):
        ti = w["ti"]
        view = self._view(ti, obj)
        if w["table"]:
            view = self._table(ti, [view], {"resourceVersion": obj["metadata"].get("resourceVersion", "")}, w["req"])
        return {"type": etype, "object": view}

    def _bookmark(self, w, rv, initial_end=False):
        ti = w["ti"]
        meta = {"resourceVersion": str(rv), "creationTimestamp": None}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        return {"type": "BOOKMARK", "object": {"kind": ti.kind, "apiVersion": ti.api_version, "metadata": meta}}

    def run_watch(self, w, send, alive=lambda: True):
        """Streams watch events through send(dict) until the timeout, a
        drop, or the client going away (send raises OSError, alive()
        turns False)."""
        st = self.store
        ti, ns, ls, fs = w["ti"], w["ns"], w["ls"], w["fs"]
        if w["error"] is not None:
            send({"type": "ERROR", "object": w["error"]})
            return "gone"
        for o in w["initial"]:
            send(self._watch_event(w, "ADDED", o))
        if w["send_initial_end"]:
            send(self._bookmark(w, w["pos"], initial_end=True))
        pos = w["pos"]
        start = time.monotonic()
        deadline = start + w["timeout"]
        next_bm = start + self.bookmark_interval_s
        while True:
            out = []
            bookmark = False
            end = None
            with st.lock:
                while True:
                    now = time.monotonic()
                    if self.watch_epoch != w["epoch"]:
                        end = "reset" if self.watch_reset else "dropped"
                        break
                    if self.gone_epoch != w["gone"]:
                        end = "gone"
                        break
                    if now >= deadline:
                        end = "timeout"
                        break
                    if not alive():
                        end = "closed"
                        break
                    if ti.is_cr and self.types.get((ti.group, ti.version, ti.plural)) is None:
                        end = "unserved"  # the CRD went away: the API server ends such watches
                        break
                    if self.faults.stalled():
                        st.cond.wait(min(0.2, deadline - now))
                        continue
                    if pos < st.compacted:
                        end = "gone"
                        break
                    evs = st.events_after(pos)
                    if evs:
                        for ev in evs:
                            item = self._filter_event(ti, ns, ls, fs, ev)
                            if item is not None:
                                out.append(item)
                        pos = evs[-1].rv
                        if out:
                            break
                        continue
                    if w["bookmarks"] and now >= next_bm:
                        bookmark = True
                        break
                    wake = deadline if not w["bookmarks"] else min(deadline, next_bm)
                    st.cond.wait(max(0.01, min(wake - now, 1.0)))
                events = [self._watch_event(w, t, o) for t, o in out]
            for e in events:
                send(e)
            if events and end is None and w["bookmarks"] and time.monotonic() >= next_bm:
                bookmark = True  # a busy stream gets its bookmarks too
            if bookmark:
                send(self._bookmark(w, pos))
                next_bm = time.monotonic() + self.bookmark_interval_s
            if end == "gone":
                send({"type": "ERROR", "object": status_obj(
                    410, "Expired", f"too old resource version: {pos} ({max(st.compacted, pos + 1)})")})
                return end
            if end == "timeout" and w["bookmarks"]:
                send(self._bookmark(w, pos))
            if end == "closed":
                raise ConnectionResetError("the watch client went away")
            if end is not None:
                return end

    def _filter_event(self, ti, ns, ls, fs, ev):
        if ev.key != ti.storage_key:
            return None
        if ns is not None and ev.ns != ns:
            return None
        if ev.type == "ADDED":
            return ("ADDED", ev.obj) if self._matches(ti, ev.obj, ns, ls, fs) else None
        if ev.type == "DELETED":
            return ("DELETED", ev.obj) if self._matches(ti, ev.obj, ns, ls, fs) else None
        new_m = self._matches(ti, ev.obj, ns, ls, fs)
        old_m = ev.prev is not None and self._matches(ti, ev.prev, ns, ls, fs)
        if new_m and old_m:
            return ("MODIFIED", ev.obj)
        if new_m:
            return ("ADDED", ev.obj)
        if old_m:
            gone = copy.deepcopy(ev.prev)
            gone["metadata"]["resourceVersion"] = str(ev.rv)
            return ("DELETED", gone)
        return None

    # ------------------------------------------------------------ actions

    def drop_watches(self, reset=False):
        """Ends every open watch: cleanly, or (reset) by closing the socket."""
        with self.store.lock:
            self.watch_reset = reset
            self.watch_epoch += 1
            self.store.cond.notify_all()

    def gone_watches(self):
        """Sends every open watch an ERROR event with code 410, then ends it."""
        with self.store.lock:
            self.gone_epoch += 1
            self.store.cond.notify_all()

    def expire_versions(self):
        """Compacts all history: every resourceVersion issued so far becomes
        too old to watch from or to continue a list at."""
        with self.store.lock:
            self.store.compact_all()

    def go_down_later(self, seconds):
        if self.server is not None:
            threading.Timer(0.05, self.server.go_down, args=(seconds,)).start()

    # ------------------------------------------------------------ controllers

    def _controllers(self):
        """Namespace and CRD cleanup, pod termination and garbage collection."""
        last_rv = -1
        while not self._stop.wait(0.05):
            with self.store.lock:
                if self.store.rv == last_rv and not self.pod_deadlines:
                    continue
                before = self.store.rv
                try:
                    self._controller_pass()
                except ApiError as e:
                    if self.verbose:
                        print(f"apiserver: controller: {e}", file=sys.stderr, flush=True)
                except Exception as e:  # a bug here must not stop the server
                    print(f"apiserver: controller error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                # a pass that wrote may have unblocked more work: run again until quiet
                last_rv = before if self.store.rv != before else self.store.rv

    def _ti_for_key(self, key):
        for ti in self.types.values():
            if ti.storage_key == key and not (ti.group == "events.k8s.io"):
                return ti
        return None

    def _ctl(self, fn, *args):
        """One controller write; a refusal (a 409 or 422) skips that object."""
        try:
            return fn(*args)
        except ApiError as e:
            if self.verbose:
                print(f"apiserver: controller: {e}", file=sys.stderr, flush=True)
            return None

    def _controller_pass(self):
        st = self.store
        now = time.monotonic()
        pods_ti = self.type_for("", "v1", "pods")
        for (ns, name, uid), when in list(self.pod_deadlines.items()):
            pod = st.get(pods_ti.storage_key, ns, name)
            if pod is None or pod["metadata"]["uid"] != uid:
                del self.pod_deadlines[(ns, name, uid)]
                continue
            if now >= when:
                del self.pod_deadlines[(ns, name, uid)]
                self._ctl(self._delete, pods_ti, ns, name, {"gracePeriodSeconds": 0}, None)
        # namespaces being deleted: remove their content, then the namespace
        ns_ti = self.type_for("", "v1", "namespaces")
        for (_, nsname), nso in list(st.data.get(NS_KEY, {}).items()):
            if not nso["metadata"].get("deletionTimestamp"):
                continue
            left = 0
            for key, objs in list(st.data.items()):
                ti = self._ti_for_key(key)
                if ti is None or not ti.namespaced:
                    continue
                for (ons, oname), o in list(objs.items()):
                    if ons != nsname:
                        continue
                    left += 1
                    if not o["metadata"].get("deletionTimestamp"):
                        self._ctl(self._delete, ti, ons, oname, {}, None)
            if left == 0 and (nso.get("spec") or {}).get("finalizers"):
                new = copy.deepcopy(nso)
                new["spec"]["finalizers"] = []
                self._ctl(self._finish_update, ns_ti, None, nsname, "finalize", new, nso, None)
        # CRDs being deleted: remove their custom resources, then the finalizer
        crd_ti = self.type_for("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        for (_, cname), crd in list(st.data.get(crd_ti.storage_key, {}).items()):
            if not crd["metadata"].get("deletionTimestamp"):
                continue
            key = (crd["spec"]["group"], crd["spec"]["names"]["plural"])
            ti = self._ti_for_key(key)
            objs = st.data.get(key, {})
            for (ons, oname), o in list(objs.items()):
                if not o["metadata"].get("deletionTimestamp") and ti is not None:
                    self._ctl(self._delete, ti, ons or None, oname, {}, None)
            if not st.data.get(key) and kube_crd.CLEANUP_FINALIZER in (crd["metadata"].get("finalizers") or []):
                new = copy.deepcopy(crd)
                new["metadata"]["finalizers"] = [f for f in new["metadata"]["finalizers"] if f != kube_crd.CLEANUP_FINALIZER]
                self._ctl(self._finish_update, crd_ti, None, cname, None, new, crd, None)
        if self.gc:
            self._gc_pass()

    def _gc_pass(self):
        """What kube-controller-manager's garbage collector does for owner
        references: dependents of owners that are gone are deleted
        (background); an owner deleted with Foreground waits for its
        dependents to go, one deleted with Orphan releases them."""
        st = self.store
        uids = {o["metadata"]["uid"]: o for objs in st.data.values() for o in objs.values()}
        for key, objs in list(st.data.items()):
            ti = self._ti_for_key(key)
            if ti is None:
                continue
            for o in list(objs.values()):
                m = o["metadata"]
                refs = m.get("ownerReferences") or []
                if not refs or m.get("deletionTimestamp"):
                    continue
                owners = [uids[r.get("uid")] for r in refs if r.get("uid") in uids]
                ns = m.get("namespace") or None
                if not owners:
                    self._ctl(self._delete, ti, ns, m["name"], {}, None)
                    continue
                dying = [ow for ow in owners if ow["metadata"].get("deletionTimestamp")]
                orphaning = {ow["metadata"]["uid"] for ow in dying if "orphan" in (ow["metadata"].get("finalizers") or [])}
                foreground = [ow for ow in dying if "foregroundDeletion" in (ow["metadata"].get("finalizers") or [])]
                if orphaning:
                    new = copy.deepcopy(o)
                    new["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") not in orphaning]
                    if not new["metadata"]["ownerReferences"]:
                        del new["metadata"]["ownerReferences"]
                    self._ctl(self._finish_update, ti, ns, m["name"], None, new, o, None)
                elif foreground and len(foreground) == len(owners):
                    self._ctl(self._delete, ti, ns, m["name"], {"propagationPolicy": "Foreground"}, None)
        referenced = {r.get("uid") for objs in st.data.values() for o in objs.values()
                      for r in o["metadata"].get("ownerReferences") or []}
        for key, objs in list(st.data.items()):
            for o in list(objs.values()):
                m = o["metadata"]
                fins = m.get("finalizers") or []
                if not m.get("deletionTimestamp") or not {"orphan", "foregroundDeletion"} & set(fins):
                    continue
                if m["uid"] in referenced:
                    continue
                ti = self._ti_for_key(key)
                new = copy.deepcopy(o)
                new["metadata"]["finalizers"] = [f for f in fins if f not in ("orphan", "foregroundDeletion")]
                self._ctl(self._finish_update, ti, m.get("namespace") or None, m["name"], None, new, o, None)

    # ------------------------------------------------------------ admin

    def record(self, method, path, query, verb, code, agent, seconds, latency_s=0.0, user=""):
        with self.store.lock:
            self.request_seq += 1
            self.requests.append({"seq": self.request_seq, "time": time.time(), "method": method, "path": path,
                                  "query": query, "verb": verb, "code": code, "userAgent": agent, "user": user,
                                  "ms": round(seconds * 1000, 1), "faultLatencyMs": round(latency_s * 1000, 1)})

    def request_log(self, since=0):
        with self.store.lock:
            return {"requests": [r for r in self.requests if r["seq"] > since], "next": self.request_seq}

    def clear_requests(self):
        with self.store.lock:
            self.requests.clear()

    def configure(self, **kw):
        for k, v in kw.items():
            if k not in CONFIG_KEYS:
                raise ValueError(f"unknown config key '{k}'")
            if k == "watch_gone_mode" and v not in ("event", "http"):
                raise ValueError("watch_gone_mode must be 'event' or 'http'")
            if k == "token_users":
                _check_token_users(v or {})
        with self.store.lock:
            for k, v in kw.items():
                if k == "history_events":
                    self.store.history_events = int(v)
                    if len(self.store.log) > self.store.history_events:
                        self.store.compact(len(self.store.log) - self.store.history_events)
                elif k == "tokens":
                    self.tokens = set(v or [])
                elif k == "token_users":
                    self.token_users = _check_token_users(v or {})
                else:
                    setattr(self, k, v)
            self.store.cond.notify_all()

    def set_token_user(self, token, user):
        """Accepts token as user (None: forget the token)."""
        with self.store.lock:
            if user is None:
                self.token_users.pop(token, None)
            else:
                self.token_users = dict(self.token_users, **_check_token_users({token: user}))

    def config(self):
        return {"bookmark_interval_s": self.bookmark_interval_s, "history_events": self.store.history_events,
                "watch_gone_mode": self.watch_gone_mode, "pod_termination_s": self.pod_termination_s, "gc": self.gc,
                "default_watch_timeout_s": self.default_watch_timeout_s, "tokens": len(self.tokens),
                "token_users": len(self.token_users),
                "verbose": self.verbose}

    def stats(self):
        with self.store.lock:
            counts = {f"{g}/{p}" if g else p: len(objs) for (g, p), objs in self.store.data.items()}
            return {"resourceVersion": self.store.rv, "compactedResourceVersion": self.store.compacted,
                    "retainedEvents": len(self.store.log), "openWatches": self.open_watches, "objects": counts,
                    "requests": self.request_seq}

    # ------------------------------------------------------------ discovery

    def _root_paths(self):
        paths = ["/api", "/api/v1", "/apis", "/healthz", "/livez", "/readyz", "/version", "/openapi/v3"]
        for g, versions in self.served_groups():
            if g:
                paths.append(f"/apis/{g}")
                paths += [f"/apis/{g}/{v}" for v in versions]
        return paths

    def _api_group(self, g):
        versions = dict(self.served_groups())[g]
        vs = [{"groupVersion": f"{g}/{v}", "version": v} for v in versions]
        return {"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": vs, "preferredVersion": vs[0]}

    def _resource_list(self, group, version):
        res = []
        for ti in sorted(self.types_in(group, version), key=lambda t: t.plural):
            e = {"name": ti.plural, "singularName": ti.singular, "namespaced": ti.namespaced, "kind": ti.kind,
                 "verbs": list(VERBS)}
            if ti.short_names:
                e["shortNames"] = ti.short_names
            if ti.categories:
                e["categories"] = ti.categories
            digest = hashlib.sha256(f"{ti.group}/{ti.kind}".encode()).digest()
            e["storageVersionHash"] = base64.b64encode(digest[:8]).decode()
            res.append(e)
            for sub, verbs in ti.subresources():
                res.append({"name": f"{ti.plural}/{sub}", "singularName": "", "namespaced": ti.namespaced,
                            "kind": ti.kind, "verbs": verbs})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}

    def _discovery_root(self, which, req):
        if _accepts_aggregated(req.accept):
            items = []
            for g, versions in self.served_groups():
                if (which == "api") != (g == ""):
                    continue
                vlist = []
                for v in versions:
                    resources = []
                    for ti in sorted(self.types_in(g, v), key=lambda t: t.plural):
                        rd = {"resource": ti.plural,
                              "responseKind": {"group": ti.group, "version": ti.version, "kind": ti.kind},
                              "scope": "Namespaced" if ti.namespaced else "Cluster",
                              "singularResource": ti.singular, "verbs": list(VERBS)}
                        if ti.short_names:
                            rd["shortNames"] = ti.short_names
                        if ti.categories:
                            rd["categories"] = ti.categories
                        subs = [{"subresource": s, "verbs": verbs,
                                 "responseKind": {"group": ti.group, "version": ti.version, "kind": ti.kind}}
                                for s, verbs in ti.subresources()]
                        if subs:
                            rd["subresources"] = subs
                        resources.append(rd)
                    vlist.append({"version": v, "resources": resources, "freshness": "Current"})
                items.append({"metadata": {"name": g, "creationTimestamp": None}, "versions": vlist})
            body = {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {},
                    "items": items}
            return 200, body, {"Content-Type": "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"}
        if which == "api":
            return 200, {"kind": "APIVersions", "versions": ["v1"],
                         "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}, {}
        groups = [self._api_group(g) for g, _ in self.served_groups() if g]
        return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}, {}

    # ------------------------------------------------------------ openapi

    def _openapi_docs(self):
        docs = {}
        for g, versions in self.served_groups():
            for v in versions:
                docs[f"apis/{g}/{v}" if g else "api/v1"] = self._openapi_gv(g, v)
        return docs

    def _openapi_gv(self, group, version):
        """An OpenAPI v3 document with what kubectl reads: PATCH operations
        carrying the fieldValidation parameter (so kubectl leaves validation
        to the server) and custom resource schemas (for kubectl explain)."""
        paths, schemas = {}, {}
        prefix = f"/apis/{group}/{version}" if group else "/api/v1"
        params = [{"name": n, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                  for n in ("dryRun", "fieldManager", "fieldValidation", "force")]
        for ti in self.types_in(group, version):
            gvk = {"group": ti.group, "version": ti.version, "kind": ti.kind}
            scope = f"{prefix}/namespaces/{{namespace}}" if ti.namespaced else prefix
            item = f"{scope}/{ti.plural}/{{name}}"
            content = {ct: {"schema": {"type": "object"}} for ct in
                       ("application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml")}
            ref = _schema_name(ti)
            paths[item] = {"patch": {"operationId": f"patch{ti.kind}", "x-kubernetes-action": "patch",
                                     "x-kubernetes-group-version-kind": gvk, "parameters": params,
                                     "requestBody": {"content": content, "required": True},
                                     "responses": {"200": {"description": "OK", "content": {
                                         "application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}}}}}
            if ti.is_cr and ti.schema is not None:
                s = copy.deepcopy(ti.schema)
                s.setdefault("properties", {})
                s["properties"].setdefault("apiVersion", {"type": "string"})
                s["properties"].setdefault("kind", {"type": "string"})
                s["properties"]["metadata"] = {"type": "object"}
                s["x-kubernetes-group-version-kind"] = [gvk]
                schemas[ref] = s
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
                "paths": paths, "components": {"schemas": schemas}}

    def _openapi(self, extra, req):
        if extra == ["v3"]:
            docs = self._openapi_docs()
            paths = {}
            for k, d in docs.items():
                h = hashlib.sha512(json.dumps(d, sort_keys=True).encode()).hexdigest()[:64].upper()
                paths[k] = {"serverRelativeURL": f"/openapi/v3/{k}?hash={h}"}
            return 200, {"paths": paths}, {}
        if extra and extra[0] == "v3":
            doc = self._openapi_docs().get("/".join(extra[1:]))
            if doc is not None:
                return 200, doc, {}
        # /openapi/v2 is not served: kubectl then uses its built-in patch
        # metadata for strategic merge patches of built-in kinds
        raise path_not_found()


def _check_token_users(m):
    if not isinstance(m, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                          for k, v in m.items()):
        raise ValueError("'token_users' must map non-empty token strings to non-empty user names")
    return dict(m)


def _schema_name(ti):
    g = ".".join(reversed(ti.group.split("."))) if ti.group else "io.k8s.api.core"
    return f"{g}.{ti.version}.{ti.kind}"


def _version_priority(v):
    m = re.match(r"^v(\d+)(?:(alpha|beta)(\d+))?$", v)
    if not m:
        return (3, 0, 0, v)
    stage = {"alpha": 2, "beta": 1, None: 0}[m.group(2)]
    return (stage, -int(m.group(1)), -int(m.group(3) or 0), v)


def _spec_part(obj, has_status):
    skip = {"metadata", "apiVersion", "kind"} | ({"status"} if has_status else set())
    return {k: v for k, v in obj.items() if k not in skip}


def _int_rv(text):
    try:
        v = int(text)
        if v < 0:
            raise ValueError
        return v
    except (TypeError, ValueError):
        raise bad_request(f"invalid resource version: \"{text}\"")


def invalid_list(msg):
    return ApiError(422, "Invalid", msg)


def too_large(want, have):
    return ApiError(504, "Timeout", f"Timeout: Too large resource version: {want}, current: {have}",
                    {"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                     "retryAfterSeconds": 1})


# ---------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "loraplane-test-apiserver"

    def log_message(self, fmt, *args):
        if self.server.frontend.app.verbose:
            sys.stderr.write("apiserver: " + (fmt % args) + "\n")

    def setup(self):
        super().setup()
        self.server.frontend.track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.frontend.track(self.connection, False)

    def do_GET(self):
        self._serve("GET")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(1024)
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                if len(out) + n > MAX_BODY:
                    raise ApiError(413, "RequestEntityTooLarge", "the request is too large")
                out += self.rfile.read(n)
                self.rfile.readline(16)
            return bytes(out)
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ApiError(413, "RequestEntityTooLarge", "the request is too large")
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, code, body, headers=None):
        headers = dict(headers or {})
        ctype = headers.pop("Content-Type", "application/json")
        if isinstance(body, (dict, list)):
            data = (json.dumps(body, separators=(",", ":")) + "\n").encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body or b""
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in headers.items():
            for one in (v if isinstance(v, list) else [v]):
                self.send_header(k, one)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        return code

    def _auth_user(self, app):
        if not app.tokens and not app.token_users and not self.server.frontend.client_ca:
            return "admin"
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            got = auth[7:].strip().encode()
            for t in list(app.tokens):
                if hmac.compare_digest(got, t.encode()):
                    return "token"
            for t, user in list(app.token_users.items()):
                if hmac.compare_digest(got, t.encode()):
                    return user
            return None
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                cert = self.connection.getpeercert()
            except (ValueError, OSError):
                cert = None
            if cert:
                for rdn in cert.get("subject", ()):
                    for k, v in rdn:
                        if k == "commonName":
                            return v
                return "client-cert"
        return None

    def _serve(self, method):
        fe = self.server.frontend
        app = fe.app
        url = urlsplit(self.path)
        path, query = url.path, url.query
        code = 0
        verb = ""
        user = ""
        latency = 0.0
        started = time.monotonic()
        try:
            body = self._read_body()
        except (ApiError, ValueError) as e:
            self.close_connection = True
            err = e if isinstance(e, ApiError) else bad_request("malformed chunked body")
            self._send(err.code, err.status)
            return
        try:
            if path.startswith("/_"):
                code = self._admin(method, path, query, body)
                verb = "admin"
                return
            user = self._auth_user(app)
            if user is None:
                user = ""
                code = self._send(401, status_obj(401, "Unauthorized", "Unauthorized"))
                return
            req = Request(method, path, query, dict(self.headers.items()), body, user)
            try:
                with app.store.lock:
                    r = app.route(path)
            except ApiError as e:
                code = self._send(e.code, e.status, e.headers)
                return
            verb = app.verb_of(method, r, req)
            latency, action = app.faults.decide(method, verb, path, user)
            if latency:
                time.sleep(latency)
            if action == "drop":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                code = -1
                return
            if isinstance(action, ApiError):
                code = self._send(action.code, action.status, action.headers)
                return
            if verb == "watch":
                code = self._watch(app, r, req)
                return
            code, obj, headers = app.dispatch(req, r)
            code = self._send(code, obj, headers)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True
        except Exception as e:  # a bug in this server: say so loudly, answer 500
            traceback.print_exc()
            self.close_connection = True
            try:
                code = self._send(500, status_obj(500, "InternalError",
                                                  f"Internal error occurred: {type(e).__name__}: {e}"))
            except OSError:
                pass
        finally:
            app.record(method, path, query, verb, code, self.headers.get("User-Agent", ""), time.monotonic() - started,
                       latency, user)

    def _watch(self, app, r, req):
        try:
            w = app.prepare_watch(r, req)
        except ApiError as e:
            return self._send(e.code, e.status, e.headers)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.wfile.flush()

        def send(ev):
            data = (json.dumps(ev, separators=(",", ":")) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def alive():
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return True
                if isinstance(self.connection, ssl.SSLSocket):
                    return False  # a watch client sends nothing more but a close
                return self.connection.recv(1, socket.MSG_PEEK) != b""
            except (OSError, ValueError):
                return False

        with app.store.lock:
            app.open_watches += 1
        try:
            how = app.run_watch(w, send, alive)
            if how == "reset":
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return 200
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            self.close_connection = True
        finally:
            with app.store.lock:
                app.open_watches -= 1
        return 200

    def _admin(self, method, path, query, body):
        app = self.server.frontend.app
        try:
            data = json.loads(body) if body else {}
            if not isinstance(data, dict):
                raise ValueError("the body must be a JSON object")
            if path == "/_faults":
                if method == "GET":
                    return self._send(200, app.faults.snapshot())
                if method == "DELETE":
                    app.faults.clear()
                    return self._send(200, app.faults.snapshot())
                if method == "POST":
                    app.faults.set(**data)
                    return self._send(200, app.faults.snapshot())
            if path == "/_config":
                if method == "POST":
                    app.configure(**data)
                if method in ("GET", "POST"):
                    return self._send(200, app.config())
            if path == "/_requests":
                if method == "GET":
                    since = int(parse_qs(query).get("since", ["0"])[0])
                    return self._send(200, app.request_log(since))
                if method == "DELETE":
                    app.clear_requests()
                    return self._send(200, {"requests": [], "next": app.request_seq})
            if path == "/_stats" and method == "GET":
                return self._send(200, app.stats())
            if path == "/_clock" and method == "POST":
                return self._send(200, app.advance_clock(data.get("advance_s")))
            return self._send(404, {"error": f"no admin endpoint {method} {path}"})
        except (ValueError, TypeError, re.error) as e:
            return self._send(400, {"error": str(e)})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, frontend):
        self.frontend = frontend
        super().__init__(addr, _Handler)

    def finish_request(self, request, client_address):
        try:
            # headers and body go out in separate writes: without this, Nagle's
            # algorithm and the client's delayed ACK add 40 ms to every request
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        ctx = self.frontend.ssl_ctx
        if ctx is not None:
            request.settimeout(10)
            try:
                request = ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                request.close()
                return
            request.settimeout(None)
        try:
            self.RequestHandlerClass(request, client_address, self)
        finally:
            if ctx is not None:
                try:
                    request.close()
                except OSError:
                    pass

    def handle_error(self, request, client_address):
        if self.frontend.app.verbose:
            super().handle_error(request, client_address)


class HttpFrontend:
    """The listening socket(s): can go down and come back on the same port."""

    def __init__(self, app, host, port, ssl_ctx, client_ca):
        self.app = app
        self.host = host
        self.port = port
        self.ssl_ctx = ssl_ctx
        self.client_ca = client_ca
        self.httpd = None
        self.thread = None
        self.conns = set()
        self.lock = threading.Lock()
        app.server = self

    def track(self, sock, add):
        with self.lock:
            (self.conns.add if add else self.conns.discard)(sock)

    def start(self):
        self.httpd = _HTTPServer((self.host, self.port), self)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="apiserver-http", daemon=True)
        self.thread.start()

    def go_down(self, seconds=None):
        """Closes the listener and every connection; comes back after
        `seconds` on the same port (never, when seconds is None)."""
        httpd, self.httpd = self.httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if seconds:
            up_at = self.app.now() + seconds
            threading.Thread(target=self._come_up_at, args=(up_at,), daemon=True).start()

    def _come_up_at(self, up_at):
        while self.app.now() < up_at:
            time.sleep(0.02)
        self.come_up()

    def come_up(self):
        if self.httpd is None:
            for _ in range(50):
                try:
                    self.start()
                    return
                except OSError:
                    time.sleep(0.1)
            raise OSError(f"cannot listen on {self.host}:{self.port} again")

    def stop(self):
        self.go_down(None)


# ---------------------------------------------------------------- Python API

class KubeApiServer:
    """The server for Python tests: start() it, point clients at .url, and
    use request()/create()/faults to drive and break it.

        s = KubeApiServer(token="t").start()
        s.create({"apiVersion": "v1", "kind": "Pod", ...})
        s.faults.set(status=500, for_seconds=2)
        s.stop()
    """

    def __init__(self, host="127.0.0.1", port=0, token=None, tls_cert=None, tls_key=None, client_ca=None, **config):
        ctx = None
        if client_ca and not tls_cert:
            raise ValueError("client_ca needs tls_cert and tls_key")
        if tls_cert:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls_cert, tls_key)
            ctx.set_alpn_protocols(["http/1.1"])
            if client_ca:
                ctx.load_verify_locations(client_ca)
                ctx.verify_mode = ssl.CERT_OPTIONAL
        self.app = App(token=token, **config)
        self.frontend = HttpFrontend(self.app, host, port, ctx, client_ca)
        self.scheme = "https" if ctx else "http"

    @property
    def faults(self):
        return self.app.faults

    @property
    def port(self):
        return self.frontend.port

    @property
    def url(self):
        return f"{self.scheme}://{self.frontend.host}:{self.frontend.port}"

    def start(self):
        try:
            self.frontend.start()
        except OSError:
            self.app.close()
            raise
        return self

    def stop(self):
        self.frontend.stop()
        self.app.close()

    def go_down(self, seconds=None):
        self.frontend.go_down(seconds)

    def come_up(self):
        self.frontend.come_up()

    def advance_clock(self, seconds):
        """Moves the clock of faults (for_seconds, down_for_seconds) forward."""
        return self.app.advance_clock(seconds)

    def configure(self, **kw):
        self.app.configure(**kw)

    def set_token_user(self, token, user):
        """Accepts the bearer token as user (for example
        "system:serviceaccount:team-a:operator"); user None forgets it."""
        self.app.set_token_user(token, user)

    def drop_watches(self, reset=False):
        self.app.drop_watches(reset)

    def gone_watches(self):
        self.app.gone_watches()

    def expire_versions(self):
        self.app.expire_versions()

    def request(self, method, path, body=None, content_type="application/json", accept="application/json"):
        """One API call without HTTP (no auth, no faults): returns (code, obj)."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        url = urlsplit(path)
        req = Request(method, url.path, url.query, {"Content-Type": content_type, "Accept": accept}, body)
        try:
            r = self.app.route(url.path)
            if self.app.verb_of(method, r, req) == "watch":
                raise bad_request("use HTTP for watches")
        except ApiError as e:
            return e.code, e.status
        code, obj, _ = self.app.dispatch(req, r)
        return code, obj

    def path_for(self, obj, name=True):
        with self.app.store.lock:
            ti = self.app.type_by_kind(obj["apiVersion"], obj["kind"])
        if ti is None:
            raise ValueError(f"no resource serves {obj['apiVersion']} {obj['kind']}")
        base = f"/apis/{ti.api_version}" if ti.group else "/api/v1"
        ns = (obj.get("metadata") or {}).get("namespace") or "default"
        p = f"{base}/namespaces/{ns}/{ti.plural}" if ti.namespaced else f"{base}/{ti.plural}"
        return f"{p}/{obj['metadata']['name']}" if name else p

    def create(self, obj):
        code, out = self.request("POST", self.path_for(obj, name=False), obj)
        if code != 201:
            raise RuntimeError(f"create failed ({code}): {out.get('message')}")
        return out

    def get(self, obj):
        code, out = self.request("GET", self.path_for(obj))
        return out if code == 200 else None

    def run_pod(self, name, namespace="default", labels=None, annotations=None, ip="10.0.0.1", ready=True,
                ports=None, phase="Running", node="node-1"):
        """Creates a pod and gives it the status a kubelet would: phase,
        podIP and the Ready condition. Returns the pod."""
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace, "labels": labels or {},
                            "annotations": annotations or {}},
               "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "loraplane-agent:test",
                                                          "ports": ports or []}]}}
        self.create(pod)
        return self.set_pod_status(name, namespace, ip=ip, ready=ready, phase=phase)

    def set_pod_status(self, name, namespace="default", ip=None, ready=True, phase="Running"):
        now = fmt_time(now_utc())
        cond = "True" if ready else "False"
        st = {"phase": phase, "conditions": [{"type": "Ready", "status": cond, "lastTransitionTime": now},
                                             {"type": "ContainersReady", "status": cond, "lastTransitionTime": now}],
              "containerStatuses": [{"name": "agent", "ready": ready, "restartCount": 0, "image": "loraplane-agent:test",
                                     "imageID": "", "started": True, "state": {"running": {"startedAt": now}}}]}
        if ip:
            st["podIP"] = ip
            st["podIPs"] = [{"ip": ip}]
        code, out = self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": st},
                                 content_type="application/merge-patch+json")
        if code != 200:
            raise RuntimeError(f"pod status update failed ({code}): {out.get('message')}")
        return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Kubernetes API test server (memory only).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--token", action="append", help="accepted bearer token (repeatable); none = no auth")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--client-ca", help="also accept client certificates signed by this CA")
    p.add_argument("--history-events", type=int, default=10000,
                   help="watch events kept; older resourceVersions get 410 Gone")
    p.add_argument("--bookmark-interval", type=float, default=5.0, help="seconds between watch bookmarks")
    p.add_argument("--watch-gone-mode", choices=["event", "http"], default="event",
                   help="how a watch from a compacted version fails: ERROR event or HTTP 410")
    p.add_argument("--pod-termination", type=float, default=1.0,
                   help="seconds a deleted pod on a node stays Terminating (at most its grace period)")
    p.add_argument("--no-gc", action="store_true", help="do not garbage-collect owned objects")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    a = p.parse_args(argv)
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key go together")
    try:
        srv = KubeApiServer(host=a.host, port=a.port, token=a.token, tls_cert=a.tls_cert, tls_key=a.tls_key,
                            client_ca=a.client_ca, history_events=a.history_events,
                            bookmark_interval_s=a.bookmark_interval, watch_gone_mode=a.watch_gone_mode,
                            pod_termination_s=a.pod_termination, gc=not a.no_gc, verbose=a.verbose)
    except (OSError, ssl.SSLError, ValueError) as e:
        print(f"apiserver: cannot set up TLS: {e}", file=sys.stderr)
        return 1
    try:
        srv.start()
    except OSError as e:
        print(f"apiserver: cannot listen on {a.host}:{a.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"ready {srv.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
