"""OpenAPI v3 structural schemas of CustomResourceDefinitions, applied the
way the API server applies them to custom resources: pruning of unknown
fields, defaulting, validation, and the CEL rules of x-kubernetes-validations.

Supported schema keywords: type (object, array, string, integer, number,
boolean), properties, required, additionalProperties, items, enum, pattern
(unanchored, as in OpenAPI), minLength, maxLength, minimum, maximum,
exclusiveMinimum, exclusiveMaximum, minItems, maxItems, format date-time and
date, nullable, default, x-kubernetes-preserve-unknown-fields,
x-kubernetes-int-or-string.

CEL: this server evaluates one rule only, `self == oldSelf` (the form
loraplane's CRD uses to make fields immutable; whitespace free, either
order). It is a transition rule: checked on update when both the old and the
new object have a value at the rule's place. A CRD carrying any other rule is
rejected when created, so no rule is silently ignored.

Errors are "causes" as the API server reports them: dicts with reason,
message and field (`spec.source.uri`, `status.endpoints[0].ready`)."""

import re
from datetime import datetime

_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}

SUPPORTED_RULES = ("self==oldSelf", "oldSelf==self")


def type_name(v):
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    return _TYPE_NAMES.get(type(v), "unknown")


def _quote(v):
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def cause(reason, field, message):
    return {"reason": reason, "message": message, "field": field}


def _join(path, key):
    return f"{path}.{key}" if path else key


def _type_ok(t, v):
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "integer":
        return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return True


_DATE_TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _format_ok(fmt, v):
    if fmt == "date-time":
        if not _DATE_TIME_RE.match(v):
            return False
        try:
            datetime.fromisoformat(v[:19])
        except ValueError:
            return False
        return True
    if fmt == "date":
        try:
            datetime.strptime(v, "%Y-%m-%d")
        except ValueError:
            return False
        return True
    return True


def prune(schema, value, path="", root=True):
    """Drops fields the schema does not know, in place; returns their paths."""
    dropped = []
    if schema is None or schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return dropped
    if isinstance(value, dict):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        for k in list(value.keys()):
            if root and k in ("apiVersion", "kind", "metadata"):
                continue
            if props is not None and k in props:
                dropped += prune(props[k], value[k], _join(path, k), False)
            elif isinstance(addl, dict):
                dropped += prune(addl, value[k], _join(path, k), False)
            elif addl is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                del value[k]
                dropped.append(_join(path, k))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            dropped += prune(schema["items"], item, f"{path}[{i}]", False)
    return dropped


def apply_defaults(schema, value):
    """Fills in defaults, in place, recursing into values it defaulted."""
    if schema is None:
        return
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, prop in props.items():
            if "default" in prop and (k not in value or (value[k] is None and not prop.get("nullable"))):
                value[k] = _deep(prop["default"])
        for k, v in value.items():
            if k in props:
                apply_defaults(props[k], v)
            elif isinstance(schema.get("additionalProperties"), dict):
                apply_defaults(schema["additionalProperties"], v)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


def _deep(v):
    if isinstance(v, dict):
        return {k: _deep(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deep(x) for x in v]
    return v


def validate(schema, value, path="", root=True):
    """Returns the causes for everything wrong with value under schema."""
    out = []
    if schema is None:
        return out
    if value is None:
        if not schema.get("nullable") and "type" in schema:
            out.append(cause("FieldValueTypeInvalid", path,
                             f"Invalid value: \"null\": {path} in body must be of type {schema['type']}: \"null\""))
        return out
    if schema.get("x-kubernetes-int-or-string"):
        if not (isinstance(value, str) or _type_ok("integer", value)):
            out.append(cause("FieldValueTypeInvalid", path,
                             f"Invalid value: \"{type_name(value)}\": {path} in body must be of type "
                             f"integer or string: \"{type_name(value)}\""))
            return out
    elif "type" in schema and not _type_ok(schema["type"], value):
        tn = type_name(value)
        out.append(cause("FieldValueTypeInvalid", path,
                         f"Invalid value: \"{tn}\": {path} in body must be of type {schema['type']}: \"{tn}\""))
        return out
    if "enum" in schema and not any(type_name(value) == type_name(e) and value == e for e in schema["enum"]):
        out.append(cause("FieldValueNotSupported", path,
                         f"Unsupported value: {_quote(value)}: supported values: "
                         + ", ".join(_quote(e) for e in schema["enum"])))
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append(cause("FieldValueInvalid", path,
                             f"Invalid value: {_quote(value)}: {path} in body should be at least "
                             f"{schema['minLength']} chars long"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append(cause("FieldValueTooLong", path,
                             f"Too long: may not be more than {schema['maxLength']} bytes"))
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(cause("FieldValueInvalid", path,
                             f"Invalid value: {_quote(value)}: {path} in body should match "
                             f"'{schema['pattern']}'"))
        if "format" in schema and not _format_ok(schema["format"], value):
            out.append(cause("FieldValueInvalid", path,
                             f"Invalid value: {_quote(value)}: {path} in body must be of type "
                             f"{schema['format']}: {_quote(value)}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema:
            lo = schema["minimum"]
            if value < lo or (schema.get("exclusiveMinimum") and value == lo):
                rel = "greater than" if schema.get("exclusiveMinimum") else "greater than or equal to"
                out.append(cause("FieldValueInvalid", path,
                                 f"Invalid value: {_quote(value)}: {path} in body should be {rel} {_quote(lo)}"))
        if "maximum" in schema:
            hi = schema["maximum"]
            if value > hi or (schema.get("exclusiveMaximum") and value == hi):
                rel = "less than" if schema.get("exclusiveMaximum") else "less than or equal to"
                out.append(cause("FieldValueInvalid", path,
                                 f"Invalid value: {_quote(value)}: {path} in body should be {rel} {_quote(hi)}"))
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append(cause("FieldValueInvalid", path,
                             f"Invalid value: {len(value)}: {path} in body should have at least "
                             f"{schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append(cause("FieldValueTooMany", path,
                             f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                out += validate(schema["items"], item, f"{path}[{i}]", False)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for req in schema.get("required") or []:
            if req not in value:
                out.append(cause("FieldValueRequired", _join(path, req), "Required value"))
        for k in sorted(value):
            if root and k in ("apiVersion", "kind", "metadata"):
                continue
            if k in props:
                out += validate(props[k], value[k], _join(path, k), False)
            elif isinstance(schema.get("additionalProperties"), dict):
                out += validate(schema["additionalProperties"], value[k], _join(path, k), False)
    return out


def _rule_key(rule):
    return re.sub(r"\s+", "", rule or "")


def unsupported_rules(schema, path):
    """Lists (path, rule) for every x-kubernetes-validations rule this
    server cannot evaluate."""
    out = []
    if not isinstance(schema, dict):
        return out
    for i, r in enumerate(schema.get("x-kubernetes-validations") or []):
        rule = r.get("rule") if isinstance(r, dict) else None
        if _rule_key(rule) not in SUPPORTED_RULES:
            out.append((f"{path}.x-kubernetes-validations[{i}].rule", rule))
    for k, sub in (schema.get("properties") or {}).items():
        out += unsupported_rules(sub, f"{path}.properties[{k}]")
    if isinstance(schema.get("items"), dict):
        out += unsupported_rules(schema["items"], f"{path}.items")
    if isinstance(schema.get("additionalProperties"), dict):
        out += unsupported_rules(schema["additionalProperties"], f"{path}.additionalProperties")
    return out


def validate_transitions(schema, new, old, path=""):
    """Evaluates `self == oldSelf` rules where old and new both have a value."""
    out = []
    if not isinstance(schema, dict) or new is None or old is None:
        return out
    for r in schema.get("x-kubernetes-validations") or []:
        if _rule_key(r.get("rule")) in SUPPORTED_RULES and new != old:
            msg = r.get("message") or f"failed rule: {r.get('rule')}"
            reason = r.get("reason") or "FieldValueInvalid"
            field = path + (r.get("fieldPath") or "")
            out.append(cause(reason, field, f"Invalid value: \"{type_name(new)}\": {msg}"))
    if isinstance(new, dict) and isinstance(old, dict):
        for k, sub in (schema.get("properties") or {}).items():
            if k in new and k in old:
                out += validate_transitions(sub, new[k], old[k], _join(path, k))
    return out
