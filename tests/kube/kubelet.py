"""A kubelet stand-in for the Kubernetes API test server: it runs the pods
bound to its node as real processes, each pod in its own network
namespace with its own IP on a Linux bridge, each container in its own
mount and UTS namespace with the pod's volumes bind-mounted, as the user
its securityContext names, with exactly the command, args and environment
Kubernetes would give it. No images: commands come from the host (a bin
directory mounted at /usr/local/bin, the host's /usr and /etc as the
image). See docs/kube-test-server.md, "The kubelet stand-in", and
tests/kube/cluster.py, which starts it with the API server and the
controllers (tests/kube/kube_controllers.py).

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and ip, nsenter, unshare."""

import base64
import http.client
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from kube_client import Informer, KubeError, resource_path  # noqa: E402

LAUNCHER = os.path.join(HERE, "container_launch.py")
NAME_RX = re.compile(r"^lpk([0-9a-f]+)x(\d+)")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# the capabilities containerd gives a root container
DEFAULT_CAPS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
                "SETPCAP": 8, "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27,
                "AUDIT_WRITE": 29, "SETFCAP": 31}
CAP_NUMBERS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
               "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
               "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
               "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
               "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
               "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
               "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
               "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40}
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class StandInError(Exception):
    """The stand-in cannot run here (privileges, tools) or was misused."""


def now_iso():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(cmd, what, check=True, input=None):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, input=input)
    except FileNotFoundError:
        raise StandInError(f"{what}: '{cmd[0]}' is not installed")
    if check and p.returncode != 0:
        raise StandInError(f"{what}: `{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()}")
    return p


def require_privileges():
    """Raises StandInError saying what is missing to create network and
    mount namespaces."""
    missing = [t for t in ("ip", "nsenter", "unshare") if shutil.which(t) is None]
    if missing:
        raise StandInError(f"the kubelet stand-in needs {', '.join(missing)} (iproute2, util-linux)")
    if os.geteuid() != 0:
        raise StandInError("the kubelet stand-in needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN): it creates a "
                           "bridge, veth pairs, network namespaces and mount namespaces; run the test as root")


# ---------------------------------------------------------------- quantities and expansion

_SUFFIX = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50, "Ei": 2 ** 60,
           "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(q):
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3", 4) as a float."""
    if isinstance(q, (int, float)) and not isinstance(q, bool):
        return float(q)
    m = re.match(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$", str(q).strip())
    if not m:
        raise ValueError(f"invalid quantity {q!r}")
    return float(m.group(1) + (m.group(2) or "")) * _SUFFIX[m.group(3) or ""]


def expand(text, lookup):
    """Kubernetes' $(VAR) expansion: $(NAME) becomes lookup(NAME) when
    known (else stays as written), $$ is one $, anything else is kept."""
    out = []
    i, checkpoint, n = 0, 0, len(text)
    while i < n:
        if text[i] == "$" and i + 1 < n:
            out.append(text[checkpoint:i])
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                adv = 1
            elif nxt == "(":
                close = text.find(")", i + 2)
                if close < 0:
                    out.append("$(")
                    adv = 1
                else:
                    name = text[i + 2:close]
                    val = lookup(name)
                    out.append(val if val is not None else f"$({name})")
                    adv = close - i
            else:
                out.append("$" + nxt)
                adv = 1
            i += adv
            checkpoint = i + 1
        i += 1
    out.append(text[checkpoint:])
    return "".join(out)


class ConfigError(Exception):
    """A container cannot be created from its spec as things are now
    (CreateContainerConfigError / CreateContainerError)."""

    def __init__(self, message, reason="CreateContainerConfigError"):
        super().__init__(message)
        self.reason = reason


class VolumeError(Exception):
    """A volume cannot be set up yet (the pod stays ContainerCreating)."""


# ---------------------------------------------------------------- network

class PodNet:
    def __init__(self, netns, ip, slot, veth):
        self.netns = netns
        self.ip = ip
        self.slot = slot
        self.veth = veth


def _netns_pids(ns):
    p = _run(["ip", "netns", "pids", ns], "listing the processes of a netns", check=False)
    return [int(x) for x in p.stdout.split() if x.isdigit()]


def _kill_netns(ns):
    for _ in range(50):
        pids = _netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def _pid_alive(pid):
    """True for a running process (a zombie is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


_ACTIVE = set()  # prefixes of this process's live networks
_COUNTER = itertools.count()


def cleanup_stale(log=lambda m: None):
    """Removes the network namespaces, links and state directories a
    crashed earlier run (a process that no longer exists) left behind."""
    stale = set()
    p = _run(["ip", "netns", "list"], "listing network namespaces", check=False)
    namespaces = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    p = _run(["ip", "-o", "link", "show"], "listing links", check=False)
    links = [line.split(":")[1].strip().split("@")[0] for line in p.stdout.splitlines() if ":" in line]

    def dead(name):
        m = NAME_RX.match(name)
        if not m:
            return False
        prefix = f"lpk{m.group(1)}x{m.group(2)}"
        pid = int(m.group(1), 16)
        if pid == os.getpid():
            return prefix not in _ACTIVE
        return not _pid_alive(pid)

    for ns in namespaces:
        if dead(ns):
            _kill_netns(ns)
            _run(["ip", "netns", "del", ns], "removing a stale netns", check=False)
            stale.add(ns)
    for link in links:
        if dead(link):
            _run(["ip", "link", "del", link], "removing a stale link", check=False)
            stale.add(link)
    tmp = os.environ.get("TMPDIR") or "/tmp"
    try:
        for d in os.listdir(tmp):
            m = re.match(r"^lpk-([0-9a-f]+)x(\d+)-", d)
            if m and dead(f"lpk{m.group(1)}x{m.group(2)}"):
                shutil.rmtree(os.path.join(tmp, d), ignore_errors=True)
                stale.add(d)
    except OSError:
        pass
    if stale:
        log(f"removed what a crashed earlier run left: {', '.join(sorted(stale))}")


class Network:
    """The node's pod network: a bridge (the host is .1 of a /24 picked
    from 10.200.0.0/13 by the process id, skipping subnets in use) and, per
    pod, a network namespace with a veth pair whose peer is the pod's eth0
    (.2 to .254, default route via .1, lo up)."""

    def __init__(self, log=lambda m: None):
        n = next(_COUNTER)
        self.prefix = f"lpk{os.getpid():x}x{n}"
        if len(self.prefix) + 3 > 15:
            raise StandInError(f"too many clusters in one process for interface names ({self.prefix})")
        self.bridge = self.prefix
        _ACTIVE.add(self.prefix)
        self.log = log
        self.lock = threading.Lock()
        self.slots = {}
        self.last_slot = 1
        self.subnet = None
        self.gateway = None
        self.up_done = False

    def _used_subnets(self):
        used = []
        for cmd in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
            out = _run(cmd, "reading the host's addresses", check=False).stdout
            for m in re.finditer(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out):
                try:
                    used.append(ipaddress.ip_network(m.group(1), strict=False))
                except ValueError:
                    pass
        return [u for u in used if u.prefixlen > 0]

    def up(self):
        require_privileges()
        cleanup_stale(self.log)
        used = self._used_subnets()
        start = os.getpid() % (8 * 256)
        for i in range(8 * 256):
            idx = (start + i) % (8 * 256)
            net = ipaddress.ip_network(f"10.{200 + idx // 256}.{idx % 256}.0/24")
            if not any(net.overlaps(u) for u in used):
                self.subnet = net
                break
        if self.subnet is None:
            raise StandInError("no free /24 in 10.200.0.0/13 for the pod network")
        self.gateway = str(self.subnet.network_address + 1)
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"], "creating the pod bridge")
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge], "addressing the pod bridge")
            _run(["ip", "link", "set", self.bridge, "up"], "bringing the pod bridge up")
        except StandInError:
            self.down()
            raise
        self.up_done = True
        return self

    def add_pod(self):
        """A new pod sandbox. Addresses are handed out round-robin (an
        address comes back only after the others), and a pod's eth0 MAC
        follows from its address, so that neighbour entries others hold for
        a reused address stay right."""
        with self.lock:
            order = [2 + (self.last_slot - 2 + i) % 253 for i in range(1, 254)]
            slot = next((s for s in order if s not in self.slots), None)
            if slot is None:
                raise StandInError("the pod network is full (253 pods)")
            self.slots[slot] = None
            self.last_slot = slot
        ns, veth = f"{self.prefix}-{slot}", f"{self.prefix}v{slot:02x}"
        addr = self.subnet.network_address + slot
        ip = str(addr)
        mac = "02:4c:" + ":".join(f"{b:02x}" for b in addr.packed)
        pn = PodNet(ns, ip, slot, veth)
        try:
            _run(["ip", "netns", "add", ns], "creating a pod network namespace")
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac, "netns", ns],
                 "creating a veth pair")
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"], "attaching a veth to the bridge")
            _run(["ip", "neigh", "flush", "to", ip, "dev", self.bridge], "flushing a stale neighbour entry",
                 check=False)
            _run(["ip", "-n", ns, "-batch", "-"], "configuring the pod's interfaces",
                 input=f"link set lo up\naddr add {ip}/24 dev eth0\nlink set eth0 up\n"
                       f"route add default via {self.gateway}\n")
        except StandInError:
            self.remove_pod(pn)
            raise
        with self.lock:
            self.slots[slot] = pn
        return pn

    def remove_pod(self, pn):
        _kill_netns(pn.netns)
        _run(["ip", "netns", "del", pn.netns], "removing a pod netns", check=False)
        _run(["ip", "link", "del", pn.veth], "removing a veth", check=False)
        with self.lock:
            self.slots.pop(pn.slot, None)

    def down(self):
        with self.lock:
            pods = [p for p in self.slots.values() if p is not None]
        for pn in pods:
            self.remove_pod(pn)
        if self.subnet is not None:
            _run(["ip", "link", "del", self.bridge], "removing the pod bridge", check=False)
        _ACTIVE.discard(self.prefix)


# ---------------------------------------------------------------- volume files

def write_atomic_dir(target, files, gid=None):
    """Writes files ({relative path: (bytes, mode)}) into target the way
    kubelet's atomic writer does: a timestamped directory, a ..data link
    to it and, for each top-level name, a link through ..data; an update
    swaps ..data in one rename. Returns True when something changed."""
    os.makedirs(target, exist_ok=True)
    data_link = os.path.join(target, "..data")
    if os.path.islink(data_link):
        cur = os.path.join(target, os.readlink(data_link))
        same = True
        for rel, (content, mode) in files.items():
            p = os.path.join(cur, rel)
            if gid is not None:
                mode |= 0o440
            try:
                with open(p, "rb") as f:
                    if f.read() != content or (os.stat(p).st_mode & 0o7777) != mode:
                        same = False
                        break
            except OSError:
                same = False
                break
        if same:
            existing = set()
            for dp, _, fn in os.walk(cur):
                existing |= {os.path.relpath(os.path.join(dp, x), cur) for x in fn}
            if existing == set(files):
                return False
    stamp = datetime.now(timezone.utc).strftime("..%Y_%m_%d_%H_%M_%S.") + secrets.token_hex(5)
    new = os.path.join(target, stamp)
    os.makedirs(new, mode=0o755)
    for rel, (content, mode) in files.items():
        p = os.path.join(new, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(content)
        if gid is not None:
            os.chown(p, -1, gid)
            mode |= 0o440  # kubelet's volume ownership rule for fsGroup on a read-only volume
        os.chmod(p, mode)
    if gid is not None:
        os.chown(new, -1, gid)
    tmp_link = os.path.join(target, "..data_tmp")
    if os.path.lexists(tmp_link):
        os.unlink(tmp_link)
    os.symlink(stamp, tmp_link)
    old = os.readlink(data_link) if os.path.islink(data_link) else None
    os.rename(tmp_link, data_link)
    tops = {rel.split("/")[0] for rel in files}
    for name in os.listdir(target):
        if name.startswith(".."):
            continue
        if name not in tops:
            os.unlink(os.path.join(target, name))
    for top in tops:
        link = os.path.join(target, top)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..data", top), link)
    if old:
        shutil.rmtree(os.path.join(target, old), ignore_errors=True)
    return True


def _key_files(data, items, default_mode, what, optional):
    """{path: (bytes, mode)} of a secret / configMap volume (or projection)."""
    out = {}
    if items:
        for it in items:
            k = it.get("key")
            if k not in data:
                if optional:
                    continue
                raise VolumeError(f"configmap/secret {what}: couldn't find key {k}")
            out[_rel_path(it.get("path") or k)] = (data[k], it.get("mode", default_mode))
    else:
        for k, v in data.items():
            out[_rel_path(k)] = (v, default_mode)
    return out


def _rel_path(p):
    """A volume item's path: relative, no '..' (the API server would
    refuse anything else)."""
    if not isinstance(p, str) or not p or p.startswith("/") or ".." in p.split("/") or p.startswith(".."):
        raise VolumeError(f"invalid volume item path {p!r}: must be relative and may not contain '..'")
    return p


# ---------------------------------------------------------------- containers

class Probe:
    def __init__(self, spec, scale, start):
        self.spec = spec
        self.scale = scale
        self.period = max(0.05, float(spec.get("periodSeconds", 10)) * scale)
        self.next_at = start + float(spec.get("initialDelaySeconds", 0)) * scale
        self.successes = 0
        self.failures = 0
        self.success_threshold = int(spec.get("successThreshold", 1))
        self.failure_threshold = int(spec.get("failureThreshold", 3))
        self.timeout = float(spec.get("timeoutSeconds", 1))
        self.last_message = ""


class Container:
    """What the stand-in knows about one container of a pod."""

    def __init__(self, spec, kind):
        self.spec = spec
        self.name = spec["name"]
        self.kind = kind  # "init", "sidecar" (init with restartPolicy Always) or "app"
        self.proc = None
        self.pid = None
        self.restart_count = 0
        self.runs = 0
        self.state = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state = {}
        self.ready = False
        self.started = False
        self.done = False  # an init container that succeeded, or an app container that will not run again
        self.sidecar_up = False  # a sidecar that started (init may go on)
        self.backoff_until = 0.0
        self.probes = {}
        self.exit_code = None
        self.started_mono = 0.0
        self.container_id = ""
        self.env = None
        self.argv = None
        self.log_path = None
        self.term_log = None
        self.kill_reason = None

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def status(self, image_fallback=""):
        st = {"name": self.name, "image": self.spec.get("image") or image_fallback,
              "imageID": "", "ready": self.ready, "restartCount": self.restart_count,
              "started": self.started if self.running() else False, "state": self.state,
              "lastState": self.last_state}
        if self.container_id:
            st["containerID"] = self.container_id
        return st


def _log(msg):
    print(f"kubelet-standin: {msg}", file=sys.stderr, flush=True)


class PodWorker:
    """One pod on the node: a thread that sets the pod up, runs its
    containers, probes them, writes its status and tears it down."""

    def __init__(self, kubelet, pod):
        self.k = kubelet
        self.pod = pod
        m = pod["metadata"]
        self.ns, self.name, self.uid = m["namespace"], m["name"], m["uid"]
        self.dir = os.path.join(kubelet.state_dir, "pods", f"{self.ns}_{self.name}_{self.uid[:8]}")
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        self.wake = threading.Event()
        self.lock = threading.Lock()
        self.deleted = False
        self.finished = threading.Event()
        self.net = None
        self.volumes = None  # name -> (host path, read-only)
        self.volume_specs = {}
        self.sa_token = None
        spec = pod.get("spec") or {}
        self.init = [Container(c, "sidecar" if c.get("restartPolicy") == "Always" else "init")
                     for c in spec.get("initContainers") or []]
        self.apps = [Container(c, "app") for c in spec.get("containers") or []]
        self.phase = "Pending"
        self.pod_reason = None
        self.pod_message = None
        self.start_time = None
        self.last_status = None
        self.events_sent = set()
        self.pending_message = None
        self.deps_changed = False
        self.status_retry = False
        self.last_ip = None
        self.initialized = not self.init
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.ns}-{self.name}", daemon=True)

    # ---- outside API

    def update(self, pod):
        with self.lock:
            self.pod = pod
        self.wake.set()

    def gone(self):
        self.deleted = True
        self.wake.set()

    def containers(self):
        return self.init + self.apps

    def find(self, name):
        for c in self.containers():
            if c.name == name:
                return c
        return None

    # ---- helpers

    def _spec(self):
        with self.lock:
            return self.pod.get("spec") or {}

    def _event(self, etype, reason, message, container=None, once=True):
        key = (reason, message, container)
        if once and key in self.events_sent:
            return
        self.events_sent.add(key)
        self.k.event(self.pod, etype, reason, message, container)

    def _scale(self):
        return self.k.probe_period_scale

    # ---- the loop

    def _run(self):
        try:
            self._main()
        except Exception as e:  # a bug in the stand-in: say so everywhere a test looks
            _log(f"pod {self.ns}/{self.name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            self._event("Warning", "KubeletStandInError", f"{type(e).__name__}: {e}")
            self._terminate(0, delete_object=False)
        finally:
            self.finished.set()

    def _wait(self, seconds):
        if seconds is None or seconds > 0:
            self.wake.wait(seconds)
        self.wake.clear()

    def _main(self):
        while True:
            with self.lock:
                pod = self.pod
            if self.deleted or self.k.stopping:
                self._terminate(0 if self.deleted else self.k.stop_grace_s, delete_object=False)
                return
            if pod["metadata"].get("deletionTimestamp"):
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                grace = int(grace if grace is not None else self._spec().get("terminationGracePeriodSeconds", 30))
                self._terminate(grace, delete_object=True)
                return
            if self.phase in ("Succeeded", "Failed"):
                self._wait(None)
                continue
            if self.start_time is None:
                self.start_time = now_iso()
            if self.volumes is None:
                if not self._prepare():
                    self._sync_status()
                    self._wait(2.0)
                    continue
            elif self.deps_changed:
                self.deps_changed = False
                self._refresh_volumes()
            if self.net is None:
                if self._spec().get("hostNetwork"):
                    self.net = PodNet(None, self.k.network.gateway, None, None)  # the node's own namespace
                else:
                    try:
                        self.net = self.k.network.add_pod()
                    except StandInError as e:
                        self._event("Warning", "FailedCreatePodSandBox", str(e))
                        self._wait(2.0)
                        continue
                self._write_hosts()
            now = time.monotonic()
            if not self.initialized:
                self._step_init(now)
            if self.initialized:
                self._step_containers(now)
            self._sync_status()
            self._wait(self._next_wakeup())

    def _next_wakeup(self):
        now = time.monotonic()
        t = None
        for c in self.containers():
            cands = [now + 1.0] if self.status_retry else []
            if c.running():
                cands += [p.next_at for p in c.probes.values() if p is not None]
            elif c.backoff_until > now:
                cands.append(c.backoff_until)
            elif not c.done and c.proc is None and c.state.get("waiting"):
                cands.append(now + 1.0)
            for x in cands:
                t = x if t is None else min(t, x)
        return None if t is None else max(0.0, t - now)

    # ---- volumes

    def _prepare(self):
        """Resolves every volume to a host path; False (with the reason in
        the pod's status and an Event) when one cannot be set up yet."""
        spec = self._spec()
        self.k.catch_up(self.pod)
        try:
            self._check_service_account(spec)
            vols = {}
            for v in spec.get("volumes") or []:
                vols[v["name"]] = self._volume(v, spec)
            if self._automount(spec):
                vols["\0sa"] = self._sa_volume(spec)
            self.volumes = vols
            self.pending_message = None
            return True
        except VolumeError as e:
            self.pending_message = str(e)
            self._event("Warning", "FailedMount", str(e))
            return False

    def _check_service_account(self, spec):
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        if self.k.informers["serviceaccounts"].get(self.ns, sa) is None:
            raise VolumeError(f"serviceaccount \"{sa}\" not found (the pod's service account must exist)")

    def _automount(self, spec):
        if spec.get("automountServiceAccountToken") is not None:
            return bool(spec["automountServiceAccountToken"])
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        sao = self.k.informers["serviceaccounts"].get(self.ns, sa) or {}
        if sao.get("automountServiceAccountToken") is not None:
            return bool(sao["automountServiceAccountToken"])
        return True

    def _fs_group(self):
        return (self._spec().get("securityContext") or {}).get("fsGroup")

    def _vol_dir(self, name):
        return os.path.join(self.dir, "volumes", name)

    def _volume(self, v, spec):
        name = v.get("name", "")
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name):
            raise VolumeError(f"invalid volume name {name!r}")
        self.volume_specs[name] = v
        d = self._vol_dir(name)
        gid = self._fs_group()
        if "emptyDir" in v:
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o777)
            if gid is not None:
                os.chown(d, -1, gid)
                os.chmod(d, 0o2777)
            return (d, False)
        if "hostPath" in v:
            hp = v["hostPath"]
            path = hp.get("path", "")
            host = self.k.host_paths.get(path, path)
            typ = hp.get("type") or ""
            if typ == "DirectoryOrCreate" and not os.path.exists(host):
                os.makedirs(host, mode=0o755)
            elif typ == "FileOrCreate" and not os.path.exists(host):
                os.makedirs(os.path.dirname(host), exist_ok=True)
                open(host, "a").close()
            if typ in ("Directory", "DirectoryOrCreate") and not os.path.isdir(host):
                raise VolumeError(f"MountVolume.SetUp failed for volume \"{name}\" : hostPath type check failed: "
                                  f"{path} is not a directory")
            if typ in ("File", "FileOrCreate") and not os.path.isfile(host):
                raise VolumeError(f"MountVolume.SetUp failed for volume \"{name}\" : hostPath type check failed: "
                                  f"{path} is not a file")
            if not os.path.exists(host):
                if typ == "":
                    os.makedirs(host, mode=0o755)  # kubelet creates a missing hostPath directory
                else:
                    raise VolumeError(f"MountVolume.SetUp failed for volume \"{name}\" : hostPath {path} "
                                      "does not exist")
            return (host, False)
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"].get("claimName", "")
            pvc = self.k.informers["persistentvolumeclaims"].get(self.ns, claim)
            if pvc is None:
                raise VolumeError(f"persistentvolumeclaim \"{claim}\" not found")
            if (pvc.get("status") or {}).get("phase") != "Bound":
                raise VolumeError(f"persistentvolumeclaim \"{claim}\" is not bound")
            return (self.k.pvc_dir(pvc), bool(v["persistentVolumeClaim"].get("readOnly")))
        if "secret" in v or "configMap" in v:
            files = self._source_files(v)
            write_atomic_dir(d, files, gid)
            return (d, True)
        if "projected" in v or "downwardAPI" in v:
            files = self._source_files(v)
            write_atomic_dir(d, files, gid)
            return (d, True)
        kind = next((k for k in v if k != "name"), "?")
        raise VolumeError(f"volume \"{name}\": volumes of type {kind} are not supported by the kubelet stand-in "
                          "(emptyDir, hostPath, persistentVolumeClaim, secret, configMap, projected and "
                          "downwardAPI are)")

    def _secret_data(self, name, optional, what):
        s = self.k.informers["secrets"].get(self.ns, name)
        if s is None:
            if optional:
                return None
            raise VolumeError(f"MountVolume.SetUp failed for volume \"{what}\" : secret \"{name}\" not found")
        return {k: base64.b64decode(x) for k, x in (s.get("data") or {}).items()}

    def _cm_data(self, name, optional, what):
        cm = self.k.informers["configmaps"].get(self.ns, name)
        if cm is None:
            if optional:
                return None
            raise VolumeError(f"MountVolume.SetUp failed for volume \"{what}\" : configmap \"{name}\" not found")
        out = {k: str(x).encode() for k, x in (cm.get("data") or {}).items()}
        out.update({k: base64.b64decode(x) for k, x in (cm.get("binaryData") or {}).items()})
        return out

    def _source_files(self, v):
        name = v["name"]
        if "secret" in v:
            s = v["secret"]
            data = self._secret_data(s.get("secretName", ""), s.get("optional"), name)
            return _key_files(data or {}, s.get("items"), s.get("defaultMode", 0o644), s.get("secretName"),
                              s.get("optional"))
        if "configMap" in v:
            s = v["configMap"]
            data = self._cm_data(s.get("name", ""), s.get("optional"), name)
            return _key_files(data or {}, s.get("items"), s.get("defaultMode", 0o644), s.get("name"),
                              s.get("optional"))
        if "downwardAPI" in v:
            s = v["downwardAPI"]
            return self._downward_files(s.get("items") or [], s.get("defaultMode", 0o644))
        p = v["projected"]
        mode = p.get("defaultMode", 0o644)
        out = {}
        for src in p.get("sources") or []:
            if "secret" in src:
                s = src["secret"]
                data = self._secret_data(s.get("name", ""), s.get("optional"), name)
                out.update(_key_files(data or {}, s.get("items"), mode, s.get("name"), s.get("optional")))
            elif "configMap" in src:
                s = src["configMap"]
                data = self._cm_data(s.get("name", ""), s.get("optional"), name)
                out.update(_key_files(data or {}, s.get("items"), mode, s.get("name"), s.get("optional")))
            elif "downwardAPI" in src:
                out.update(self._downward_files(src["downwardAPI"].get("items") or [], mode))
            elif "serviceAccountToken" in src:
                out[_rel_path(src["serviceAccountToken"].get("path", "token"))] = (self._token().encode(), mode)
            else:
                raise VolumeError(f"volume \"{name}\": projected source {list(src)} is not supported")
        return out

    def _downward_files(self, items, mode):
        out = {}
        for it in items:
            try:
                if "fieldRef" in it:
                    val = self._field_ref(it["fieldRef"].get("fieldPath", ""), volume=True)
                else:
                    val = self._resource_ref(it["resourceFieldRef"], None)
            except ConfigError as e:
                raise VolumeError(str(e))
            out[_rel_path(it.get("path"))] = (val.encode(), it.get("mode", mode))
        return out

    def _token(self):
        if self.sa_token is None:
            spec = self._spec()
            sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
            self.sa_token = "lpk-sa-" + secrets.token_urlsafe(32)
            self.k.register_token(self.sa_token, f"system:serviceaccount:{self.ns}:{sa}")
        return self.sa_token

    def _sa_volume(self, spec):
        d = self._vol_dir("kube-api-access")
        files = {"token": (self._token().encode(), 0o644), "ca.crt": (self.k.ca_pem, 0o644),
                 "namespace": (self.ns.encode(), 0o644)}
        write_atomic_dir(d, files, self._fs_group())
        return (d, True)

    def _refresh_volumes(self):
        """secret, configMap, projected and downwardAPI volumes follow their
        sources (as kubelet's periodic sync does); subPath mounts do not."""
        for name, v in self.volume_specs.items():
            if any(k in v for k in ("secret", "configMap", "projected", "downwardAPI")):
                try:
                    write_atomic_dir(self._vol_dir(name), self._source_files(v), self._fs_group())
                except VolumeError as e:
                    self._event("Warning", "FailedMount", str(e))

    def _hostname(self):
        spec = self._spec()
        if spec.get("hostNetwork"):
            return self.k.node_name
        return spec.get("hostname") or self.name

    def _write_hosts(self):
        p = os.path.join(self.dir, "etc-hosts")
        with open(p, "w") as f:
            f.write("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
                    f"ip6-loopback\n{self.net.ip}\t{self._hostname()}\n")
        os.chmod(p, 0o644)

    # ---- environment

    def _field_ref(self, path, volume=False):
        with self.lock:
            pod = self.pod
        m = pod["metadata"]
        spec = pod.get("spec") or {}
        simple = {"metadata.name": m.get("name", ""), "metadata.namespace": m.get("namespace", ""),
                  "metadata.uid": m.get("uid", ""), "spec.nodeName": spec.get("nodeName", ""),
                  "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                  "status.hostIP": self.k.network.gateway, "status.hostIPs": self.k.network.gateway,
                  "status.podIP": self.net.ip if self.net else "", "status.podIPs": self.net.ip if self.net else ""}
        if path in simple:
            return simple[path]
        mm = re.match(r"^metadata\.(labels|annotations)\['([^']*)'\]$", path)
        if mm:
            return (m.get(mm.group(1)) or {}).get(mm.group(2), "")
        if volume and path in ("metadata.labels", "metadata.annotations"):
            d = m.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")

    def _resource_ref(self, ref, container_spec):
        cname = ref.get("containerName")
        cs = container_spec
        if cname:
            cs = next((c.spec for c in self.containers() if c.name == cname), None)
            if cs is None:
                raise ConfigError(f"resourceFieldRef: no container {cname!r}")
        res = ref.get("resource", "")
        kind, _, what = res.partition(".")
        val = ((cs or {}).get("resources") or {}).get(kind, {}).get(what)
        if val is None and kind == "requests":
            val = ((cs or {}).get("resources") or {}).get("limits", {}).get(what)
            if val is None and what == "cpu":
                return "0"
            if val is None and what == "memory":
                return "0"
        if val is None:
            val = self.k.node_capacity.get(what)
            if val is None:
                raise ConfigError(f"unsupported resourceFieldRef resource {res!r}")
        div = parse_quantity(ref.get("divisor", "1") or "1")
        if div <= 0:
            raise ConfigError(f"invalid resourceFieldRef divisor {ref.get('divisor')!r}")
        return str(int(math.ceil(parse_quantity(val) / div - 1e-9)))

    def _service_env(self, spec):
        """KUBERNETES_* (the API server as the pods reach it) and, with
        enableServiceLinks, the Docker-link variables of the namespace's
        Services, as kubelet adds them."""
        env = {}
        if spec.get("enableServiceLinks", True):
            for svc in sorted(self.k.informers["services"].list(self.ns), key=lambda s: s["metadata"]["name"]):
                sspec = svc.get("spec") or {}
                ip = sspec.get("clusterIP")
                if not ip or ip == "None" or not sspec.get("ports"):
                    continue
                env.update(_link_env(svc["metadata"]["name"], ip, sspec["ports"]))
        host, port = self.k.network.gateway, self.k.api_port
        env.update(_link_env("kubernetes", host, [{"name": "https", "port": port, "protocol": "TCP"}]))
        return env

    def _env(self, c):
        """The container's environment: the image's, HOSTNAME, then what
        Kubernetes computes (envFrom, env with $(VAR) expansion, service
        variables)."""
        spec = self._spec()
        svc_env = self._service_env(spec)
        tmp = {}
        for ef in c.spec.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            if "configMapRef" in ef:
                ref = ef["configMapRef"]
                cm = self.k.informers["configmaps"].get(self.ns, ref.get("name", ""))
                if cm is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"configmap \"{ref.get('name')}\" not found")
                data = dict(cm.get("data") or {})
            elif "secretRef" in ef:
                ref = ef["secretRef"]
                s = self.k.informers["secrets"].get(self.ns, ref.get("name", ""))
                if s is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"secret \"{ref.get('name')}\" not found")
                data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (s.get("data") or {}).items()}
            else:
                continue
            for k, v in data.items():
                if ENV_NAME.match(prefix + k):
                    tmp[prefix + k] = v
                else:
                    self._event("Warning", "InvalidEnvironmentVariableNames",
                                f"Keys [{k}] from the EnvFrom are not valid environment variable names, skipped",
                                c.name)

        def lookup(name):
            if name in tmp:
                return tmp[name]
            return svc_env.get(name)

        for e in c.spec.get("env") or []:
            name = e.get("name", "")
            if "valueFrom" not in e or e.get("value"):
                tmp[name] = expand(e.get("value", "") or "", lookup)
                continue
            vf = e["valueFrom"] or {}
            if "secretKeyRef" in vf:
                ref = vf["secretKeyRef"]
                s = self.k.informers["secrets"].get(self.ns, ref.get("name", ""))
                if s is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"secret \"{ref.get('name')}\" not found")
                data = s.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"couldn't find key {ref.get('key')} in Secret {self.ns}/{ref.get('name')}")
                tmp[name] = base64.b64decode(data[ref["key"]]).decode(errors="replace")
            elif "configMapKeyRef" in vf:
                ref = vf["configMapKeyRef"]
                cm = self.k.informers["configmaps"].get(self.ns, ref.get("name", ""))
                if cm is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"configmap \"{ref.get('name')}\" not found")
                data = cm.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"couldn't find key {ref.get('key')} in ConfigMap {self.ns}/{ref.get('name')}")
                tmp[name] = data[ref["key"]]
            elif "fieldRef" in vf:
                tmp[name] = self._field_ref(vf["fieldRef"].get("fieldPath", ""))
            elif "resourceFieldRef" in vf:
                tmp[name] = self._resource_ref(vf["resourceFieldRef"], c.spec)
            else:
                raise ConfigError(f"env {name}: unsupported valueFrom {list(vf)}")
        env = dict(self.k.image_env)
        env["HOSTNAME"] = self._hostname()
        env.update(tmp)
        for k, v in svc_env.items():
            if k not in tmp:
                env[k] = v
        return env

    # ---- starting and stopping containers

    def _security(self, c):
        psc = self._spec().get("securityContext") or {}
        csc = c.spec.get("securityContext") or {}

        def pick(k):
            return csc[k] if csc.get(k) is not None else psc.get(k)

        uid, gid = pick("runAsUser"), pick("runAsGroup")
        if uid is None:
            uid = self.k.image_user
        if pick("runAsNonRoot") and not uid:
            if uid == 0:
                raise ConfigError("container's runAsUser breaks non-root policy (pod: "
                                  f"\"{self.name}_{self.ns}({self.uid})\", container: {c.name})")
            raise ConfigError("container has runAsNonRoot and image will run as root (pod: "
                              f"\"{self.name}_{self.ns}({self.uid})\", container: {c.name})")
        groups = list(psc.get("supplementalGroups") or [])
        if psc.get("fsGroup") is not None:
            groups.append(psc["fsGroup"])
        caps = None
        if not csc.get("privileged"):
            capspec = csc.get("capabilities") or {}
            keep = dict(DEFAULT_CAPS)
            drops = [str(x).upper().removeprefix("CAP_") for x in capspec.get("drop") or []]
            if "ALL" in drops:
                keep = {}
            for d in drops:
                keep.pop(d, None)
            for a in capspec.get("add") or []:
                a = str(a).upper().removeprefix("CAP_")
                if a == "ALL":
                    keep = dict(CAP_NUMBERS)
                elif a in CAP_NUMBERS:
                    keep[a] = CAP_NUMBERS[a]
            caps = sorted(keep.values())
        no_new_privs = csc.get("allowPrivilegeEscalation") is False
        ro = bool(csc.get("readOnlyRootFilesystem"))
        return uid, gid, groups, caps, no_new_privs, ro

    def _mounts(self, c, env):
        binds = [{"src": self.k.bin_dir, "dst": "/usr/local/bin", "ro": True},
                 {"src": os.path.join(self.dir, "etc-hosts"), "dst": "/etc/hosts", "ro": False}]
        seen = set()
        for vm in c.spec.get("volumeMounts") or []:
            vname = vm.get("name")
            if vname not in self.volumes:
                raise ConfigError(f"volumeMount {vname!r} names no volume of the pod", "CreateContainerError")
            host, vol_ro = self.volumes[vname]
            sub = vm.get("subPath") or ""
            if vm.get("subPathExpr"):
                sub = expand(vm["subPathExpr"], env.get)
            src = host
            if sub:
                if sub.startswith("/") or ".." in sub.split("/"):
                    raise ConfigError(f"subPath {sub!r} must be a relative path without '..'", "CreateContainerError")
                src = os.path.join(host, sub)
                real_root = os.path.realpath(host)
                if not os.path.lexists(src):
                    os.makedirs(src, exist_ok=True)
                    os.chmod(src, 0o777 if self.volume_specs.get(vname, {}).get("emptyDir") is not None else 0o755)
                if not (os.path.realpath(src) + "/").startswith(real_root + "/") and \
                        os.path.realpath(src) != real_root:
                    raise ConfigError(f"subPath {sub!r} of volume {vname} points outside the volume",
                                      "CreateContainerError")
                src = os.path.realpath(src)
            binds.append({"src": src, "dst": vm["mountPath"], "ro": bool(vm.get("readOnly")) or vol_ro})
            seen.add(os.path.normpath(vm["mountPath"]))
        if "\0sa" in self.volumes and SA_DIR not in seen:
            binds.append({"src": self.volumes["\0sa"][0], "dst": SA_DIR, "ro": True})
        tpath = c.spec.get("terminationMessagePath") or "/dev/termination-log"
        if os.path.normpath(tpath) not in seen:
            c.term_log = os.path.join(self.dir, f"termination-{c.name}")
            with open(c.term_log, "w"):
                pass
            os.chmod(c.term_log, 0o666)
            binds.append({"src": c.term_log, "dst": tpath, "ro": False})
        return binds

    def _argv(self, c, env):
        cmd = list(c.spec.get("command") or [])
        args = list(c.spec.get("args") or [])
        if not cmd:
            ep = self.k.entrypoint_for(c.spec.get("image", ""))
            if ep is None:
                raise ConfigError(f"container {c.name} has no command and the stand-in knows no entrypoint for "
                                  f"image {c.spec.get('image')!r} (give image_entrypoints)", "CreateContainerError")
            cmd = list(ep)
        out = [expand(x, env.get) for x in cmd + args]
        if not out:
            raise ConfigError(f"container {c.name}: nothing to run", "CreateContainerError")
        return out

    def _start(self, c, now):
        c.kill_reason = None
        self.k.catch_up(self.pod)
        try:
            env = self._env(c)
            argv = self._argv(c, env)
            uid, gid, groups, caps, nnp, ro = self._security(c)
            binds = self._mounts(c, env)
        except ConfigError as e:
            c.state = {"waiting": {"reason": e.reason, "message": str(e)}}
            self._event("Warning", "Failed", f"Error: {e}", c.name)
            c.backoff_until = now + 1.0
            return
        c.env, c.argv = env, argv
        run_dir = os.path.join(self.dir, "run", f"{c.name}-{c.runs}")
        root, scratch = os.path.join(run_dir, "root"), os.path.join(run_dir, "scratch")
        os.makedirs(root)
        os.makedirs(scratch)
        spec = {"root": root, "scratch": scratch, "image_dirs": self.k.image_dirs, "image_links": self.k.image_links,
                "empty_dirs": [["tmp", 0o1777], ["var/tmp", 0o1777], ["run", 0o755], ["home", 0o755],
                               ["root", 0o700]],
                "binds": binds, "readonly_root": ro, "hostname": self._hostname(), "uid": uid, "gid": gid,
                "groups": groups, "no_new_privs": nnp, "caps": caps, "cwd": c.spec.get("workingDir") or "/",
                "argv": argv, "env": list(env.items()), "path": env.get("PATH", DEFAULT_PATH),
                "parent_pid": os.getpid()}
        spec_path = os.path.join(run_dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        ldir = os.path.join(self.dir, "logs", c.name)
        os.makedirs(ldir, exist_ok=True)
        c.log_path = os.path.join(ldir, f"{c.restart_count}.log")
        r, w = os.pipe()
        started_at = now_iso()
        try:
            with open(c.log_path, "ab") as log:
                netns = ["nsenter", f"--net=/run/netns/{self.net.netns}", "--"] if self.net.netns else []
                c.proc = subprocess.Popen(
                    netns + ["unshare", "--mount", "--uts", "--propagation", "private", "--", sys.executable, "-I",
                             LAUNCHER, spec_path, str(w)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,),
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, start_new_session=True, cwd="/")
        finally:
            os.close(w)
        err = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            err += chunk
        os.close(r)
        c.runs += 1
        c.pid = c.proc.pid
        c.container_id = f"standin://{secrets.token_hex(16)}"
        c.started_mono = now
        proc = c.proc
        threading.Thread(target=self._reap, args=(proc,), daemon=True, name=f"reap-{c.name}").start()
        if err:
            proc.wait()
            msg = err.decode(errors="replace")
            c.proc = None
            self._finished(c, 128, "StartError", msg, started_at, now)
            self._event("Warning", "Failed", f"Error: {msg}", c.name, once=False)
            return
        c.state = {"running": {"startedAt": started_at}}
        c.started = False
        c.ready = False
        sp = c.spec
        c.probes = {}
        scale = self._scale()
        if c.kind != "init":
            if sp.get("startupProbe"):
                c.probes["startup"] = Probe(sp["startupProbe"], scale, now)
            else:
                c.started = True
            for kind in ("readiness", "liveness"):
                if sp.get(kind + "Probe"):
                    c.probes[kind] = Probe(sp[kind + "Probe"], scale, now)
            if "readiness" not in c.probes:
                c.ready = c.started
        self._event("Normal", "Started", f"Started container {c.name}", c.name, once=False)
        hook = ((sp.get("lifecycle") or {}).get("postStart"))
        if hook:
            ok, msg = self._handler(c, hook, 30.0)
            if not ok:
                self._event("Warning", "FailedPostStartHook", msg, c.name, once=False)
                c.kill_reason = "FailedPostStartHook"
                self._kill(c, self._grace(c))

    def _reap(self, proc):
        proc.wait()
        self.wake.set()

    def _grace(self, c, probe=None):
        if probe is not None and probe.spec.get("terminationGracePeriodSeconds") is not None:
            return int(probe.spec["terminationGracePeriodSeconds"])
        return int(self._spec().get("terminationGracePeriodSeconds", 30))

    def _kill(self, c, grace):
        """SIGTERM to the container's process group, SIGKILL after grace
        seconds; waits until it is gone."""
        proc = c.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=max(0.0, grace))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def _finished(self, c, code, reason, message, started_at, now):
        term = {"exitCode": code, "reason": reason, "startedAt": started_at, "finishedAt": now_iso(),
                "containerID": c.container_id}
        if message:
            term["message"] = message
        c.state = {"terminated": term}
        c.exit_code = code
        c.ready = False
        c.started = False
        c.probes = {}

    def _collect_exit(self, c, now):
        """The container's process ended: record it; True if it did."""
        if c.proc is None or c.proc.poll() is None:
            return False
        code = c.proc.returncode
        if code < 0:
            code = 128 - code  # killed by signal N: 128+N, as runtimes report
        started_at = (c.state.get("running") or {}).get("startedAt", "")
        reason = c.kill_reason or ("Completed" if code == 0 else "Error")
        msg = ""
        if c.term_log and os.path.exists(c.term_log):
            try:
                with open(c.term_log, errors="replace") as f:
                    msg = f.read(4096)
            except OSError:
                pass
        if not msg and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError" and code != 0:
            msg = _tail(c.log_path, 80, 2048)
        c.proc = None
        self._finished(c, code, reason, msg, started_at, now)
        return True

    def _restart_due(self, c, now):
        """After an exit: when the restart may happen (backoff grows with
        quick restarts: base, 2x base, ... up to the cap)."""
        base, cap = self.k.restart_backoff
        ran = now - c.started_mono
        if ran > 10 * cap:
            c.quick_fails = 0
        c.quick_fails = getattr(c, "quick_fails", 0) + 1
        delay = min(cap, base * (2 ** (c.quick_fails - 1)))
        c.backoff_until = now + delay
        c.last_state = c.state
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {delay:g}s restarting failed container={c.name} "
                                          f"pod={self.name}_{self.ns}({self.uid})"}}
        if delay >= 1:
            self._event("Warning", "BackOff", "Back-off restarting failed container", c.name)

    # ---- init and app containers

    def _fail_pod(self):
        self.phase = "Failed"
        self._teardown_net()

    def _step_init(self, now):
        """Init containers in order, each to completion; a sidecar (an
        init container with restartPolicy Always) only has to start (and
        pass its startup probe), then keeps running with the app
        containers."""
        policy = self._spec().get("restartPolicy", "Always")
        for c in self.init:
            if c.done or c.sidecar_up:
                continue
            if c.running():
                if c.kind == "sidecar":
                    self._run_probes(c, now)
                    if c.started:
                        c.sidecar_up = True
                        continue
                return
            if self._collect_exit(c, now):
                if c.kind == "init" and c.exit_code == 0:
                    c.done = True
                    c.last_state = {}
                    continue
                if c.kind == "init" and policy == "Never":
                    self._fail_pod()
                    return
                c.restart_count += 1
                self._restart_due(c, now)
                return
            if now >= c.backoff_until:
                self._start(c, now)
                if c.running():
                    if c.kind == "sidecar" and c.started:
                        c.sidecar_up = True
                        continue
                    return
                if c.state.get("terminated"):  # StartError
                    if c.kind == "init" and policy == "Never":
                        self._fail_pod()
                        return
                    c.restart_count += 1
                    self._restart_due(c, now)
            return
        self.initialized = True

    def _step_containers(self, now):
        policy = self._spec().get("restartPolicy", "Always")
        sidecars = [c for c in self.init if c.kind == "sidecar"]
        for c in sidecars + self.apps:
            always = c.kind == "sidecar" or policy == "Always"
            if c.running():
                self._run_probes(c, now)
                continue
            if self._collect_exit(c, now):
                if always or (policy == "OnFailure" and c.exit_code != 0):
                    c.restart_count += 1
                    self._restart_due(c, now)
                else:
                    c.done = True
                continue
            if c.done:
                continue
            if c.proc is None and now >= c.backoff_until:
                self._start(c, now)
                if c.proc is None and c.state.get("terminated"):  # StartError
                    if always or policy == "OnFailure":
                        c.restart_count += 1
                        self._restart_due(c, now)
                    else:
                        c.done = True
        if policy != "Always" and all(c.done for c in self.apps):
            self.phase = "Succeeded" if all(c.exit_code == 0 for c in self.apps) else "Failed"
            for s in sidecars:
                self._kill(s, self._grace(s))
                self._collect_exit(s, now)
            self._teardown_net()

    def _run_probes(self, c, now):
        for kind in ("startup", "liveness", "readiness"):
            p = c.probes.get(kind)
            if p is None or now < p.next_at:
                continue
            if kind != "startup" and not c.started:
                p.next_at = now + p.period
                continue
            ok, msg = self._handler(c, p.spec, p.timeout)
            p.next_at = time.monotonic() + p.period
            if ok:
                p.successes += 1
                p.failures = 0
            else:
                p.failures += 1
                p.successes = 0
                p.last_message = msg
                self._event("Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {msg}", c.name)
            if kind == "startup":
                if ok:
                    c.started = True
                    del c.probes["startup"]
                    if "readiness" not in c.probes:
                        c.ready = True
                elif p.failures >= p.failure_threshold:
                    self._event("Normal", "Killing", f"Container {c.name} failed startup probe, will be restarted",
                                c.name, once=False)
                    c.kill_reason = "Error"
                    self._kill(c, self._grace(c, p))
                    return
            elif kind == "liveness":
                if not ok and p.failures >= p.failure_threshold:
                    self._event("Normal", "Killing", f"Container {c.name} failed liveness probe, will be restarted",
                                c.name, once=False)
                    c.kill_reason = "Error"
                    self._kill(c, self._grace(c, p))
                    return
            else:
                if ok and p.successes >= p.success_threshold:
                    c.ready = True
                elif not ok and p.failures >= p.failure_threshold:
                    c.ready = False

    def _port(self, c, port):
        if isinstance(port, int):
            return port
        if isinstance(port, str) and port.isdigit():
            return int(port)
        for cc in self.containers():
            for p in cc.spec.get("ports") or []:
                if p.get("name") == port:
                    return int(p["containerPort"])
        raise ValueError(f"no container port named {port!r}")

    def _handler(self, c, h, timeout):
        """Runs a probe or lifecycle handler (httpGet, tcpSocket, exec,
        sleep) against container c; (ok, message)."""
        try:
            if "httpGet" in h:
                g = h["httpGet"]
                port = self._port(c, g.get("port"))
                host = g.get("host") or self.net.ip
                if (g.get("scheme") or "HTTP").upper() == "HTTPS":
                    conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                       context=ssl._create_unverified_context())
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                headers = {"User-Agent": "kube-probe/1.32", "Accept": "*/*"}
                for hd in g.get("httpHeaders") or []:
                    headers[hd.get("name", "")] = hd.get("value", "")
                try:
                    conn.request("GET", g.get("path") or "/", headers=headers)
                    resp = conn.getresponse()
                    body = resp.read(1024)
                finally:
                    conn.close()
                if 200 <= resp.status < 400:
                    return True, ""
                return False, f"HTTP probe failed with statuscode: {resp.status} ({body[:200].decode(errors='replace')})"
            if "tcpSocket" in h:
                t = h["tcpSocket"]
                port = self._port(c, t.get("port"))
                with socket.create_connection((t.get("host") or self.net.ip, port), timeout=timeout):
                    return True, ""
            if "exec" in h:
                return self._exec(c, h["exec"].get("command") or [], timeout)
            if "sleep" in h:
                time.sleep(min(float(h["sleep"].get("seconds", 0)), timeout))
                return True, ""
            if "grpc" in h:
                return False, "grpc probes are not supported by the kubelet stand-in"
            return False, f"unsupported handler {list(h)}"
        except (OSError, ValueError, http.client.HTTPException) as e:
            return False, f"{type(e).__name__}: {e}"

    def _exec(self, c, command, timeout):
        """Runs command inside container c (its mount, UTS and network
        namespaces, its root, user and environment)."""
        if not c.running() or not command:
            return False, "container not running" if command else "empty exec command"
        uid, gid, _, _, _, _ = self._security(c)
        cmd = ["nsenter", "-t", str(c.pid), "-m", "-u", "-n", "-r", "-w"]
        if uid is not None:
            cmd += ["-S", str(uid), "-G", str(gid or 0)]
        try:
            p = subprocess.run(cmd + ["--"] + list(command), env=c.env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"command timed out after {timeout:g}s"
        if p.returncode == 0:
            return True, ""
        return False, f"command {command!r} exited with {p.returncode}: " \
                      f"{(p.stdout + p.stderr)[-300:].decode(errors='replace').strip()}"

    # ---- status

    def _container_statuses(self, cs):
        return [c.status() for c in cs]

    def _compute_status(self):
        spec = self._spec()
        st = {"phase": self.phase, "hostIP": self.k.network.gateway,
              "hostIPs": [{"ip": self.k.network.gateway}], "startTime": self.start_time,
              "qosClass": _qos(spec)}
        if self.net is not None or self.last_ip:
            ip = self.net.ip if self.net else self.last_ip
            st["podIP"] = ip
            st["podIPs"] = [{"ip": ip}]
        apps_ready = all(c.ready for c in self.apps) and self.phase == "Running"
        side_ready = all(c.ready for c in self.init if c.kind == "sidecar")
        ready = apps_ready and side_ready
        t = now_iso()
        unready = [c.name for c in self.apps if not c.ready]
        conds = [{"type": "PodReadyToStartContainers", "status": "True" if self.net is not None else "False"},
                 {"type": "Initialized", "status": "True" if self.initialized else "False"},
                 {"type": "Ready", "status": "True" if ready else "False"},
                 {"type": "ContainersReady", "status": "True" if ready else "False"},
                 {"type": "PodScheduled", "status": "True"}]
        if not self.initialized:
            left = [c.name for c in self.init if not c.done]
            conds[1].update(reason="ContainersNotInitialized",
                            message=f"containers with incomplete status: [{' '.join(left)}]")
        if not ready:
            reason = "PodCompleted" if self.phase in ("Succeeded", "Failed") else "ContainersNotReady"
            for cnd in conds[2:4]:
                cnd["reason"] = reason
                if reason == "ContainersNotReady":
                    cnd["message"] = f"containers with unready status: [{' '.join(unready)}]"
        old = {cnd["type"]: cnd for cnd in (self.last_status or {}).get("conditions") or []}
        for cnd in conds:
            cnd["lastProbeTime"] = None
            prev = old.get(cnd["type"])
            cnd["lastTransitionTime"] = prev["lastTransitionTime"] if prev and prev["status"] == cnd["status"] else t
        st["conditions"] = conds
        if self.init:
            st["initContainerStatuses"] = self._container_statuses(self.init)
        if self.volumes is None and self.pending_message:
            for c in self.apps:
                c.state = {"waiting": {"reason": "ContainerCreating"}}
        st["containerStatuses"] = self._container_statuses(self.apps)
        if self.pod_reason:
            st["reason"] = self.pod_reason
        if self.pod_message:
            st["message"] = self.pod_message
        return st

    def _sync_status(self):
        if self.phase == "Pending" and self.initialized and self.apps and all(c.runs for c in self.apps):
            self.phase = "Running"
        st = self._compute_status()
        if st == self.last_status:
            return
        try:
            code, out = self.k.client.request(
                "PATCH", resource_path("v1", "pods", self.ns, self.name, "status"),
                [{"op": "test", "path": "/metadata/uid", "value": self.uid},
                 {"op": "add", "path": "/status", "value": st}], "application/json-patch+json")
        except (OSError, http.client.HTTPException) as e:
            code, out = -1, {"message": f"{type(e).__name__}: {e}"}
        if code == 200:
            self.last_status = st
            self.status_retry = False
        elif code != 404:
            # the API server is away or failing: the pod keeps running, the status is written later
            if not self.status_retry:
                _log(f"pod {self.ns}/{self.name}: status update failed: HTTP {code}: {out.get('message')}")
            self.status_retry = True

    # ---- termination

    def _teardown_net(self):
        if self.net is not None:
            self.last_ip = self.net.ip
            if self.net.netns:
                self.k.network.remove_pod(self.net)
            self.net = None

    def _terminate(self, grace, delete_object):
        """Stops every container (preStop, SIGTERM, SIGKILL after grace),
        writes the final status, deletes the pod for good when asked, and
        removes the sandbox and volumes."""
        deadline = time.monotonic() + max(0, grace)
        running = [c for c in self.containers() if c.running()]
        if grace > 0:
            hooks = []
            for c in running:
                hook = (c.spec.get("lifecycle") or {}).get("preStop")
                if hook:
                    th = threading.Thread(target=self._handler, args=(c, hook, max(0.0, grace)), daemon=True)
                    th.start()
                    hooks.append(th)
            for th in hooks:
                th.join(max(0.0, deadline - time.monotonic()))
        for c in running:
            if c.proc is not None and c.proc.poll() is None:
                try:
                    os.killpg(c.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for c in running:
            if c.proc is None:
                continue
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(c.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                c.proc.wait()
        now = time.monotonic()
        for c in running:
            self._collect_exit(c, now)
        self._teardown_net()
        if delete_object and not self.deleted:
            if self.phase not in ("Succeeded", "Failed"):
                self.phase = "Failed" if any(c.exit_code not in (0, None) for c in self.apps) else "Succeeded"
            for c in self.apps:
                c.ready = False
            self._sync_status()
            delay = 0.2
            while True:
                try:
                    code, out = self.k.client.request(
                        "DELETE", resource_path("v1", "pods", self.ns, self.name),
                        {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                         "preconditions": {"uid": self.uid}})
                except (OSError, http.client.HTTPException) as e:
                    code, out = -1, {"message": f"{type(e).__name__}: {e}"}
                if code in (200, 404, 409) or self.deleted or self.k.stopping:
                    break
                _log(f"pod {self.ns}/{self.name}: final delete failed: HTTP {code}: {out.get('message')}; "
                     f"retrying in {delay:.1f}s")
                self.wake.wait(delay)
                self.wake.clear()
                delay = min(delay * 2, 5.0)
        if self.sa_token:
            self.k.register_token(self.sa_token, None)
        shutil.rmtree(os.path.join(self.dir, "volumes"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.dir, "run"), ignore_errors=True)


def _tail(path, lines, limit):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (OSError, TypeError):
        return ""
    return b"\n".join(data.splitlines()[-lines:])[-limit:].decode(errors="replace")


def _link_env(name, ip, ports):
    """Docker-link style variables of one service, as kubelet makes them."""
    pre = name.upper().replace("-", "_")
    env = {f"{pre}_SERVICE_HOST": ip}
    first = ports[0]
    env[f"{pre}_SERVICE_PORT"] = str(first.get("port"))
    for p in ports:
        if p.get("name"):
            env[f"{pre}_SERVICE_PORT_{p['name'].upper().replace('-', '_')}"] = str(p.get("port"))
    proto = (first.get("protocol") or "TCP").lower()
    env[f"{pre}_PORT"] = f"{proto}://{ip}:{first.get('port')}"
    for p in ports:
        pr = (p.get("protocol") or "TCP")
        base = f"{pre}_PORT_{p.get('port')}_{pr.upper()}"
        env[base] = f"{pr.lower()}://{ip}:{p.get('port')}"
        env[base + "_PROTO"] = pr.lower()
        env[base + "_PORT"] = str(p.get("port"))
        env[base + "_ADDR"] = ip
    return env


def _qos(spec):
    cs = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    req = [((c.get("resources") or {}).get("requests") or {}) for c in cs]
    lim = [((c.get("resources") or {}).get("limits") or {}) for c in cs]
    if not any(req) and not any(lim):
        return "BestEffort"
    if all(lm.get("cpu") and lm.get("memory") and rq.get("cpu", lm.get("cpu")) == lm.get("cpu")
           and rq.get("memory", lm.get("memory")) == lm.get("memory") for rq, lm in zip(req, lim)):
        return "Guaranteed"
    return "Burstable"


# ---------------------------------------------------------------- the kubelet

class Kubelet:
    """Runs the pods bound to one node. client: a KubeClient with the
    node's credentials; network: a Network that is up; bin_dir: what
    appears at /usr/local/bin in every container; pvc_dir(pvc) and the
    host_paths mapping say where claims and hostPaths live on the host;
    register_token(token, user) makes the API server accept a pod's
    service-account token (user None: forget it)."""

    def __init__(self, client, network, node_name, bin_dir, state_dir, api_port, ca_pem, register_token, pvc_dir,
                 host_paths=None, probe_period_scale=0.1, restart_backoff=(0.5, 5.0), image_env=None,
                 image_entrypoints=None, image_user=None, node_labels=None, stop_grace_s=2.0, log=_log):
        self.client = client
        self.network = network
        self.node_name = node_name
        self.bin_dir = os.path.abspath(bin_dir)
        self.state_dir = state_dir
        self.api_port = api_port
        self.ca_pem = ca_pem
        self.register_token = register_token
        self.pvc_dir = pvc_dir
        self.host_paths = dict(host_paths or {})
        self.probe_period_scale = probe_period_scale
        self.restart_backoff = restart_backoff
        self.image_env = dict(image_env or {"PATH": "/usr/local/bin:/usr/bin:/bin"})
        self.image_entrypoints = dict(image_entrypoints or {})
        self.image_user = image_user
        self.node_labels = dict(node_labels or {})
        self.stop_grace_s = stop_grace_s
        self.log = log
        self.stopping = False
        self.workers = {}  # uid -> PodWorker
        self.last = {}  # (ns, name) -> the latest PodWorker, kept for logs
        self.done_uids = set()  # pods this kubelet finished (a finalizer may keep the object a while)
        self.lock = threading.Lock()
        self.image_dirs, self.image_links = [], {}
        for name in sorted(os.listdir("/")):
            p = os.path.join("/", name)
            if name in ("usr", "etc", "opt") and os.path.isdir(p) and not os.path.islink(p):
                self.image_dirs.append(name)
            elif name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
                if os.path.islink(p):
                    self.image_links[name] = os.readlink(p).lstrip("/")
                elif os.path.isdir(p):
                    self.image_dirs.append(name)
        mem = 0
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
        except OSError:
            pass
        self.node_capacity = {"cpu": str(os.cpu_count() or 1), "memory": str(mem), "ephemeral-storage": "0",
                              "pods": "110"}
        self.informers = {}

    def entrypoint_for(self, image):
        repo = image.split("@")[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        if image in self.image_entrypoints:
            return self.image_entrypoints[image]
        if repo in self.image_entrypoints:
            return self.image_entrypoints[repo]
        return None

    # ---- lifecycle

    def start(self):
        self._register_node()
        for plural in ("secrets", "configmaps", "persistentvolumeclaims", "serviceaccounts", "services"):
            inf = Informer(self.client, resource_path("v1", plural), f"kubelet-{plural}", log=self.log)
            inf.add_handler(self._on_dependency)
            self.informers[plural] = inf.start()
        for inf in self.informers.values():
            inf.synced.wait(30)
        pods = Informer(self.client, resource_path("v1", "pods"), "kubelet-pods",
                        query=f"fieldSelector=spec.nodeName%3D{self.node_name}", log=self.log)
        pods.add_handler(self._on_pod)
        self.informers["pods"] = pods.start()
        if not pods.synced.wait(30):
            raise StandInError("the kubelet stand-in could not list pods from the API server")
        return self

    def stop(self):
        """Stops every pod's containers (SIGTERM, SIGKILL after
        stop_grace_s) and removes the pod sandboxes; the pods stay in the
        API (the node went away)."""
        self.stopping = True
        for inf in self.informers.values():
            inf.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.wake.set()
        for w in workers:
            w.finished.wait(self.stop_grace_s + 30)
        for inf in self.informers.values():
            inf.stop()

    def _register_node(self):
        labels = {"kubernetes.io/hostname": self.node_name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64"}
        labels.update(self.node_labels)
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node_name, "labels": labels},
                "spec": {}}
        code, out = self.client.request("POST", "/api/v1/nodes", node)
        if code not in (201, 409):
            raise KubeError(code, out, "registering the node")
        alloc = dict(self.node_capacity)
        t = now_iso()
        status = {"capacity": self.node_capacity, "allocatable": alloc,
                  "addresses": [{"type": "InternalIP", "address": self.network.gateway},
                                {"type": "Hostname", "address": self.node_name}],
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "kubelet stand-in is posting ready status",
                                  "lastHeartbeatTime": t, "lastTransitionTime": t}],
                  "nodeInfo": {"kubeletVersion": "v1.32.4", "kubeProxyVersion": "", "operatingSystem": "linux",
                               "architecture": "amd64", "containerRuntimeVersion": "loraplane-standin://1",
                               "osImage": "loraplane kubelet stand-in", "kernelVersion": os.uname().release,
                               "machineID": "", "systemUUID": "", "bootID": ""}}
        self.client.must("PATCH", f"/api/v1/nodes/{self.node_name}/status", {"status": status},
                         "application/merge-patch+json")

    def catch_up(self, pod, timeout=3.0):
        """Waits until the caches of secrets, configMaps, claims, service
        accounts and services are at least as new as the pod, so that a
        container sees everything created before its pod (Services for its
        link variables included)."""
        rv = int(pod["metadata"].get("resourceVersion") or 0)
        for name in ("secrets", "configmaps", "persistentvolumeclaims", "serviceaccounts", "services"):
            self.informers[name].wait_rv(rv, timeout)

    # ---- events from the API

    def _on_pod(self, etype, pod, old):
        uid = pod["metadata"]["uid"]
        with self.lock:
            w = self.workers.get(uid)
            if etype == "DELETED":
                if w is not None:
                    w.gone()
                return
            if w is None:
                if self.stopping or uid in self.done_uids:
                    return
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") and \
                        not pod["metadata"].get("deletionTimestamp"):
                    return  # finished before this kubelet started
                w = PodWorker(self, pod)
                self.workers[uid] = w
                self.last[(w.ns, w.name)] = w
                w.thread.start()
                threading.Thread(target=self._forget_when_done, args=(w,), daemon=True).start()
                return
        w.update(pod)

    def _forget_when_done(self, w):
        w.finished.wait()
        with self.lock:
            self.workers.pop(w.uid, None)
            self.done_uids.add(w.uid)

    def _on_dependency(self, etype, obj, old):
        ns = (obj.get("metadata") or {}).get("namespace")
        with self.lock:
            workers = [w for w in self.workers.values() if w.ns == ns]
        for w in workers:
            w.deps_changed = True
            w.wake.set()

    def event(self, pod, etype, reason, message, container=None):
        m = pod["metadata"]
        t = now_iso()
        io = {"kind": "Pod", "namespace": m["namespace"], "name": m["name"], "uid": m["uid"], "apiVersion": "v1"}
        if container:
            io["fieldPath"] = f"spec.containers{{{container}}}"
        ev = {"apiVersion": "v1", "kind": "Event",
              "metadata": {"generateName": f"{m['name']}.", "namespace": m["namespace"]},
              "involvedObject": io, "reason": reason, "message": message[:1024], "type": etype,
              "source": {"component": "kubelet", "host": self.node_name}, "firstTimestamp": t, "lastTimestamp": t,
              "count": 1, "reportingComponent": "kubelet", "reportingInstance": self.node_name}
        try:
            self.client.request("POST", resource_path("v1", "events", m["namespace"]), ev)
        except (OSError, http.client.HTTPException):
            pass  # events are best effort, as in kubelet

    # ---- for tests

    def worker(self, ns, name):
        with self.lock:
            w = self.last.get((ns, name))
        if w is None:
            raise KeyError(f"the kubelet stand-in never ran pod {ns}/{name}")
        return w

    def log_path(self, ns, pod, container=None, previous=False):
        """The file holding the container's output (this run, or the
        previous one)."""
        w = self.worker(ns, pod)
        c = w.find(container) if container else w.apps[0]
        if c is None:
            raise KeyError(f"pod {ns}/{pod} has no container {container}")
        n = c.restart_count - (1 if previous else 0)
        return os.path.join(w.dir, "logs", c.name, f"{n}.log")

    def logs(self, ns, pod, container=None, previous=False):
        try:
            with open(self.log_path(ns, pod, container, previous), errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def all_logs(self, ns, pod, container=None):
        """Every run of the container, oldest first, with a header per run."""
        w = self.worker(ns, pod)
        out = []
        for c in w.containers():
            if container and c.name != container:
                continue
            d = os.path.join(w.dir, "logs", c.name)
            for n in sorted(int(x[:-4]) for x in os.listdir(d) if x.endswith(".log")) if os.path.isdir(d) else []:
                with open(os.path.join(d, f"{n}.log"), errors="replace") as f:
                    out.append(f"--- {ns}/{pod} {c.name} run {n} ---\n{f.read()}")
        return "\n".join(out)

    def container_pid(self, ns, pod, container=None):
        """The host pid of the container's process (None when not running)."""
        w = self.worker(ns, pod)
        c = w.find(container) if container else w.apps[0]
        if c is None:
            raise KeyError(f"pod {ns}/{pod} has no container {container}")
        return c.pid if c.running() else None

    def netns(self, ns, pod):
        w = self.worker(ns, pod)
        return w.net.netns if w.net else None

    def pods_running(self):
        with self.lock:
            return [(w.ns, w.name) for w in self.workers.values()]

