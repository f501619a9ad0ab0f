#!/usr/bin/env bash
# Runs libFuzzer targets built by `make fuzz-build`: run.sh SECONDS JOBS
# TARGET... Each target starts from its seed corpus (tests/fuzz/corpus/T,
# never written) and keeps what it finds in $FUZZ_BUILD/corpus/T, so a later
# run goes on from there. Prints `PASS fuzz-T` or `FAIL fuzz-T: why` per
# target (crash files land in $FUZZ_BUILD/artifacts/T/); exits non-zero on
# any failure. FUZZ_ARGS adds libFuzzer flags (e.g. -jobs=4 -workers=4).
set -u
cd "$(dirname "$0")/../.."
build=${FUZZ_BUILD:-build-fuzz}
seconds=${1:?usage: run.sh SECONDS JOBS TARGET...}
jobs=${2:?usage: run.sh SECONDS JOBS TARGET...}
shift 2
export LP_FIXTURES=${LP_FIXTURES:-tests/fixtures}
# ASan's leak check is on: a leak on an error path is a finding too
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

run_one() {
	local t=$1 bin=$build/fuzz/fuzz-$1 work=$build/corpus/$1 art=$build/artifacts/$1/
	local log=$build/fuzz-logs/$1.log dict=tests/fuzz/corpus/$1.dict rc
	local args=(-max_total_time="$seconds" -timeout=25 -rss_limit_mb=2048 -max_len=65536
		-print_final_stats=1 -artifact_prefix="$art")
	mkdir -p "$work" "$art" "$(dirname "$log")"
	[ -f "$dict" ] && args+=(-dict="$dict")
	if [ ! -x "$bin" ]; then
		echo "FAIL fuzz-$t: $bin was not built"
		return 1
	fi
	# shellcheck disable=SC2086
	"$bin" "${args[@]}" ${FUZZ_ARGS:-} "$work" "tests/fuzz/corpus/$t" >"$log" 2>&1
	rc=$?
	if [ $rc -eq 0 ]; then
		echo "PASS fuzz-$t ($(grep -m1 -o 'stat::number_of_executed_units: *[0-9]*' "$log" |
			grep -o '[0-9]*$') runs in ${seconds}s)"
		return 0
	fi
	echo "FAIL fuzz-$t: exit $rc, $(grep -m1 -E 'ERROR: |SUMMARY: |fuzz: .*failed|runtime error' "$log" |
		cut -c1-200); input: $(grep -m1 -o "Test unit written to .*" "$log" | cut -c22-) (log $log)"
	return 1
}

status=0
pids=()
for t in "$@"; do
	run_one "$t" &
	pids+=($!)
	if [ ${#pids[@]} -ge "$jobs" ]; then
		wait "${pids[0]}" || status=1
		pids=("${pids[@]:1}")
	fi
done
for p in ${pids[@]+"${pids[@]}"}; do
	wait "$p" || status=1
done
exit $status
