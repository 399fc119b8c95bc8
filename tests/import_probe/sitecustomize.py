"""Loaded at start-up by the processes that tests/test_startup.py starts with this folder first on PYTHONPATH.

It records which files ask for a watched package (`LAB_IMPORT_WATCH`, comma-separated top-level names; default
torchvision), by `import` statements and by `importlib.import_module` (how Hydra imports a `_target_`), also when the
package is already imported, and at exit writes those requests and the names of all imported modules as JSON to
`LAB_IMPORT_REPORT`.
"""

import atexit
import builtins
import importlib
import json
import os
import sys

REPORT = os.environ.get("LAB_IMPORT_REPORT")
WATCHED = set(os.environ.get("LAB_IMPORT_WATCH", "torchvision").split(","))
requests: list[tuple[str, str]] = []  # (file that asked, module asked for)


def note(name: str, caller) -> None:
    if name.partition(".")[0] in WATCHED:
        requests.append((caller.f_code.co_filename, name))


if REPORT:
    real_import, real_import_module = builtins.__import__, importlib.import_module

    def traced_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0:
            note(name, sys._getframe(1))
        return real_import(name, globals, locals, fromlist, level)

    def traced_import_module(name, package=None):
        note(name, sys._getframe(1))
        return real_import_module(name, package)

    builtins.__import__ = traced_import
    importlib.import_module = traced_import_module

    @atexit.register
    def write_report() -> None:
        with open(REPORT, "w") as f:
            json.dump({"modules": sorted(sys.modules), "requests": requests}, f)
