"""A small Kubernetes API client for the kubelet stand-in and its
controllers (tests/kube/kubelet.py, tests/kube/kube_controllers.py): JSON
requests over HTTPS with a bearer token, and informers (list + watch with
bookmarks, relist on 410, a local cache) like client-go's, plus a work
queue with delayed adds. Standard library only."""

import heapq
import http.client
import json
import socket
import ssl
import sys
import threading
import time
from urllib.parse import quote, urlsplit


class KubeError(Exception):
    def __init__(self, code, obj, what=""):
        msg = obj.get("message") if isinstance(obj, dict) else str(obj)
        super().__init__(f"{what}: HTTP {code}: {msg}" if what else f"HTTP {code}: {msg}")
        self.code = code
        self.obj = obj


class KubeClient:
    """JSON over HTTP(S) to one API server; one keep-alive connection per
    thread. request() answers (code, parsed body) and retries once on a
    connection that went stale."""

    def __init__(self, url, token=None, ca_file=None, user_agent="loraplane-kubelet-standin", timeout=30):
        u = urlsplit(url)
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.token = token
        self.user_agent = user_agent
        self.timeout = timeout
        self.ctx = None
        if self.scheme == "https":
            self.ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl._create_unverified_context()
        self.local = threading.local()

    def connect(self, timeout=None):
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout or self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def headers(self, ctype=None):
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if ctype:
            h["Content-Type"] = ctype
        return h

    def request(self, method, path, body=None, ctype="application/json"):
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        for attempt in (0, 1):
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = self.local.conn = self.connect()
            try:
                conn.request(method, path, body=data, headers=self.headers(ctype if data is not None else None))
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        try:
            obj = json.loads(raw) if raw else {}
        except ValueError:
            obj = {"message": raw.decode(errors="replace")}
        return resp.status, obj

    def must(self, method, path, body=None, ctype="application/json", ok=(200, 201)):
        code, obj = self.request(method, path, body, ctype)
        if code not in ok:
            raise KubeError(code, obj, f"{method} {path}")
        return obj

    def close(self):
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None


def resource_path(api_version, plural, ns=None, name=None, sub=None):
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    p = f"{base}/namespaces/{quote(ns)}/{plural}" if ns else f"{base}/{plural}"
    if name:
        p += f"/{quote(name)}"
    if sub:
        p += f"/{sub}"
    return p


def key_of(obj):
    m = obj.get("metadata") or {}
    return (m.get("namespace") or "", m.get("name") or "")


def rv_of(obj):
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Informer:
    """list + watch of one resource path (optionally with a selector
    query), a cache keyed (namespace, name) and handlers called as
    handler(event_type, obj, old) from the informer's thread. Watches ask
    for bookmarks and restart from the last version seen; a 410 relists
    (handlers then see the difference as events). Writes the owner made
    itself go into the cache at once through observe() / forget(), so a
    controller does not act twice on a state the watch has not shown yet."""

    def __init__(self, client, path, name, query="", log=None, watch_timeout_s=240):
        self.client = client
        self.path = path
        self.name = name
        self.query = query
        self.log = log or (lambda msg: None)
        self.watch_timeout_s = watch_timeout_s
        self.items = {}
        self.gone = {}  # key -> uid deleted by our own write, until the watch says so
        self.lock = threading.RLock()
        self.handlers = []
        self.synced = threading.Event()
        self.stopping = threading.Event()
        self.rv = 0  # the newest resourceVersion this informer has seen (events, bookmarks, lists)
        self.failures = 0  # list or watch attempts that failed (the API server away, errors)
        self.rv_cond = threading.Condition()
        self.thread = None
        self.conn = None

    def add_handler(self, fn):
        self.handlers.append(fn)

    def _seen(self, rv):
        try:
            rv = int(rv)
        except (TypeError, ValueError):
            return
        with self.rv_cond:
            if rv > self.rv:
                self.rv = rv
                self.rv_cond.notify_all()

    def wait_rv(self, rv, timeout):
        """Waits until the cache reflects the API at least as of version
        rv (bookmarks move it on when nothing changes); False on timeout."""
        deadline = time.monotonic() + timeout
        with self.rv_cond:
            while self.rv < int(rv):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.rv_cond.wait(left)
        return True

    def start(self):
        self.thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopping.set()
        conn = self.conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.thread is not None:
            self.thread.join(5)

    # ---- cache

    def get(self, ns, name):
        with self.lock:
            return self.items.get((ns or "", name))

    def list(self, ns=None, pred=None):
        with self.lock:
            objs = list(self.items.values())
        return [o for o in objs
                if (ns is None or (o.get("metadata") or {}).get("namespace", "") == ns) and (pred is None or pred(o))]

    def observe(self, obj):
        """Our own write's result: newer than what the watch has shown."""
        if not isinstance(obj, dict) or obj.get("kind") == "Status":
            return
        k = key_of(obj)
        with self.lock:
            cur = self.items.get(k)
            if cur is None or rv_of(obj) >= rv_of(cur):
                self.items[k] = obj

    def forget(self, obj):
        """Our own delete removed obj for good."""
        k = key_of(obj)
        with self.lock:
            cur = self.items.pop(k, None)
            uid = (obj.get("metadata") or {}).get("uid") or ((cur or {}).get("metadata") or {}).get("uid")
            if uid:
                self.gone[k] = uid

    def _apply(self, etype, obj):
        k = key_of(obj)
        uid = (obj.get("metadata") or {}).get("uid")
        with self.lock:
            old = self.items.get(k)
            if etype == "DELETED":
                self.items.pop(k, None)
                if self.gone.get(k) == uid:
                    del self.gone[k]
            else:
                if self.gone.get(k) == uid:
                    return  # an event older than our own delete
                if old is not None and (old.get("metadata") or {}).get("uid") == uid and rv_of(old) > rv_of(obj):
                    return  # older than our own write
                self.items[k] = obj
        for h in self.handlers:
            try:
                h(etype, obj, old)
            except Exception as e:  # a handler bug must not stop the informer
                self.log(f"informer {self.name}: handler error: {type(e).__name__}: {e}")
                import traceback
                traceback.print_exc(file=sys.stderr)

    # ---- list and watch

    def _url(self, extra):
        q = "&".join(x for x in (self.query, extra) if x)
        return f"{self.path}?{q}" if q else self.path

    def _relist(self):
        code, lst = self.client.request("GET", self._url(""))
        if code != 200:
            raise KubeError(code, lst, f"list {self.path}")
        fresh = {}
        for o in lst.get("items") or []:
            o.setdefault("apiVersion", lst.get("apiVersion", "").replace("List", ""))
            fresh[key_of(o)] = o
        with self.lock:
            old_items = dict(self.items)
            self.gone.clear()
        for k, o in old_items.items():
            if k not in fresh:
                self._apply("DELETED", o)
        for k, o in fresh.items():
            prev = old_items.get(k)
            if prev is None or rv_of(prev) != rv_of(o):
                self._apply("ADDED" if prev is None else "MODIFIED", o)
        self._seen(lst["metadata"]["resourceVersion"])
        return lst["metadata"]["resourceVersion"]

    def _watch(self, rv):
        """Streams events from rv; returns the last version seen, or None
        when the server says the version is gone (relist)."""
        conn = self.client.connect(timeout=self.watch_timeout_s + 30)
        self.conn = conn
        try:
            url = self._url(f"watch=true&allowWatchBookmarks=true&resourceVersion={rv}"
                            f"&timeoutSeconds={self.watch_timeout_s}")
            conn.request("GET", url, headers=self.client.headers())
            resp = conn.getresponse()
            if resp.status == 410:
                resp.read()
                return None
            if resp.status != 200:
                body = resp.read()
                raise KubeError(resp.status, {"message": body[:300].decode(errors="replace")}, f"watch {self.path}")
            while not self.stopping.is_set():
                line = resp.readline()
                if not line:
                    return rv
                ev = json.loads(line)
                t, obj = ev.get("type"), ev.get("object") or {}
                if t == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise KubeError(obj.get("code", 500), obj, f"watch {self.path}")
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if t != "BOOKMARK":
                    self._apply(t, obj)
                if new_rv:
                    rv = new_rv
                    self._seen(new_rv)
            return rv
        finally:
            self.conn = None
            conn.close()

    def _run(self):
        rv = None
        backoff = 0.1
        streak = 0
        while not self.stopping.is_set():
            try:
                if rv is None:
                    rv = self._relist()
                    self.synced.set()
                rv = self._watch(rv)
                backoff = 0.1
                streak = 0
            except (OSError, http.client.HTTPException, KubeError, ValueError) as e:
                if self.stopping.is_set():
                    break
                self.failures += 1
                streak += 1
                if streak == 1:  # one line per outage, not one per retry
                    self.log(f"informer {self.name}: {type(e).__name__}: {e}; retrying with backoff")
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)


class WorkQueue:
    """Keys to process, each at most once in the queue; add_after() for
    retries and timers. get() blocks; None once shut down."""

    def __init__(self):
        self.cond = threading.Condition()
        self.ready = []
        self.queued = set()
        self.timers = []
        self.seq = 0
        self.closed = False

    def add(self, key):
        with self.cond:
            if key not in self.queued:
                self.queued.add(key)
                self.ready.append(key)
                self.cond.notify()

    def add_after(self, key, delay):
        if delay <= 0:
            return self.add(key)
        with self.cond:
            self.seq += 1
            heapq.heappush(self.timers, (time.monotonic() + delay, self.seq, key))
            self.cond.notify()

    def get(self):
        with self.cond:
            while not self.closed:
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    _, _, key = heapq.heappop(self.timers)
                    if key not in self.queued:
                        self.queued.add(key)
                        self.ready.append(key)
                if self.ready:
                    key = self.ready.pop(0)
                    self.queued.discard(key)
                    return key
                wait = self.timers[0][0] - now if self.timers else None
                self.cond.wait(wait)
            return None

    def shutdown(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()
