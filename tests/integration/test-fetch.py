#!/usr/bin/env python3
"""loraplane-agent fetch URI DEST (docs/model-fetch.md): real fetch
processes against moto's S3 server, a fake Hugging Face hub, an HTTPS file
server with a throw-away CA (and the same server over plain http), and
file:// paths. Checks what lands in DEST byte for byte, the marker file,
the sha256 pin, exit statuses and messages of failures (DEST untouched),
reuse without a single request, re-downloads after a change of URI or a
damaged file, limits, leftovers of a killed fetch, and finally a real agent
started with --model DEST on fetched tiny models answering /v1/models.
Prints one PASS/FAIL line per test (counted by tests/run.sh)."""

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

import harness as H

TMP = tempfile.mkdtemp(prefix="lp-fetch-")
TINY_DIR = H.TINY  # config.json, tokenizer, two safetensors shards and their index
GGUF_DIR = os.path.join(H.FIX, "tiny-gguf")
MARKER = ".loraplane-source.json"


def read_dir(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, n))}


TINY_FILES = read_dir(TINY_DIR)
Q8 = open(os.path.join(GGUF_DIR, "tiny-llama-q8_0.gguf"), "rb").read()
Q4 = open(os.path.join(GGUF_DIR, "tiny-llama-q4_0.gguf"), "rb").read()


def sha(data):
    return hashlib.sha256(data).hexdigest()


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
    srv.seen = []
    srv.lock = threading.Lock()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def requests_of(srv):
    with srv.lock:
        return list(srv.seen)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, body=b"", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def record(self):
        with self.server.lock:
            self.server.seen.append(self.path)
        return urllib.request.unquote(self.path)


# --- the hub: /api/models/{repo}/revision/{rev} and /{repo}/resolve/{rev}/{path}

HUB_REPOS = {
    "team/tiny-llama": {"main": {**TINY_FILES, "README.md": b"# tiny\n",
                                 ".gitattributes": b"*.safetensors filter=lfs\n",
                                 "original/params.json": b"{}"}},
    "team/tiny-gguf": {"main": {"README.md": b"# ggufs\n", "sub/tiny-llama-q8_0.gguf": Q8,
                                "tiny-llama-q4_0.gguf": Q4, "tiny-llama-q8_0.gguf": Q8},
                       "refs/pr/1": {"tiny-llama-q4_0.gguf": Q4}},
}


class HubHandler(Handler):
    def do_GET(self):
        path = self.record()
        if path.startswith("/api/models/"):
            repo, _, rev = path[len("/api/models/"):].partition("/revision/")
            files = HUB_REPOS.get(repo, {}).get(rev)
            if files is None:
                return self.send(404, b'{"error":"Repository not found"}',
                                 {"X-Error-Message": "Repository not found"})
            body = {"id": repo, "siblings": [{"rfilename": n, "size": len(b)}
                                             for n, b in sorted(files.items())]}
            return self.send(200, json.dumps(body).encode())
        repo, _, rest = path[1:].partition("/resolve/")
        for rev, files in sorted(HUB_REPOS.get(repo, {}).items(), key=lambda r: -len(r[0])):
            if rest.startswith(rev + "/"):
                name = rest[len(rev) + 1:]
                if name in files:
                    return self.send(200, files[name])
                return self.send(404, b'{"error":"Entry not found"}',
                                 {"X-Error-Message": "Entry not found"})
        self.send(404, b'{"error":"Repository not found"}')


# --- the web server (https, and plain http for the insecure flag)

WEB_FILES = {"/m/tiny.gguf": Q8, "/m/other.gguf": Q4,
             **{"/llama/" + n: b for n, b in TINY_FILES.items()}}


class WebHandler(Handler):
    def do_GET(self):
        path = self.record()
        if path in WEB_FILES:
            return self.send(200, WEB_FILES[path])
        self.send(404, b"<html>404 Not Found</html>")


def make_cert():
    key, crt = os.path.join(TMP, "key.pem"), os.path.join(TMP, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(crt, key)
    return ctx, crt


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    port = free_port()
    exe = shutil.which("moto_server")
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(port)],
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


def setup_bucket(url):
    import boto3
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                      aws_access_key_id="test", aws_secret_access_key="test")
    s3.create_bucket(Bucket="models")
    s3.put_object(Bucket="models", Key="gguf/tiny-llama-q8_0.gguf", Body=Q8)
    s3.put_object(Bucket="models", Key="gguf/tiny-llama-q8_0.gguf.md5", Body=b"x")
    for n, b in TINY_FILES.items():
        s3.put_object(Bucket="models", Key="hf/tiny-llama/" + n, Body=b)


# ---------------------------------------------------------------- helpers

MOTO = HUB = WEB = PLAIN = None
ENV = {}


def fetch(*args, env=None):
    """Runs loraplane-agent fetch: (rc, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "HF_", "LORAPLANE_")) and
            not k.lower().endswith("_proxy") and k not in ("CURL_CA_BUNDLE",)}
    full.update(ENV)
    full.update(env or {})
    p = subprocess.run([H.AGENT, "fetch", *args], capture_output=True, text=True, timeout=120,
                       env=full, errors="replace")
    H.check_clean(p.stdout + p.stderr)
    return p.returncode, p.stdout, p.stderr


def ok(r):
    rc, out, errs = r
    assert rc == 0, f"fetch exited {rc}:\n{out}{errs}"
    return out, errs


def fails(r, status, *needles):
    rc, out, errs = r
    assert rc == status, f"fetch exited {rc}, not {status}:\n{out}{errs}"
    for n in needles:
        assert n in errs, f"{n!r} not in:\n{errs}"
    return errs


def dest(name):
    return os.path.join(TMP, "vol", name)


def snapshot(path):
    """Every file below path with its bytes (None when path is absent)."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def model_files(d):
    """DEST's files without the marker, after checking the marker."""
    files = snapshot(d)
    assert files is not None, f"{d} does not exist"
    meta = json.loads(files.pop(MARKER))
    listed = {f["name"]: (f["size"], f["sha256"]) for f in meta["files"]}
    assert listed == {n: (len(b), sha(b)) for n, b in files.items()}, (listed, list(files))
    return files, meta


def leftovers():
    vol = os.path.join(TMP, "vol")
    return sorted(n for n in os.listdir(vol) if ".tmp." in n or ".old." in n)


# ---------------------------------------------------------------- tests

@H.test
def usage_and_help():
    rc, out, _ = fetch("--help")
    assert rc == 0 and "usage: loraplane-agent fetch" in out and "--sha256" in out, out
    fails(fetch(), 2, "missing URI and DEST")
    fails(fetch("s3://models/x.gguf"), 2, "missing DEST")
    fails(fetch("--frobnicate", "s3://models/x.gguf", dest("u")), 2, "unknown option")
    fails(fetch("--max-files", "0", "s3://models/x.gguf", dest("u")), 2, "--max-files")
    fails(fetch("--max-file-bytes", "1G", "s3://models/x.gguf", dest("u")), 2,
          "--max-file-bytes")
    fails(fetch("--sha256", "12ab", "s3://models/x.gguf", dest("u")), 2, "64 hex")
    # a directory model has no single digest
    fails(fetch("--sha256", "a" * 64, "s3://models/hf/tiny-llama", dest("u")), 2,
          "single-file model", "directory model")
    assert not os.path.exists(dest("u"))


@H.test
def s3_gguf_by_key():
    d = dest("s3-gguf")
    out, errs = ok(fetch("s3://models/gguf/tiny-llama-q8_0.gguf", d))
    files, meta = model_files(d)
    assert files == {"tiny-llama-q8_0.gguf": Q8}, list(files)  # not the .md5 beside it
    assert meta["uri"] == "s3://models/gguf/tiny-llama-q8_0.gguf", meta
    assert f"model at '{d}/tiny-llama-q8_0.gguf'" in out and sha(Q8) in out, out
    assert f"{len(Q8)} bytes" in out, out
    assert "fetching 's3://models/gguf/tiny-llama-q8_0.gguf'" in errs, errs
    assert "of 172.0 KiB (100%)" in errs, errs  # a progress line
    _, errs = ok(fetch("--quiet", "s3://models/gguf/tiny-llama-q8_0.gguf", dest("s3-q")))
    assert "%" not in errs, errs


@H.test
def s3_directory_by_prefix():
    d = dest("s3-dir")
    out, _ = ok(fetch("s3://models/hf/tiny-llama", d))
    files, _ = model_files(d)
    assert files == TINY_FILES, sorted(files)
    assert f"model at '{d}': {len(TINY_FILES)} files" in out, out


@H.test
def hf_repo_model_files():
    d = dest("hf-dir")
    before = len(requests_of(HUB))
    ok(fetch("hf://team/tiny-llama", d))
    files, _ = model_files(d)
    # the model files only: no README, .gitattributes or subdirectories
    assert files == TINY_FILES, sorted(files)
    paths = requests_of(HUB)[before:]
    assert paths[0] == "/api/models/team/tiny-llama/revision/main", paths
    assert not any("README" in p or "original" in p for p in paths), paths


@H.test
def hf_single_gguf_and_ambiguous_repo():
    d = dest("hf-gguf")
    ok(fetch("hf://team/tiny-gguf/sub/tiny-llama-q8_0.gguf", d))
    files, _ = model_files(d)
    assert files == {"tiny-llama-q8_0.gguf": Q8}, list(files)
    d2 = dest("hf-pr")
    ok(fetch("hf://team/tiny-gguf@refs/pr/1/tiny-llama-q4_0.gguf", d2))
    assert model_files(d2)[0] == {"tiny-llama-q4_0.gguf": Q4}
    # a repo of several .gguf files and no config.json: name one
    d3 = dest("hf-many")
    fails(fetch("hf://team/tiny-gguf", d3), 1, "2 .gguf files", "tiny-llama-q4_0.gguf",
          "tiny-llama-q8_0.gguf", "name one")
    assert not os.path.exists(d3)
    fails(fetch("hf://team/tiny-gguf/README.md", d3), 1, "neither a repository nor one .gguf")


@H.test
def https_single_file_and_directory():
    d = dest("https-gguf")
    ok(fetch(WEB_URL + "/m/tiny.gguf", d))
    assert model_files(d)[0] == {"tiny.gguf": Q8}
    d2 = dest("https-dir")
    before = len(requests_of(WEB))
    ok(fetch(WEB_URL + "/llama/", d2))
    # the shards come from model.safetensors.index.json
    assert model_files(d2)[0] == TINY_FILES
    paths = requests_of(WEB)[before:]
    assert "/llama/model-00002-of-00002.safetensors" in paths, paths
    # plain http needs the flag (or LORAPLANE_ALLOW_INSECURE_SOURCE_ENDPOINTS)
    d3 = dest("http-gguf")
    fails(fetch(PLAIN_URL + "/m/tiny.gguf", d3), 1, "plain http",
          "--allow-insecure-source-endpoints")
    assert not os.path.exists(d3)
    ok(fetch("--allow-insecure-source-endpoints", PLAIN_URL + "/m/tiny.gguf", d3))
    assert model_files(d3)[0] == {"tiny.gguf": Q8}
    d4 = dest("http-env")
    ok(fetch(PLAIN_URL + "/m/other.gguf", d4,
             env={"LORAPLANE_ALLOW_INSECURE_SOURCE_ENDPOINTS": "true"}))
    assert model_files(d4)[0] == {"other.gguf": Q4}


@H.test
def file_sources_are_copied():
    d = dest("file-gguf")
    src = os.path.abspath(os.path.join(GGUF_DIR, "tiny-llama-q8_0.gguf"))
    ok(fetch("file://" + src, d))
    assert model_files(d)[0] == {"tiny-llama-q8_0.gguf": Q8}
    d2 = dest("file-dir")
    ok(fetch("file://" + os.path.abspath(TINY_DIR), d2))
    assert model_files(d2)[0] == TINY_FILES
    n_gguf = len([f for f in os.listdir(GGUF_DIR) if f.endswith(".gguf")])
    fails(fetch("file://" + os.path.abspath(GGUF_DIR), dest("file-many")), 1,
          f"{n_gguf} .gguf files")
    fails(fetch("file:///nonexistent/model.gguf", dest("file-none")), 1, "does not exist")


@H.test
def sha256_pin():
    d = dest("pinned")
    out, _ = ok(fetch("--sha256", sha(Q8).upper(), "s3://models/gguf/tiny-llama-q8_0.gguf", d))
    assert sha(Q8) in out
    # a mismatch fails and leaves DEST as it was, absent or an earlier model
    d2 = dest("pin-bad")
    fails(fetch("--sha256", sha(Q4), "s3://models/gguf/tiny-llama-q8_0.gguf", d2), 1,
          f"has sha256 {sha(Q8)}, not the pinned {sha(Q4)}")
    assert not os.path.exists(d2)
    before = snapshot(d)
    fails(fetch("--sha256", sha(Q4), WEB_URL + "/m/tiny.gguf", d), 1, "not the pinned")
    assert snapshot(d) == before
    assert leftovers() == [], leftovers()


@H.test
def missing_sources_leave_dest_untouched():
    d = dest("s3-gguf")  # holds the s3 gguf from s3_gguf_by_key
    ok(fetch("s3://models/gguf/tiny-llama-q8_0.gguf", d))
    before = snapshot(d)
    fails(fetch("s3://models/gguf/nope.gguf", d), 1, "no objects under s3://models/gguf/nope.gguf",
          "was not changed")
    fails(fetch("hf://team/tiny-gguf/sub/nope.gguf", d), 1, "404", "Entry not found")
    fails(fetch("hf://team/no-such-repo", d), 1, "404", "Repository not found")
    fails(fetch(WEB_URL + "/m/nope.gguf", d), 1, "does not exist (404)")
    fails(fetch(WEB_URL + "/nothing/", d), 1, "no config.json")
    assert snapshot(d) == before
    assert leftovers() == [], leftovers()


@H.test
def rerun_reuses_without_requests():
    d = dest("reuse")
    ok(fetch(WEB_URL + "/llama", d))
    before = len(requests_of(WEB))
    out, errs = ok(fetch(WEB_URL + "/llama", d))
    assert len(requests_of(WEB)) == before, requests_of(WEB)[before:]
    assert "nothing downloaded" in errs and f"model at '{d}'" in out, errs
    d2 = dest("reuse-hf")
    ok(fetch("hf://team/tiny-gguf/sub/tiny-llama-q8_0.gguf", d2))
    before = len(requests_of(HUB))
    out, errs = ok(fetch("hf://team/tiny-gguf/sub/tiny-llama-q8_0.gguf", d2))
    assert len(requests_of(HUB)) == before and "nothing downloaded" in errs, errs
    assert sha(Q8) in out, out


@H.test
def damaged_file_is_downloaded_again():
    d = dest("damaged")
    ok(fetch(WEB_URL + "/llama/", d))
    shard = os.path.join(d, "model-00001-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    before = len(requests_of(WEB))
    _, errs = ok(fetch(WEB_URL + "/llama/", d))
    assert "nothing downloaded" not in errs, errs
    assert len(requests_of(WEB)) > before
    assert model_files(d)[0] == TINY_FILES


@H.test
def changed_uri_downloads_again():
    d = dest("changing")
    ok(fetch(WEB_URL + "/m/tiny.gguf", d))
    ok(fetch("hf://team/tiny-llama", d))
    files, meta = model_files(d)
    assert files == TINY_FILES and meta["uri"] == "hf://team/tiny-llama", sorted(files)
    ok(fetch("s3://models/gguf/tiny-llama-q8_0.gguf", d))
    assert model_files(d)[0] == {"tiny-llama-q8_0.gguf": Q8}
    assert leftovers() == [], leftovers()


@H.test
def foreign_destination_refused():
    d = dest("foreign")
    os.makedirs(d)
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("mine")
    fails(fetch(WEB_URL + "/m/tiny.gguf", d), 1, "holds files that no fetch wrote")
    assert snapshot(d) == {"notes.txt": b"mine"}
    f = dest("a-file")
    open(f, "w").close()
    fails(fetch(WEB_URL + "/m/tiny.gguf", f), 1, "is not a directory")
    empty = dest("empty")
    os.makedirs(empty)
    ok(fetch(WEB_URL + "/m/tiny.gguf", empty))
    assert model_files(empty)[0] == {"tiny.gguf": Q8}


@H.test
def limits():
    d = dest("limited")
    fails(fetch("--max-file-bytes", "100000", "s3://models/gguf/tiny-llama-q8_0.gguf", d), 1,
          "over the limit of 100000 per file")
    fails(fetch("--max-files", "3", "hf://team/tiny-llama", d), 1, "limit of 3")
    # https announces no sizes up front: cut off while streaming
    fails(fetch("--max-total-bytes", "200000", WEB_URL + "/llama/", d), 1, "limit")
    assert not os.path.exists(d)
    assert leftovers() == [], leftovers()


@H.test
def leftovers_of_a_killed_fetch_are_removed():
    d = dest("killed")
    junk = os.path.join(TMP, "vol", ".killed.tmp.4242.0")
    os.makedirs(junk)
    with open(os.path.join(junk, "model-00001-of-00002.safetensors"), "wb") as f:
        f.write(b"half" * 1000)
    ok(fetch(WEB_URL + "/m/tiny.gguf", d))
    assert not os.path.exists(junk)
    assert model_files(d)[0] == {"tiny.gguf": Q8}


@H.test
def agent_serves_the_fetched_models():
    for name, uri in (("served-gguf", "s3://models/gguf/tiny-llama-q8_0.gguf"),
                      ("served-dir", "hf://team/tiny-llama")):
        d = dest(name)
        ok(fetch(uri, d))
        with H.Agent(*H.TINY_ARGS, model=d) as a:
            status, obj = a.json("GET", "/v1/models")
            assert status == 200, (status, obj)
            assert obj["data"][0]["id"] == name, obj  # DEST's name, either kind
            assert a.serving()
    # a directory of several .gguf files is refused, naming them
    d = dest("two-ggufs")
    ok(fetch(WEB_URL + "/m/tiny.gguf", d))
    shutil.copy(os.path.join(GGUF_DIR, "tiny-llama-q4_0.gguf"), d)
    rc, out = H.run_agent_once("--model", d, "--port", "0", "--admin-port", "0")
    assert rc != 0 and "2 .gguf files" in out and "tiny-llama-q4_0.gguf" in out, (rc, out)


def main():
    global MOTO, HUB, WEB, PLAIN, WEB_URL, PLAIN_URL
    os.makedirs(os.path.join(TMP, "vol"))
    try:
        tls, cert = make_cert()
        HUB = start(HubHandler)
        WEB = start(WebHandler, tls)
        PLAIN = start(WebHandler)
        WEB_URL = f"https://127.0.0.1:{WEB.server_address[1]}"
        PLAIN_URL = f"http://127.0.0.1:{PLAIN.server_address[1]}"
        MOTO, moto_url = start_moto()
        setup_bucket(moto_url)
        ENV.update({"AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "test",
                    "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                    "HF_ENDPOINT": f"http://127.0.0.1:{HUB.server_address[1]}",
                    "CURL_CA_BUNDLE": cert, "NO_PROXY": "*"})
    except Exception as e:
        print(f"FAIL test-fetch:setup: {type(e).__name__}: {e}", flush=True)
        if MOTO:
            MOTO.kill()
        sys.exit(1)

    def cleanup():
        MOTO.terminate()
        MOTO.wait(timeout=10)
        shutil.rmtree(TMP, ignore_errors=True)
        return 0

    H.main("test-fetch", cleanup)


WEB_URL = PLAIN_URL = None

if __name__ == "__main__":
    main()
