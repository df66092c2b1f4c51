#!/usr/bin/env python3
"""
The resident memory of the design card's import graph, before any olladmr
code runs: each line imports one more part of the required stack in a fresh
interpreter (pyOpenSSL hidden, as olladmr hides it when no TLS is
configured) and prints its ``VmRSS``.

    python bench/import_floor.py [--python PATH]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

STEPS = [
    ("the interpreter", []),
    ("+ twisted.python.compat (stdlib it pulls: ssl, email, http.client...)", ["twisted.python.compat"]),
    ("+ the reactor, twisted.web.server, application, logger",
     ["twisted.internet.reactor", "twisted.web.server", "twisted.application.service", "twisted.logger"]),
    ("+ klein (werkzeug)", ["klein"]),
    ("+ treq, twisted.web.client", ["treq", "twisted.web.client"]),
    ("+ yaml, prometheus_client, httptools", ["yaml", "prometheus_client", "httptools"]),
    ("+ olladmr's modules (olladmr.build)", ["olladmr.build"]),
]

PROBE = """
import importlib, sys
sys.modules["OpenSSL"] = None  # as olladmr.lean does without TLS
for name in sys.argv[1:]:
    importlib.import_module(name)
print([line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1])
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    modules: list[str] = []
    for label, more in STEPS:
        modules += more
        out = subprocess.run([args.python, "-c", PROBE, *modules], capture_output=True, text=True, check=True)
        print(f"{int(out.stdout) / 1024:6.1f} MB  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
