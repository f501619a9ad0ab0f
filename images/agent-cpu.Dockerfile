# loraplane-agent and loraplane-generate for CPU-only nodes:
#   ghcr.io/loraplane/loraplane-agent:<version>   (make images; docs/images.md)
#
# The build stage compiles the two programs with CUDA=0 on Debian 12, as
# hack/deps.sh sets up a developer's machine; the runtime stage is
# debian:bookworm-slim with only the shared libraries the programs link
# (tests/integration/test-images.py checks the list against the binaries'
# NEEDED entries) and the CA certificates the adapter downloads need.
#
# The agent runs as uid/gid 65532 and writes only to volumes. The Helm
# chart mounts an emptyDir at /tmp and one at /var/cache/loraplane, and
# passes --lora-cache-dir /var/cache/loraplane/adapters: a directory the
# agent creates itself (0700, owned by 65532), since it refuses a cache
# directory owned by another uid, as an emptyDir's root is. The root file
# system can be read-only.

ARG VERSION=0.1.0

FROM debian:bookworm AS build
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		build-essential pkg-config \
		libcivetweb-dev libcurl4-openssl-dev libjansson-dev libpcre2-dev \
		libssl-dev libyaml-dev zlib1g-dev \
	&& rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" CUDA=0 bin/loraplane-agent bin/loraplane-generate

FROM debian:bookworm-slim
ARG VERSION
LABEL org.opencontainers.image.title="loraplane-agent" \
	org.opencontainers.image.description="loraplane-agent (CPU): OpenAI-compatible server of one base model and many LoRA adapters" \
	org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
	org.opencontainers.image.version="${VERSION}" \
	org.opencontainers.image.licenses="NOASSERTION"
# libcivetweb1: HTTP server; libcurl4 + libssl3: adapter downloads and
# TLS; libjansson4, libyaml-0-2, libpcre2-8-0, zlib1g: JSON, YAML, the
# tokenizers' regular expressions, zip archives; ca-certificates: the trust store for
# https://, s3:// and hf:// sources (a file, not a library).
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		ca-certificates libcivetweb1 libcurl4 libjansson4 libpcre2-8-0 libssl3 \
		libyaml-0-2 zlib1g \
	&& rm -rf /var/lib/apt/lists/* \
	&& groupadd --gid 65532 loraplane \
	&& useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin loraplane
COPY --from=build /src/bin/loraplane-agent /src/bin/loraplane-generate /usr/local/bin/
USER 65532:65532
# 8000: the OpenAI API; 8001: admin, metrics, health
EXPOSE 8000 8001
ENTRYPOINT ["loraplane-agent"]
