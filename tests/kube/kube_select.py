"""Label and field selectors as the Kubernetes API parses and applies them.

Label selectors (the `labelSelector` query parameter): comma-separated
requirements `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`,
`k>n`, `k<n`. `!=` and `notin` also match objects without the key, as in
Kubernetes. Field selectors (`fieldSelector`): `f=v`, `f==v`, `f!=v`, joined
by commas, with `\\,` `\\=` `\\\\` escapes in values; which fields a resource
supports is decided by the caller (see FieldSelector.check).

Parse errors raise SelectorError; the server turns it into 400 BadRequest."""

import re

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_NAME_RE = re.compile("^" + _NAME + "$")
_DNS1123_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SelectorError(ValueError):
    pass


def qualified_name_error(key):
    """Returns why `key` is not a valid label key / qualified name, or None."""
    if not key:
        return "name part must be non-empty"
    prefix, _, name = key.rpartition("/")
    if "/" in key:
        if not prefix:
            return "prefix part must be non-empty"
        if len(prefix) > 253 or not _DNS1123_SUBDOMAIN_RE.match(prefix):
            return "prefix part a lowercase RFC 1123 subdomain must consist of lower case " \
                "alphanumeric characters, '-' or '.', and must start and end with an " \
                "alphanumeric character"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _NAME_RE.match(name):
        return "name part must consist of alphanumeric characters, '-', '_' or '.', and " \
            "must start and end with an alphanumeric character"
    return None


def label_value_error(value):
    """Returns why `value` is not a valid label value, or None."""
    if value == "":
        return None
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _NAME_RE.match(value):
        return "a valid label must be an empty string or consist of alphanumeric characters, " \
            "'-', '_' or '.', and must start and end with an alphanumeric character"
    return None


_TOKEN_RE = re.compile(r"==|!=|=|!|\(|\)|,|>|<|[^\s=!(),<>]+")


def _tokens(text):
    return _TOKEN_RE.findall(text)


class LabelSelector:
    """A parsed label selector; `matches(labels)` tests a labels dict."""

    def __init__(self, text):
        self.text = text or ""
        self.reqs = []  # (key, op, [values]) with op in exists, !exists, in, notin, gt, lt
        toks = _tokens(self.text)
        i = 0

        def take():
            nonlocal i
            if i >= len(toks):
                raise SelectorError(f"unable to parse requirement: unexpected end of selector '{self.text}'")
            t = toks[i]
            i += 1
            return t

        while i < len(toks):
            t = take()
            if t == "!":
                key = take()
                self._check_key(key)
                self.reqs.append((key, "!exists", []))
            else:
                key = t
                self._check_key(key)
                if i >= len(toks) or toks[i] == ",":
                    self.reqs.append((key, "exists", []))
                else:
                    op = take()
                    if op in ("=", "=="):
                        v = self._value(take() if i < len(toks) and toks[i] != "," else "")
                        self.reqs.append((key, "in", [v]))
                    elif op == "!=":
                        v = self._value(take() if i < len(toks) and toks[i] != "," else "")
                        self.reqs.append((key, "notin", [v]))
                    elif op in ("in", "notin"):
                        if take() != "(":
                            raise SelectorError(f"unable to parse requirement: found '{toks[i - 1]}', expected: '('")
                        vals = []
                        while True:
                            t = take()
                            if t == ")":
                                break
                            if t == ",":
                                continue
                            vals.append(self._value(t))
                        if not vals and op == "in":
                            raise SelectorError("unable to parse requirement: for 'in', 'notin' operators, values set can't be empty")
                        self.reqs.append((key, op, vals))
                    elif op in (">", "<"):
                        v = take()
                        try:
                            int(v)
                        except ValueError:
                            raise SelectorError("unable to parse requirement: for 'gt', 'lt' operators, "
                                                f"the value must be an integer: '{v}'")
                        self.reqs.append((key, "gt" if op == ">" else "lt", [v]))
                    else:
                        raise SelectorError(f"unable to parse requirement: found '{op}', expected: in, notin, =, ==, !=, gt, lt")
            if i < len(toks):
                if toks[i] != ",":
                    raise SelectorError(f"found '{toks[i]}', expected: ',' or 'end of string'")
                i += 1
                if i >= len(toks):
                    raise SelectorError("found ',', expected: identifier after ','")

    @staticmethod
    def _check_key(key):
        if key in ("=", "==", "!=", "(", ")", ",", ">", "<"):
            raise SelectorError(f"unable to parse requirement: found '{key}', expected: identifier")
        why = qualified_name_error(key)
        if why:
            raise SelectorError(f"unable to parse requirement: invalid label key \"{key}\": {why}")

    @staticmethod
    def _value(v):
        if v in ("=", "==", "!=", "(", ")", ",", "!"):
            raise SelectorError(f"unable to parse requirement: found '{v}', expected: identifier")
        why = label_value_error(v)
        if why:
            raise SelectorError(f"unable to parse requirement: invalid label value: \"{v}\": {why}")
        return v

    def empty(self):
        return not self.reqs

    def matches(self, labels):
        labels = labels or {}
        for key, op, vals in self.reqs:
            has = key in labels
            if op == "exists" and not has:
                return False
            if op == "!exists" and has:
                return False
            if op == "in" and (not has or labels[key] not in vals):
                return False
            if op == "notin" and has and labels[key] in vals:
                return False
            if op in ("gt", "lt"):
                if not has:
                    return False
                try:
                    n = int(labels[key])
                except ValueError:
                    return False
                if op == "gt" and not n > int(vals[0]):
                    return False
                if op == "lt" and not n < int(vals[0]):
                    return False
        return True


def _split_unescaped(text, sep):
    parts, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i:i + 2])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(v):
    out, i = [], 0
    while i < len(v):
        if v[i] == "\\" and i + 1 < len(v):
            if v[i + 1] not in "\\,=":
                raise SelectorError(f"invalid field selector: invalid escape sequence: \\{v[i + 1]}")
            out.append(v[i + 1])
            i += 2
        else:
            out.append(v[i])
            i += 1
    return "".join(out)


class FieldSelector:
    """A parsed field selector: list of (field, op, value), op '=' or '!='."""

    def __init__(self, text):
        self.text = text or ""
        self.reqs = []
        if not self.text.strip():
            return
        for part in _split_unescaped(self.text, ","):
            part = part.strip()
            if not part:
                continue
            m = re.match(r"^([^=!]+?)\s*(==|!=|=)\s*(.*)$", part)
            if not m:
                raise SelectorError(f"invalid selector: '{self.text}'; can't understand '{part}'")
            op = "!=" if m.group(2) == "!=" else "="
            self.reqs.append((m.group(1).strip(), op, _unescape(m.group(3))))

    def empty(self):
        return not self.reqs

    def check(self, supported, resource_desc):
        """Raises SelectorError for a field the resource cannot select on."""
        for field, _, _ in self.reqs:
            if field not in supported:
                raise SelectorError(f"field label not supported: {field}" if resource_desc is None else
                                    f"\"{field}\" is not a known field selector: only "
                                    + ", ".join(f"\"{s}\"" for s in sorted(supported)))

    def matches(self, fields):
        for field, op, value in self.reqs:
            have = fields.get(field, "")
            if op == "=" and have != value:
                return False
            if op == "!=" and have == value:
                return False
        return True
