#!/usr/bin/env python3
"""Walks README.md's Kubernetes quick start line by line, as written, with
our Kubernetes API test server and its kubelet stand-in as the one-node
cluster (KUBECONFIG points at it; the pods run as real processes). The one
line that cannot run as written is the in-cluster client pod (the stand-in
runs no images and has no cluster DNS or Service IPs): the test sends the
same request to every endpoint of the adapter's Service instead.

The quick start writes /var/lib/loraplane on this machine (the node's
hostPath); an existing one is moved aside and put back. Needs root."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

from harness import BIN_DIR, ROOT, main, test

sys.path.insert(0, os.path.join(ROOT, "tests", "kube"))
from cluster import Cluster  # noqa: E402

NODE_DIR = "/var/lib/loraplane"
TMP = tempfile.mkdtemp(prefix="lp-readme-")
state = {}


def quick_start():
    """The shell lines of the quick start block, continuations joined."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## On Kubernetes"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines, cur = [], ""
    for raw in block.splitlines():
        cur += raw.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            lines.append(cur.strip())
        cur = ""
    return lines


def client_pod_request(line, c):
    """The request of the `kubectl run ... curl` line, sent to each endpoint
    of the Service it names."""
    url = re.search(r"curl -s (http://\S+)", line).group(1)
    body = re.search(r"-d '(\{.*\})'", line).group(1)
    m = re.match(r"http://([^.]+)\.([^.]+)\.svc(/.*)", url)
    svc, ns, path = m.groups()
    slices = json.loads(c.kubectl("-n", ns, "get", "endpointslices", "-l",
                                  f"kubernetes.io/service-name={svc}", "-o", "json").stdout)["items"]
    targets = [f"http://{a}:{s['ports'][0]['port']}" for s in slices for e in s["endpoints"] for a in e["addresses"]]
    assert targets, f"Service {svc} has no endpoints"
    for t in targets:
        req = urllib.request.Request(t + path, data=body.encode(), headers={"Content-Type": "application/json"})
        out = json.load(urllib.request.urlopen(req, timeout=120))
        assert out["choices"][0]["text"] and out["model"] == json.loads(body)["model"], out
    return len(targets)


@test
def readme_quick_start():
    lines = quick_start()
    assert any(line.startswith(".tools/helm install") for line in lines), lines
    if os.path.exists(NODE_DIR):
        state["moved"] = NODE_DIR + ".test-readme-backup"
        shutil.move(NODE_DIR, state["moved"])
    c = state["c"] = Cluster(bin_dir=os.path.abspath(BIN_DIR)).start()
    env = dict(os.environ, KUBECONFIG=c.kubeconfig, HELM_CACHE_HOME=f"{TMP}/cache",
               HELM_CONFIG_HOME=f"{TMP}/config", HELM_DATA_HOME=f"{TMP}/data")
    walked = []
    for line in lines:
        if line.startswith("kubectl -n loraplane run client"):
            n = client_pod_request(line, c)
            walked.append(f"{line[:40]}... (sent to {n} endpoint(s))")
            continue
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
        if p.returncode != 0:
            raise AssertionError(f"README line failed ({p.returncode}): {line}\n{p.stdout[-2000:]}\n"
                                 f"{p.stderr[-2000:]}\n{c.dump('loraplane')}")
        walked.append(line)
        if line.startswith("kubectl -n loraplane get loraadapters"):
            rows = p.stdout.splitlines()
            assert rows[0].split()[:4] == ["NAME", "BASE", "TOTAL", "READY"], rows
            assert rows[1].split()[:4] == ["sql", "HuggingFaceTB/SmolLM2-135M-Instruct", "1", "1"], rows
    assert walked[-1].endswith("endpoint(s))"), walked
    print("  walked:\n    " + "\n    ".join(walked), flush=True)


def cleanup():
    c = state.get("c")
    if c:
        c.stop()
    shutil.rmtree(NODE_DIR, ignore_errors=True)
    if state.get("moved"):
        shutil.move(state["moved"], NODE_DIR)
    shutil.rmtree(TMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    main("test-readme", cleanup)
