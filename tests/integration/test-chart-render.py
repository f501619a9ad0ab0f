#!/usr/bin/env python3
"""The Helm chart and the kustomize tree, rendered by the real tools: helm
lint --strict, helm template with the default values and each example,
values.schema.json refusing bad values with readable messages, kubectl
kustomize of every overlay, manifests/ and the schema's engine flags in
step with their generators, the chart's CRD equal to crds/, and
docs/install.md's values table naming every value of the schema.
(test-chart.py runs what the chart renders.)"""

import glob
import json
import os
import subprocess
import sys
import tempfile

import yaml

from harness import ROOT, main, test

HELM = os.path.join(ROOT, ".tools", "helm")
CHART = os.path.join(ROOT, "charts", "loraplane")
EXAMPLES = sorted(glob.glob(os.path.join(CHART, "examples", "*.yaml")))
TMP = tempfile.mkdtemp(prefix="lp-chart-render-")
ENV = dict(os.environ, HELM_CACHE_HOME=f"{TMP}/cache", HELM_CONFIG_HOME=f"{TMP}/config",
           HELM_DATA_HOME=f"{TMP}/data")


def run(*args, ok=True):
    p = subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=120)
    if ok:
        assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip()[-2000:]}"
    return p


def render(*args):
    out = run(HELM, "template", "rel", CHART, "--namespace", "lp", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@test
def lint_strict():
    run(HELM, "lint", "--strict", CHART)
    for f in EXAMPLES:
        run(HELM, "lint", "--strict", CHART, "-f", f)
    assert len(EXAMPLES) >= 3, EXAMPLES


@test
def default_values_render():
    docs = render()
    kinds = sorted({d["kind"] for d in docs})
    for k in ["ClusterRole", "ClusterRoleBinding", "Deployment", "PodDisruptionBudget", "Role",
              "RoleBinding", "Secret", "Service", "ServiceAccount"]:
        assert k in kinds, f"{k} missing from {kinds}"
    op = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "rel-loraplane-operator"][0]
    spec = op["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert op["spec"]["replicas"] == 2
    assert "--leader-elect" in c["args"], c["args"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    # no ServiceMonitor without the Prometheus Operator's API
    assert not by_kind(docs, "ServiceMonitor")


@test
def pool_labels_and_ports():
    import hashlib
    docs = render("-f", os.path.join(CHART, "examples", "cpu.yaml"))
    dep = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "rel-loraplane-smollm2"][0]
    tpl = dep["spec"]["template"]
    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert tpl["metadata"]["labels"]["loraplane.io/base-model-hash"] == hashlib.sha256(base.encode()).hexdigest()[:8]
    assert tpl["metadata"]["annotations"]["loraplane.io/base-model"] == base
    c = tpl["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "admin": 8001}
    assert f"--served-model-name={base}" in c["args"], c["args"]
    assert "--max-loras=8" in c["args"], c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    init = tpl["spec"]["initContainers"][0]
    assert init["args"][0] == "fetch" and init["args"][-2:] == ["hf://HuggingFaceTB/SmolLM2-135M-Instruct", "/models/base"], init["args"]
    assert tpl["spec"]["automountServiceAccountToken"] is False
    assert len(tpl["spec"]["topologySpreadConstraints"]) == 2
    assert dep["spec"]["replicas"] == 2
    assert by_kind(docs, "PodDisruptionBudget")


@test
def gpu_pool_with_s3_model():
    docs = render("-f", os.path.join(CHART, "examples", "gpu-s3.yaml"))
    dep = [d for d in by_kind(docs, "Deployment") if "llama3-8b" in d["metadata"]["name"]][0]
    spec = dep["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["image"].endswith("-cuda"), c["image"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, c["resources"]
    assert "--device=cuda" in c["args"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])
    init = spec["initContainers"][0]
    assert init["envFrom"] == [{"secretRef": {"name": "llama-s3"}}]
    assert init["args"][-2] == "s3://models/meta-llama/Llama-3.1-8B-Instruct/"


@test
def namespaced_install_uses_roles():
    docs = render("-f", os.path.join(CHART, "examples", "namespaced.yaml"))
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "Role")
    assert {r["metadata"]["namespace"] for r in roles} == {"team-a", "lp"}, [r["metadata"] for r in roles]
    op = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-operator")][0]
    assert "--namespace=team-a" in op["spec"]["template"]["spec"]["containers"][0]["args"]
    dep = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-smollm2")][0]
    vol = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "model"][0]
    assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


@test
def service_monitor_with_prometheus_operator():
    docs = render("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor")
    sm = by_kind(docs, "ServiceMonitor")
    assert len(sm) == 1 and sm[0]["spec"]["endpoints"][0]["port"] == "metrics", sm


@test
def inference_pool():
    """pools[].inferencePool renders an InferencePool (GIE v1) that selects
    exactly the pool's pods on their serving port; nothing when disabled."""
    assert not by_kind(render("-f", os.path.join(CHART, "examples", "cpu.yaml")), "InferencePool")
    values = os.path.join(TMP, "gie.yaml")
    with open(values, "w") as f:
        yaml.safe_dump({"pools": [
            {"name": "a", "baseModelName": "org/a", "model": {"hostPath": {"path": "/m/a.gguf"}},
             "inferencePool": {"enabled": True}},
            {"name": "b", "baseModelName": "org/b", "model": {"hostPath": {"path": "/m/b.gguf"}},
             "inferencePool": {"enabled": True, "endpointPickerRef": {
                 "name": "shared-epp", "port": 9102, "failureMode": "FailOpen"}}},
            {"name": "c", "baseModelName": "org/c", "model": {"hostPath": {"path": "/m/c.gguf"}}}]}, f)
    docs = render("-f", values)
    pools = {d["metadata"]["name"]: d for d in by_kind(docs, "InferencePool")}
    assert sorted(pools) == ["rel-loraplane-a", "rel-loraplane-b"], sorted(pools)
    for name, ip in pools.items():
        assert ip["apiVersion"] == "inference.networking.k8s.io/v1" and ip["metadata"]["namespace"] == "lp", ip
        dep = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == name][0]
        tpl = dep["spec"]["template"]
        assert ip["spec"]["selector"] == {"matchLabels": dep["spec"]["selector"]["matchLabels"]}, ip["spec"]
        labels = tpl["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in ip["spec"]["selector"]["matchLabels"].items()), labels
        http = [p for p in tpl["spec"]["containers"][0]["ports"] if p["name"] == "http"][0]
        assert ip["spec"]["targetPorts"] == [{"number": http["containerPort"]}], ip["spec"]
    # a selector of one pool matches none of the other pools' pods
    other = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "rel-loraplane-c"][0]
    sel = pools["rel-loraplane-a"]["spec"]["selector"]["matchLabels"]
    assert not all(other["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert pools["rel-loraplane-a"]["spec"]["endpointPickerRef"] == {
        "name": "rel-loraplane-a-epp", "port": {"number": 9002}, "failureMode": "FailClose"}
    assert pools["rel-loraplane-b"]["spec"]["endpointPickerRef"] == {
        "name": "shared-epp", "port": {"number": 9102}, "failureMode": "FailOpen"}
    # poolDefaults turns it on for every pool
    docs = render("-f", os.path.join(CHART, "examples", "cpu.yaml"), "--set", "poolDefaults.inferencePool.enabled=true")
    assert [d["metadata"]["name"] for d in by_kind(docs, "InferencePool")] == ["rel-loraplane-smollm2"]
    # bad values stop helm with the key's name
    p = run(HELM, "template", "rel", CHART, "-f", values, "--set",
            "pools[0].inferencePool.endpointPickerRef.failureMode=Sometimes", ok=False)
    assert p.returncode != 0 and "pools.0.inferencePool.endpointPickerRef.failureMode" in p.stderr, p.stderr
    p = run(HELM, "template", "rel", CHART, "-f", values, "--set", "pools[0].inferencePool.enable=true", ok=False)
    assert p.returncode != 0 and "enable" in p.stderr, p.stderr


@test
def cleanup_hook():
    docs = render()
    hooks = [d for d in docs if (d["metadata"].get("annotations") or {}).get("helm.sh/hook") == "pre-delete"]
    assert {d["kind"] for d in hooks} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Job"}, hooks
    job = by_kind(hooks, "Job")[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "cleanup"
    docs = render("--set", "operator.cleanupOnUninstall=false")
    assert not [d for d in docs if (d["metadata"].get("annotations") or {}).get("helm.sh/hook")]


@test
def schema_refuses_bad_values():
    bad = os.path.join(TMP, "bad.yaml")
    with open(bad, "w") as f:
        yaml.safe_dump({"pools": [{"name": "Bad_Name", "baseModelName": "x", "replicas": -1,
                                   "model": {"uri": "ftp://x", "pvc": {"claimName": "c"}},
                                   "engine": {"max-loras": "many", "no-such-flag": 1, "port": 9000}}],
                        "operator": {"resync": "soon", "replica": 3}}, f)
    p = run(HELM, "template", "rel", CHART, "-f", bad, ok=False)
    assert p.returncode != 0
    for want in ["pools.0.name", "pools.0.replicas", "pools.0.model", "operator.resync",
                 "replica", "no-such-flag", "port", "pools.0.engine.max-loras"]:
        assert want in p.stderr, f"'{want}' not in helm's message: {p.stderr}"
    good = os.path.join(TMP, "good.yaml")
    with open(good, "w") as f:
        yaml.safe_dump({"pools": [{"name": "p", "baseModelName": "x", "model": {"hostPath": {"path": "/m/x.gguf"}},
                                   "engine": {"max-loras": 2, "allow-base-mismatch": True}}]}, f)
    run(HELM, "template", "rel", CHART, "-f", good)


@test
def kustomize_overlays_render():
    overlays = sorted(glob.glob(os.path.join(ROOT, "manifests", "overlays", "*")))
    assert [os.path.basename(o) for o in overlays] == ["cpu", "gpu"], overlays
    for o in overlays:
        docs = [d for d in yaml.safe_load_all(run("kubectl", "kustomize", o).stdout) if d]
        kinds = [d["kind"] for d in docs]
        assert "CustomResourceDefinition" in kinds and kinds.count("Deployment") == 2, kinds
        assert all(d["metadata"].get("namespace", "loraplane") == "loraplane" for d in docs)
    for s in glob.glob(os.path.join(ROOT, "manifests", "samples", "*.yaml")):
        docs = [d for d in yaml.safe_load_all(open(s)) if d]
        assert any(d["kind"] == "LoraAdapter" for d in docs), s


@test
def generated_files_are_current():
    run(sys.executable, os.path.join(ROOT, "hack", "make-manifests.py"), "--check")
    run(sys.executable, os.path.join(ROOT, "hack", "make-chart-schema.py"), "--check")
    assert open(os.path.join(CHART, "crds", "loraplane.io_loraadapters.yaml")).read() == \
        open(os.path.join(ROOT, "crds", "loraplane.io_loraadapters.yaml")).read(), \
        "charts/loraplane/crds/ differs from crds/"


@test
def versions_agree():
    chart = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))
    version = open(os.path.join(ROOT, "VERSION")).read().strip()
    assert chart["appVersion"] == version, (chart["appVersion"], version)


@test
def install_doc_names_every_value():
    schema = json.load(open(os.path.join(CHART, "values.schema.json")))
    doc = open(os.path.join(ROOT, "docs", "install.md")).read()
    missing = []

    def walk(node, prefix):
        props = node.get("properties")
        if not props or node.get("description", "").startswith("generated"):
            return
        for k, v in props.items():
            key = f"{prefix}{k}"
            if "$ref" in v or k in ("resources", "service", "image", "podDisruptionBudget", "topologySpread") \
                    or "properties" not in v:
                if f"`{key}`" not in doc and not any(f"`{key}." in line for line in doc.splitlines()):
                    missing.append(key)
            else:
                walk(v, key + ".")

    walk({k: v for k, v in schema.items() if k == "properties"} | {"properties": {
        k: v for k, v in schema["properties"].items() if k not in ("pools", "global")}}, "")
    walk(schema["definitions"]["pool"], "pools[].")
    missing = [m for m in missing if not (m.startswith("pools[].") and
                                          f"`poolDefaults.{m[8:]}" in doc)]
    assert not missing, f"docs/install.md's values table misses {missing}"


def cleanup():
    import shutil
    shutil.rmtree(TMP, ignore_errors=True)
    return 0


if __name__ == "__main__":
    main("test-chart-render", cleanup)
