#!/usr/bin/env bash
# make cuda-check: ptxas's resource report of every kernel in
# kernels/cuda/*.cu, for every arch of CUDA_ARCHS. One line per file and
# arch, counted by tests/run.sh:
#   PASS cuda-check:FILE:sm_XX (N kernels, at most R registers)
#   FAIL cuda-check:FILE:sm_XX: FUNCTION: why
# A function fails on any spill (stores or loads); a kernel marked hot
# also fails on a non-zero stack frame. A kernel is marked hot by the
# comment `// lp: hot` on its own line right above it (above its template
# line, or its __global__ line). Every function's figures are printed too,
# indented: `  sm_XX FILE FUNCTION: R registers, S bytes stack, ...`.
#
# Usage: hack/cuda-check.sh [DIR]
#   DIR: a directory of FILE.ptxas reports that the Makefile's nvcc rule
#   wrote beside its objects (make cuda-check); without it each file is
#   compiled here, into a temporary directory, with the Makefile's flags.
# Environment: NVCC (default /usr/local/cuda/bin/nvcc), CUDA_ARCHS
# (default "80 86 89 90"), CUDA_CHECK_SRCS (the .cu files, default
# kernels/cuda/*.cu; tests/integration/test-cuda-build.sh checks the
# checker on files of its own).
set -u
cd "$(dirname "$0")/.." || exit 1
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda}/bin/nvcc}
CUDA_ARCHS=${CUDA_ARCHS:-80 86 89 90}
dir=${1:-}
srcs=${CUDA_CHECK_SRCS:-$(ls kernels/cuda/*.cu)}
status=0

if [ -z "$dir" ]; then
	if ! command -v "$NVCC" >/dev/null 2>&1; then
		echo "cuda-check: no nvcc at '$NVCC' (set NVCC or CUDA_HOME)" >&2
		exit 2
	fi
	dir=$(mktemp -d)
	trap 'rm -rf "$dir"' EXIT
	gencode=()
	for a in $CUDA_ARCHS; do
		gencode+=(-gencode "arch=compute_$a,code=sm_$a")
	done
	for src in $srcs; do
		name=$(basename "$src" .cu)
		nice "$NVCC" -std=c++17 -O3 -I. -D_GNU_SOURCE -Xcompiler -fPIC,-fvisibility=hidden \
			"${gencode[@]}" -Xptxas -v -c -o "$dir/$name.o" "$src" 2>"$dir/$name.ptxas" ||
			echo "compile failed" >"$dir/$name.failed"
	done
fi

# Names of the kernels marked hot in a source file, one a line.
hot_kernels() {
	awk '
	/^[ \t]*\/\/[ \t]*lp:[ \t]*hot[ \t]*$/ { want = 1; text = ""; next }
	want {
		text = text " " $0
		gsub(/__launch_bounds__[ \t]*\([^)]*\)/, "", text)
		if (text ~ /__global__/) {
			rest = substr(text, index(text, "__global__"))
			p = index(rest, "(")
			if (p) {
				head = substr(rest, 1, p - 1)
				sub(/[ \t]+$/, "", head)
				n = split(head, w, /[^A-Za-z0-9_]+/)
				print w[n]
				want = 0
			}
		} else if (++lines > 8) {
			want = 0
		}
	}' "$1"
}

# The function records of a ptxas report: "arch mangled regs stack
# spill_stores spill_loads entry(0/1)", one per function and arch. ptxas
# runs once per arch and starts each run with its "bytes gmem" line; a run
# whose functions name no arch takes the arch at its place in CUDA_ARCHS.
records() {
	awk -v archs="$CUDA_ARCHS" '
	function flush(   k, a) {
		if (!n) return
		a = arch != "" ? arch : "sm_" A[module]
		for (k = 1; k <= n; k++) {
			split(rec[k], f, " ")
			print a, f[1], (f[1] in regs ? regs[f[1]] : 0), f[2], f[3], f[4], (f[1] in entry)
		}
		n = 0
		delete regs
		delete entry
	}
	BEGIN { split(archs, A, " "); module = 0 }
	/bytes gmem/ { flush(); module++; arch = ""; next }
	/Compiling entry function/ {
		match($0, /\x27[^\x27]+\x27/); cur = substr($0, RSTART + 1, RLENGTH - 2)
		entry[cur] = 1
		if (match($0, /for \x27sm_[0-9a-z]+\x27/)) arch = substr($0, RSTART + 5, RLENGTH - 6)
		next
	}
	/Function properties for/ { cur = $NF; next }
	/bytes stack frame/ {
		rec[++n] = cur " " $1 " " $5 " " $9
		next
	}
	/Used [0-9]+ registers/ {
		match($0, /Used [0-9]+ registers/)
		regs[cur] = substr($0, RSTART + 5, RLENGTH - 15)
		next
	}
	END { flush() }' "$1"
}

# The plain name of a demangled function: "void ns::k<1, 2>(float*)" -> k.
base_name() {
	sed -e 's/(anonymous namespace):://g' -e 's/[<(].*//' -e 's/.* //' -e 's/.*:://'
}

for src in $srcs; do
	file=$(basename "$src")
	name=${file%.cu}
	report="$dir/$name.ptxas"
	hot=$(hot_kernels "$src")
	if [ -e "$dir/$name.failed" ] || [ ! -e "$report" ]; then
		for a in $CUDA_ARCHS; do
			echo "FAIL cuda-check:$file:sm_$a: no ptxas report (does it compile?)"
		done
		[ -e "$report" ] && sed 's/^/    | /' "$report" | head -40
		status=1
		continue
	fi
	recs=$(records "$report")
	for a in $CUDA_ARCHS; do
		why=""
		kernels=0
		max_regs=0
		seen=" "
		while read -r arch mangled regs stack st ld is_entry; do
			[ "$arch" = "sm_$a" ] || continue
			plain=$(printf '%s\n' "$mangled" | c++filt)
			base=$(printf '%s\n' "$plain" | base_name)
			short=$(printf '%s\n' "$plain" | sed -e 's/^void //' -e 's/([^()]*)$//')
			printf '  sm_%s %s %s: %s registers, %s bytes stack, %s/%s bytes spill stores/loads%s\n' \
				"$a" "$file" "$plain" "$regs" "$stack" "$st" "$ld" \
				"$([ "$is_entry" = 1 ] || echo ' (device function)')"
			if [ "$st" != 0 ] || [ "$ld" != 0 ]; then
				why="${why:+$why; }$short: $st bytes spill stores, $ld bytes spill loads"
			fi
			[ "$is_entry" = 1 ] || continue
			kernels=$((kernels + 1))
			seen="$seen$base "
			[ "$regs" -gt "$max_regs" ] && max_regs=$regs
			if [ "$stack" != 0 ] && grep -qx "$base" <<<"$hot"; then
				why="${why:+$why; }$short (hot): $stack bytes stack frame"
			fi
		done <<<"$recs"
		for h in $hot; do
			case "$seen" in
			*" $h "*) ;;
			*) why="${why:+$why; }hot kernel '$h' is not in ptxas's report (not instantiated?)" ;;
			esac
		done
		if [ -n "$why" ]; then
			echo "FAIL cuda-check:$file:sm_$a: $why"
			status=1
		elif [ "$kernels" -eq 0 ]; then
			echo "PASS cuda-check:$file:sm_$a (no kernels)"
		else
			echo "PASS cuda-check:$file:sm_$a ($kernels kernels, at most $max_regs registers)"
		fi
	done
done
exit $status
