#!/usr/bin/env python3
"""Adapters from S3 through the agent's management API, against moto's S3
server with signature checking on: a load from a bucket serves the same
tokens as the adapter loaded from disk, wrong credentials are refused with
S3's 403 passed through, and a missing prefix is a 404.

Reuses test-agent.py's Agent and test-sources.py's moto helpers. Prints
PASS/FAIL lines."""

import importlib.util
import json
import os
import sys
import tempfile
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name, file):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


import harness as at  # noqa: E402
st = load("source_tests", "test-sources.py")

ADAPTER = os.path.join(at.TINY_LORAS, "r8-all")
PROMPT = "Once upon a time"


def setup_bucket(url):
    import boto3
    setup = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="agent")
    iam.put_user_policy(UserName="agent", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="agent")["AccessKey"]
    s3 = boto3.client("s3", **setup)
    # the adapter at the root of its bucket: moto checks a signature against
    # the query as its web framework re-encodes it, so a listing prefix with
    # '/' fails its check although S3 accepts it (see test-sources.py)
    s3.create_bucket(Bucket="lora-sql")
    for f in sorted(os.listdir(ADAPTER)):
        with open(os.path.join(ADAPTER, f), "rb") as fh:
            s3.put_object(Bucket="lora-sql", Key=f, Body=fh.read())
    moto_auth(url, True)
    return key["AccessKeyId"], key["SecretAccessKey"]


def moto_auth(url, on):
    """Signatures and permissions checked (on) or not (off)."""
    req = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0" if on else b"inf",
                                 method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


def s3_env(url, key_id, secret):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "HF_")) and not k.lower().endswith("_proxy")}
    env.update({"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "NO_PROXY": "*"})
    return env


def main():
    failures = 0
    moto, url = st.start_moto()
    agents = []

    def check(name, fn):
        nonlocal failures
        try:
            fn()
            print(f"PASS test-agent-s3:{name}", flush=True)
        except AssertionError as e:
            failures += 1
            print(f"FAIL test-agent-s3:{name}: {e}", flush=True)
        except Exception as e:
            failures += 1
            print(f"FAIL test-agent-s3:{name}: {type(e).__name__}: {e}", flush=True)

    try:
        key_id, secret = setup_bucket(url)
        cache = tempfile.mkdtemp(prefix="lp-s3-cache-")

        def load_from_bucket():
            a = at.Agent(*at.TINY_ARGS, "--lora-cache-dir", cache, env=s3_env(url, key_id, secret))
            agents.append(a)
            status, obj = a.json("POST", "/v1/loras",
                                 {"lora_name": "sql", "source": {"uri": "s3://lora-sql"}},
                                 admin=True)
            assert status == 201, (status, obj)
            assert obj["source"] == "s3://lora-sql", obj
            status, obj = a.json("POST", "/v1/completions",
                                 {"model": "sql", "prompt": PROMPT, "max_tokens": 16,
                                  "temperature": 0, "ignore_eos": True})
            assert status == 200, (status, obj)
            want = at.generate_text(at.TINY, PROMPT, adapter="sql", adapter_dir=ADAPTER,
                                    max_tokens=16, extra=["--ignore-eos"])
            assert obj["choices"][0]["text"] == want["completion"], (obj, want)
            # a missing prefix is not found (signature checks off: see above)
            moto_auth(url, False)
            try:
                status, obj = a.json("POST", "/v1/loras",
                                     {"lora_name": "none", "source": {"uri": "s3://lora-sql/none"}},
                                     admin=True)
            finally:
                moto_auth(url, True)
            assert status == 404, (status, obj)

        def wrong_credentials_refused():
            a = at.Agent(*at.TINY_ARGS, "--lora-cache-dir", tempfile.mkdtemp(prefix="lp-s3-"),
                         env=s3_env(url, key_id, "not-the-secret"))
            agents.append(a)
            status, obj = a.json("POST", "/v1/loras",
                                 {"lora_name": "sql", "source": {"uri": "s3://lora-sql"}},
                                 admin=True)
            assert status == 403, (status, obj)
            msg = json.dumps(obj)
            assert "403" in msg or "SignatureDoesNotMatch" in msg, msg
            assert a.serving()

        def credentials_in_the_request():
            # an agent with no AWS variables at all: the load carries them
            # (what the operator sends from a LoraAdapter's secretRef)
            env = {k: v for k, v in s3_env(url, "x", "x").items() if not k.startswith("AWS_")}
            # moto is plain http: an endpoint from a request needs the flag
            a = at.Agent(*at.TINY_ARGS, "--lora-cache-dir", tempfile.mkdtemp(prefix="lp-s3-"),
                         "--allow-insecure-source-endpoints", env=env)
            agents.append(a)
            creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret,
                     "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": url}

            def load(name, credentials):
                return a.json("POST", "/v1/loras", {"lora_name": name, "source": {
                    "uri": "s3://lora-sql", "credentials": credentials}}, admin=True)

            # without: the default endpoint is AWS's, unreachable here
            status, obj = a.json("POST", "/v1/loras",
                                 {"lora_name": "sql", "source": {"uri": "s3://lora-sql"}},
                                 admin=True)
            assert status in (403, 502), (status, obj)
            # bad credentials objects, each with its message
            for bad, what in (([1], "must be an object"),
                              ({"AWS_SECRET_KEY": "x"}, "'AWS_SECRET_KEY'"),
                              ({"AWS_REGION": 3}, "AWS_REGION' must be a string")):
                status, obj = load("sql", bad)
                assert status == 400 and what in obj["error"]["message"], (bad, status, obj)
            status, obj = load("sql", {"AWS_ACCESS_KEY_ID": key_id, "AWS_ENDPOINT_URL": url})
            assert status == 400 and "together" in obj["error"]["message"], (status, obj)
            assert obj["error"]["param"] == "source.credentials", obj
            # wrong secret: S3's refusal
            status, obj = load("sql", dict(creds, AWS_SECRET_ACCESS_KEY="not-the-secret"))
            assert status == 403, (status, obj)
            # right ones: loaded and serving
            status, obj = load("sql", creds)
            assert status == 201, (status, obj)
            status, obj = a.json("POST", "/v1/completions",
                                 {"model": "sql", "prompt": PROMPT, "max_tokens": 4})
            assert status == 200, (status, obj)
            # the secret is nowhere to be read back: not in the adapter's
            # description, not in the log
            status, listing = a.json("GET", "/v1/loras", admin=True)
            assert status == 200 and secret not in json.dumps(listing), listing
            assert secret not in a.log() and key_id not in a.log(), a.log()[-2000:]
            assert a.serving()

        check("load_from_bucket_serves_the_adapters_tokens", load_from_bucket)
        check("wrong_credentials_give_s3s_403", wrong_credentials_refused)
        check("credentials_in_the_load_request", credentials_in_the_request)
    finally:
        for a in agents:
            a.kill()
        moto.kill()
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
