#!/usr/bin/env python3
"""Adapters resolved on demand (--lora-resolver), from a file:// directory
and from moto's S3 server: an unknown model that names an adapter there is
loaded and served with the tokens the same adapter gives when loaded
through POST /v1/loras; 16 concurrent first requests make one load; names
that are no adapter names are 404 with nothing fetched; a name that does
not resolve is 404 model_not_found and is answered again from the negative
cache without a source request until its time is over; an invalid adapter
is 422 (cached too); a resolved adapter is listed, described with its
source, unloadable and resolved again afterwards; a file:// prefix outside
--allowed-local-roots and malformed prefixes are refused at startup.
Prints PASS/FAIL lines."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import harness as A

TMP = tempfile.mkdtemp(prefix="lp-resolver-")
ROOT_DIR = os.path.join(TMP, "allowed")  # --allowed-local-roots
LORAS = os.path.join(ROOT_DIR, "loras")  # the resolver's directory
OUTSIDE = os.path.join(TMP, "outside")
NEG_TTL = 4  # seconds: the misses' memory in these agents
# each load waits this long before it starts, so that the concurrent first
# requests surely overlap it (a test hook of the agent)
DELAY = {"LORAPLANE_TEST_RESOLVER_DELAY_MS": "200"}
PROMPT = "Once upon a time"
BODY = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
BAD_NAMES = ("../loras/sql", "a b", ".hidden", "sql/", "x" * 129, "/abs", "team//sql")

_file_agent = None
_s3 = None  # (moto process, url, log lines, condition, agent)
_agents = []


def setup_dirs():
    os.makedirs(LORAS)
    os.makedirs(OUTSIDE)
    for name, src in (("sql", "r8-all"), ("chat", "r4-qv"), ("again", "r16-attn"),
                      ("team/nested", "r4-qv")):
        A.copy_adapter(os.path.join(A.TINY_LORAS, src), os.path.join(LORAS, name))
    A.copy_adapter(os.path.join(A.TINY_LORAS, "r8-all"), os.path.join(ROOT_DIR, "admin-sql"))
    broken = os.path.join(LORAS, "broken")
    os.makedirs(broken)
    with open(os.path.join(broken, "adapter_config.json"), "w") as fh:
        fh.write("{not json")
    A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(OUTSIDE, "r4-qv"))
    # a link inside the resolver's directory to an adapter outside it
    os.symlink(os.path.join(OUTSIDE, "r4-qv"), os.path.join(LORAS, "escape"))


def file_agent():
    global _file_agent
    if _file_agent is None:
        setup_dirs()
        _file_agent = A.Agent("--allowed-local-roots", ROOT_DIR, "--lora-resolver",
                              "file://" + LORAS, "--lora-resolver-negative-ttl", str(NEG_TTL),
                              *A.TINY_ARGS, env=DELAY)
        _agents.append(_file_agent)
    return _file_agent


def complete(agent, model, **extra):
    return agent.json("POST", "/v1/completions", dict(BODY, model=model, **extra))


def count(agent, pattern):
    return len(re.findall(pattern, agent.log(), re.M))


def model_ids(agent):
    status, obj = agent.json("GET", "/v1/models")
    assert status == 200, obj
    return [m["id"] for m in obj["data"]]


def loads(agent):
    return agent.metrics()["loraplane_adapter_loads_total"]


def concurrently(n, fn):
    """fn() on n threads released together; their results in order."""
    barrier = threading.Barrier(n)
    out = [None] * n

    def run(i):
        barrier.wait()
        try:
            out[i] = fn()
        except Exception as e:  # reported by the assertion on the result
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


# ---- file:// ----------------------------------------------------------------


@A.test
def unknown_adapter_is_resolved_and_served():
    a = file_agent()
    assert "sql" not in model_ids(a)
    status, obj = complete(a, "sql")
    assert status == 200, (status, obj)
    assert obj["model"] == "sql", obj
    # the same adapter loaded through the admin API gives the same tokens
    status, got = a.json("POST", "/v1/loras", {"lora_name": "admin-sql", "source": {
        "uri": "file://" + os.path.join(ROOT_DIR, "admin-sql")}}, admin=True)
    assert status == 201, (status, got)
    status, want = complete(a, "admin-sql")
    assert status == 200, (status, want)
    assert obj["choices"][0]["text"] == want["choices"][0]["text"], (obj, want)
    # and it differs from the base model's (the adapter was applied)
    status, base = complete(a, a.base_name())
    assert status == 200 and base["choices"][0]["text"] != obj["choices"][0]["text"], base
    # an ordinary adapter now: listed, described with where it came from
    assert "sql" in model_ids(a)
    status, desc = a.json("GET", "/v1/loras/sql", admin=True)
    assert status == 200, (status, desc)
    assert desc["source"] == "file://" + os.path.realpath(os.path.join(LORAS, "sql")), desc
    assert count(a, r"resolved adapter 'sql' from 'file://") == 1, a.log()[-2000:]
    # chat requests resolve too, names with '/' name subdirectories
    status, obj = a.json("POST", "/v1/chat/completions", {
        "model": "team/nested", "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and obj["model"] == "team/nested", (status, obj)
    assert "team/nested" in model_ids(a)


@A.test
def concurrent_first_requests_share_one_load():
    a = file_agent()
    before = loads(a)
    results = concurrently(16, lambda: complete(a, "chat"))
    texts = set()
    for r in results:
        assert not isinstance(r, Exception), r
        status, obj = r
        assert status == 200, (status, obj)
        texts.add(obj["choices"][0]["text"])
    assert len(texts) == 1, texts
    assert count(a, r"resolving adapter 'chat' ") == 1, a.log()[-3000:]
    assert count(a, r"resolved adapter 'chat' ") == 1, a.log()[-3000:]
    assert count(a, r"cannot resolve adapter 'chat'") == 0, a.log()[-3000:]
    assert loads(a) - before == 1, (before, loads(a))


@A.test
def invalid_names_are_404_without_a_lookup():
    a = file_agent()
    for name in BAD_NAMES:
        status, obj = complete(a, name)
        assert status == 404, (name, status, obj)
        assert obj["error"]["code"] == "model_not_found", obj
        assert obj["error"]["param"] == "model", obj
    assert count(a, r"resolved? adapter '(\.\.|a b|\.hidden|sql/|x{129}|/abs|team//)") == 0, \
        a.log()[-3000:]
    # a link that leads out of the resolver's directory resolves to nothing
    status, obj = complete(a, "escape")
    assert status == 404 and obj["error"]["code"] == "model_not_found", (status, obj)
    assert "escape" not in model_ids(a)


@A.test
def a_miss_is_remembered_for_the_negative_ttl():
    a = file_agent()
    t0 = time.time()
    status, obj = complete(a, "ghost")
    assert status == 404, (status, obj)
    assert obj["error"]["code"] == "model_not_found" and "ghost" in obj["error"]["message"], obj
    assert time.time() - t0 < 5, "a miss must be quick"
    assert count(a, r"cannot resolve adapter 'ghost'") == 1, a.log()[-2000:]
    # the adapter appears now, but the miss is remembered: no second look
    A.copy_adapter(os.path.join(A.TINY_LORAS, "r4-qv"), os.path.join(LORAS, "ghost"))
    status, obj2 = complete(a, "ghost")
    assert (status, obj2) == (404, obj), (status, obj2)
    assert count(a, r"cannot resolve adapter 'ghost'") == 1, a.log()[-2000:]
    assert count(a, r"resolving adapter 'ghost'") == 1, a.log()[-2000:]
    assert time.time() - t0 < NEG_TTL, "the machine was too slow to test the negative cache"
    # once the time is over the name is looked up again and resolves
    deadline = time.time() + NEG_TTL + 30
    while True:
        status, obj = complete(a, "ghost")
        if status == 200:
            break
        assert status == 404 and time.time() < deadline, (status, obj)
        time.sleep(0.2)
    assert time.time() - t0 >= NEG_TTL - 0.5, "resolved before the miss expired"
    assert count(a, r"resolved adapter 'ghost' ") == 1, a.log()[-2000:]


@A.test
def an_invalid_adapter_is_422_and_remembered():
    a = file_agent()
    for _ in range(3):
        status, obj = complete(a, "broken")
        assert status == 422, (status, obj)
        assert obj["error"]["code"] == "invalid_adapter", obj
    assert count(a, r"cannot resolve adapter 'broken'.*\(HTTP 422\); remembered") == 1, \
        a.log()[-2000:]
    A.assert_healthy(a)


@A.test
def a_resolved_adapter_unloads_and_resolves_again():
    a = file_agent()
    status, obj = complete(a, "again")
    assert status == 200, (status, obj)
    first = obj["choices"][0]["text"]
    status, obj = a.json("DELETE", "/v1/loras/again", admin=True)
    assert status == 200, (status, obj)
    assert "again" not in model_ids(a)
    status, obj = a.json("GET", "/v1/loras/again", admin=True)
    assert status == 404, (status, obj)
    status, obj = complete(a, "again")
    assert status == 200 and obj["choices"][0]["text"] == first, (status, obj)
    assert count(a, r"resolved adapter 'again' ") == 2, a.log()[-2000:]
    assert "again" in model_ids(a)


@A.test
def bad_prefixes_are_refused_at_startup():
    if not os.path.isdir(OUTSIDE):
        file_agent()
    cases = [
        (["--allowed-local-roots", ROOT_DIR, "--lora-resolver", "file://" + OUTSIDE],
         "is not below any of the '--allowed-local-roots'"),
        (["--lora-resolver", "file://" + LORAS], "needs '--allowed-local-roots'"),
        (["--allowed-local-roots", ROOT_DIR, "--lora-resolver",
          "file://" + os.path.join(ROOT_DIR, "missing")], "cannot resolve"),
        (["--lora-resolver", "https://example.com/loras"], "needs file:///DIR"),
        (["--lora-resolver", "hf://org/repo"], "must be hf://ORG"),
        (["--lora-resolver", "s3://Bad_Bucket"], "not a bucket name"),
    ]
    for args, want in cases:
        rc, out = A.run_agent_once("--model", A.TINY, "--port", "0", "--admin-port", "0",
                                   *args, timeout=60)
        assert rc == 1, (args, rc, out[-1000:])
        assert want in out, (args, want, out[-1000:])
        assert "listening:" not in out, out[-1000:]  # refused before the ports opened
    rc, out = A.run_agent_once("--model", A.TINY, "--lora-resolver", "s3://abc",
                               "--lora-resolver", "s3://abd", timeout=60)
    assert rc == 2 and "takes one uri prefix" in out, (rc, out[-500:])
    rc, out = A.run_agent_once("--model", A.TINY, "--lora-resolver-negative-ttl", "3",
                               timeout=60)
    assert rc == 2 and "needs '--lora-resolver'" in out, (rc, out[-500:])


# ---- s3:// (moto) ------------------------------------------------------------


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """moto's S3 server (no signature checks) with its request log kept."""
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    env = dict(os.environ)
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", preexec_fn=A._die_with_parent)
    lines, cond = [], threading.Condition()

    def read():
        for line in proc.stdout:
            with cond:
                lines.append(line.rstrip("\n"))
                cond.notify_all()

    threading.Thread(target=read, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url, lines, cond
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


def s3():
    global _s3
    if _s3 is None:
        if not os.path.isdir(LORAS):
            file_agent()
        import boto3
        proc, url, lines, cond = start_moto()
        try:
            client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                                  aws_access_key_id="k", aws_secret_access_key="s")
            client.create_bucket(Bucket="loras")
            src = os.path.join(A.TINY_LORAS, "r8-all")
            for f in sorted(os.listdir(src)):
                with open(os.path.join(src, f), "rb") as fh:
                    client.put_object(Bucket="loras", Key="team/sql/" + f, Body=fh.read())
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("AWS_", "HF_")) and not k.lower().endswith("_proxy")}
            env.update({"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                        "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "NO_PROXY": "*",
                        **DELAY})
            agent = A.Agent("--lora-resolver", "s3://loras/team/", "--lora-cache-dir",
                            os.path.join(TMP, "cache"), *A.TINY_ARGS, env=env)
            _agents.append(agent)
        except BaseException:
            proc.kill()
            raise
        _s3 = (proc, url, lines, cond, agent)
    return _s3


def moto_requests(pattern):
    """moto's logged requests matching pattern, after a marker request
    proves that the requests before it are logged."""
    proc, url, lines, cond, _ = s3()
    marker = f"/moto-api/?marker={time.time_ns()}"
    urllib.request.urlopen(url + marker, timeout=10).read()
    deadline = time.time() + 10
    with cond:
        while not any(marker in line for line in lines):
            assert time.time() < deadline, "moto did not log the marker request"
            cond.wait(0.5)
        return [line for line in lines if re.search(pattern, line)]


@A.test
def s3_concurrent_first_requests_download_once():
    _, _, _, _, a = s3()
    weights = r'"GET /loras/team/sql/adapter_model\.safetensors'
    assert moto_requests(weights) == []
    results = concurrently(16, lambda: complete(a, "sql"))
    texts = set()
    for r in results:
        assert not isinstance(r, Exception), r
        status, obj = r
        assert status == 200, (status, obj)
        texts.add(obj["choices"][0]["text"])
    assert len(texts) == 1, texts
    assert len(moto_requests(weights)) == 1, moto_requests(r"team")
    assert count(a, r"resolving adapter 'sql' ") == 1, a.log()[-3000:]
    assert count(a, r"resolved adapter 'sql' from 's3://loras/team/sql'") == 1, a.log()[-3000:]
    status, desc = a.json("GET", "/v1/loras/sql", admin=True)
    assert status == 200 and desc["source"] == "s3://loras/team/sql", (status, desc)
    # the same tokens as the file:// agent's, where r8-all is 'sql' too
    status, want = complete(file_agent(), "sql")
    assert status == 200 and texts == {want["choices"][0]["text"]}, (texts, want)


@A.test
def s3_invalid_names_fetch_nothing():
    _, _, _, _, a = s3()
    bucket = r'"[A-Z]+ /loras'
    before = moto_requests(bucket)
    for name in BAD_NAMES:
        status, obj = complete(a, name)
        assert status == 404 and obj["error"]["code"] == "model_not_found", (name, status, obj)
    after = moto_requests(bucket)
    assert after == before, after[len(before):]


@A.test
def s3_a_miss_asks_the_source_once():
    _, _, _, _, a = s3()
    ghost = r"ghost"
    for i in range(3):
        status, obj = complete(a, "ghost")
        assert status == 404 and obj["error"]["code"] == "model_not_found", (status, obj)
        if i == 0:
            first = len(moto_requests(ghost))
            assert first >= 1, "the first miss did not ask the source"
    assert len(moto_requests(ghost)) == first, moto_requests(ghost)
    assert count(a, r"cannot resolve adapter 'ghost'") == 1, a.log()[-2000:]


def cleanup():
    failures = 0
    for i, a in enumerate(_agents):
        failures += A.stop_agent(a, f"test-resolver:agent{i}_exit")
    if _s3:
        _s3[0].kill()
    shutil.rmtree(TMP, ignore_errors=True)
    return failures


if __name__ == "__main__":
    A.main("test-resolver", cleanup)
