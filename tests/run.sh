#!/usr/bin/env bash
# Runs every test program given on the command line, then the integration
# tests (tests/integration/test-*.sh and test-*.py), and counts the
# `PASS name` / `FAIL name: why` lines they print. A program that exits
# non-zero without printing a FAIL line (a crash, a sanitizer report)
# counts as one failure. Ends with one line `N passed, N failed`.
# UNIT_ONLY=1 skips the integration tests (make unit, make tsan).
set -u
cd "$(dirname "$0")/.."
export BUILD=${BUILD:-build} BIN=${BIN:-bin} MODEL=${MODEL:-models/smollm2-135m-instruct-q4_1.gguf}
export LP_FIXTURES=${LP_FIXTURES:-tests/fixtures}
log_dir=$BUILD/test-logs
mkdir -p "$log_dir"
passed=0
failed=0
failures=()

run_one() {
	local name=$1
	shift
	local log="$log_dir/$name.log" rc p f
	local start=$SECONDS
	timeout "${TEST_TIMEOUT:-900}" "$@" >"$log" 2>&1
	rc=$?
	p=$(grep -c '^PASS ' "$log")
	f=$(grep -c '^FAIL ' "$log")
	if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
		f=1
		echo "FAIL $name: exited with status $rc" >>"$log"
	fi
	passed=$((passed + p))
	failed=$((failed + f))
	printf '%-36s %3d passed, %d failed  (%ds)\n' "$name" "$p" "$f" $((SECONDS - start))
	if [ "$f" -ne 0 ]; then
		grep -E '^(FAIL|     also)' "$log" | head -20 | sed 's/^/    /'
		tail -n 15 "$log" | grep -vE '^(PASS|FAIL)' | sed 's/^/    | /'
		failures+=("$name")
	fi
}

for bin in "$@"; do
	run_one "$(basename "$bin")" "$bin"
done
for t in tests/integration/test-*.sh; do
	[ -e "$t" ] && [ -z "${UNIT_ONLY:-}" ] || continue
	run_one "$(basename "$t")" bash "$t"
done
for t in tests/integration/test-*.py; do
	[ -e "$t" ] && [ -z "${UNIT_ONLY:-}" ] || continue
	run_one "$(basename "$t")" python3 "$t"
done

[ ${#failures[@]} -eq 0 ] || echo "failed programs: ${failures[*]} (logs in $log_dir)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
