# loraplane-operator:
#   ghcr.io/loraplane/loraplane-operator:<version>   (make images; docs/images.md)
#
# The build stage compiles the operator alone with CUDA=0 on Debian 12;
# the runtime stage is debian:bookworm-slim with only the shared libraries
# it links (tests/integration/test-images.py checks the list against its
# NEEDED entries). No ca-certificates: in a pod the operator trusts the
# API server through the service account's ca.crt, and it talks to the
# agents over plain HTTP. It runs as uid/gid 65532 and writes no file, so
# the root file system can be read-only.

ARG VERSION=0.1.0

FROM debian:bookworm AS build
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		build-essential pkg-config \
		libcivetweb-dev libcurl4-openssl-dev libjansson-dev libpcre2-dev libssl-dev libyaml-dev \
		zlib1g-dev \
	&& rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" CUDA=0 bin/loraplane-operator

FROM debian:bookworm-slim
ARG VERSION
LABEL org.opencontainers.image.title="loraplane-operator" \
	org.opencontainers.image.description="loraplane-operator: loads LoraAdapter resources into loraplane agent pods" \
	org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
	org.opencontainers.image.version="${VERSION}" \
	org.opencontainers.image.licenses="NOASSERTION"
# libcivetweb1: the probe and metrics server; libcurl4 + libssl3: the
# Kubernetes API (TLS) and the agents; libjansson4, libyaml-0-2: JSON and
# kubeconfig
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		libcivetweb1 libcurl4 libjansson4 libssl3 libyaml-0-2 \
	&& rm -rf /var/lib/apt/lists/* \
	&& groupadd --gid 65532 loraplane \
	&& useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin loraplane
COPY --from=build /src/bin/loraplane-operator /usr/local/bin/
USER 65532:65532
# 8080: /metrics; 8081: /healthz and /readyz
EXPOSE 8080 8081
ENTRYPOINT ["loraplane-operator"]
