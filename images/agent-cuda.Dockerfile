# loraplane-agent and loraplane-generate with the CUDA backend:
#   ghcr.io/loraplane/loraplane-agent:<version>-cuda   (make images; docs/images.md)
#
# The build stage compiles the programs and bin/libloraplane-cuda.so with
# NVIDIA's CUDA 13.0 toolkit on Ubuntu 24.04 (CUDA=1, the Makefile's
# CUDA_ARCHS: sm_80, sm_86, sm_89, sm_90 and PTX for newer GPUs). The
# runtime stage is NVIDIA's CUDA 13.0 runtime image, which carries
# cuBLAS/cuBLASLt (libcublas-13-0) and registers their directory with the
# dynamic loader; the CUDA runtime itself is linked into the shared object
# (cudart_static) and the driver's libcuda.so.1 comes from the node through
# the NVIDIA container toolkit. The programs link no CUDA library: the
# agent dlopens the shared object, which it looks for in ../lib/loraplane/
# from its own directory (kernels/cuda-loader.c), so it lives in
# /usr/local/lib/loraplane/. Without a GPU or driver, --device auto (the
# default) runs on the CPU and logs why.
#
# Ubuntu 24.04's names for the runtime libraries differ from Debian 12's
# where the 64-bit time_t transition renamed them (libcurl4t64,
# libssl3t64); tests/integration/test-images.py holds the mapping.
#
# The agent runs as uid/gid 65532 and writes only to volumes: the Helm
# chart mounts an emptyDir at /tmp and one at /var/cache/loraplane, and
# passes --lora-cache-dir /var/cache/loraplane/adapters (a directory the
# agent creates itself, 0700). The root file system can be read-only.

ARG VERSION=0.1.0

FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		build-essential pkg-config \
		libcivetweb-dev libcurl4-openssl-dev libjansson-dev libpcre2-dev \
		libssl-dev libyaml-dev zlib1g-dev \
	&& rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" CUDA=1 CUDA_HOME=/usr/local/cuda \
	bin/loraplane-agent bin/loraplane-generate bin/libloraplane-cuda.so

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG VERSION
LABEL org.opencontainers.image.title="loraplane-agent" \
	org.opencontainers.image.description="loraplane-agent (CUDA 13): OpenAI-compatible server of one base model and many LoRA adapters" \
	org.opencontainers.image.source="https://github.com/loraplane/loraplane" \
	org.opencontainers.image.version="${VERSION}" \
	org.opencontainers.image.licenses="NOASSERTION"
# the same libraries as the CPU image, by their Ubuntu 24.04 names
RUN apt-get update \
	&& DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		ca-certificates libcivetweb1 libcurl4t64 libjansson4 libpcre2-8-0 libssl3t64 \
		libyaml-0-2 zlib1g \
	&& rm -rf /var/lib/apt/lists/* \
	&& groupadd --gid 65532 loraplane \
	&& useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
		--shell /usr/sbin/nologin loraplane
COPY --from=build /src/bin/loraplane-agent /src/bin/loraplane-generate /usr/local/bin/
COPY --from=build /src/bin/libloraplane-cuda.so /usr/local/lib/loraplane/
USER 65532:65532
# 8000: the OpenAI API; 8001: admin, metrics, health
EXPOSE 8000 8001
ENTRYPOINT ["loraplane-agent"]
