"""Resource types the test API server serves: what each built-in kind looks
like to clients (names, scope, verbs, subresources), the defaults and
validation its strategy applies, the fields it can be selected on, and its
`kubectl get` table. Custom resources get a TypeInfo built from their CRD
(see crd_types).

Validation here covers what a client of loraplane can trip over (names,
labels, required fields, immutable fields, IP addresses, Lease times); it is
not a copy of every rule of kube-apiserver."""

import base64
import binascii
import copy
import ipaddress
import re
from datetime import datetime, timezone

from kube_schema import cause
from kube_select import label_value_error, qualified_name_error

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

NAME_DESCRIPTION = ("Name must be unique within a namespace. Is required when creating resources, "
                    "although some resources may allow a client to request the generation of an "
                    "appropriate name automatically. Name is primarily intended for creation "
                    "idempotence and configuration definition. Cannot be updated.")
AGE_DESCRIPTION = ("CreationTimestamp is a timestamp representing the server time when this object "
                   "was created.")


def now_utc():
    return datetime.now(timezone.utc)


def fmt_time(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_micro(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text):
    """Parses an RFC 3339 time (any fraction, Z or offset); None if invalid."""
    if not isinstance(text, str):
        return None
    m = re.match(r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", text)
    if not m:
        return None
    frac = (m.group(3) or ".0")[1:7].ljust(6, "0")
    tz = "+00:00" if m.group(4) in ("Z", "z") else m.group(4)
    try:
        return datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}.{frac}{tz}").astimezone(timezone.utc)
    except ValueError:
        return None


def human_duration(seconds):
    """Ages the way kubectl shows them: 45s, 3m20s, 15m, 5h12m, 3d4h, 2y."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m" if s % 60 == 0 else f"{m}m{s % 60}s"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h" if m % 60 == 0 else f"{h}h{m % 60}m"
    if h < 48:
        return f"{h}h"
    if h < 24 * 8:
        return f"{h // 24}d" if h % 24 == 0 else f"{h // 24}d{h % 24}h"
    if h < 24 * 365 * 2:
        return f"{h // 24}d"
    if h < 24 * 365 * 8:
        dy = (h // 24) % 365
        return f"{h // 24 // 365}y" if dy == 0 else f"{h // 24 // 365}y{dy}d"
    return f"{h // 24 // 365}y"


def age(ts):
    t = parse_time(ts)
    if t is None:
        return "<unknown>"
    return human_duration((now_utc() - t).total_seconds())


def col(name, typ="string", desc="", priority=0, fmt=""):
    return {"name": name, "type": typ, "format": fmt, "description": desc, "priority": priority}


NAME_COL = col("Name", "string", NAME_DESCRIPTION, 0, "name")
AGE_COL = col("Age", "string", AGE_DESCRIPTION)


def _meta(o):
    return o.get("metadata") or {}


class TypeInfo:
    """One served resource (group, version, plural)."""

    def __init__(self, group, version, kind, plural, namespaced=True, short_names=(), categories=(),
                 singular=None, status=False, generation=False, unconditional_update=True,
                 create_on_update=False, name_rule="subdomain", list_kind=None):
        self.group = group
        self.version = version
        self.kind = kind
        self.plural = plural
        self.singular = singular or kind.lower()
        self.namespaced = namespaced
        self.short_names = list(short_names)
        self.categories = list(categories)
        self.has_status = status
        self.tracks_generation = generation
        self.unconditional_update = unconditional_update
        self.create_on_update = create_on_update
        self.name_rule = name_rule
        self.list_kind = list_kind or kind + "List"
        self.is_cr = False
        self.crd = None  # the CRD object for custom resources
        self.schema = None  # openAPIV3Schema of this version (custom resources)
        self.printer_columns = None
        self.storage_key = (group, plural)  # events.k8s.io shares core events
        self.extra_subresources = []  # (name, verbs)
        self.field_labels = {"metadata.name", "metadata.namespace"}
        self.return_deleted_object = False  # DELETE answers the object, not a Status
        self.shapes = {}  # field path -> JSON shape the Go types impose (see shape_error)

    @property
    def api_version(self):
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self):
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def group_kind(self):
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def subresources(self):
        out = []
        if self.has_status:
            out.append(("status", ["get", "patch", "update"]))
        return out + self.extra_subresources

    # --- strategy hooks; built-in kinds override what they need ---

    def to_storage(self, obj):
        return obj

    def from_storage(self, obj):
        return obj

    def prepare_create(self, obj):
        pass

    def prepare_update(self, new, old, sub=None):
        pass

    def validate(self, obj, old):
        return []

    def fields(self, obj):
        m = _meta(obj)
        out = {"metadata.name": m.get("name", "")}
        if self.namespaced:
            out["metadata.namespace"] = m.get("namespace", "")
        return out

    def table_columns(self):
        return [NAME_COL, AGE_COL]

    def table_cells(self, obj):
        return [_meta(obj).get("name", ""), age(_meta(obj).get("creationTimestamp"))]


def _name_err(rule, name):
    if rule == "label":
        if len(name) > 63 or not DNS1123_LABEL.match(name):
            return ("a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
                    "or '-', and must start and end with an alphanumeric character")
    elif rule == "subdomain":
        if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
            return ("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                    "characters, '-' or '.', and must start and end with an alphanumeric character")
    return None


def validate_meta(ti, obj):
    """Object metadata rules shared by every kind."""
    out = []
    m = _meta(obj)
    name = m.get("name", "")
    why = _name_err(ti.name_rule, name) if name else None
    if why:
        out.append(cause("FieldValueInvalid", "metadata.name", f"Invalid value: \"{name}\": {why}"))
    for k, v in (m.get("labels") or {}).items():
        kerr = qualified_name_error(k)
        if kerr:
            out.append(cause("FieldValueInvalid", "metadata.labels", f"Invalid value: \"{k}\": {kerr}"))
        if not isinstance(v, str):
            out.append(cause("FieldValueTypeInvalid", f"metadata.labels.{k}", "Invalid value: must be a string"))
            continue
        verr = label_value_error(v)
        if verr:
            out.append(cause("FieldValueInvalid", "metadata.labels", f"Invalid value: \"{v}\": {verr}"))
    for k, v in (m.get("annotations") or {}).items():
        kerr = qualified_name_error(k.lower())
        if kerr:
            out.append(cause("FieldValueInvalid", "metadata.annotations", f"Invalid value: \"{k}\": {kerr}"))
        if not isinstance(v, str):
            out.append(cause("FieldValueTypeInvalid", f"metadata.annotations.{k}", "Invalid value: must be a string"))
    for i, f in enumerate(m.get("finalizers") or []):
        why = qualified_name_error(f) if isinstance(f, str) else "must be a string"
        if why:
            out.append(cause("FieldValueInvalid", f"metadata.finalizers[{i}]", f"Invalid value: \"{f}\": {why}"))
    for i, ref in enumerate(m.get("ownerReferences") or []):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not isinstance(ref, dict) or not ref.get(field):
                out.append(cause("FieldValueRequired" if field != "apiVersion" else "FieldValueInvalid",
                                 f"metadata.ownerReferences[{i}].{field}",
                                 "Required value" if field != "apiVersion" else "Invalid value: \"\": version must not be empty"))
    return out


META_SHAPES = {"metadata": "object", "metadata.name": "string", "metadata.generateName": "string",
               "metadata.namespace": "string", "metadata.uid": "string", "metadata.resourceVersion": "string",
               "metadata.generation": "integer", "metadata.labels": "map", "metadata.annotations": "map",
               "metadata.finalizers": "strings", "metadata.ownerReferences": "array",
               "metadata.creationTimestamp": "string", "metadata.deletionTimestamp": "string"}
_GO_TYPES = {"object": "struct", "array": "[]interface {}", "string": "string", "integer": "int64",
             "boolean": "bool", "map": "map[string]string", "strings": "[]string"}


def _json_type(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return "null"


def _shape_ok(shape, v):
    if v is None:
        return True  # Go decodes null as the zero value
    if shape == "object":
        return isinstance(v, dict)
    if shape == "array":
        return isinstance(v, list)
    if shape == "string":
        return isinstance(v, str)
    if shape == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if shape == "boolean":
        return isinstance(v, bool)
    if shape == "map":
        return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    if shape == "strings":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    return True


def shape_error(ti, obj):
    """The decoding error the real server gives for a field of the wrong
    JSON type (it cannot unmarshal it into the Go struct), or None."""
    shapes = dict(META_SHAPES)
    shapes.update(ti.shapes)
    for path in sorted(shapes, key=lambda p: p.count(".")):
        cur = obj
        for part in path.split("."):
            if not isinstance(cur, dict) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None and not _shape_ok(shapes[path], cur):
            bad = _json_type(cur)
            if shapes[path] in ("map", "strings") and isinstance(cur, (dict, list)):
                items = cur.values() if isinstance(cur, dict) else cur
                bad = "number" if any(isinstance(x, (int, float)) for x in items) else "value"
            return (f"json: cannot unmarshal {bad} into Go struct field {ti.kind}.{path} of type "
                    f"{_GO_TYPES[shapes[path]]}")
    return None


def _containers_ok(pod_spec, path):
    out = []
    cs = pod_spec.get("containers")
    if not isinstance(cs, list) or not cs:
        return [cause("FieldValueRequired", f"{path}.containers", "Required value")]
    seen = set()
    for i, c in enumerate(cs):
        p = f"{path}.containers[{i}]"
        if not isinstance(c, dict):
            out.append(cause("FieldValueInvalid", p, "Invalid value: must be an object"))
            continue
        name = c.get("name", "")
        if not name:
            out.append(cause("FieldValueRequired", f"{p}.name", "Required value"))
        elif not DNS1123_LABEL.match(name) or len(name) > 63:
            out.append(cause("FieldValueInvalid", f"{p}.name", f"Invalid value: \"{name}\": " + _name_err("label", name)))
        elif name in seen:
            out.append(cause("FieldValueDuplicate", f"{p}.name", f"Duplicate value: \"{name}\""))
        seen.add(name)
        if not c.get("image"):
            out.append(cause("FieldValueRequired", f"{p}.image", "Required value"))
        for j, port in enumerate(c.get("ports") or []):
            cp = port.get("containerPort") if isinstance(port, dict) else None
            if not isinstance(cp, int) or not 1 <= cp <= 65535:
                out.append(cause("FieldValueInvalid", f"{p}.ports[{j}].containerPort",
                                 f"Invalid value: {cp}: must be between 1 and 65535, inclusive"))
    return out


def _default_containers(spec):
    for c in spec.get("containers") or []:
        if not isinstance(c, dict):
            continue
        img = c.get("image", "")
        tag_latest = ":" not in img.rsplit("/", 1)[-1] or img.endswith(":latest")
        c.setdefault("imagePullPolicy", "Always" if tag_latest and "@" not in img else "IfNotPresent")
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for port in c.get("ports") or []:
            if isinstance(port, dict):
                port.setdefault("protocol", "TCP")


def _ip_ok(text):
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class Namespaces(TypeInfo):
    def __init__(self):
        super().__init__("", "v1", "Namespace", "namespaces", namespaced=False, short_names=["ns"],
                         status=True, name_rule="label")
        self.extra_subresources = [("finalize", ["update"])]
        self.shapes = {"spec": "object", "status": "object", "spec.finalizers": "strings"}
        self.field_labels = {"metadata.name", "status.phase"}

    def prepare_create(self, obj):
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        obj["status"] = {"phase": "Active"}
        self.prepare_update(obj, None)

    def prepare_update(self, new, old, sub=None):
        new["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = new["metadata"]["name"]
        if old is not None and sub != "finalize":
            # spec.finalizers changes only through /finalize
            new["spec"] = copy.deepcopy(old.get("spec", {}))

    def fields(self, obj):
        return {"metadata.name": _meta(obj).get("name", ""),
                "status.phase": (obj.get("status") or {}).get("phase", "")}

    def table_columns(self):
        return [NAME_COL, col("Status", desc="The status of the namespace"), AGE_COL]

    def table_cells(self, obj):
        return [_meta(obj)["name"], (obj.get("status") or {}).get("phase", ""), age(_meta(obj).get("creationTimestamp"))]


class Pods(TypeInfo):
    def __init__(self):
        super().__init__("", "v1", "Pod", "pods", short_names=["po"], categories=["all"], status=True)
        self.return_deleted_object = True
        self.extra_subresources = [("binding", ["create"]), ("log", ["get"])]
        self.shapes = {"spec": "object", "status": "object", "spec.containers": "array", "spec.nodeName": "string",
                       "spec.terminationGracePeriodSeconds": "integer", "status.phase": "string",
                       "status.podIP": "string", "status.podIPs": "array", "status.conditions": "array",
                       "status.containerStatuses": "array"}
        self.field_labels = {"metadata.name", "metadata.namespace", "spec.nodeName", "spec.restartPolicy",
                             "spec.schedulerName", "spec.serviceAccountName", "spec.hostNetwork",
                             "status.phase", "status.podIP", "status.nominatedNodeName"}

    @staticmethod
    def _defaults(obj):
        spec = obj.setdefault("spec", {})
        if not isinstance(spec, dict):
            return
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        spec.setdefault("dnsPolicy", "ClusterFirst")
        spec.setdefault("schedulerName", "default-scheduler")
        spec.setdefault("securityContext", {})
        spec.setdefault("enableServiceLinks", True)
        spec.setdefault("priority", 0)
        _default_containers(spec)

    def prepare_create(self, obj):
        self._defaults(obj)
        # no kubelet has seen the pod yet: the real server resets status the same way
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}

    def prepare_update(self, new, old, sub=None):
        self._defaults(new)
        st = new.get("status")
        if isinstance(st, dict):
            # v1 keeps podIP and podIPs[0] in step, as the API's conversion does
            if st.get("podIP") and not st.get("podIPs"):
                st["podIPs"] = [{"ip": st["podIP"]}]
            elif st.get("podIPs") and not st.get("podIP") and isinstance(st["podIPs"][0], dict):
                st["podIP"] = st["podIPs"][0].get("ip", "")

    def validate(self, obj, old):
        spec = obj.get("spec") or {}
        out = _containers_ok(spec, "spec")
        st = obj.get("status") or {}
        if st.get("podIP") and not _ip_ok(st["podIP"]):
            out.append(cause("FieldValueInvalid", "status.podIP",
                             f"Invalid value: \"{st['podIP']}\": must be a valid IP address"))
        phase = st.get("phase")
        if phase and phase not in ("Pending", "Running", "Succeeded", "Failed", "Unknown"):
            out.append(cause("FieldValueNotSupported", "status.phase", f"Unsupported value: \"{phase}\""))
        if old is not None:
            a = copy.deepcopy(old.get("spec") or {})
            b = copy.deepcopy(spec)
            for s in (a, b):
                for c in s.get("containers") or []:
                    if isinstance(c, dict):
                        c.pop("image", None)
                s.pop("activeDeadlineSeconds", None)
                s.pop("tolerations", None)
            if a != b:
                out.append(cause("FieldValueForbidden", "spec",
                                 "Forbidden: pod updates may not change fields other than "
                                 "`spec.containers[*].image`,`spec.initContainers[*].image`,"
                                 "`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions "
                                 "to existing tolerations),`spec.terminationGracePeriodSeconds` "
                                 "(allow it to be set to 1 if it was previously negative)"))
        return out

    def fields(self, obj):
        spec, st = obj.get("spec") or {}, obj.get("status") or {}
        out = super().fields(obj)
        out.update({"spec.nodeName": spec.get("nodeName", ""),
                    "spec.restartPolicy": spec.get("restartPolicy", ""),
                    "spec.schedulerName": spec.get("schedulerName", ""),
                    "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                    "spec.hostNetwork": "true" if spec.get("hostNetwork") else "false",
                    "status.phase": st.get("phase", ""), "status.podIP": st.get("podIP", ""),
                    "status.nominatedNodeName": st.get("nominatedNodeName", "")})
        return out

    def table_columns(self):
        return [NAME_COL,
                col("Ready", desc="The aggregate readiness state of this pod for accepting traffic."),
                col("Status", desc="The aggregate status of the containers in this pod."),
                col("Restarts", desc="The number of times the containers in this pod have been restarted."),
                AGE_COL,
                col("IP", desc="The IP address assigned to this pod", priority=1),
                col("Node", desc="The name of the node where this pod is scheduled", priority=1),
                col("Nominated Node", desc="The name of the node where this pod is nominated", priority=1),
                col("Readiness Gates", desc="The readiness gates of this pod", priority=1)]

    def table_cells(self, obj):
        spec, st, m = obj.get("spec") or {}, obj.get("status") or {}, _meta(obj)
        total = len(spec.get("containers") or [])
        cstat = st.get("containerStatuses") or []
        if cstat:
            ready = sum(1 for c in cstat if isinstance(c, dict) and c.get("ready"))
        else:
            conds = {c.get("type"): c.get("status") for c in st.get("conditions") or [] if isinstance(c, dict)}
            ready = total if conds.get("Ready") == "True" else 0
        restarts = sum(int(c.get("restartCount", 0)) for c in cstat if isinstance(c, dict))
        reason = _pod_status_reason(spec, st)
        if m.get("deletionTimestamp"):
            reason = "Terminating"
        return [m.get("name", ""), f"{ready}/{total}", reason, restarts, age(m.get("creationTimestamp")),
                st.get("podIP") or "<none>", spec.get("nodeName") or "<none>",
                st.get("nominatedNodeName") or "<none>", "<none>"]


def _term_reason(t, prefix=""):
    if t.get("reason"):
        return prefix + t["reason"]
    if t.get("signal"):
        return f"{prefix}Signal:{t['signal']}"
    return f"{prefix}ExitCode:{t.get('exitCode', 0)}"


def _pod_status_reason(spec, st):
    """kubectl's STATUS of a pod: the phase or pod reason, else what its
    init containers or containers are doing (Init:0/1, ContainerCreating,
    CrashLoopBackOff, Completed, Error, ...)."""
    reason = st.get("reason") or st.get("phase", "")
    inits = [c for c in st.get("initContainerStatuses") or [] if isinstance(c, dict)]
    n_init = len(spec.get("initContainers") or [])
    initializing = False
    for i, c in enumerate(inits):
        state = c.get("state") or {}
        t, w = state.get("terminated"), state.get("waiting")
        if t is not None and t.get("exitCode") == 0:
            continue
        if (state.get("running") is not None or t is not None and t.get("exitCode") == 0) and c.get("started"):
            continue  # a running sidecar
        initializing = True
        if t is not None:
            reason = _term_reason(t, "Init:")
        elif w is not None and w.get("reason") and w["reason"] != "PodInitializing":
            reason = "Init:" + w["reason"]
        else:
            reason = f"Init:{i}/{n_init}"
        break
    if not initializing:
        running = False
        for c in reversed([c for c in st.get("containerStatuses") or [] if isinstance(c, dict)]):
            state = c.get("state") or {}
            if (state.get("waiting") or {}).get("reason"):
                reason = state["waiting"]["reason"]
            elif state.get("terminated") is not None:
                reason = _term_reason(state["terminated"])
            elif state.get("running") is not None and c.get("ready"):
                running = True
        if reason == "Completed" and running:
            reason = "Running"
    return reason


class Services(TypeInfo):
    def __init__(self, ip_alloc):
        super().__init__("", "v1", "Service", "services", short_names=["svc"], categories=["all"],
                         status=True, create_on_update=True, name_rule="label")
        self.ip_alloc = ip_alloc
        self.return_deleted_object = True
        self.shapes = {"spec": "object", "status": "object", "spec.ports": "array", "spec.selector": "map",
                       "spec.type": "string", "spec.clusterIP": "string", "spec.clusterIPs": "strings"}

    @staticmethod
    def _defaults(spec):
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        if spec["type"] != "ExternalName":
            spec.setdefault("internalTrafficPolicy", "Cluster")
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                if "port" in p:
                    p.setdefault("targetPort", p["port"])

    def prepare_create(self, obj):
        spec = obj.setdefault("spec", {})
        self._defaults(spec)
        if spec["type"] != "ExternalName":
            if not spec.get("clusterIP"):
                spec["clusterIP"] = self.ip_alloc()
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            if spec["clusterIP"] != "None":
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
        obj["status"] = {"loadBalancer": {}}

    def prepare_update(self, new, old, sub=None):
        spec, ospec = new.setdefault("spec", {}), old.get("spec") or {}
        if not isinstance(spec, dict):
            return
        self._defaults(spec)
        # allocated values the client left out stay as they were
        for k in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            if k not in spec and k in ospec:
                spec[k] = copy.deepcopy(ospec[k])

    def validate(self, obj, old):
        out = []
        spec = obj.get("spec") or {}
        if spec.get("type") not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
            out.append(cause("FieldValueNotSupported", "spec.type",
                             f"Unsupported value: \"{spec.get('type')}\": supported values: \"ClusterIP\", "
                             "\"ExternalName\", \"LoadBalancer\", \"NodePort\""))
        ports = spec.get("ports") or []
        if not ports and spec.get("clusterIP") != "None" and spec.get("type") != "ExternalName":
            out.append(cause("FieldValueRequired", "spec.ports", "Required value"))
        names = set()
        for i, p in enumerate(ports):
            port = p.get("port") if isinstance(p, dict) else None
            if not isinstance(port, int) or not 1 <= port <= 65535:
                out.append(cause("FieldValueInvalid", f"spec.ports[{i}].port",
                                 f"Invalid value: {port}: must be between 1 and 65535, inclusive"))
            if len(ports) > 1 and isinstance(p, dict) and not p.get("name"):
                out.append(cause("FieldValueRequired", f"spec.ports[{i}].name", "Required value"))
            if isinstance(p, dict) and p.get("name") in names:
                out.append(cause("FieldValueDuplicate", f"spec.ports[{i}].name", f"Duplicate value: \"{p['name']}\""))
            if isinstance(p, dict):
                names.add(p.get("name"))
        if old is not None:
            oip = (old.get("spec") or {}).get("clusterIP")
            if oip and spec.get("clusterIP") != oip and spec.get("type") != "ExternalName":
                out.append(cause("FieldValueInvalid", "spec.clusterIPs[0]",
                                 f"Invalid value: []string{{\"{spec.get('clusterIP')}\"}}: may not change once set"))
        return out

    def table_columns(self):
        return [NAME_COL, col("Type", desc="The type of the service"),
                col("Cluster-IP", desc="The IP address of the service"),
                col("External-IP", desc="The external IP of the service"),
                col("Port(s)", desc="The ports the service listens on"), AGE_COL,
                col("Selector", desc="The selector of the service", priority=1)]

    def table_cells(self, obj):
        spec, m = obj.get("spec") or {}, _meta(obj)
        ports = ",".join(f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or []
                         if isinstance(p, dict)) or "<none>"
        sel = ",".join(f"{k}={v}" for k, v in sorted((spec.get("selector") or {}).items())) or "<none>"
        return [m.get("name", ""), spec.get("type", ""), spec.get("clusterIP", ""), "<none>", ports,
                age(m.get("creationTimestamp")), sel]


class EndpointSlices(TypeInfo):
    def __init__(self):
        super().__init__("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices")
        self.shapes = {"addressType": "string", "endpoints": "array", "ports": "array"}

    def prepare_create(self, obj):
        self.prepare_update(obj, None)

    def prepare_update(self, new, old, sub=None):
        for p in new.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")

    def validate(self, obj, old):
        out = []
        at = obj.get("addressType")
        if not at:
            out.append(cause("FieldValueRequired", "addressType", "Required value"))
        elif at not in ("IPv4", "IPv6", "FQDN"):
            out.append(cause("FieldValueNotSupported", "addressType",
                             f"Unsupported value: \"{at}\": supported values: \"FQDN\", \"IPv4\", \"IPv6\""))
        if old is not None and old.get("addressType") and at != old.get("addressType"):
            out.append(cause("FieldValueInvalid", "addressType",
                             f"Invalid value: \"{at}\": field is immutable"))
        eps = obj.get("endpoints")
        if eps is None:
            eps = []
        if not isinstance(eps, list):
            out.append(cause("FieldValueTypeInvalid", "endpoints", "Invalid value: must be a list"))
            eps = []
        if len(eps) > 1000:
            out.append(cause("FieldValueTooMany", "endpoints", f"Too many: {len(eps)}: must have at most 1000 items"))
        for i, ep in enumerate(eps):
            addrs = ep.get("addresses") if isinstance(ep, dict) else None
            if not isinstance(addrs, list) or len(addrs) != 1:
                out.append(cause("FieldValueRequired" if not addrs else "FieldValueTooMany",
                                 f"endpoints[{i}].addresses", "Required value" if not addrs else
                                 f"Too many: {len(addrs)}: must have at most 1 items"))
                continue
            a = addrs[0]
            if at == "IPv4" and not (isinstance(a, str) and _ip_ok(a) and ":" not in a):
                out.append(cause("FieldValueInvalid", f"endpoints[{i}].addresses[0]",
                                 f"Invalid value: \"{a}\": must be a valid IPv4 address"))
            if at == "IPv6" and not (isinstance(a, str) and _ip_ok(a) and ":" in a):
                out.append(cause("FieldValueInvalid", f"endpoints[{i}].addresses[0]",
                                 f"Invalid value: \"{a}\": must be a valid IPv6 address"))
        for i, p in enumerate(obj.get("ports") or []):
            port = p.get("port") if isinstance(p, dict) else None
            if port is not None and (not isinstance(port, int) or not 1 <= port <= 65535):
                out.append(cause("FieldValueInvalid", f"ports[{i}].port",
                                 f"Invalid value: {port}: must be between 1 and 65535, inclusive"))
        return out

    def table_columns(self):
        return [NAME_COL, col("AddressType", desc="The IP protocol for this slice"),
                col("Ports", desc="The ports of this slice"),
                col("Endpoints", desc="The endpoints of this slice"), AGE_COL]

    def table_cells(self, obj):
        m = _meta(obj)
        ports = ",".join(str(p.get("port", "")) for p in obj.get("ports") or [] if isinstance(p, dict)) or "<unset>"
        addrs = [a for ep in obj.get("endpoints") or [] if isinstance(ep, dict) for a in ep.get("addresses") or []]
        shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
        return [m.get("name", ""), obj.get("addressType", ""), ports, shown or "<unset>", age(m.get("creationTimestamp"))]


class Leases(TypeInfo):
    def __init__(self):
        super().__init__("coordination.k8s.io", "v1", "Lease", "leases")
        self.shapes = {"spec": "object", "spec.holderIdentity": "string", "spec.leaseDurationSeconds": "integer",
                       "spec.leaseTransitions": "integer", "spec.acquireTime": "string", "spec.renewTime": "string"}

    def prepare_create(self, obj):
        self.prepare_update(obj, None)

    def prepare_update(self, new, old, sub=None):
        spec = new.get("spec")
        if isinstance(spec, dict):
            for k in ("acquireTime", "renewTime"):
                t = parse_time(spec.get(k))
                if t is not None:
                    spec[k] = fmt_micro(t)

    def validate(self, obj, old):
        out = []
        spec = obj.get("spec") or {}
        for k in ("acquireTime", "renewTime"):
            if spec.get(k) is not None and parse_time(spec.get(k)) is None:
                out.append(cause("FieldValueInvalid", f"spec.{k}",
                                 f"Invalid value: \"{spec.get(k)}\": must be an RFC 3339 time"))
        d = spec.get("leaseDurationSeconds")
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
            out.append(cause("FieldValueInvalid", "spec.leaseDurationSeconds",
                             f"Invalid value: {d}: must be greater than 0"))
        t = spec.get("leaseTransitions")
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
            out.append(cause("FieldValueInvalid", "spec.leaseTransitions",
                             f"Invalid value: {t}: must be greater than or equal to 0"))
        return out

    def table_columns(self):
        return [NAME_COL, col("Holder", desc="The holder of the lease"), AGE_COL]

    def table_cells(self, obj):
        m = _meta(obj)
        return [m.get("name", ""), (obj.get("spec") or {}).get("holderIdentity") or "",
                age(m.get("creationTimestamp"))]


_EVENT_FIELDS = ["involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                 "involvedObject.uid", "involvedObject.apiVersion", "involvedObject.resourceVersion",
                 "involvedObject.fieldPath", "reason", "reportingComponent", "source", "type"]


class Events(TypeInfo):
    def __init__(self):
        super().__init__("", "v1", "Event", "events", short_names=["ev"], create_on_update=True)
        self.shapes = {"involvedObject": "object", "reason": "string", "message": "string", "type": "string",
                       "count": "integer", "source": "object", "eventTime": "string", "series": "object",
                       "reportingComponent": "string", "reportingInstance": "string", "action": "string",
                       "firstTimestamp": "string", "lastTimestamp": "string", "related": "object"}
        self.field_labels = {"metadata.name", "metadata.namespace", *_EVENT_FIELDS}

    def prepare_create(self, obj):
        self.prepare_update(obj, None)

    def prepare_update(self, new, old, sub=None):
        t = parse_time(new.get("eventTime"))
        if t is not None:
            new["eventTime"] = fmt_micro(t)
        for k in ("firstTimestamp", "lastTimestamp"):
            t = parse_time(new.get(k))
            if t is not None:
                new[k] = fmt_time(t)
        series = new.get("series")
        if isinstance(series, dict):
            t = parse_time(series.get("lastObservedTime"))
            if t is not None:
                series["lastObservedTime"] = fmt_micro(t)

    def validate(self, obj, old):
        out = []
        io = obj.get("involvedObject")
        ns = _meta(obj).get("namespace", "")
        if not isinstance(io, dict):
            out.append(cause("FieldValueRequired", "involvedObject", "Required value"))
            io = {}
        if io.get("namespace") and io.get("namespace") != ns:
            out.append(cause("FieldValueInvalid", "involvedObject.namespace",
                             f"Invalid value: \"{io.get('namespace')}\": does not match event.namespace"))
        if obj.get("type") and obj["type"] not in ("Normal", "Warning"):
            out.append(cause("FieldValueInvalid", "type",
                             f"Invalid value: \"{obj['type']}\": has invalid value: {obj['type']}"))
        if obj.get("eventTime") is not None:
            if parse_time(obj["eventTime"]) is None:
                out.append(cause("FieldValueInvalid", "eventTime", f"Invalid value: \"{obj['eventTime']}\": must be an RFC 3339 time"))
            if not obj.get("reportingComponent"):
                out.append(cause("FieldValueRequired", "reportingController", "Required value"))
            if not obj.get("reportingInstance"):
                out.append(cause("FieldValueRequired", "reportingInstance", "Required value"))
            if not obj.get("action"):
                out.append(cause("FieldValueRequired", "action", "Required value"))
            if not obj.get("reason"):
                out.append(cause("FieldValueRequired", "reason", "Required value"))
        if len(obj.get("message") or "") > 1024 and obj.get("eventTime") is not None:
            out.append(cause("FieldValueTooLong", "note", "Too long: may not be more than 1024 bytes"))
        return out

    def fields(self, obj):
        io = obj.get("involvedObject") or {}
        out = super().fields(obj)
        for f in _EVENT_FIELDS:
            if f.startswith("involvedObject."):
                out[f] = str(io.get(f.split(".", 1)[1], ""))
        out["reason"] = obj.get("reason", "")
        out["reportingComponent"] = obj.get("reportingComponent", "")
        out["source"] = (obj.get("source") or {}).get("component", "") or obj.get("reportingComponent", "")
        out["type"] = obj.get("type", "")
        return out

    def table_columns(self):
        return [col("Last Seen", desc="Time when last event occurred"),
                col("Type", desc="Type of this event (Normal, Warning), new types could be added in the future."),
                col("Reason", desc="Reason is why the action was taken. It is human-readable."),
                col("Object", desc="The object that this event is about. Mapped to involvedObject."),
                col("Subobject", desc="Subobject of the object", priority=1),
                col("Source", desc="The component reporting this event", priority=1),
                col("Message", desc="A human-readable description of the status of this operation."),
                col("First Seen", desc="The time at which the event was first recorded.", priority=1),
                col("Count", desc="The number of times this event has occurred.", priority=1),
                dict(NAME_COL, priority=1)]

    def table_cells(self, obj):
        io, m = obj.get("involvedObject") or {}, _meta(obj)
        last = obj.get("lastTimestamp") or obj.get("eventTime") or m.get("creationTimestamp")
        first = obj.get("firstTimestamp") or obj.get("eventTime") or m.get("creationTimestamp")
        return [age(last), obj.get("type", ""), obj.get("reason", ""),
                f"{(io.get('kind') or '').lower()}/{io.get('name', '')}", io.get("fieldPath", ""),
                (obj.get("source") or {}).get("component", "") or obj.get("reportingComponent", ""),
                (obj.get("message") or "").strip(), age(first), obj.get("count") or 1, m.get("name", "")]


# events.k8s.io/v1 field <-> core/v1 field, for the one shared storage
_EVENTS_V1_MAP = [("regarding", "involvedObject"), ("note", "message"), ("reportingController", "reportingComponent"),
                  ("deprecatedSource", "source"), ("deprecatedFirstTimestamp", "firstTimestamp"),
                  ("deprecatedLastTimestamp", "lastTimestamp"), ("deprecatedCount", "count")]
_EVENTS_V1_SAME = ["eventTime", "series", "reportingInstance", "action", "reason", "related", "type"]


class EventsV1(Events):
    """events.k8s.io/v1 Event: the same stored objects as core v1 events."""

    def __init__(self):
        super().__init__()
        self.group = "events.k8s.io"
        self.create_on_update = False
        self.storage_key = ("", "events")
        self.shapes = {"regarding": "object", "note": "string", "reason": "string", "type": "string",
                       "eventTime": "string", "series": "object", "reportingController": "string",
                       "reportingInstance": "string", "action": "string", "related": "object",
                       "deprecatedSource": "object", "deprecatedCount": "integer"}
        self.field_labels = self.field_labels | {"regarding.kind", "regarding.namespace", "regarding.name",
                                                 "regarding.uid", "regarding.apiVersion",
                                                 "regarding.resourceVersion", "regarding.fieldPath",
                                                 "reportingController"}

    def to_storage(self, obj):
        out = {"apiVersion": "v1", "kind": "Event", "metadata": obj.get("metadata", {})}
        for new, old in _EVENTS_V1_MAP:
            if new in obj:
                out[old] = obj[new]
        for k in _EVENTS_V1_SAME:
            if k in obj:
                out[k] = obj[k]
        return out

    def from_storage(self, obj):
        out = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": obj.get("metadata", {})}
        for k in _EVENTS_V1_SAME:
            if k in obj:
                out[k] = obj[k]
        for new, old in _EVENTS_V1_MAP:
            if old in obj:
                out[new] = obj[old]
        return out

    def validate_v1(self, obj):
        """The rules events.k8s.io/v1 adds on create: eventTime and the
        reporting fields are required."""
        out = []
        if not obj.get("eventTime"):
            out.append(cause("FieldValueRequired", "eventTime", "Required value"))
        if not obj.get("reportingController"):
            out.append(cause("FieldValueRequired", "reportingController", "Required value"))
        if not obj.get("reportingInstance"):
            out.append(cause("FieldValueRequired", "reportingInstance", "Required value"))
        if not obj.get("action"):
            out.append(cause("FieldValueRequired", "action", "Required value"))
        if not obj.get("reason"):
            out.append(cause("FieldValueRequired", "reason", "Required value"))
        if obj.get("type") not in ("Normal", "Warning"):
            t = obj.get("type", "")
            out.append(cause("FieldValueInvalid", "type", f"Invalid value: \"{t}\": has invalid value: {t}"))
        return out

    def fields(self, obj):
        out = super().fields(obj)
        for k in list(out):
            if k.startswith("involvedObject."):
                out["regarding." + k.split(".", 1)[1]] = out[k]
        out["reportingController"] = out["reportingComponent"]
        return out


class Secrets(TypeInfo):
    def __init__(self):
        super().__init__("", "v1", "Secret", "secrets")
        self.shapes = {"data": "map", "stringData": "map", "type": "string", "immutable": "boolean"}
        self.field_labels = {"metadata.name", "metadata.namespace", "type"}

    def prepare_create(self, obj):
        obj.setdefault("type", "Opaque")
        self.prepare_update(obj, None)

    def prepare_update(self, new, old, sub=None):
        new.setdefault("type", "Opaque")
        sd = new.pop("stringData", None)
        if isinstance(sd, dict):
            data = new.setdefault("data", {})
            for k, v in sd.items():
                data[k] = base64.b64encode(str(v).encode()).decode()

    def validate(self, obj, old):
        out = []
        for k, v in (obj.get("data") or {}).items():
            if not re.match(r"^[-._a-zA-Z0-9]+$", k):
                out.append(cause("FieldValueInvalid", f"data[{k}]",
                                 f"Invalid value: \"{k}\": a valid config key must consist of alphanumeric "
                                 "characters, '-', '_' or '.'"))
            try:
                base64.b64decode(v or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                out.append(cause("FieldValueInvalid", f"data[{k}]", "Invalid value: illegal base64 data"))
        if old is not None:
            if old.get("immutable") and (obj.get("data") != old.get("data") or not obj.get("immutable")):
                out.append(cause("FieldValueForbidden", "data", "Forbidden: field is immutable when `immutable` is set"))
            if obj.get("type") != old.get("type"):
                out.append(cause("FieldValueInvalid", "type", f"Invalid value: \"{obj.get('type')}\": field is immutable"))
        return out

    def fields(self, obj):
        out = super().fields(obj)
        out["type"] = obj.get("type", "")
        return out

    def table_columns(self):
        return [NAME_COL, col("Type", desc="The type of the secret"),
                col("Data", "integer", "The number of entries in the secret"), AGE_COL]

    def table_cells(self, obj):
        m = _meta(obj)
        return [m.get("name", ""), obj.get("type", ""), len(obj.get("data") or {}), age(m.get("creationTimestamp"))]


class ConfigMaps(TypeInfo):
    def __init__(self):
        super().__init__("", "v1", "ConfigMap", "configmaps", short_names=["cm"])
        self.shapes = {"data": "map", "binaryData": "map", "immutable": "boolean"}

    def table_columns(self):
        return [NAME_COL, col("Data", "integer", "The number of entries"), AGE_COL]

    def table_cells(self, obj):
        m = _meta(obj)
        n = len(obj.get("data") or {}) + len(obj.get("binaryData") or {})
        return [m.get("name", ""), n, age(m.get("creationTimestamp"))]


class WorkloadType(TypeInfo):
    """apps/v1 kinds: stored as given (no controller runs them); selector
    must be present and match the pod template's labels."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        if self.kind in ("Deployment", "ReplicaSet", "StatefulSet"):
            self.extra_subresources = [("scale", ["get", "patch", "update"])]
        self.shapes = {"spec": "object", "status": "object", "spec.selector": "object", "spec.template": "object",
                       "spec.replicas": "integer", "spec.template.spec": "object",
                       "spec.template.spec.containers": "array"}

    def prepare_create(self, obj):
        obj["status"] = {}
        self.prepare_update(obj, None)

    def prepare_update(self, new, old, sub=None):
        spec = new.setdefault("spec", {})
        if isinstance(spec, dict) and self.kind in ("Deployment", "StatefulSet", "ReplicaSet"):
            spec.setdefault("replicas", 1)

    def validate(self, obj, old):
        out = []
        spec = obj.get("spec") or {}
        sel = spec.get("selector")
        if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
            out.append(cause("FieldValueRequired", "spec.selector", "Required value"))
        else:
            labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            for k, v in (sel.get("matchLabels") or {}).items():
                if labels.get(k) != v:
                    out.append(cause("FieldValueInvalid", "spec.template.metadata.labels",
                                     f"Invalid value: {labels}: `selector` does not match template `labels`"))
                    break
        tmpl_spec = (spec.get("template") or {}).get("spec")
        if not isinstance(tmpl_spec, dict):
            out.append(cause("FieldValueRequired", "spec.template.spec", "Required value"))
        else:
            out += _containers_ok(tmpl_spec, "spec.template.spec")
        if old is not None and (old.get("spec") or {}).get("selector") != sel and self.kind != "ReplicaSet":
            out.append(cause("FieldValueInvalid", "spec.selector", f"Invalid value: {sel}: field is immutable"))
        return out

    def table_columns(self):
        if self.kind == "Deployment":
            return [NAME_COL, col("Ready", desc="Number of the pod with ready state"),
                    col("Up-to-date", "integer", "Pods of this deployment with the desired template."),
                    col("Available", "integer", "Available pods of this deployment."),
                    AGE_COL]
        return super().table_columns()

    def table_cells(self, obj):
        m, st, spec = _meta(obj), obj.get("status") or {}, obj.get("spec") or {}
        if self.kind == "Deployment":
            return [m.get("name", ""), f"{st.get('readyReplicas', 0)}/{spec.get('replicas', 0)}",
                    st.get("updatedReplicas", 0), st.get("availableReplicas", 0), age(m.get("creationTimestamp"))]
        return super().table_cells(obj)


class Jobs(TypeInfo):
    """batch/v1 Job: defaults, the selector and pod labels the API server
    adds (controller-uid, job-name), the restartPolicy rule and the
    immutable template; status is written by a controller (the kubelet
    stand-in's job controller, see tests/kube/kube_controllers.py)."""

    def __init__(self):
        super().__init__("batch", "v1", "Job", "jobs", categories=["all"], status=True, generation=True)
        self.shapes = {"spec": "object", "status": "object", "spec.template": "object",
                       "spec.template.spec": "object", "spec.template.spec.containers": "array",
                       "spec.backoffLimit": "integer", "spec.completions": "integer", "spec.parallelism": "integer",
                       "spec.activeDeadlineSeconds": "integer", "spec.ttlSecondsAfterFinished": "integer",
                       "spec.suspend": "boolean", "spec.manualSelector": "boolean", "spec.selector": "object"}

    def prepare_create(self, obj):
        obj["status"] = {}
        spec = obj.setdefault("spec", {})
        if not isinstance(spec, dict):
            return
        if spec.get("completions") is None and spec.get("parallelism") is None:
            spec["completions"] = 1
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        tmpl = spec.setdefault("template", {})
        if not isinstance(tmpl, dict):
            return
        if not spec.get("manualSelector"):
            m = obj["metadata"]
            uid, name = m["uid"], m["name"]
            spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
            labels = tmpl.setdefault("metadata", {}).setdefault("labels", {})
            labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name,
                           "controller-uid": uid, "job-name": name})
        tspec = tmpl.get("spec")
        if isinstance(tspec, dict):
            tspec.setdefault("terminationGracePeriodSeconds", 30)
            tspec.setdefault("dnsPolicy", "ClusterFirst")
            tspec.setdefault("schedulerName", "default-scheduler")
            tspec.setdefault("securityContext", {})
            _default_containers(tspec)

    def validate(self, obj, old):
        out = []
        spec = obj.get("spec") or {}
        tspec = (spec.get("template") or {}).get("spec")
        if not isinstance(tspec, dict):
            return [cause("FieldValueRequired", "spec.template.spec", "Required value")]
        out += _containers_ok(tspec, "spec.template.spec")
        rp = tspec.get("restartPolicy")
        if rp is None:
            out.append(cause("FieldValueRequired", "spec.template.spec.restartPolicy",
                             "Required value: valid values: \"OnFailure\", \"Never\""))
        elif rp not in ("OnFailure", "Never"):
            out.append(cause("FieldValueNotSupported", "spec.template.spec.restartPolicy",
                             f"Unsupported value: \"{rp}\": supported values: \"OnFailure\", \"Never\""))
        for f in ("backoffLimit", "completions", "parallelism"):
            v = spec.get(f)
            if isinstance(v, int) and v < 0:
                out.append(cause("FieldValueInvalid", f"spec.{f}",
                                 f"Invalid value: {v}: must be greater than or equal to 0"))
        if old is not None:
            ospec = old.get("spec") or {}
            if ospec.get("template") != spec.get("template"):
                out.append(cause("FieldValueInvalid", "spec.template",
                                 "Invalid value: field is immutable"))
            for f in ("selector", "completions", "completionMode"):
                if ospec.get(f) != spec.get(f):
                    out.append(cause("FieldValueInvalid", f"spec.{f}", f"Invalid value: field is immutable"))
        return out

    def table_columns(self):
        return [NAME_COL, col("Status", desc="Status of the job."),
                col("Completions", desc="The desired number of successfully finished pods the job should be run "
                                        "with."),
                col("Duration", desc="Time required to complete the job."), AGE_COL,
                col("Containers", desc="Names of each container in the template.", priority=1),
                col("Images", desc="Images referenced by each container in the template.", priority=1),
                col("Selector", desc="Selector for pods.", priority=1)]

    def table_cells(self, obj):
        m, spec, st = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
        conds = {c.get("type"): c.get("status") for c in st.get("conditions") or [] if isinstance(c, dict)}
        if conds.get("Complete") == "True":
            status = "Complete"
        elif conds.get("Failed") == "True":
            status = "Failed"
        elif conds.get("FailureTarget") == "True" or conds.get("SuccessCriteriaMet") == "True":
            status = "Terminating"
        elif spec.get("suspend"):
            status = "Suspended"
        else:
            status = "Running"
        comp = spec.get("completions")
        completions = f"{st.get('succeeded', 0)}/{comp}" if comp is not None else f"{st.get('succeeded', 0)}/1 of " \
            f"{spec.get('parallelism', 1)}"
        start, end = parse_time(st.get("startTime")), parse_time(st.get("completionTime"))
        duration = ""
        if start is not None:
            duration = human_duration(((end or now_utc()) - start).total_seconds())
        cs = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        sel = ",".join(f"{k}={v}" for k, v in sorted(((spec.get("selector") or {}).get("matchLabels") or {}).items()))
        return [m.get("name", ""), status, completions, duration, age(m.get("creationTimestamp")),
                ",".join(c.get("name", "") for c in cs if isinstance(c, dict)),
                ",".join(c.get("image", "") for c in cs if isinstance(c, dict)), sel]


def builtin_types(ip_alloc):
    """Every built-in resource, keyed (group, version, plural)."""
    sa = TypeInfo("", "v1", "ServiceAccount", "serviceaccounts", short_names=["sa"])
    sa.return_deleted_object = True
    plain = [
        sa,
        TypeInfo("", "v1", "Endpoints", "endpoints", short_names=["ep"], list_kind="EndpointsList"),
        TypeInfo("", "v1", "Node", "nodes", namespaced=False, short_names=["no"], status=True),
        TypeInfo("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", short_names=["pvc"], status=True),
        TypeInfo("rbac.authorization.k8s.io", "v1", "Role", "roles"),
        TypeInfo("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"),
        TypeInfo("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", namespaced=False),
        TypeInfo("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", namespaced=False),
        TypeInfo("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", short_names=["pdb"],
                 status=True, generation=True),
    ]
    apps = [
        WorkloadType("apps", "v1", "Deployment", "deployments", short_names=["deploy"], categories=["all"],
                     status=True, generation=True),
        WorkloadType("apps", "v1", "StatefulSet", "statefulsets", short_names=["sts"], categories=["all"],
                     status=True, generation=True),
        WorkloadType("apps", "v1", "DaemonSet", "daemonsets", short_names=["ds"], categories=["all"],
                     status=True, generation=True),
        WorkloadType("apps", "v1", "ReplicaSet", "replicasets", short_names=["rs"], categories=["all"],
                     status=True, generation=True),
    ]
    out = [Namespaces(), Pods(), Services(ip_alloc), EndpointSlices(), Leases(), Events(), EventsV1(),
           Secrets(), ConfigMaps(), Jobs()] + plain + apps
    return out
