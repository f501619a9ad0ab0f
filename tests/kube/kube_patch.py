"""The patch formats the Kubernetes API accepts, applied to plain JSON values.

- JSON merge patch (RFC 7386, application/merge-patch+json): objects merge
  key by key, null deletes, everything else (lists included) replaces.
- JSON patch (RFC 6902, application/json-patch+json): add, remove, replace,
  move, copy and test on JSON pointers. A failed `test` or a path that does
  not exist raises PatchConflict (the server answers 422); a malformed patch
  raises PatchError (400).
- Strategic merge patch (application/strategic-merge-patch+json, built-in
  kinds only): a merge patch whose lists named in MERGE_KEYS merge by key,
  with the `$patch`, `$retainKeys`, `$setElementOrder/...` and
  `$deleteFromPrimitiveList/...` directives kubectl sends. The table of merge
  keys covers the fields of the kinds this server stores, not every kind.

Inputs are never modified; each function returns a new value."""

import copy


class PatchError(ValueError):
    """The patch document itself is malformed (400)."""


class PatchConflict(ValueError):
    """The patch is well formed but cannot apply to this object (422)."""


def merge_patch(target, patch):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"json patch path '{path}' must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _index(container, tok, path, allow_end=False):
    if tok == "-" and allow_end:
        return len(container)
    if not tok.isdigit() or (len(tok) > 1 and tok[0] == "0"):
        raise PatchConflict(f"invalid array index '{tok}' in path '{path}'")
    i = int(tok)
    if i > len(container) or (i == len(container) and not allow_end):
        raise PatchConflict(f"array index {i} out of bounds in path '{path}'")
    return i


def _walk(doc, toks, path):
    cur = doc
    for tok in toks:
        if isinstance(cur, dict):
            if tok not in cur:
                raise PatchConflict(f"doc is missing path: \"{path}\": missing value")
            cur = cur[tok]
        elif isinstance(cur, list):
            cur = cur[_index(cur, tok, path)]
        else:
            raise PatchConflict(f"doc is missing path: \"{path}\": missing value")
    return cur


def _get(doc, path):
    return _walk(doc, _pointer(path), path)


def _add(doc, path, value):
    toks = _pointer(path)
    if not toks:
        return value
    parent = _walk(doc, toks[:-1], path)
    last = toks[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, last, path, allow_end=True), value)
    else:
        raise PatchConflict(f"doc is missing path: \"{path}\": missing value")
    return doc


def _remove(doc, path):
    toks = _pointer(path)
    if not toks:
        raise PatchConflict("cannot remove the whole document")
    parent = _walk(doc, toks[:-1], path)
    last = toks[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchConflict(f"unable to remove nonexistent key: {last}: missing value")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_index(parent, last, path))
    raise PatchConflict(f"doc is missing path: \"{path}\": missing value")


def json_patch(target, ops):
    if not isinstance(ops, list):
        raise PatchError("json patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError("each json patch operation must be an object with an 'op'")
        kind = op["op"]
        path = op.get("path")
        if not isinstance(path, str):
            raise PatchError(f"json patch operation '{kind}' needs a 'path'")
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f"json patch operation '{kind}' needs a 'value'")
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)
            toks = _pointer(path)
            if not toks:
                doc = copy.deepcopy(op["value"])
            else:
                parent = _walk(doc, toks[:-1], path)
                if isinstance(parent, list):
                    parent[_index(parent, toks[-1], path)] = copy.deepcopy(op["value"])
                else:
                    parent[toks[-1]] = copy.deepcopy(op["value"])
        elif kind in ("move", "copy"):
            src = op.get("from")
            if not isinstance(src, str):
                raise PatchError(f"json patch operation '{kind}' needs a 'from'")
            value = copy.deepcopy(_get(doc, src))
            if kind == "move":
                if path.startswith(src + "/"):
                    raise PatchConflict(f"cannot move '{src}' into its own child '{path}'")
                _remove(doc, src)
            doc = _add(doc, path, value)
        elif kind == "test":
            try:
                have = _get(doc, path)
            except PatchConflict:
                have = _MISSING
            if not _json_equal(have, op["value"]):
                raise PatchConflict(f"testing value {path} failed: test failed")
        else:
            raise PatchError(f"unexpected json patch operation '{kind}'")
    return doc


_MISSING = object()


def _json_equal(a, b):
    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


# Lists of built-in kinds that merge by a key in a strategic merge patch, by
# field name; a field listed with None merges as a set of primitives.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "conditions": "type",
    "ownerReferences": "uid",
    "finalizers": None,
    "tolerations": "key",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "subjects": None,
    "secrets": "name",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "podIPs": "ip",
}
# `ports` merges by containerPort in containers and by port in Services.
_PORTS_KEY = {"containers": "containerPort", "initContainers": "containerPort", "spec": "port"}


def strategic_merge_patch(target, patch, parent_field=""):
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys") or k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            if isinstance(out.get(field), list) and isinstance(v, list):
                out[field] = [x for x in out[field] if x not in v]
            continue
        if v is None:
            out.pop(k, None)
            continue
        if isinstance(v, list):
            key = MERGE_KEYS.get(k, "") if k != "ports" else _PORTS_KEY.get(parent_field, "")
            if key == "" or not isinstance(out.get(k), list):
                out[k] = [_strip_directives(x) for x in v if not _is_delete(x)]
            elif key is None:
                merged = list(out[k])
                for x in v:
                    if x not in merged:
                        merged.append(copy.deepcopy(x))
                out[k] = merged
            else:
                out[k] = _merge_keyed_list(out[k], v, key, k)
            continue
        merged = strategic_merge_patch(out.get(k), v, k)
        if merged is None:
            out.pop(k, None)
        else:
            out[k] = merged
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _is_delete(x):
    return isinstance(x, dict) and x.get("$patch") == "delete"


def _strip_directives(x):
    if isinstance(x, dict):
        return {k: _strip_directives(v) for k, v in x.items() if not k.startswith("$")}
    if isinstance(x, list):
        return [_strip_directives(i) for i in x]
    return copy.deepcopy(x)


def _merge_keyed_list(cur, patch_items, key, field):
    out = [copy.deepcopy(x) for x in cur]
    for item in patch_items:
        if not isinstance(item, dict) or key not in item:
            if item not in out:
                out.append(_strip_directives(item))
            continue
        idx = next((i for i, x in enumerate(out) if isinstance(x, dict) and x.get(key) == item[key]), None)
        if _is_delete(item):
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_strip_directives(item))
        else:
            out[idx] = strategic_merge_patch(out[idx], item, field)
    return out


def leaf_paths(value, prefix=()):
    """The field paths a server-side apply configuration sets: a tuple per
    leaf; lists count as one leaf (atomic)."""
    if isinstance(value, dict) and value:
        out = set()
        for k, v in value.items():
            out |= leaf_paths(v, prefix + (k,))
        return out
    return {prefix}


def get_path(obj, path):
    cur = obj
    for p in path:
        if not isinstance(cur, dict) or p not in cur:
            return _MISSING
        cur = cur[p]
    return cur


def remove_path(obj, path):
    """Removes a leaf from obj in place, then any maps it left empty."""
    parents = []
    cur = obj
    for p in path[:-1]:
        if not isinstance(cur, dict) or p not in cur:
            return
        parents.append((cur, p))
        cur = cur[p]
    if isinstance(cur, dict):
        cur.pop(path[-1], None)
    for parent, key in reversed(parents):
        if isinstance(parent[key], dict) and not parent[key]:
            del parent[key]
        else:
            break


def apply_merge(target, config):
    """Server-side apply's merge of a configuration into a live object:
    maps merge recursively, lists and scalars from the configuration win."""
    if not isinstance(config, dict) or not isinstance(target, dict):
        return copy.deepcopy(config)
    out = copy.deepcopy(target)
    for k, v in config.items():
        out[k] = apply_merge(out.get(k), v)
    return out


MISSING = _MISSING
