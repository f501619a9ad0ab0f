#!/usr/bin/env bash
# Builds the libFuzzer targets (make fuzz-build, in $FUZZ_BUILD, default
# build-fuzz) and runs each for FUZZ_SECONDS (default 20), two at a time, so
# that a harness that stops building or crashes at once is noticed. One
# `PASS fuzz-T` / `FAIL fuzz-T: why` line per target (tests/fuzz/run.sh).
# Long runs: docs/fuzzing.md.
set -u
cd "$(dirname "$0")/../.."
export FUZZ_BUILD=${FUZZ_BUILD:-build-fuzz}
log=$FUZZ_BUILD/fuzz-build.log
mkdir -p "$FUZZ_BUILD"
if ! command -v "${FUZZ_CC:-clang}" >/dev/null; then
	echo "FAIL fuzz-build: ${FUZZ_CC:-clang} is not installed (make deps)"
	exit 1
fi
if ! nice make --no-print-directory -j"${FUZZ_MAKE_JOBS:-2}" fuzz-build >"$log" 2>&1; then
	echo "FAIL fuzz-build: make fuzz-build failed:"
	grep -E 'error|Error' "$log" | head -20
	exit 1
fi
echo "PASS fuzz-build"
targets=$(ls tests/fuzz/fuzz-*.c | sed 's|tests/fuzz/fuzz-\(.*\)\.c|\1|')
# shellcheck disable=SC2086
nice bash tests/fuzz/run.sh "${FUZZ_SECONDS:-20}" "${FUZZ_JOBS:-2}" $targets
