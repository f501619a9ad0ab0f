#!/usr/bin/env python3
"""loraplane-agent's admin port through curl (a subprocess) and raw HTTP:
/v1/loras (load 201, repeat 200, conflict 409, load_inplace, pins, list,
get, delete with percent-encoded names holding '/'), every refusal with its
status (names, sources outside --allowed-local-roots, missing sources,
invalid adapters), vLLM's load/unload endpoints on the admin port and, only
with --allow-runtime-lora-updating, on the public one, the admin token,
metrics of adapter loads, and HTTPS with a self-signed certificate made by
`openssl req`. Prints one PASS/FAIL line per test."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import harness as A  # noqa: E402

TOKEN = "admin-t0ken"
TMP = tempfile.mkdtemp(prefix="lp-agent-admin-")
ROOT_DIR = os.path.join(TMP, "allowed")  # --allowed-local-roots
OUTSIDE = os.path.join(TMP, "outside")
_agent = None


def setup_dirs():
    os.makedirs(ROOT_DIR)
    os.makedirs(OUTSIDE)
    for name in ("r4-qv", "r8-all", "r16-attn", "r64-mlp", "r8-all-partial"):
        A.copy_adapter(os.path.join(A.TINY_LORAS, name), os.path.join(ROOT_DIR, name))
    A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(OUTSIDE, "r4-qv"))
    # a safetensors file whose header claims more bytes than the file has
    bad = A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(ROOT_DIR, "short"))
    f = os.path.join(bad, "adapter_model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-1000])
    # DoRA is refused
    dora = A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(ROOT_DIR, "dora"))
    cfg = json.load(open(os.path.join(dora, "adapter_config.json")))
    cfg["use_dora"] = True
    json.dump(cfg, open(os.path.join(dora, "adapter_config.json"), "w"))
    # trained on another base model
    other = A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(ROOT_DIR, "other-base"))
    cfg = json.load(open(os.path.join(other, "adapter_config.json")))
    cfg["base_model_name_or_path"] = "Org/Other-Model"
    json.dump(cfg, open(os.path.join(other, "adapter_config.json"), "w"))
    # a link inside the root that points outside it
    os.symlink(os.path.join(OUTSIDE, "r4-qv"), os.path.join(ROOT_DIR, "escape"))
    with open(os.path.join(TMP, "token"), "w") as fh:
        fh.write(TOKEN + "\n")


def agent():
    global _agent
    if _agent is None:
        setup_dirs()
        _agent = A.Agent("--allowed-local-roots", ROOT_DIR, "--admin-token-file",
                         os.path.join(TMP, "token"), "--max-lora-rank", "32", *A.TINY_ARGS)
    return _agent


def curl(method, path, body=None, admin=True, token=TOKEN, extra=()):
    """(status, parsed body) from a real curl process."""
    a = agent()
    args = ["curl", "-sS", "-X", method, "-o", "-", "-w", "\n%{http_code}", *extra]
    if token:
        args += ["-H", "Authorization: Bearer " + token]
    if body is not None:
        args += ["-H", "Content-Type: application/json", "--data-binary",
                 body if isinstance(body, str) else json.dumps(body)]
    args.append(a.url(path, admin=admin))
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"curl failed: {p.stderr}"
    text, _, code = p.stdout.rpartition("\n")
    try:
        obj = json.loads(text) if text else None
    except ValueError:
        obj = text
    return int(code), obj


def uri(*parts):
    return "file://" + os.path.join(*parts)


def load(name, source, sha256=None, inplace=None, token=TOKEN):
    body = {"lora_name": name, "source": {"uri": source}}
    if sha256 is not None:
        body["source"]["sha256"] = sha256
    if inplace is not None:
        body["load_inplace"] = inplace
    return curl("POST", "/v1/loras", body, token=token)


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@A.test
def admin_token_required_except_health():
    a = agent()
    assert "has no token" not in a.log()
    for path in ("/v1/loras", "/metrics", "/ready", "/v1/models"):
        for token in (None, "wrong", TOKEN + "x"):
            status, obj = curl("GET", path, token=token)
            assert status == 401, (path, token, status, obj)
    status, obj = curl("GET", "/health", token=None)
    assert status == 200 and obj == {"status": "ok"}, obj
    status, obj = curl("GET", "/ready")
    assert status == 200 and obj["status"] == "ready", obj
    # the public port takes no admin token and has no admin routes
    status, obj = curl("GET", "/v1/loras", admin=False)
    assert status == 404, (status, obj)


@A.test
def load_201_repeat_200_conflict_409_inplace_201():
    src = os.path.join(ROOT_DIR, "r4-qv")
    status, obj = load("sql", uri(src))
    assert status == 201, (status, obj)
    assert obj["status"] == "success" and obj["lora_name"] == "sql", obj
    assert isinstance(obj["lora_id"], int) and 0 < obj["lora_id"] < 2 ** 31
    assert obj["source"] == uri(src) and obj["rank"] == 4, obj
    assert obj["sha256"] == digest(os.path.join(src, "adapter_model.safetensors")), obj
    assert obj["modules"] == ["q_proj", "v_proj"] and obj["load_ms"] >= 0, obj
    lora_id = obj["lora_id"]
    status, obj = load("sql", uri(src))
    assert status == 200 and obj["lora_id"] == lora_id, (status, obj)
    status, obj = load("sql", uri(src), sha256=digest(os.path.join(src,
                                                                  "adapter_model.safetensors")))
    assert status == 200, (status, obj)
    other = os.path.join(ROOT_DIR, "r8-all")
    status, obj = load("sql", uri(other))
    assert status == 409 and obj["error"]["code"] == "adapter_conflict", (status, obj)
    status, obj = load("sql", uri(other), inplace=False)
    assert status == 409, (status, obj)
    status, obj = load("sql", uri(other), inplace=True)
    assert status == 201 and obj["rank"] == 8 and obj["source"] == uri(other), (status, obj)
    assert obj["lora_id"] == lora_id, "lora_id is a hash of the name"
    # the new weights serve requests
    a = agent()
    r = a.json("POST", "/v1/completions", {"model": "sql", "prompt": "x", "max_tokens": 3})
    assert r[0] == 200, r
    # a plain absolute path is a file:// source too
    status, obj = load("plain", os.path.join(ROOT_DIR, "r16-attn"))
    assert status == 201 and obj["rank"] == 16, (status, obj)


@A.test
def load_ms_prints_at_most_microseconds():
    a = agent()
    src = os.path.join(ROOT_DIR, "r16-attn")
    body = {"lora_name": "timed", "source": {"uri": uri(src)}}
    for method, path, data in (("POST", "/v1/loras", body), ("GET", "/v1/loras/timed", None),
                               ("GET", "/v1/loras", None)):
        status, hdrs, raw = a.request(method, path, data, admin=True, token=TOKEN)
        assert status in (200, 201), (status, raw)
        values = re.findall(rb'"load_ms":([^,}]+)', raw)
        assert values, raw
        for v in values:
            assert re.fullmatch(rb"\d+(\.\d{1,3})?", v), (path, v)
    status, _ = curl("DELETE", "/v1/loras/timed")
    assert status == 200, status


@A.test
def absent_modules_listed_and_logged():
    # r8-all-partial's config targets all seven modules in both layers; its
    # file lacks layer 0's down_proj and layer 1's attention (peft loads it
    # with those modules adding nothing)
    want = json.load(open(os.path.join(A.FIX, "goldens", "lora-tiny-r8-all-partial.json")))
    want = want["absent_modules"]
    assert want == {"q_proj": [1], "k_proj": [1], "v_proj": [1], "o_proj": [1],
                    "down_proj": [0]}, want
    status, obj = load("partial", uri(ROOT_DIR, "r8-all-partial"))
    assert status == 201 and obj["absent_modules"] == want, (status, obj)
    assert len(obj["modules"]) == 7 and obj["rank"] == 8, obj
    a = agent()
    a.wait_log(r"adapter 'partial' from .* has no weights for 5 of the modules its config "
               r"targets .*: q_proj in layer 1; k_proj in layer 1; v_proj in layer 1; "
               r"o_proj in layer 1; down_proj in layer 0")
    status, obj = curl("GET", "/v1/loras/partial")
    assert status == 200 and obj["absent_modules"] == want, obj
    status, obj = curl("GET", "/v1/loras")
    assert obj["loras"]["partial"]["absent_modules"] == want, obj
    r = a.json("POST", "/v1/completions", {"model": "partial", "prompt": "x", "max_tokens": 3})
    assert r[0] == 200, r
    status, obj = load("whole", uri(ROOT_DIR, "r8-all"))
    assert status == 201 and obj["absent_modules"] == {}, obj
    for name in ("partial", "whole"):
        assert curl("DELETE", "/v1/loras/" + name)[0] == 200


@A.test
def base_model_mismatch_names_the_served_model_once():
    status, obj = load("x", uri(ROOT_DIR, "other-base"))
    assert status == 422 and obj["error"]["code"] == "invalid_adapter", (status, obj)
    msg = obj["error"]["message"]
    assert "adapter was trained on base model 'Org/Other-Model'" in msg, msg
    listed = re.search(r"served model \((.*)\)", msg).group(1)
    names = re.findall(r"'([^']*)'", listed)
    assert names and len(names) == len(set(names)), msg


@A.test
def list_get_and_delete_with_encoded_names():
    status, obj = load("team/sql:v2", uri(ROOT_DIR, "r4-qv"))
    assert status == 201, obj
    status, obj = curl("GET", "/v1/loras")
    assert status == 200 and obj["status"] == "success", obj
    assert obj["count"] == len(obj["loras"]) and "team/sql:v2" in obj["loras"], obj
    entry = obj["loras"]["team/sql:v2"]
    assert entry["tier"] in ("device", "host", "disk") and entry["requests_running"] == 0
    assert entry["source"] == uri(ROOT_DIR, "r4-qv") and entry["rank"] == 4, entry
    enc = "/v1/loras/" + urllib.parse.quote("team/sql:v2", safe="")
    status, obj = curl("GET", enc)
    assert status == 200 and obj["lora_name"] == "team/sql:v2", obj
    a = agent()
    models = [m["id"] for m in a.json("GET", "/v1/models")[1]["data"]]
    assert "team/sql:v2" in models, models
    status, obj = curl("DELETE", enc)
    assert status == 200 and obj == {"status": "success", "lora_name": "team/sql:v2"}, obj
    status, obj = curl("DELETE", enc)
    assert status == 404 and obj["error"]["code"] == "adapter_not_found", obj
    status, obj = curl("GET", enc)
    assert status == 404, obj
    models = [m["id"] for m in a.json("GET", "/v1/models")[1]["data"]]
    assert "team/sql:v2" not in models
    status, obj = a.json("POST", "/v1/completions", {"model": "team/sql:v2", "prompt": "x"})
    assert status == 404 and obj["error"]["code"] == "model_not_found", obj
    # an unencoded '/' works as well
    load("a/b", uri(ROOT_DIR, "r4-qv"))
    status, obj = curl("DELETE", "/v1/loras/a/b")
    assert status == 200, obj


@A.test
def refusals_each_with_their_status():
    big = "x" * 129
    cases = [
        ("name with '..'", {"lora_name": "a/../b", "source": {"uri": uri(ROOT_DIR, "r4-qv")}},
         400, "lora_name"),
        ("name '..'", {"lora_name": "..", "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400,
         "lora_name"),
        ("leading '/'", {"lora_name": "/abs", "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400,
         "lora_name"),
        ("space in the name", {"lora_name": "a b", "source": {"uri": uri(ROOT_DIR, "r4-qv")}},
         400, "lora_name"),
        ("empty name", {"lora_name": "", "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400,
         "lora_name"),
        ("129 characters", {"lora_name": big, "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400,
         "lora_name"),
        ("missing name", {"source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400, "lora_name"),
        ("the base model's name", {"lora_name": "tiny-llama",
                                   "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400, "lora_name"),
        ("name not a string", {"lora_name": 5, "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400,
         "lora_name"),
        ("missing source", {"lora_name": "x"}, 400, "source"),
        ("source a string", {"lora_name": "x", "source": uri(ROOT_DIR, "r4-qv")}, 400, "source"),
        ("missing uri", {"lora_name": "x", "source": {}}, 400, "source.uri"),
        ("bad sha256", {"lora_name": "x", "source": {"uri": uri(ROOT_DIR, "r4-qv"),
                                                     "sha256": "abc"}}, 400, "source.sha256"),
        ("load_inplace not a bool", {"lora_name": "x", "load_inplace": "yes",
                                     "source": {"uri": uri(ROOT_DIR, "r4-qv")}}, 400,
         "load_inplace"),
        ("relative path", {"lora_name": "x", "source": {"uri": "file://relative/dir"}}, 400,
         "source.uri"),
        ("unsupported scheme", {"lora_name": "x", "source": {"uri": "ftp://host/x"}}, 400,
         "source.uri"),
        ("file:// outside the allowed roots", {"lora_name": "x",
                                               "source": {"uri": uri(OUTSIDE, "r4-qv")}}, 403,
         "source.uri"),
        ("'..' out of the root", {"lora_name": "x", "source": {
            "uri": uri(ROOT_DIR, "..", "outside", "r4-qv")}}, 403, "source.uri"),
        ("a link out of the root", {"lora_name": "x",
                                    "source": {"uri": uri(ROOT_DIR, "escape")}}, 403,
         "source.uri"),
        ("missing source directory", {"lora_name": "x",
                                      "source": {"uri": uri(ROOT_DIR, "nope")}}, 404,
         "source.uri"),
        ("rank above --max-lora-rank", {"lora_name": "x",
                                        "source": {"uri": uri(ROOT_DIR, "r64-mlp")}}, 422,
         "source.uri"),
        ("header claims more bytes than the file", {"lora_name": "x",
                                                    "source": {"uri": uri(ROOT_DIR, "short")}},
         422, "source.uri"),
        ("DoRA", {"lora_name": "x", "source": {"uri": uri(ROOT_DIR, "dora")}}, 422, "source.uri"),
        ("pin mismatch", {"lora_name": "x", "source": {"uri": uri(ROOT_DIR, "r4-qv"),
                                                       "sha256": "0" * 64}}, 422,
         "source.sha256"),
    ]
    problems = []
    for name, body, status, param in cases:
        got, obj = curl("POST", "/v1/loras", body)
        err = obj.get("error") if isinstance(obj, dict) else None
        if got != status or not err or err.get("param") != param:
            problems.append(f"{name}: {got} {obj} (want {status}, param {param})")
    got, obj = curl("POST", "/v1/loras", '{"lora_name": "x", "source": ')
    if got != 400:
        problems.append(f"truncated JSON: {got} {obj}")
    got, obj = curl("DELETE", "/v1/loras/a%2F..%2Fb")
    if got != 400:
        problems.append(f"delete of a '..' name: {got} {obj}")
    assert not problems, "\n".join(problems)
    _, obj = curl("POST", "/v1/loras", {"lora_name": "x",
                                        "source": {"uri": uri(ROOT_DIR, "r64-mlp")}})
    assert "rank" in obj["error"]["message"] and "32" in obj["error"]["message"], obj
    _, obj = curl("POST", "/v1/loras", {"lora_name": "x",
                                        "source": {"uri": uri(OUTSIDE, "r4-qv")}})
    assert "allowed local roots" in obj["error"]["message"], obj
    _, obj = curl("POST", "/v1/loras", {"lora_name": "x", "source": {"uri": uri(ROOT_DIR, "dora")}})
    assert "dora" in obj["error"]["message"].lower(), obj
    assert agent().serving()


@A.test
def vllm_endpoints_on_the_admin_port_with_vllm_codes():
    a = agent()
    path = os.path.join(ROOT_DIR, "r8-all")
    status, obj = curl("POST", "/v1/load_lora_adapter", {"lora_name": "v1", "lora_path": path})
    assert status == 200 and obj == "Success: LoRA adapter 'v1' added successfully.", (status, obj)
    status, obj = curl("POST", "/v1/load_lora_adapter", {"lora_name": "v1", "lora_path": path})
    assert status == 400 and "already been loaded" in obj["error"]["message"], (status, obj)
    status, obj = curl("POST", "/v1/load_lora_adapter",
                       {"lora_name": "v1", "lora_path": os.path.join(ROOT_DIR, "r4-qv"),
                        "load_inplace": True})
    assert status == 200, (status, obj)
    assert curl("GET", "/v1/loras/v1")[1]["rank"] == 4
    status, obj = curl("POST", "/v1/load_lora_adapter", {"lora_name": "v2"})
    assert status == 400 and "must be provided" in obj["error"]["message"], obj
    status, obj = curl("POST", "/v1/load_lora_adapter",
                       {"lora_name": "v2", "lora_path": os.path.join(ROOT_DIR, "missing")})
    assert status == 404 and obj["error"]["type"] == "NotFoundError", obj
    status, obj = curl("POST", "/v1/load_lora_adapter",
                       {"lora_name": "v2", "lora_path": os.path.join(ROOT_DIR, "r64-mlp")})
    assert status == 400 and obj["error"]["code"] == 400, obj
    r = a.json("POST", "/v1/completions", {"model": "v1", "prompt": "x", "max_tokens": 2})
    assert r[0] == 200, r
    status, obj = curl("POST", "/v1/unload_lora_adapter", {"lora_name": "v1"})
    assert status == 200 and obj == "Success: LoRA adapter 'v1' removed successfully.", obj
    status, obj = curl("POST", "/v1/unload_lora_adapter", {"lora_name": "v1"})
    assert status == 404 and obj["error"]["type"] == "NotFoundError", obj
    status, obj = curl("POST", "/v1/unload_lora_adapter", {})
    assert status == 400, obj
    # not on the public port without the flag
    for p in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        status, obj = curl("POST", p, {"lora_name": "v3", "lora_path": path}, admin=False)
        assert status == 404, (p, status, obj)
    assert "v3" not in [m["id"] for m in a.json("GET", "/v1/models")[1]["data"]]


@A.test
def runtime_lora_updating_opens_the_public_port():
    with A.Agent("--allowed-local-roots", ROOT_DIR, *A.TINY_ARGS,
                 env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}) as a:
        body = {"lora_name": "pub", "lora_path": os.path.join(ROOT_DIR, "r4-qv")}
        status, _, data = a.request("POST", "/v1/load_lora_adapter", body)
        assert status == 200 and b"added successfully" in data, (status, data)
        r = a.client().completions.create(model="pub", prompt="x", max_tokens=2)
        assert r.model == "pub"
        status, _, data = a.request("POST", "/v1/unload_lora_adapter", {"lora_name": "pub"})
        assert status == 200, data
        status, _, data = a.request("POST", "/v1/loras", {"lora_name": "x"})
        assert status == 404, "the admin API stays on the admin port"
    # without allowed roots, file:// loads through the API are refused
    with A.Agent(*A.TINY_ARGS, "--allow-runtime-lora-updating") as a:
        body = {"lora_name": "pub", "lora_path": os.path.join(ROOT_DIR, "r4-qv")}
        status, _, data = a.request("POST", "/v1/load_lora_adapter", body)
        assert status == 400 and b"no allowed local roots" in data, (status, data)
        status, obj = a.json("POST", "/v1/loras", {"lora_name": "x", "source": {
            "uri": uri(ROOT_DIR, "r4-qv")}}, admin=True)
        assert status == 403, (status, obj)


@A.test
def metrics_count_adapter_loads_and_tiers():
    a = agent()
    m = a.metrics(token=TOKEN)
    assert m["loraplane_adapter_loads_total"] >= 5, m
    assert m["loraplane_adapter_unloads_total"] >= 3, m
    loaded = curl("GET", "/v1/loras")[1]["count"]
    assert sum(v for k, v in m.items() if k.startswith("loraplane_adapters{")) == loaded


@A.test
def https_on_both_ports_with_a_self_signed_certificate():
    d = os.path.join(TMP, "tls")
    os.makedirs(d)
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", cert], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    with A.Agent("--tls-cert", cert, "--tls-key", key, *A.TINY_ARGS, tls_ca=cert) as a:
        assert a.scheme == "https", a.log()
        for admin, path in ((False, "/v1/models"), (True, "/v1/loras")):
            p = subprocess.run(["curl", "-sS", "--cacert", cert, a.url(path, admin=admin)],
                               capture_output=True, text=True, timeout=60)
            assert p.returncode == 0 and json.loads(p.stdout), (p.returncode, p.stderr)
        status, obj = a.json("POST", "/v1/completions",
                             {"model": "tiny-llama", "prompt": "x", "max_tokens": 3,
                              "stream": True})
        assert status == 200
        # the certificate is checked: without the CA curl refuses
        p = subprocess.run(["curl", "-sS", a.url("/health")], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode != 0
        # and plain HTTP gets no answer
        p = subprocess.run(["curl", "-sS", "-m", "5",
                            f"http://127.0.0.1:{a.port}/health"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode != 0 or "ok" not in p.stdout, p.stdout
    # a key without its certificate is a usage error
    rc, out = A.run_agent_once("--model", A.TINY, "--tls-key", key)
    assert rc == 2 and "go together" in out, out
    rc, out = A.run_agent_once("--model", A.TINY, "--port", "0", "--admin-port", "0",
                               *A.TINY_ARGS, "--tls-cert", cert, "--tls-key", "/nonexistent")
    assert rc == 1 and "/nonexistent" in out, out


if __name__ == "__main__":
    failed = 0
    try:
        failed = A.run_tests("test-agent-admin")
    finally:
        if _agent is not None:
            failed += A.stop_agent(_agent, "test-agent-admin:shutdown")
        shutil.rmtree(TMP, ignore_errors=True)
    sys.exit(1 if failed else 0)
