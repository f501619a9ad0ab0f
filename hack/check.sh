#!/usr/bin/env bash
# make check: clang-format conformance and the banned-call list.
set -u
cd "$(dirname "$0")/.."
status=0
files=$(git ls-files '*.c' '*.h' '*.cu' '*.cuh')
banned='\b(sprintf|vsprintf|strcpy|strcat|strncpy|atoi|atol|atof|gets|strtok)[[:space:]]*\('
if hits=$(grep -nE "$banned" $files); then
	echo "check: banned calls (use snprintf, memcpy with a length, strtol, strtok_r):"
	echo "$hits"
	status=1
fi
for f in $files; do
	if ! clang-format --dry-run -Werror "$f" >/dev/null 2>&1; then
		echo "check: $f is not formatted (make format)"
		status=1
	fi
done
[ $status -eq 0 ] && echo "check: ok"
exit $status
