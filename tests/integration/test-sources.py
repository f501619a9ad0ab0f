#!/usr/bin/env python3
"""Adapter sources against real servers: moto's S3 server (with IAM
authentication switched on, so every SigV4 signature is verified), a fake
Hugging Face hub with a CDN it redirects to, and an HTTPS server with a
self-signed certificate. Drives tests/integration/source-fetch.c (the
Makefile's $(BUILD)/tests/integration/source-fetch, built with make when
missing), which prints one JSON line per fetch. Prints one PASS/FAIL line
per test (counted by tests/run.sh)."""

import hashlib
import http.server
import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from harness import run_tests, test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
BUILD = os.environ.get("BUILD", "build")
TMP = tempfile.mkdtemp(prefix="lp-sources-")
DRIVER = os.path.join(BUILD, "tests", "integration", "source-fetch")

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(data):
    return hashlib.sha256(data).hexdigest()


def make_adapter_files(seed, weights_size):
    """A PEFT-shaped adapter: the sources module copies bytes and never
    parses them, so random weights are enough."""
    rnd = hashlib.sha256(seed.encode()).digest()
    weights = (rnd * (weights_size // len(rnd) + 1))[:weights_size]
    weights = bytes((b + i * 7) & 0xFF for i, b in enumerate(weights))
    config = json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "seed": seed}).encode()
    return {"adapter_config.json": config, "adapter_model.safetensors": weights}


PEFT = make_adapter_files("peft", 80_000)
PEFT_V1 = make_adapter_files("peft-v1", 60_000)
TRTLLM = {"model.lora_config.npy": b"\x93NUMPY cfg" + bytes(200),
          "model.lora_weights.npy": b"\x93NUMPY w" + bytes(range(256)) * 300}
NEMO = b"nemo-tar" + bytes(range(256)) * 150


# ---------------------------------------------------------------- servers

class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up mid-body (size limits) are expected


def start(handler, tls=None):
    srv = Server(("127.0.0.1", 0), handler)
    if tls:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class Recorder:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []  # (path, authorization header or None)

    def add(self, path, auth):
        with self.lock:
            self.requests.append((path, auth))

    def count(self, suffix):
        with self.lock:
            return sum(1 for p, _ in self.requests if p.endswith(suffix))

    def clear(self):
        with self.lock:
            self.requests.clear()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", headers=None, length=True):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if not length:
            self.close_connection = True


# --- the fake hub and its CDN

HUB = Recorder()
CDN = Recorder()
HF_TOKEN = "hf_test_token_123"
CDN_BLOBS = {}
HUB_REPOS = {
    # repo -> (private, {revision: {file: bytes}})
    "team/sql-lora": (False, {"main": {**PEFT, "README.md": b"# readme\n"}}),
    "team/private-lora": (True, {"main": PEFT, "v1": {**PEFT_V1, ".gitattributes": b"*\n"}}),
    "team/docs-only": (False, {"main": {"README.md": b"nothing here\n"}}),
    "team/nemo-lora": (False, {"main": {"sql.nemo": NEMO, "README.md": b"x"}}),
    "solo": (False, {"refs/pr/1": TRTLLM}),
}


class HubHandler(Handler):
    def do_GET(self):
        auth = self.headers.get("Authorization")
        HUB.add(self.path, auth)
        path = urllib.request.unquote(self.path)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            repo, _, rev = rest.partition("/revision/")
            files = self.lookup(repo, rev, auth)
            if files is None:
                return
            body = {"id": repo, "sha": "0" * 40,
                    "siblings": [{"rfilename": n} for n in sorted(files)]}
            return self.send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        if "/resolve/" in path:
            repo, _, rest = path[1:].partition("/resolve/")
            for rev in sorted({r for _, revs in HUB_REPOS.values() for r in revs}, key=len,
                              reverse=True):
                if rest.startswith(rev + "/"):
                    files = self.lookup(repo, rev, auth)
                    if files is None:
                        return
                    name = rest[len(rev) + 1:]
                    if name not in files:
                        return self.send(404, b'{"error":"Entry not found"}',
                                         {"X-Error-Code": "EntryNotFound"})
                    if name.endswith(".safetensors"):
                        # large files live on the CDN, like the real hub's
                        key = sha(files[name])
                        CDN_BLOBS[key] = files[name]
                        cdn = getattr(self.server, "cdn_url", None) or CDN_URL
                        return self.send(302, b"", {"Location": f"{cdn}/blobs/{key}"})
                    return self.send(200, files[name])
            return self.send(404, b'{"error":"Revision not found"}')
        self.send(404, b"not found")

    def lookup(self, repo, rev, auth):
        if repo not in HUB_REPOS:
            self.send(404, b'{"error":"Repository not found"}',
                      {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        private, revs = HUB_REPOS[repo]
        if private and auth != f"Bearer {HF_TOKEN}":
            self.send(401, b'{"error":"Invalid credentials in Authorization header"}',
                      {"X-Error-Message": "Invalid credentials in Authorization header"})
            return None
        if rev not in revs:
            self.send(404, b'{"error":"Invalid rev id"}',
                      {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return None
        return revs[rev]


class CdnHandler(Handler):
    def do_GET(self):
        CDN.add(self.path, self.headers.get("Authorization"))
        key = self.path.rsplit("/", 1)[-1]
        if key in CDN_BLOBS:
            return self.send(200, CDN_BLOBS[key])
        self.send(404, b"no such blob")


TLS_CDN = Recorder()


class TlsCdnHandler(CdnHandler):
    def do_GET(self):
        TLS_CDN.add(self.path, self.headers.get("Authorization"))
        key = self.path.rsplit("/", 1)[-1]
        if key in CDN_BLOBS:
            return self.send(200, CDN_BLOBS[key])
        self.send(404, b"no such blob")


# --- the HTTPS file server

WEB = Recorder()
WEB_FILES = {
    "/adapters/sql/": PEFT,
    "/adapters/trt/": TRTLLM,
    "/adapters/bin-only/": {"adapter_config.json": PEFT["adapter_config.json"],
                            "adapter_model.bin": b"PK\x03\x04" + bytes(5000)},
    "/adapters/config-only/": {"adapter_config.json": PEFT["adapter_config.json"]},
    "/flaky/sql/": PEFT,
    "/ratelimited/sql/": PEFT,
    "/slow/sql/": PEFT,
    "/nolength/sql/": PEFT,
    "/down/sql/": PEFT,
    "/changing/sql/": dict(PEFT),
    "/dl/": {"sql.nemo": NEMO},
    "/lru/a/": make_adapter_files("lru-a", 50_000),
    "/lru/b/": make_adapter_files("lru-b", 50_000),
    "/lru/c/": make_adapter_files("lru-c", 50_000),
}
WEB_FAILS = {}  # path -> failures left


class WebHandler(Handler):
    def do_GET(self):
        WEB.add(self.path, self.headers.get("Authorization"))
        path = urllib.request.unquote(self.path)
        d, _, name = path.rpartition("/")
        d += "/"
        if d.startswith("/down/"):
            return self.send(503, b"service unavailable")
        if d.startswith("/flaky/") or d.startswith("/ratelimited/"):
            with WEB.lock:
                left = WEB_FAILS.setdefault(path, 2 if d.startswith("/flaky/") else 1)
                WEB_FAILS[path] = left - 1
            if left > 0:
                if d.startswith("/flaky/"):
                    return self.send(503, b"try later")
                return self.send(429, b"slow down", {"Retry-After": "1"})
        if d.startswith("/slow/"):
            time.sleep(0.4)
        files = WEB_FILES.get(d)
        if files is None or name not in files:
            return self.send(404, b"<html>404 Not Found</html>")
        self.send(200, files[name], length=not d.startswith("/nolength/"))


# ---------------------------------------------------------------- setup

def build_driver():
    """`make test` builds the driver with the build's own flags (the
    sanitizers of `make asan` too); run alone, this asks make for it."""
    if os.path.exists(DRIVER):
        return
    p = subprocess.run(["make", "--no-print-directory", f"BUILD={BUILD}",
                        f"BIN={os.environ.get('BIN', 'bin')}", DRIVER],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"cannot build {DRIVER}:\n" + p.stdout + p.stderr)


def make_cert():
    key, crt = os.path.join(TMP, "key.pem"), os.path.join(TMP, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    return ctx, crt


def start_moto():
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    env = dict(os.environ)
    env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited")
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


# Bucket "flat-lora": an adapter at the bucket's root, fetched while moto
# verifies signatures. Moto checks a signature against the URL as its web
# framework re-encodes it (query decoded, "%2B" and "%28" turned back into
# "+" and "(") where S3 uses the URL as sent, so boto3's own requests fail
# there too for such keys and prefixes: here keys only need "%20" and no
# listing query needs encoding. Keys with '+', '(', '=' and '&' are fetched
# from bucket "loras" with the check off.
FLAT_FILES = {
    **PEFT,
    "notes on v1.txt": b"a key with spaces\n",
    "sub dir/extra.json": b"{}",
}

S3_FILES = {
    "team/sql/adapter_config.json": PEFT["adapter_config.json"],
    "team/sql/adapter_model.safetensors": PEFT["adapter_model.safetensors"],
    "team/sql/extra dir/notes +1 (draft).txt": b"keys with spaces, plus and parens\n",
    "team/sql/sub/a=b&c.json": b"{}",
    "team/sql-other/adapter_config.json": b"{\"not\": \"this one\"}",
    "team/folder-marker/": b"",
    "team/folder-marker/adapter_config.json": PEFT["adapter_config.json"],
    "team/folder-marker/adapter_model.safetensors": PEFT["adapter_model.safetensors"],
    "nemo/sql.nemo": NEMO,
}


def setup_s3(url):
    import boto3
    setup = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="setup",
                 aws_secret_access_key="setup")
    iam = boto3.client("iam", **setup)
    iam.create_user(UserName="loader")
    iam.put_user_policy(UserName="loader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="loader")["AccessKey"]
    # temporary credentials with a session token, as pods get them
    role = iam.create_role(RoleName="lora-reader", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": "sts:AssumeRole"}]}))["Role"]
    iam.put_role_policy(RoleName="lora-reader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    sts = boto3.client("sts", **setup)
    temp = sts.assume_role(RoleArn=role["Arn"], RoleSessionName="agent")["Credentials"]
    TEMP_CREDS.update({"AWS_ACCESS_KEY_ID": temp["AccessKeyId"],
                       "AWS_SECRET_ACCESS_KEY": temp["SecretAccessKey"],
                       "AWS_SESSION_TOKEN": temp["SessionToken"]})
    s3 = boto3.client("s3", **setup)
    s3.create_bucket(Bucket="loras")
    for k, v in S3_FILES.items():
        s3.put_object(Bucket="loras", Key=k, Body=v)
    s3.create_bucket(Bucket="public-lora")
    for k, v in PEFT.items():
        s3.put_object(Bucket="public-lora", Key="sql/" + k, Body=v, ACL="public-read")
    s3.create_bucket(Bucket="flat-lora")
    for k, v in FLAT_FILES.items():
        s3.put_object(Bucket="flat-lora", Key=k, Body=v)
    return key["AccessKeyId"], key["SecretAccessKey"]


def moto_auth(on):
    """Makes moto check every request's signature and permissions (on), or
    none (off)."""
    req = urllib.request.Request(MOTO_URL + "/moto-api/reset-auth", data=b"0" if on else b"inf",
                                 method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).read()


# ---------------------------------------------------------------- driver

BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith(("AWS_", "HF_", "CURL_"))}
BASE_ENV["NO_PROXY"] = "*"


def fetch(*uris, cache=None, env=None, args=(), timeout=120):
    """Runs the driver; returns the list of result objects."""
    if cache is None:
        cache = tempfile.mkdtemp(dir=TMP, prefix="cache-")
    e = dict(BASE_ENV)
    e.update(S3_ENV)
    e.update(HUB_ENV)
    e["CURL_CA_BUNDLE"] = CERT
    e.update(env or {})
    e = {k: v for k, v in e.items() if v is not None}
    p = subprocess.run([DRIVER, "--cache", cache, "--backoff-ms", "50", *args, *uris],
                       capture_output=True, text=True, env=e, timeout=timeout)
    assert "AddressSanitizer" not in p.stderr and "runtime error" not in p.stderr, p.stderr
    assert p.returncode == 0, f"driver exited {p.returncode}: {p.stderr}"
    return [json.loads(line) for line in p.stdout.splitlines()]


def one(*uris, **kw):
    r = fetch(*uris, **kw)
    assert len(r) == 1, r
    return r[0]


def ok(r):
    assert r["rc"] == 0, f"{r['uri']}: {r['code']}: {r['error']}"
    return r


def fails(r, code, *needles):
    assert r["code"] == code, f"{r['uri']}: expected {code}, got {r['code']}: {r['error']}"
    for n in needles:
        assert n in r["error"], f"{r['uri']}: '{n}' not in error '{r['error']}'"
    assert r["path"] == "", r
    return r


def local_files(path):
    out = {}
    for d, _, names in os.walk(path):
        for n in names:
            full = os.path.join(d, n)
            rel = os.path.relpath(full, path)
            if rel != ".loraplane-source.json":
                out[rel] = open(full, "rb").read()
    return out


def entries(cache):
    return sorted(os.listdir(cache))


# ---------------------------------------------------------------- tests

@test
def s3_signatures_verified_by_server():
    moto_auth(True)
    try:
        # one object per listing page: continuation tokens are signed too
        r = ok(one("s3://flat-lora", args=["--page", "1"]))
        assert local_files(r["path"]) == FLAT_FILES, sorted(local_files(r["path"]))
        assert r["sha256"] == sha(PEFT["adapter_model.safetensors"])
        r = fails(one("s3://flat-lora", env={"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG1"}),
                  "EACCES", "403", "InvalidAccessKeyId", "s3://flat-lora")
        assert r["http_status"] == 403
        r = fails(one("s3://flat-lora", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
                  "EACCES", "403", "SignatureDoesNotMatch")
        assert r["http_status"] == 403
        # temporary credentials: the session token is sent and signed
        r = ok(one("s3://flat-lora", env=TEMP_CREDS))
        assert local_files(r["path"]) == FLAT_FILES
        fails(one("s3://flat-lora", env={**TEMP_CREDS, "AWS_SESSION_TOKEN": None}), "EACCES",
              "403")
    finally:
        moto_auth(False)


def cred_args(creds, flag="--cred"):
    out = []
    for k, v in creds.items():
        out += [flag, f"{k}={v}"]
    return out


@test
def credentials_of_one_fetch_replace_the_environment():
    moto_auth(True)
    try:
        keys = {k: S3_ENV[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        # no AWS_ variable at all: the fetch's own credentials and endpoint
        bare = {k: None for k in S3_ENV}
        r = ok(one("s3://flat-lora", env=bare, args=["--allow-insecure-endpoints", *cred_args(
            {**keys, "AWS_ENDPOINT_URL": MOTO_URL, "AWS_REGION": "us-east-1"})]))
        assert local_files(r["path"]) == FLAT_FILES
        # they win over the environment's, both ways
        ok(one("s3://flat-lora", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
               args=cred_args(keys)))
        fails(one("s3://flat-lora", args=cred_args({**keys, "AWS_SECRET_ACCESS_KEY": "nope"})),
              "EACCES", "SignatureDoesNotMatch")
        # temporary credentials; the environment's session token is not
        # mixed with the request's keys
        ok(one("s3://flat-lora", args=cred_args(TEMP_CREDS)))
        fails(one("s3://flat-lora", env=TEMP_CREDS, args=cred_args(
            {k: TEMP_CREDS[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})),
            "EACCES", "403")
        # half a key pair, a token without keys, control characters
        fails(one("s3://flat-lora", args=["--cred", "AWS_ACCESS_KEY_ID=x"]), "EINVAL",
              "together")
        fails(one("s3://flat-lora", args=["--cred", "AWS_SESSION_TOKEN=x"]), "EINVAL",
              "AWS_SESSION_TOKEN")
        fails(one("s3://flat-lora", args=cred_args({**keys, "AWS_REGION": "eu west"})),
              "EINVAL", "region")
    finally:
        moto_auth(False)
    # the hub's token
    HUB.clear()
    ok(one("hf://team/private-lora@v1", args=["--cred", f"HF_TOKEN={HF_TOKEN}"]))
    with HUB.lock:
        assert all(a == f"Bearer {HF_TOKEN}" for _, a in HUB.requests), HUB.requests
    fails(one("hf://team/private-lora@v1", env={"HF_TOKEN": HF_TOKEN},
              args=["--cred", "HF_TOKEN=wrong"]), "EACCES")


@test
def joined_download_refused_is_retried_with_own_credentials():
    # two fetches of one URI at once, thread 0 with a wrong token: whichever
    # leads, the one with the right token gets the adapter
    for _ in range(4):
        r = fetch("hf://team/private-lora@v1", args=[
            "--threads", "2", "--cred", f"HF_TOKEN={HF_TOKEN}", "--cred-thread0", "HF_TOKEN=wrong"])
        assert len(r) == 2, r
        ok(r[1])
        assert local_files(r[1]["path"]) == PEFT_V1
        assert r[0]["code"] in ("OK", "EACCES"), r[0]


@test
def s3_directory_is_byte_identical():
    cache = tempfile.mkdtemp(dir=TMP)
    r = ok(one("s3://loras/team/sql", cache=cache))
    want = {k[len("team/sql/"):]: v for k, v in S3_FILES.items() if k.startswith("team/sql/")}
    assert local_files(r["path"]) == want, sorted(local_files(r["path"]))
    assert r["sha256"] == sha(PEFT["adapter_model.safetensors"])
    assert r["files"] == 4 and not r["from_cache"] and not r["joined"]
    assert r["bytes_downloaded"] == sum(len(v) for v in want.values())
    assert r["progress_done"] == r["bytes_downloaded"] == r["progress_total"]
    assert r["progress_monotonic"] and r["progress_calls"] >= 1
    # <cache>/s3-<32 hex of sha256(uri)>, and nothing else left behind
    name = "s3-" + sha(b"s3://loras/team/sql")[:32]
    assert r["path"] == os.path.join(os.path.realpath(cache), name), r["path"]
    assert entries(cache) == [name], entries(cache)


@test
def s3_anonymous_without_credentials():
    # no AWS_ACCESS_KEY_ID: unsigned requests, fine for public objects only
    anon = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    r = ok(one("s3://public-lora/sql/", env=anon))
    assert local_files(r["path"]) == PEFT
    r = fails(one("s3://loras/team/sql", env=anon), "EACCES", "403",
              "s3://loras/team/sql/adapter_config.json")
    assert r["http_status"] == 403
    # half a key pair is a configuration error when the cache is created
    e = {**BASE_ENV, **S3_ENV}
    del e["AWS_SECRET_ACCESS_KEY"]
    p = subprocess.run([DRIVER, "--cache", tempfile.mkdtemp(dir=TMP), "s3://loras/team/sql"],
                       capture_output=True, text=True, env=e, timeout=60)
    assert p.returncode == 2 and "must be set together" in p.stderr, (p.returncode, p.stderr)


@test
def s3_listing_follows_continuation_tokens():
    r = ok(one("s3://loras/team/sql/", args=["--page", "1"]))
    assert r["files"] == 4, r
    assert local_files(r["path"])["sub/a=b&c.json"] == b"{}"


@test
def s3_folder_markers_skipped_and_single_object():
    r = ok(one("s3://loras/team/folder-marker"))
    assert sorted(local_files(r["path"])) == sorted(PEFT)
    r = ok(one("s3://loras/nemo/sql.nemo"))
    assert r["path"].endswith("/sql.nemo") and open(r["path"], "rb").read() == NEMO
    assert r["sha256"] == sha(NEMO)


@test
def s3_missing_prefix_or_bucket_is_not_found():
    fails(one("s3://loras/team/nothing-here/"), "ENOENT", "no objects under s3://loras/team/nothing-here/")
    # "team/sq" must not match team/sql/... or team/sql-other/...
    fails(one("s3://loras/team/sq"), "ENOENT")
    r = fails(one("s3://no-such-bucket/x"), "ENOENT", "NoSuchBucket")
    assert r["http_status"] == 404


@test
def s3_limits():
    fails(one("s3://loras/team/sql", args=["--max-files", "3"]), "EFBIG", "4 objects")
    fails(one("s3://loras/team/sql", args=["--max-file-bytes", "10000"]), "EFBIG",
          "adapter_model.safetensors")
    fails(one("s3://loras/team/sql", args=["--max-total-bytes", "50000"]), "EFBIG")


@test
def hf_revision_with_token():
    HUB.clear()
    CDN.clear()
    r = ok(one("hf://team/private-lora@v1", env={"HF_TOKEN": HF_TOKEN}))
    assert local_files(r["path"]) == PEFT_V1, sorted(local_files(r["path"]))
    assert r["sha256"] == sha(PEFT_V1["adapter_model.safetensors"])
    with HUB.lock:
        reqs = list(HUB.requests)
    assert reqs[0][0] == "/api/models/team/private-lora/revision/v1", reqs
    assert all(a == f"Bearer {HF_TOKEN}" for _, a in reqs), reqs
    assert HUB.count("/resolve/v1/adapter_config.json") == 1
    assert HUB.count("/resolve/v1/adapter_model.safetensors") == 1
    assert HUB.count(".gitattributes") == 0
    # the redirect was followed to another host:port, without the token
    with CDN.lock:
        assert len(CDN.requests) == 1 and CDN.requests[0][1] is None, CDN.requests


@test
def hf_main_revision_and_formats():
    HUB.clear()
    r = ok(one("hf://team/sql-lora"))
    assert local_files(r["path"]) == PEFT
    assert HUB.count("/revision/main") == 1 and HUB.count("README.md") == 0
    r = ok(one("hf://team/nemo-lora"))
    assert r["path"].endswith("/sql.nemo") and r["sha256"] == sha(NEMO)
    # a revision with slashes is encoded into one path segment
    r = ok(one("hf://solo@refs/pr/1"))
    assert local_files(r["path"]) == TRTLLM
    assert r["sha256"] == sha(TRTLLM["model.lora_weights.npy"])
    assert HUB.count("/revision/refs%2Fpr%2F1") == 1


@test
def hf_errors():
    r = fails(one("hf://team/private-lora"), "EACCES", "401",
              "Invalid credentials in Authorization header")
    assert r["http_status"] == 401
    fails(one("hf://team/private-lora", env={"HF_TOKEN": "wrong"}), "EACCES")
    r = fails(one("hf://team/nope"), "ENOENT", "Repository not found")
    assert r["http_status"] == 404
    fails(one("hf://team/sql-lora@v9"), "ENOENT", "Invalid rev id")
    fails(one("hf://team/docs-only"), "ENOENT", "no adapter files")


@test
def https_directories_and_nemo():
    r = ok(one(f"{WEB_URL}/adapters/sql/"))
    assert local_files(r["path"]) == PEFT
    assert r["sha256"] == sha(PEFT["adapter_model.safetensors"])
    r = ok(one(f"{WEB_URL}/adapters/trt"))  # no trailing slash: still a directory
    assert local_files(r["path"]) == TRTLLM
    assert r["sha256"] == sha(TRTLLM["model.lora_weights.npy"])
    r = ok(one(f"{WEB_URL}/adapters/bin-only/"))
    assert sorted(local_files(r["path"])) == ["adapter_config.json", "adapter_model.bin"]
    r = ok(one(f"{WEB_URL}/dl/sql.nemo"))
    assert r["path"].endswith("/sql.nemo") and open(r["path"], "rb").read() == NEMO


@test
def https_not_found_and_untrusted():
    WEB.clear()
    r = fails(one(f"{WEB_URL}/adapters/missing/"), "ENOENT", "no adapter at")
    assert r["http_status"] == 404
    # 404 is not retried
    assert WEB.count("/adapters/missing/adapter_config.json") == 1
    fails(one(f"{WEB_URL}/adapters/config-only/"), "ENOENT", "adapter_model.safetensors")
    fails(one(f"{WEB_URL}/dl/other.nemo"), "ENOENT")
    # without the test CA the certificate is refused, and not retried
    WEB.clear()
    fails(one(f"{WEB_URL}/adapters/sql/", env={"CURL_CA_BUNDLE": None}), "EIO", "certificate",
          "after 1 try")


@test
def sha256_pin_match_and_mismatch():
    good = sha(PEFT["adapter_model.safetensors"])
    cache = tempfile.mkdtemp(dir=TMP)
    r = ok(one(f"{WEB_URL}/adapters/sql/", cache=cache, args=["--sha256", good.upper()]))
    assert r["sha256"] == good
    cache = tempfile.mkdtemp(dir=TMP)
    fails(one(f"{WEB_URL}/adapters/sql/", cache=cache, args=["--sha256", "ab" * 32]), "EBADMSG",
          good, "ab" * 32)
    assert entries(cache) == [], entries(cache)  # nothing installed, no .tmp left
    fails(one(f"{WEB_URL}/adapters/sql/", args=["--sha256", "xyz"]), "EINVAL", "64 hex")
    # file sources are checked too
    d = tempfile.mkdtemp(dir=TMP)
    for n, v in PEFT.items():
        open(os.path.join(d, n), "wb").write(v)
    ok(one(d, args=["--sha256", good]))
    fails(one(d, args=["--sha256", "00" * 32]), "EBADMSG")


@test
def cache_hit_without_network():
    srv = start(WebHandler, TLS)
    url = f"https://127.0.0.1:{srv.server_address[1]}/adapters/sql/"
    cache = tempfile.mkdtemp(dir=TMP)
    first = ok(one(url, cache=cache))
    srv.shutdown()
    srv.server_close()
    again = ok(one(url, cache=cache, args=["--attempts", "1"]))
    assert again["from_cache"] and again["bytes_downloaded"] == 0
    assert again["path"] == first["path"] and again["sha256"] == first["sha256"]
    assert again["files"] == 2 and again["bytes_total"] == first["bytes_total"]
    # a matching pin is checked against the files on disk and still needs no network
    ok(one(url, cache=cache, args=["--attempts", "1", "--sha256", first["sha256"]]))
    # a pin the entry does not match means downloading again: the server is gone
    fails(one(url, cache=cache, args=["--attempts", "1", "--sha256", "cd" * 32]), "EIO")
    # a damaged entry (truncated weights) is not used
    w = os.path.join(first["path"], "adapter_model.safetensors")
    open(w, "r+b").truncate(100)
    fails(one(url, cache=cache, args=["--attempts", "1"]), "EIO")


@test
def new_pin_replaces_stale_entry():
    url = f"{WEB_URL}/changing/sql/"
    cache = tempfile.mkdtemp(dir=TMP)
    old = ok(one(url, cache=cache))
    new_weights = b"new weights" * 1000
    WEB_FILES["/changing/sql/"]["adapter_model.safetensors"] = new_weights
    r = ok(one(url, cache=cache))
    assert r["from_cache"] and r["sha256"] == old["sha256"]  # no pin: the cache wins
    r = ok(one(url, cache=cache, args=["--sha256", sha(new_weights)]))
    assert not r["from_cache"] and r["sha256"] == sha(new_weights)
    assert open(os.path.join(r["path"], "adapter_model.safetensors"), "rb").read() == new_weights
    r = ok(one(url, cache=cache))
    assert r["from_cache"] and r["sha256"] == sha(new_weights)
    assert len(entries(cache)) == 1, entries(cache)
    # evicting makes the next fetch download again
    r = ok(one(url, cache=cache, args=["--evict"]))
    assert not r["from_cache"]


@test
def concurrent_fetches_download_once():
    WEB.clear()
    cache = tempfile.mkdtemp(dir=TMP)
    rs = fetch(f"{WEB_URL}/slow/sql/", cache=cache, args=["--threads", "8"])
    assert len(rs) == 8
    for r in rs:
        ok(r)
    assert len({r["path"] for r in rs}) == 1 and len({r["sha256"] for r in rs}) == 1
    assert sum(1 for r in rs if not r["joined"]) == 1, rs
    assert WEB.count("/slow/sql/adapter_config.json") == 1
    assert WEB.count("/slow/sql/adapter_model.safetensors") == 1
    # the same for a source that fails: one request, eight errors
    WEB.clear()
    rs = fetch(f"{WEB_URL}/adapters/missing/", cache=cache, args=["--threads", "8"])
    assert all(r["code"] == "ENOENT" for r in rs), rs
    assert WEB.count("/adapters/missing/adapter_config.json") == 1


@test
def size_limits():
    cache = tempfile.mkdtemp(dir=TMP)
    # announced by Content-Length
    fails(one(f"{WEB_URL}/adapters/sql/", cache=cache, args=["--max-file-bytes", "20000"]),
          "EFBIG", "adapter_model.safetensors", "20000")
    # no Content-Length: caught while streaming
    fails(one(f"{WEB_URL}/nolength/sql/", cache=cache, args=["--max-file-bytes", "20000"]),
          "EFBIG", "20000")
    fails(one(f"{WEB_URL}/adapters/sql/", cache=cache, args=["--max-total-bytes", "50000"]),
          "EFBIG")
    fails(one(f"{WEB_URL}/adapters/sql/", cache=cache, args=["--max-files", "1"]), "EFBIG")
    assert entries(cache) == [], entries(cache)
    ok(one(f"{WEB_URL}/nolength/sql/", cache=cache))


@test
def file_sources_and_allowed_roots():
    root = tempfile.mkdtemp(dir=TMP)
    outside = tempfile.mkdtemp(dir=TMP)
    for d in (os.path.join(root, "sql"), os.path.join(outside, "secret")):
        os.makedirs(d)
        for n, v in PEFT.items():
            open(os.path.join(d, n), "wb").write(v)
    os.symlink(os.path.join(outside, "secret"), os.path.join(root, "escape"))
    api = ["--api", "--root", root]
    r = ok(one(f"file://{root}/sql", args=api))
    assert r["path"] == os.path.realpath(os.path.join(root, "sql"))
    assert r["sha256"] == sha(PEFT["adapter_model.safetensors"]) and r["bytes_downloaded"] == 0
    fails(one(f"file://{outside}/secret", args=api), "EACCES", "outside the allowed local roots")
    fails(one(f"{root}/escape", args=api), "EACCES", "outside")  # symlink out of the root
    fails(one(f"file://{root}/../{os.path.basename(outside)}/secret", args=api), "EACCES")
    # whether a path outside the roots exists is not revealed
    fails(one(f"file://{outside}/missing", args=api), "EACCES")
    fails(one(f"file://{root}/missing", args=api), "ENOENT")
    # without roots the API may not load files at all; the command line may
    fails(one(f"file://{root}/sql", args=["--api"]), "EACCES", "disabled")
    ok(one(f"file://{outside}/secret"))


@test
def malformed_uris_rejected():
    bad = ["", "s3://", "s3://ab/x", "s3://Bad_Bucket/x", "hf://", "hf://a/b/c",
           "hf://team/repo@", "hf://team/re po", "hf://team/repo@../x", "hf://../x",
           "ftp://host/x", "http://127.0.0.1/x/", "relative/dir", "file://host/x",
           "https://", "https://user:pw@host/x/", "https://host/x/?a=1", "s3://bucket\x01/x",
           "x" * 5000]
    rs = fetch(*bad)
    assert len(rs) == len(bad)
    for r in rs:
        fails(r, "EINVAL")
    assert "plain http" in rs[bad.index("http://127.0.0.1/x/")]["error"]
    assert "'ftp'" in rs[bad.index("ftp://host/x")]["error"]


@test
def retries_on_503_and_429():
    WEB.clear()
    WEB_FAILS.clear()
    r = ok(one(f"{WEB_URL}/flaky/sql/"))
    assert local_files(r["path"]) == PEFT
    n = WEB.count("/flaky/sql/adapter_config.json")
    assert n == 3, f"{n} requests, expected 503, 503, 200"
    t0 = time.monotonic()
    ok(one(f"{WEB_URL}/ratelimited/sql/", args=["--backoff-max-ms", "3000"]))
    took = time.monotonic() - t0
    assert took >= 0.9, f"Retry-After: 1 not honoured ({took:.2f} s)"
    WEB.clear()
    r = fails(one(f"{WEB_URL}/down/sql/", args=["--attempts", "3"]), "EIO", "503")
    assert r["http_status"] == 503
    n = WEB.count("/down/sql/adapter_config.json")
    assert n == 3, f"{n} requests for 3 attempts"
    port = free_port()  # nothing listens there
    fails(one(f"https://127.0.0.1:{port}/x/", args=["--attempts", "2"]), "EIO", "after 2 tries")


# ---------------------------------------------------------------- issue 9: endpoints, cache

CAPTURE = Recorder()  # (path, every header) of requests to a request-chosen endpoint


class CaptureHandler(Handler):
    """An endpoint a load request names: records everything, serves nothing."""

    def do_GET(self):
        CAPTURE.add(self.path, dict(self.headers.items()))
        self.send(404, b'{"error":"Repository not found"}')


def captured():
    with CAPTURE.lock:
        return list(CAPTURE.requests)


SECRET_HEADERS = ("authorization", "x-amz-security-token", "x-amz-date", "x-amz-content-sha256")


def assert_no_secrets(reqs):
    assert reqs, "the endpoint saw no request"
    for path, headers in reqs:
        low = {k.lower(): v for k, v in headers.items()}
        leaked = [h for h in SECRET_HEADERS if h in low]
        assert not leaked, f"{path}: the environment's {leaked} reached the endpoint: {low}"
        for v in low.values():
            assert HF_TOKEN not in v and TEMP_CREDS["AWS_SESSION_TOKEN"] not in v, low


@test
def request_endpoint_gets_no_environment_secrets():
    # the agent's own HF token and AWS keys (with a session token) in the
    # environment; the request names the endpoint and nothing else
    env = {**TEMP_CREDS, "HF_TOKEN": HF_TOKEN}
    CAPTURE.clear()
    fails(one("hf://team/private-lora@v1", env=env,
              args=["--allow-insecure-endpoints", "--cred", f"HF_ENDPOINT={CAPTURE_URL}"]),
          "ENOENT")
    assert_no_secrets(captured())
    CAPTURE.clear()
    fails(one("s3://flat-lora", env=env,
              args=["--allow-insecure-endpoints", "--cred", f"AWS_ENDPOINT_URL={CAPTURE_URL}"]),
          "ENOENT")
    assert_no_secrets(captured())
    # a region from the request that derives the endpoint names AWS only
    CAPTURE.clear()
    fails(one("s3://flat-lora", env={**env, "AWS_ENDPOINT_URL": None},
              args=["--cred", "AWS_REGION=localhost"]), "EINVAL", "not an AWS region name")
    assert captured() == []


@test
def request_endpoint_plain_http_needs_the_flag():
    CAPTURE.clear()
    for key, uri in (("HF_ENDPOINT", "hf://team/sql-lora"), ("AWS_ENDPOINT_URL", "s3://loras/x")):
        fails(one(uri, args=["--cred", f"{key}={CAPTURE_URL}", "--cred", f"HF_TOKEN={HF_TOKEN}"]),
              "EINVAL", key, "plain http", "--allow-insecure-source-endpoints")
        fails(one(uri, args=["--cred", f"{key}=https://user:pw@127.0.0.1:1/"]), "EINVAL", key)
    assert captured() == [], "a refused endpoint was contacted"


@test
def request_endpoint_https_with_own_credentials():
    HUB.clear()
    # https hub named by the request, with the request's token: no flag needed
    r = ok(one("hf://team/private-lora@v1", env={"HF_TOKEN": "env-token-not-sent"},
               args=["--cred", f"HF_ENDPOINT={TLS_HUB_URL}", "--cred", f"HF_TOKEN={HF_TOKEN}"]))
    assert local_files(r["path"]) == PEFT_V1
    with HUB.lock:
        assert HUB.requests and all(a == f"Bearer {HF_TOKEN}" for _, a in HUB.requests)
    # without a token of its own the request is anonymous: refused
    HUB.clear()
    fails(one("hf://team/private-lora@v1", env={"HF_TOKEN": HF_TOKEN},
              args=["--cred", f"HF_ENDPOINT={TLS_HUB_URL}"]), "EACCES")
    with HUB.lock:
        assert HUB.requests and all(a is None for _, a in HUB.requests), HUB.requests


@test
def redirects_carry_no_credentials_away():
    # https hub -> https CDN on another port: followed without the token
    TLS_CDN.clear()
    ok(one("hf://team/private-lora", args=["--cred", f"HF_ENDPOINT={TLS_HUB_URL}",
                                            "--cred", f"HF_TOKEN={HF_TOKEN}"]))
    with TLS_CDN.lock:
        assert len(TLS_CDN.requests) == 1 and TLS_CDN.requests[0][1] is None, TLS_CDN.requests
    # https hub -> plain http: not followed at all
    CDN.clear()
    fails(one("hf://team/sql-lora", args=["--cred", f"HF_ENDPOINT={TLS_HUB_DOWN_URL}",
                                          "--cred", f"HF_TOKEN={HF_TOKEN}"]), "EIO")
    assert CDN.count("") == 0, "an https download was redirected to plain http"


def driver_refuses(cache, *needles):
    e = {**BASE_ENV, **S3_ENV, **HUB_ENV}
    p = subprocess.run([DRIVER, "--cache", cache, f"{WEB_URL}/adapters/sql/"],
                       capture_output=True, text=True, env=e, timeout=60)
    assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
    for n in needles:
        assert n in p.stderr, f"'{n}' not in '{p.stderr}'"


@test
def cache_directory_private_to_the_agent():
    cache = os.path.join(TMP, "new-cache", "sub")
    ok(one(f"{WEB_URL}/adapters/sql/", cache=cache))
    assert os.stat(cache).st_mode & 0o777 == 0o700, oct(os.stat(cache).st_mode)
    for mode in (0o777, 0o770, 0o722):
        os.chmod(cache, mode)
        driver_refuses(cache, "writable by group or others", oct(mode)[2:])
    os.chmod(cache, 0o700)
    if os.geteuid() == 0:  # another user's directory (only root can make one)
        os.chown(cache, 12345, 12345)
        driver_refuses(cache, "owned by uid 12345")
        os.chown(cache, 0, 0)
        link = os.path.join(TMP, "cache-link")
        os.symlink(cache, link)
        os.lchown(link, 12345, 12345)
        driver_refuses(link, "symbolic link owned by uid 12345")
    ok(one(f"{WEB_URL}/adapters/sql/", cache=cache))


def entry_of(uri):
    return "https-" + sha(uri.encode())[:32]


@test
def tampered_entry_is_not_served():
    cache = tempfile.mkdtemp(dir=TMP)
    uri = f"{WEB_URL}/adapters/sql/"
    ok(one(uri, cache=cache))
    d = os.path.join(cache, entry_of(uri))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        path = os.path.join(d, name)
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0xFF  # same size, other bytes
        open(path, "wb").write(data)
        WEB.clear()
        r = ok(one(uri, cache=cache))
        assert not r["from_cache"] and WEB.count(name) == 1, (r, WEB.requests)
        assert local_files(r["path"]) == PEFT
        assert r["sha256"] == sha(PEFT["adapter_model.safetensors"])
    # a planted entry whose record matches its own (wrong) weights is
    # still that uri's entry: it is served only as what it is, and a pin
    # of the real weights replaces it
    meta = json.load(open(os.path.join(d, ".loraplane-source.json")))
    evil = b"planted weights"
    open(os.path.join(d, "adapter_model.safetensors"), "wb").write(evil)
    for f in meta["files"]:
        if f["name"] == "adapter_model.safetensors":
            f["size"], f["sha256"] = len(evil), sha(evil)
    meta["sha256"] = sha(evil)
    json.dump(meta, open(os.path.join(d, ".loraplane-source.json"), "w"))
    r = ok(one(uri, cache=cache, args=["--sha256", sha(PEFT["adapter_model.safetensors"])]))
    assert not r["from_cache"] and local_files(r["path"]) == PEFT


@test
def discarded_entry_leaves_nothing():
    cache = tempfile.mkdtemp(dir=TMP)
    uri = f"{WEB_URL}/adapters/config-only/"
    ok(one(f"{WEB_URL}/adapters/sql/", cache=cache, args=["--discard"]))
    assert entries(cache) == [], entries(cache)


@test
def cache_budget_evicts_least_recently_used():
    a, b, c = (f"{WEB_URL}/lru/{x}/" for x in "abc")
    budget = ["--max-cache-bytes", "120000"]  # two of the ~50 kB adapters
    cache = tempfile.mkdtemp(dir=TMP)
    rs = fetch(a, b, a, c, cache=cache, args=budget)
    assert [r["code"] for r in rs] == ["OK"] * 4, rs
    assert entries(cache) == sorted([entry_of(a), entry_of(c)]), entries(cache)
    assert local_files(rs[3]["path"]) == WEB_FILES["/lru/c/"]
    # held entries (a loaded adapter's) are never evicted: no room
    cache = tempfile.mkdtemp(dir=TMP)
    rs = fetch(a, b, c, cache=cache, args=[*budget, "--hold"])
    assert [r["code"] for r in rs] == ["OK", "OK", "ENOSPC"], rs
    assert "no room" in rs[2]["error"] and "120000" in rs[2]["error"], rs[2]
    assert entries(cache) == sorted([entry_of(a), entry_of(b)]), entries(cache)
    # one adapter larger than the whole budget
    cache = tempfile.mkdtemp(dir=TMP)
    fails(one(a, cache=cache, args=["--max-cache-bytes", "30000"]), "ENOSPC", "budget")
    assert entries(cache) == []


# ---------------------------------------------------------------- main

def main():
    global TLS, CERT, WEB_URL, CDN_URL, S3_ENV, HUB_ENV, MOTO_URL
    global CAPTURE_URL, TLS_HUB_URL, TLS_HUB_DOWN_URL
    moto = None
    try:
        build_driver()
        TLS, CERT = make_cert()
        web = start(WebHandler, TLS)
        WEB_URL = f"https://127.0.0.1:{web.server_address[1]}"
        cdn = start(CdnHandler)
        CDN_URL = f"http://127.0.0.1:{cdn.server_address[1]}"
        hub = start(HubHandler)
        HUB_ENV = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"}
        CAPTURE_URL = f"http://127.0.0.1:{start(CaptureHandler).server_address[1]}"
        tls_cdn = start(TlsCdnHandler, TLS)
        tls_hub = start(HubHandler, TLS)
        tls_hub.cdn_url = f"https://127.0.0.1:{tls_cdn.server_address[1]}"
        TLS_HUB_URL = f"https://127.0.0.1:{tls_hub.server_address[1]}"
        down_hub = start(HubHandler, TLS)
        down_hub.cdn_url = CDN_URL
        TLS_HUB_DOWN_URL = f"https://127.0.0.1:{down_hub.server_address[1]}"
        moto, MOTO_URL = start_moto()
        key, secret = setup_s3(MOTO_URL)
        S3_ENV = {"AWS_ENDPOINT_URL": MOTO_URL, "AWS_ACCESS_KEY_ID": key,
                  "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}
    except Exception as e:
        print(f"FAIL test-sources:setup: {type(e).__name__}: {e}", flush=True)
        if moto:
            moto.kill()
        return 1
    try:
        failures = run_tests("test-sources")
    finally:
        moto.terminate()
        moto.wait(timeout=10)
        shutil.rmtree(TMP, ignore_errors=True)
    return 1 if failures else 0


TLS = CERT = WEB_URL = CDN_URL = MOTO_URL = None
CAPTURE_URL = TLS_HUB_URL = TLS_HUB_DOWN_URL = None
S3_ENV = HUB_ENV = {}
TEMP_CREDS = {}

if __name__ == "__main__":
    sys.exit(main())
