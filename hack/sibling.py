"""load_script(name, filename): a sibling script of hack/ as a module.

The scripts' names hold dashes, so `import` cannot name them; the scripts
that reuse another's helpers load it with this (hack/ is on sys.path when
one of them runs)."""

import importlib.util
import os

HACK = os.path.dirname(os.path.abspath(__file__))


def load_script(name, filename):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HACK, filename))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
