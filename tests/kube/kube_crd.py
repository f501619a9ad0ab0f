"""CustomResourceDefinitions: the CRD kind itself (validation, status the
API server maintains) and the TypeInfo of each custom resource version a
CRD serves (schema, status subresource, printer columns).

Conversion between versions is `None` only: every version holds the same
fields and only apiVersion changes, which is what a CRD without a conversion
webhook gets."""

import json
import re

import kube_schema
from kube_schema import cause
from kube_types import (AGE_COL, AGE_DESCRIPTION, DNS1123_LABEL, DNS1123_SUBDOMAIN, NAME_COL, TypeInfo,
                        age, col, fmt_time, now_utc, parse_time)

CLEANUP_FINALIZER = "customresourcecleanup.apiextensions.k8s.io"


class JsonPathError(ValueError):
    pass


_SEG_RE = re.compile(r"""\.([A-Za-z0-9_\-$]+)"""  # .field
                     r"""|\[(\d+|\*)\]"""  # [0] or [*]
                     r"""|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*(?:"([^"]*)"|'([^']*)')\)\]"""  # [?(@.a=="b")]
                     r"""|\.\*""")  # .*


def parse_jsonpath(text):
    """Parses the JSONPath subset printer columns use: `.a.b`, `[0]`, `[*]`,
    `[?(@.type=="Ready")]`, optionally wrapped in `{...}`."""
    t = (text or "").strip()
    if t.startswith("{") and t.endswith("}"):
        t = t[1:-1]
    if not t.startswith(".") and not t.startswith("["):
        raise JsonPathError(f"must be a simple json path starting with '.': {text}")
    segs, pos = [], 0
    while pos < len(t):
        m = _SEG_RE.match(t, pos)
        if not m:
            raise JsonPathError(f"unsupported json path at '{t[pos:]}'")
        if m.group(1) is not None:
            segs.append(("key", m.group(1)))
        elif m.group(2) is not None:
            segs.append(("all", None) if m.group(2) == "*" else ("index", int(m.group(2))))
        elif m.group(3) is not None:
            val = m.group(4) if m.group(4) is not None else m.group(5)
            segs.append(("filter", (m.group(3).split("."), val)))
        else:
            segs.append(("all", None))
        pos = m.end()
    return segs


def eval_jsonpath(segs, obj):
    cur = [obj]
    for kind, arg in segs:
        nxt = []
        for v in cur:
            if kind == "key" and isinstance(v, dict) and arg in v:
                nxt.append(v[arg])
            elif kind == "index" and isinstance(v, list) and arg < len(v):
                nxt.append(v[arg])
            elif kind == "all":
                nxt.extend(v if isinstance(v, list) else v.values() if isinstance(v, dict) else [])
            elif kind == "filter" and isinstance(v, list):
                path, want = arg
                for item in v:
                    x = item
                    for p in path:
                        x = x.get(p) if isinstance(x, dict) else None
                    if x is not None and str(x) == want:
                        nxt.append(item)
        cur = nxt
    return cur


def _cell(typ, value):
    if value is None:
        return None
    if typ == "integer":
        if isinstance(value, bool):
            return None
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
            return int(value)
        return None
    if typ == "number":
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if typ == "boolean":
        return value if isinstance(value, bool) else None
    if typ == "date":
        if isinstance(value, str):
            return age(value) if parse_time(value) else "<invalid>"
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


class CustomType(TypeInfo):
    """One served version of a CRD."""

    def __init__(self, crd, version):
        spec = crd["spec"]
        names = spec["names"]
        super().__init__(spec["group"], version["name"], names["kind"], names["plural"],
                         namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                         short_names=names.get("shortNames") or [], categories=names.get("categories") or [],
                         singular=names.get("singular") or names["kind"].lower(),
                         status="status" in (version.get("subresources") or {}), generation=True,
                         unconditional_update=False, list_kind=names.get("listKind"))
        self.is_cr = True
        self.crd = crd
        self.storage_version = storage_version(crd)
        self.schema = (version.get("schema") or {}).get("openAPIV3Schema")
        self.printer_columns = []
        for c in version.get("additionalPrinterColumns") or []:
            self.printer_columns.append((c, parse_jsonpath(c["jsonPath"])))

    def to_storage(self, obj):
        obj["apiVersion"] = f"{self.group}/{self.storage_version}"
        return obj

    def from_storage(self, obj):
        out = dict(obj)
        out["apiVersion"] = self.api_version
        return out

    def table_columns(self):
        if not self.printer_columns:
            return [NAME_COL, AGE_COL]
        cols = [NAME_COL]
        for c, _ in self.printer_columns:
            cols.append(col(c["name"], c["type"], c.get("description", ""), c.get("priority", 0), c.get("format", "")))
        return cols

    def table_cells(self, obj):
        m = obj.get("metadata") or {}
        if not self.printer_columns:
            return [m.get("name", ""), age(m.get("creationTimestamp"))]
        cells = [m.get("name", "")]
        for c, segs in self.printer_columns:
            found = eval_jsonpath(segs, obj)
            cells.append(_cell(c["type"], found[0]) if found else None)
        return cells


class CRDs(TypeInfo):
    def __init__(self):
        super().__init__("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions",
                         namespaced=False, short_names=["crd", "crds"], categories=["api-extensions"],
                         status=True, generation=True, unconditional_update=False)
        self.shapes = {"spec": "object", "status": "object", "spec.group": "string", "spec.scope": "string",
                       "spec.names": "object", "spec.names.plural": "string", "spec.names.kind": "string",
                       "spec.names.singular": "string", "spec.names.shortNames": "strings",
                       "spec.names.categories": "strings", "spec.versions": "array"}

    def prepare_create(self, obj):
        fin = obj["metadata"].setdefault("finalizers", [])
        if CLEANUP_FINALIZER not in fin:
            fin.append(CLEANUP_FINALIZER)
        self._defaults(obj)
        obj["status"] = {}
        self.refresh_status(obj, None)

    def prepare_update(self, new, old, sub=None):
        self._defaults(new)

    @staticmethod
    def _defaults(obj):
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return
        names = spec.get("names")
        if isinstance(names, dict) and isinstance(names.get("kind"), str):
            names.setdefault("singular", names["kind"].lower())
            names.setdefault("listKind", names["kind"] + "List")
        spec.setdefault("conversion", {"strategy": "None"})

    @staticmethod
    def refresh_status(obj, old):
        """The status a real API server gives an accepted CRD: names
        accepted, established, stored versions."""
        spec = obj.get("spec") or {}
        st = obj.setdefault("status", {})
        now = fmt_time(now_utc())
        prev = {c.get("type"): c for c in ((old or {}).get("status") or {}).get("conditions") or []}

        def cond(typ, status, reason, message):
            p = prev.get(typ)
            t = p["lastTransitionTime"] if p and p.get("status") == status else now
            return {"type": typ, "status": status, "lastTransitionTime": t, "reason": reason, "message": message}

        conds = [cond("NamesAccepted", "True", "NoConflicts", "no conflicts found"),
                 cond("Established", "True", "InitialNamesAccepted", "the initial names have been accepted")]
        if (obj.get("metadata") or {}).get("deletionTimestamp"):
            conds.append(cond("Terminating", "True", "InstanceDeletionInProgress",
                              "CustomResource deletion is in progress"))
        st["conditions"] = conds
        st["acceptedNames"] = dict(spec.get("names") or {})
        stored = list(((old or {}).get("status") or {}).get("storedVersions") or [])
        for v in spec.get("versions") or []:
            if isinstance(v, dict) and v.get("storage") and v.get("name") not in stored:
                stored.append(v["name"])
        st["storedVersions"] = stored

    def validate(self, obj, old):
        out = []
        spec = obj.get("spec")
        name = (obj.get("metadata") or {}).get("name", "")
        if not isinstance(spec, dict):
            return [cause("FieldValueRequired", "spec", "Required value")]
        group = spec.get("group", "")
        if not group:
            out.append(cause("FieldValueRequired", "spec.group", "Required value"))
        elif "." not in group or not DNS1123_SUBDOMAIN.match(group):
            out.append(cause("FieldValueInvalid", "spec.group",
                             f"Invalid value: \"{group}\": should be a domain with at least one dot"))
        names = spec.get("names") if isinstance(spec.get("names"), dict) else {}
        plural, kind = names.get("plural", ""), names.get("kind", "")
        if not plural:
            out.append(cause("FieldValueRequired", "spec.names.plural", "Required value"))
        elif not DNS1123_LABEL.match(plural):
            out.append(cause("FieldValueInvalid", "spec.names.plural",
                             f"Invalid value: \"{plural}\": a lowercase RFC 1123 label must consist of lower "
                             "case alphanumeric characters or '-', and must start and end with an "
                             "alphanumeric character"))
        if not kind:
            out.append(cause("FieldValueRequired", "spec.names.kind", "Required value"))
        for i, s in enumerate(names.get("shortNames") or []):
            if not isinstance(s, str) or not DNS1123_LABEL.match(s):
                out.append(cause("FieldValueInvalid", f"spec.names.shortNames[{i}]",
                                 f"Invalid value: \"{s}\": a lowercase RFC 1123 label must consist of lower "
                                 "case alphanumeric characters or '-'"))
        if plural and group and name != f"{plural}.{group}":
            out.append(cause("FieldValueInvalid", "metadata.name",
                             f"Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"))
        scope = spec.get("scope")
        if scope not in ("Namespaced", "Cluster"):
            out.append(cause("FieldValueNotSupported" if scope else "FieldValueRequired", "spec.scope",
                             f"Unsupported value: \"{scope}\": supported values: \"Cluster\", \"Namespaced\""
                             if scope else "Required value"))
        versions = spec.get("versions")
        if not isinstance(versions, list) or not versions:
            out.append(cause("FieldValueInvalid", "spec.versions",
                             "Invalid value: \"null\": must have exactly one version marked as storage version"))
            versions = []
        storage = [v for v in versions if isinstance(v, dict) and v.get("storage")]
        if versions and len(storage) != 1:
            out.append(cause("FieldValueInvalid", "spec.versions",
                             f"Invalid value: {len(storage)}: must have exactly one version marked as storage version"))
        seen = set()
        for i, v in enumerate(versions):
            p = f"spec.versions[{i}]"
            if not isinstance(v, dict):
                out.append(cause("FieldValueInvalid", p, "Invalid value: must be an object"))
                continue
            vn = v.get("name", "")
            if not vn or not DNS1123_LABEL.match(vn):
                out.append(cause("FieldValueInvalid", f"{p}.name", f"Invalid value: \"{vn}\": a DNS-1035 label is required"))
            if vn in seen:
                out.append(cause("FieldValueDuplicate", f"{p}.name", f"Duplicate value: \"{vn}\""))
            seen.add(vn)
            for k in ("served", "storage"):
                if not isinstance(v.get(k), bool):
                    out.append(cause("FieldValueRequired", f"{p}.{k}", "Required value"))
            schema = (v.get("schema") or {}).get("openAPIV3Schema")
            if not isinstance(schema, dict):
                out.append(cause("FieldValueRequired", f"{p}.schema.openAPIV3Schema", "Required value: schemas are required"))
            else:
                if schema.get("type") != "object":
                    out.append(cause("FieldValueInvalid", f"{p}.schema.openAPIV3Schema.type",
                                     f"Invalid value: \"{schema.get('type', '')}\": must be object at the root"))
                for where, rule in kube_schema.unsupported_rules(schema, f"{p}.schema.openAPIV3Schema"):
                    out.append(cause("FieldValueInvalid", where,
                                     f"Invalid value: \"{rule}\": this test API server evaluates only the CEL "
                                     "rule 'self == oldSelf'"))
            for j, c in enumerate(v.get("additionalPrinterColumns") or []):
                cp = f"{p}.additionalPrinterColumns[{j}]"
                if not isinstance(c, dict):
                    out.append(cause("FieldValueInvalid", cp, "Invalid value: must be an object"))
                    continue
                if not c.get("name"):
                    out.append(cause("FieldValueRequired", f"{cp}.name", "Required value"))
                if c.get("type") not in ("integer", "number", "string", "boolean", "date"):
                    out.append(cause("FieldValueNotSupported", f"{cp}.type",
                                     f"Unsupported value: \"{c.get('type', '')}\": supported values: \"boolean\", "
                                     "\"date\", \"integer\", \"number\", \"string\""))
                if not c.get("jsonPath"):
                    out.append(cause("FieldValueRequired", f"{cp}.jsonPath", "Required value"))
                else:
                    try:
                        parse_jsonpath(c["jsonPath"])
                    except JsonPathError as e:
                        out.append(cause("FieldValueInvalid", f"{cp}.jsonPath", f"Invalid value: \"{c['jsonPath']}\": {e}"))
        if old is not None:
            ospec = old.get("spec") or {}
            for k in ("group", "scope"):
                if spec.get(k) != ospec.get(k):
                    out.append(cause("FieldValueInvalid", f"spec.{k}",
                                     f"Invalid value: \"{spec.get(k)}\": field is immutable"))
            if names.get("plural") != (ospec.get("names") or {}).get("plural"):
                out.append(cause("FieldValueInvalid", "spec.names.plural",
                                 f"Invalid value: \"{plural}\": field is immutable"))
        return out

    def table_columns(self):
        return [NAME_COL, col("Created At", "date", AGE_DESCRIPTION)]

    def table_cells(self, obj):
        m = obj.get("metadata") or {}
        return [m.get("name", ""), m.get("creationTimestamp", "")]


def crd_types(crd):
    """TypeInfos for every served version of an accepted CRD."""
    return [CustomType(crd, v) for v in crd["spec"]["versions"] if v.get("served")]


def storage_version(crd):
    for v in crd["spec"]["versions"]:
        if v.get("storage"):
            return v["name"]
    return crd["spec"]["versions"][0]["name"]
