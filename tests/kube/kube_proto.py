"""Decoding of the Kubernetes protobuf request bodies kubectl sends.

kubectl's imperative commands (`kubectl create namespace|secret|configmap|
serviceaccount|service`) post `application/vnd.kubernetes.protobuf` bodies
(and helm sends its DELETE requests' DeleteOptions that way):
the 4-byte magic `k8s\\0` then a runtime.Unknown message (typeMeta, raw)
whose raw bytes are the object. This module turns those into the JSON form
for the kinds listed in KINDS; anything else raises ProtoError (the server
answers 415 and names what it can decode). Responses are always JSON, which
every client accepts."""

import base64
from datetime import datetime, timezone

MAGIC = b"k8s\x00"


class ProtoError(ValueError):
    pass


def _varint(b, i):
    shift = result = 0
    while True:
        if i >= len(b):
            raise ProtoError("truncated varint")
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return result, i
        if shift > 63:
            raise ProtoError("varint too long")


def _fields(b):
    """Yields (field number, wire type, value) of one message."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(b, i)
        elif wt == 2:
            n, i = _varint(b, i)
            if i + n > len(b):
                raise ProtoError("truncated field")
            v = b[i:i + n]
            i += n
        elif wt == 1:
            v = b[i:i + 8]
            i += 8
        elif wt == 5:
            v = b[i:i + 4]
            i += 4
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        yield num, wt, v


TIME = {1: ("seconds", "int"), 2: ("nanos", "int")}
OWNER_REF = {5: ("apiVersion", "string"), 1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
             6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool")}
OBJECT_META = {1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"),
               5: ("uid", "string"), 6: ("resourceVersion", "string"), 7: ("generation", "int"),
               8: ("creationTimestamp", ("time",)), 11: ("labels", ("map", "string")),
               12: ("annotations", ("map", "string")), 13: ("ownerReferences", ("repeated", ("msg", OWNER_REF))),
               14: ("finalizers", ("repeated", "string"))}
OBJECT_REF = {1: ("kind", "string"), 2: ("namespace", "string"), 3: ("name", "string"), 4: ("uid", "string"),
              5: ("apiVersion", "string"), 6: ("resourceVersion", "string"), 7: ("fieldPath", "string")}
INT_OR_STRING = {1: ("type", "int"), 2: ("intVal", "int"), 3: ("strVal", "string")}
SERVICE_PORT = {1: ("name", "string"), 2: ("protocol", "string"), 3: ("port", "int"),
                4: ("targetPort", ("intorstr",)), 5: ("nodePort", "int"), 6: ("appProtocol", "string")}
SERVICE_SPEC = {1: ("ports", ("repeated", ("msg", SERVICE_PORT))), 2: ("selector", ("map", "string")),
                3: ("clusterIP", "string"), 4: ("type", "string"), 5: ("externalIPs", ("repeated", "string")),
                7: ("sessionAffinity", "string"), 10: ("externalName", "string"),
                11: ("externalTrafficPolicy", "string"), 13: ("publishNotReadyAddresses", "bool"),
                17: ("ipFamilyPolicy", "string"), 18: ("clusterIPs", ("repeated", "string")),
                19: ("ipFamilies", ("repeated", "string")), 22: ("internalTrafficPolicy", "string")}

KINDS = {
    ("v1", "Namespace"): {1: ("metadata", ("msg", OBJECT_META)),
                          2: ("spec", ("msg", {1: ("finalizers", ("repeated", "string"))})),
                          3: ("status", ("msg", {1: ("phase", "string")}))},
    ("v1", "Secret"): {1: ("metadata", ("msg", OBJECT_META)), 2: ("data", ("map", "bytes")),
                       3: ("type", "string"), 4: ("stringData", ("map", "string")), 5: ("immutable", "bool")},
    ("v1", "ConfigMap"): {1: ("metadata", ("msg", OBJECT_META)), 2: ("data", ("map", "string")),
                          3: ("binaryData", ("map", "bytes")), 4: ("immutable", "bool")},
    ("v1", "ServiceAccount"): {1: ("metadata", ("msg", OBJECT_META)),
                               2: ("secrets", ("repeated", ("msg", OBJECT_REF))),
                               3: ("imagePullSecrets", ("repeated", ("msg", {1: ("name", "string")}))),
                               4: ("automountServiceAccountToken", "bool")},
    ("v1", "Service"): {1: ("metadata", ("msg", OBJECT_META)), 2: ("spec", ("msg", SERVICE_SPEC))},
}


def _scalar(typ, wt, v):
    if typ == "string":
        return v.decode("utf-8")
    if typ == "bytes":
        return base64.b64encode(v).decode()
    if typ == "int":
        if wt != 0:
            raise ProtoError("expected a varint")
        return v - (1 << 64) if v >= 1 << 63 else v
    if typ == "bool":
        return bool(v)
    raise ProtoError(f"unknown scalar type {typ}")


def _decode(schema, b):
    out = {}
    for num, wt, v in _fields(b):
        if num not in schema:
            continue
        name, typ = schema[num]
        if isinstance(typ, str):
            out[name] = _scalar(typ, wt, v)
        elif typ[0] == "msg":
            out[name] = _decode(typ[1], v)
        elif typ[0] == "time":
            t = _decode(TIME, v)
            if t.get("seconds"):
                out[name] = datetime.fromtimestamp(t["seconds"], timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        elif typ[0] == "intorstr":
            t = _decode(INT_OR_STRING, v)
            out[name] = t.get("strVal", "") if t.get("type") == 1 else t.get("intVal", 0)
        elif typ[0] == "map":
            entry = _decode({1: ("k", "string"), 2: ("v", typ[1])}, v)
            out.setdefault(name, {})[entry.get("k", "")] = entry.get("v", "" if typ[1] != "bytes" else "")
        elif typ[0] == "repeated":
            inner = typ[1]
            if isinstance(inner, str):
                out.setdefault(name, []).append(_scalar(inner, wt, v))
            else:
                out.setdefault(name, []).append(_decode(inner[1], v))
    return _drop_empty(out)


def _drop_empty(d):
    """Go's JSON omits empty optional fields; gogo protobuf sends them all."""
    return {k: v for k, v in d.items() if v not in ("", 0, None, {}, [])}


DELETE_OPTIONS = {1: ("gracePeriodSeconds", "int"),
                  2: ("preconditions", ("msg", {1: ("uid", "string"), 2: ("resourceVersion", "string")})),
                  3: ("orphanDependents", "bool"), 4: ("propagationPolicy", "string"),
                  5: ("dryRun", ("repeated", "string"))}


def _unwrap(body):
    """(typeMeta dict, raw bytes) of a runtime.Unknown protobuf envelope."""
    if not body.startswith(MAGIC):
        raise ProtoError("missing the 'k8s\\0' protobuf prefix")
    tm, raw = {}, b""
    for num, wt, v in _fields(body[4:]):
        if num == 1 and wt == 2:
            tm = _decode({1: ("apiVersion", "string"), 2: ("kind", "string")}, v)
        elif num == 2 and wt == 2:
            raw = v
    return tm, raw


def decode_delete_options(body):
    """The JSON form of a protobuf DeleteOptions body (what helm sends with
    DELETE). Unlike objects, false and 0 are kept: gracePeriodSeconds=0
    and orphanDependents=false mean something."""
    tm, raw = _unwrap(body)
    if tm.get("kind") not in ("DeleteOptions", None, ""):
        raise ProtoError(f"expected DeleteOptions, got {tm.get('kind')}")
    out = {}
    for num, wt, v in _fields(raw):
        if num not in DELETE_OPTIONS:
            continue
        name, typ = DELETE_OPTIONS[num]
        if typ == "int":
            out[name] = _scalar("int", wt, v)
        elif typ == "bool":
            out[name] = _scalar("bool", wt, v)
        elif typ == "string":
            out[name] = _scalar("string", wt, v)
        elif typ[0] == "msg":
            out[name] = _decode(typ[1], v)
        else:
            out.setdefault(name, []).append(_scalar("string", wt, v))
    return out


def decode(body):
    """Returns the JSON object for a protobuf request body, or raises."""
    tm, raw = _unwrap(body)
    key = (tm.get("apiVersion", ""), tm.get("kind", ""))
    if key not in KINDS:
        raise ProtoError(f"protobuf bodies are decoded only for {', '.join(k for _, k in sorted(KINDS))}, "
                         f"not {key[1] or 'an unnamed kind'}; send JSON (for example kubectl apply -f)")
    obj = {"apiVersion": key[0], "kind": key[1]}
    obj.update(_decode(KINDS[key], raw))
    obj.setdefault("metadata", {})
    return obj
