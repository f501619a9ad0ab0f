#!/usr/bin/env python3
"""The hostile-input regression suite (issue 9): every way found to get an
agent out of its box, and a representative set of the attacks it already
refused, each against a real agent process (an ASan + UBSan one under
`make asan`). Every case asserts the status the agent answers and that it
is still healthy afterwards.

The cases live in one module per area, tests/integration/hostile_*.py
(classic, files, formats, http, sources, ...); this program imports every
such module, runs all their tests with one PASS/FAIL line each, then stops
each module's agents (a non-zero exit or a sanitizer report is a failure).
Any module also runs alone: `python3 tests/integration/hostile_http.py`.
docs/security.md says what each refusal looks like."""

import glob
import importlib
import os
import sys

import harness as H

HERE = os.path.dirname(os.path.abspath(__file__))


def modules():
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "hostile_*.py")))
    return [importlib.import_module(n) for n in names]


if __name__ == "__main__":
    mods = modules()
    assert mods, "no hostile_*.py module found"
    failed = 0
    try:
        failed = H.run_tests("test-hostile")
    finally:
        for m in mods:
            failed += m.cleanup()
    sys.exit(1 if failed else 0)
