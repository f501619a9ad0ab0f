#!/usr/bin/env python3
"""Hostile inputs of the classes the agent already refused when issue 9's
review was made, kept as regressions: path traversal out of the allowed
root, a pickle naming a forbidden global, zip members with '../', a lying
Content-Length, 100k-deep JSON, wrong-type fields and invalid UTF-8 on the
management API. Each case asserts the status and error code, and that the
agent still answers /health and serves a completion afterwards.

A module of tests/integration/test-hostile.py; runs alone too."""

import json
import os
import pickle
import shutil
import socket
import sys
import tempfile
import zipfile

import harness as H

TMP = None
ROOT = None  # --allowed-local-roots
_agent = None


def _setup():
    global TMP, ROOT
    TMP = tempfile.mkdtemp(prefix="lp-hostile-classic-")
    ROOT = os.path.join(TMP, "root")
    os.makedirs(ROOT)
    outside = os.path.join(TMP, "outside")
    H.copy_adapter(os.path.join(H.TINY_LORAS, "r4-qv"), outside)

    # adapter_model.bin whose pickle calls a global the reader must refuse
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    d = H.copy_adapter(os.path.join(H.TINY_LORAS, "r8-all-bin"), os.path.join(ROOT, "pickle"))
    src = os.path.join(d, "adapter_model.bin")
    with zipfile.ZipFile(src) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(src + ".new", "w") as z:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"w": Evil()}, protocol=2)
            z.writestr(info.filename, data)
    os.replace(src + ".new", src)

    # adapter_model.bin with a member that climbs out of the archive
    d = H.copy_adapter(os.path.join(H.TINY_LORAS, "r8-all-bin"), os.path.join(ROOT, "zipslip"))
    src = os.path.join(d, "adapter_model.bin")
    with zipfile.ZipFile(src) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(src + ".new", "w") as z:
        for name, data in members:
            if name.endswith("data/0"):
                name = "adapter_model/../../../../tmp/lp-zipslip"
            z.writestr(name, data)
    os.replace(src + ".new", src)
    H.copy_adapter(os.path.join(H.TINY_LORAS, "r4-qv"), os.path.join(ROOT, "good"))


def agent():
    global _agent
    if _agent is None:
        _setup()
        _agent = H.Agent("--allowed-local-roots", ROOT, "--max-lora-rank", "32", *H.TINY_ARGS)
    return _agent


def expect(a, method, path, body, status, code=None, admin=True):
    got, obj = a.json(method, path, body, admin=admin)
    assert got == status, f"{method} {path} {str(body)[:120]}: {got} {obj}, want {status}"
    if code is not None:
        assert isinstance(obj, dict) and obj["error"]["code"] == code, obj
    H.assert_healthy(a)
    return obj


@H.test
def classic_path_traversal_out_of_the_root_is_403():
    a = agent()
    for uri in ("file://" + ROOT + "/../outside", "file://" + ROOT + "/good/../../outside"):
        obj = expect(a, "POST", "/v1/loras", {"lora_name": "t", "source": {"uri": uri}}, 403)
        assert "outside the allowed local roots" in obj["error"]["message"], obj
    # file paths are taken literally: '%2e%2e' is a name inside the root
    expect(a, "POST", "/v1/loras",
           {"lora_name": "t", "source": {"uri": "file://" + ROOT + "/%2e%2e/outside"}}, 404,
           "source_not_found")
    expect(a, "GET", "/v1/loras/t", None, 404)


@H.test
def classic_forbidden_pickle_global_is_422():
    a = agent()
    obj = expect(a, "POST", "/v1/loras",
                 {"lora_name": "p", "source": {"uri": "file://" + os.path.join(ROOT, "pickle")}},
                 422)
    assert "global" in obj["error"]["message"], obj


@H.test
def classic_zip_member_with_dotdot_is_422_and_writes_nothing():
    a = agent()
    expect(a, "POST", "/v1/loras",
           {"lora_name": "z", "source": {"uri": "file://" + os.path.join(ROOT, "zipslip")}}, 422)
    assert not os.path.exists("/tmp/lp-zipslip")


@H.test
def classic_lying_content_length_does_not_hang_or_crash():
    a = agent()
    # shorter body than announced, then the client closes its side
    s = socket.create_connection(("127.0.0.1", a.admin_port), timeout=30)
    s.sendall(b"POST /v1/loras HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100000\r\n\r\n{\"lora_name\": \"x\"")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:  # the server answers or closes; a timeout fails the test
        piece = s.recv(65536)
        if not piece:
            break
        data += piece
    s.close()
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:200]
    # longer body than announced: the extra bytes are not a second request
    s = socket.create_connection(("127.0.0.1", a.admin_port), timeout=30)
    body = b'{"lora_name": 5}'
    s.sendall(b"POST /v1/loras HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: " + str(len(body)).encode() +
              b"\r\n\r\n" + body + b"DELETE /v1/loras/good HTTP/1.1\r\n\r\n")
    data = b""
    while True:
        piece = s.recv(65536)
        if not piece:
            break
        data += piece
    s.close()
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert data.count(b"HTTP/1.1") == 1, data
    H.assert_healthy(a)


@H.test
def classic_deep_json_is_400_on_both_ports():
    a = agent()
    deep = b"[" * 100000 + b"]" * 100000
    expect(a, "POST", "/v1/loras", deep, 400)
    expect(a, "POST", "/v1/completions", deep, 400, admin=False)
    expect(a, "POST", "/v1/load_lora_adapter", b'{"lora_name":' + deep + b"}", 400)


@H.test
def classic_wrong_type_fields_are_400():
    a = agent()
    good = "file://" + os.path.join(ROOT, "good")
    cases = [
        {"lora_name": 5, "source": {"uri": good}},
        {"lora_name": "w", "source": good},
        {"lora_name": "w", "source": {"uri": 7}},
        {"lora_name": "w", "source": {"uri": good, "sha256": 1}},
        {"lora_name": "w", "source": {"uri": good}, "load_inplace": "yes"},
        {"lora_name": ["w"], "source": {"uri": good}},
        ["lora_name", "w"],
    ]
    for body in cases:
        expect(a, "POST", "/v1/loras", body, 400)
    for body in ({"lora_name": 5, "lora_path": good[7:]}, {"lora_name": "w", "lora_path": 5}):
        got, obj = a.json("POST", "/v1/load_lora_adapter", body, admin=True)
        assert got == 400, (body, got, obj)
    expect(a, "GET", "/v1/loras/w", None, 404)


@H.test
def classic_invalid_utf8_is_400():
    a = agent()
    good = ("file://" + os.path.join(ROOT, "good")).encode()
    for body in (b'{"lora_name": "caf\xe9", "source": {"uri": "' + good + b'"}}',
                 b'{"lora_name": "x", "source": {"uri": "' + good + b'\xff"}}',
                 b'{"lora_name": "\xc0\xaf", "source": {"uri": "' + good + b'"}}'):
        expect(a, "POST", "/v1/loras", body, 400)
    expect(a, "POST", "/v1/completions", b'{"model": "x", "prompt": "\xed\xa0\x80"}', 400,
           admin=False)


def cleanup():
    failures = H.stop_agent(_agent, "hostile_classic:shutdown")
    if TMP:
        shutil.rmtree(TMP, ignore_errors=True)
    return failures


if __name__ == "__main__":
    H.main("hostile_classic", cleanup)
