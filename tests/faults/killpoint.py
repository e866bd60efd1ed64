"""Run the clc-dask CLI and SIGKILL it at an exact point: a rename onto a matching path.

Usage: ``python killpoint.py '{"match": "*/tiles/*/classes.tif", "count": 2, "when": "after"}' ARGS…``

Every finished file and folder clc-dask writes appears by a rename (``os.replace``) onto its
final name, so "the n-th rename onto a path matching ``match``" names a point of a run by the
store's public layout only: ``before`` kills with the temporary file complete but not yet in
place, ``after`` with it in place but not yet journaled. The process kills itself with SIGKILL
(no cleanup of any kind runs), from whichever thread renames.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import sys
import threading

spec = json.loads(sys.argv[1])
_replace = os.replace
_lock = threading.Lock()
_seen = 0


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def replace(src, dst, *args, **kwargs):  # noqa: ANN001, ANN201 - os.replace's signature
    global _seen
    hit = False
    if fnmatch.fnmatch(os.fspath(dst), spec["match"]):
        with _lock:
            _seen += 1
            hit = _seen == spec.get("count", 1)
    if hit and spec.get("when", "after") == "before":
        _kill()
    result = _replace(src, dst, *args, **kwargs)
    if hit:
        _kill()
    return result


os.replace = replace
sys.argv = ["clc-dask", *sys.argv[2:]]

from clc_dask.cli import main  # noqa: E402 - after the patch

main()
