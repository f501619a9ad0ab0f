#!/usr/bin/env bash
# The CUDA side of the build, as make test sees it: the programs start on a
# machine without CUDA (no CUDA library among their dependencies); and,
# where nvcc is installed, every kernel passes hack/cuda-check.sh (no
# spills, no stack frame in hot kernels, every arch of CUDA_ARCHS), the
# checker itself catches a spill and a hot stack frame, the shared object
# exports only its entry points and finds cuBLAS without an rpath, and the
# Makefile's CUDA switches do what docs/cuda.md says. Without nvcc the
# nvcc parts print SKIP. One PASS/FAIL line per check.
set -u
cd "$(dirname "$0")/../.." || exit 1
BUILD=${BUILD:-build}
BIN=${BIN:-bin}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
CUDA_ARCHS=${CUDA_ARCHS:-80 86 89 90}
T=test-cuda-build
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pass() { echo "PASS $T:$1"; }
fail() { echo "FAIL $T:$1: $2"; }

# The programs: no link-time CUDA dependency.
for prog in loraplane-agent loraplane-generate loraplane-operator; do
	if [ ! -x "$BIN/$prog" ]; then
		fail "no_cuda_dependency_$prog" "'$BIN/$prog' is not built"
		continue
	fi
	deps=$(ldd "$BIN/$prog" 2>&1)
	if grep -Eq 'libcuda|libcublas|libcudart|libnv' <<<"$deps"; then
		fail "no_cuda_dependency_$prog" "$(grep -E 'libcuda|libcublas|libcudart|libnv' <<<"$deps" | tr '\n' ' ')"
	else
		pass "no_cuda_dependency_$prog"
	fi
done

# make CUDA=1 without nvcc: a clear error, before anything is built.
out=$(env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -n CUDA=1 NVCC="$tmp/no/nvcc" BUILD="$tmp/b1" BIN="$tmp/b1/bin" all 2>&1)
rc=$?
if [ $rc -ne 0 ] && grep -q "CUDA=1 but there is no nvcc at '$tmp/no/nvcc'" <<<"$out"; then
	pass make_cuda1_without_nvcc_says_so
else
	fail make_cuda1_without_nvcc_says_so "make printed: $(tail -3 <<<"$out")"
fi

# make CUDA=0: no nvcc and no shared object; the emulated tests still build.
out=$(env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -n CUDA=0 BUILD="$tmp/b0" BIN="$tmp/b0/bin" all test-cuda-emu 2>&1)
rc=$?
if [ $rc -eq 0 ] && ! grep -q 'nvcc\|libloraplane-cuda.so' <<<"$out"; then
	pass make_cuda0_builds_no_cuda
else
	fail make_cuda0_builds_no_cuda "$(grep -m3 'nvcc\|libloraplane-cuda.so\|rror' <<<"$out")"
fi
if [ -z "$(ls tests/cuda/test-*.cc 2>/dev/null)" ] || [ ! -e "$CUDA_HOME/include/cuda_fp16.h" ] ||
	grep -q -- '-DLP_CUDA_EMU' <<<"$out"; then
	pass make_cuda0_still_builds_emulated_tests
else
	fail make_cuda0_still_builds_emulated_tests "no emulated build in: $(head -3 <<<"$out")"
fi

if ! command -v "$NVCC" >/dev/null 2>&1; then
	echo "SKIP $T: no nvcc at '$NVCC': the kernels' ptxas check and the shared object's checks need it"
	exit 0
fi

# The checker catches what it is for, on files of its own.
cat >"$tmp/good.cu" <<'EOF'
// lp: hot
template <int N>
__global__ void __launch_bounds__(128) scale_kernel(float *x, int n)
{
	int i = blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		x[i] *= (float)N;
}
template __global__ void scale_kernel<2>(float *, int);
EOF
cat >"$tmp/bad.cu" <<'EOF'
// lp: hot
__global__ void stack_kernel(float *x, const int *idx)
{
	float a[64];
	for (int k = 0; k < 64; k++)
		a[k] = 0;
	for (int k = 0; k < 64; k++)
		a[idx[k] & 63] += x[k];
	x[threadIdx.x] = a[idx[threadIdx.x] & 63];
}

__global__ void __launch_bounds__(1024, 2) spill_kernel(float *x, int n)
{
	float acc[96];
#pragma unroll
	for (int k = 0; k < 96; k++)
		acc[k] = x[k * n + threadIdx.x];
	for (int it = 0; it < n; it++) {
#pragma unroll
		for (int k = 0; k < 96; k++)
			acc[k] = acc[k] * acc[(k + 1) % 96] + x[it];
	}
#pragma unroll
	for (int k = 0; k < 96; k++)
		x[k * n + threadIdx.x] = acc[k];
}

// lp: hot
__global__ void missing_kernel(float *x);
EOF
out=$(CUDA_ARCHS=80 CUDA_CHECK_SRCS="$tmp/good.cu $tmp/bad.cu" NVCC="$NVCC" bash hack/cuda-check.sh 2>&1)
if grep -q '^PASS cuda-check:good.cu:sm_80 (1 kernels' <<<"$out" &&
	grep '^FAIL cuda-check:bad.cu:sm_80' <<<"$out" | grep -q 'spill_kernel: [1-9][0-9]* bytes spill stores' &&
	grep '^FAIL cuda-check:bad.cu:sm_80' <<<"$out" | grep -q 'stack_kernel (hot): [1-9][0-9]* bytes stack frame' &&
	grep '^FAIL cuda-check:bad.cu:sm_80' <<<"$out" | grep -q "hot kernel 'missing_kernel' is not in"; then
	pass checker_catches_spills_hot_stacks_and_missing_kernels
else
	fail checker_catches_spills_hot_stacks_and_missing_kernels "$(grep -E '^(PASS|FAIL)' <<<"$out" | tr '\n' ' ')"
fi

# Every kernel of kernels/cuda/: the reports of the shared object's build
# when they are all there (make test built it), else compiled here.
dir="$BUILD/cuda"
for src in kernels/cuda/*.cu; do
	name=$(basename "$src" .cu)
	if [ ! -e "$dir/$name.ptxas" ] || [ "$src" -nt "$dir/$name.ptxas" ]; then
		dir=""
		break
	fi
done
NVCC="$NVCC" CUDA_ARCHS="$CUDA_ARCHS" bash hack/cuda-check.sh ${dir:+"$dir"} | grep -E '^(PASS|FAIL)'

# The shared object: its exports, its libraries, no rpath.
so="$BIN/libloraplane-cuda.so"
if [ ! -e "$so" ]; then
	echo "SKIP $T: '$so' is not built (make CUDA=1)"
	exit 0
fi
exports=$(nm -D --defined-only "$so" | awk '$2 ~ /^[TDBRVW]$/ { print $3 }' | sort | tr '\n' ' ')
if [ "$exports" = "lp_cuda_backend_counters lp_cuda_backend_open " ]; then
	pass shared_object_exports_its_entry_points_only
else
	fail shared_object_exports_its_entry_points_only "exports: ${exports:0:400}"
fi
dyn=$(readelf -d "$so")
needed=$(grep NEEDED <<<"$dyn" | sed 's/.*\[\(.*\)\]/\1/' | tr '\n' ' ')
if grep -q 'libcublasLt\.so' <<<"$needed" && ! grep -q 'libcudart\.so\|libcuda\.so' <<<"$needed"; then
	pass shared_object_needs_cublaslt_and_has_cudart_inside
else
	fail shared_object_needs_cublaslt_and_has_cudart_inside "NEEDED: $needed"
fi
if grep -q 'RPATH\|RUNPATH' <<<"$dyn"; then
	fail shared_object_has_no_rpath "$(grep 'RPATH\|RUNPATH' <<<"$dyn")"
else
	pass shared_object_has_no_rpath
fi
