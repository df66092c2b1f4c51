#!/usr/bin/env bash
# Set up a virtualenv in .venv (installing olladmr as a real, non-editable
# package with its test extras), type-check the package (mypy.ini) and run
# the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ".[test]"
# twistd discovers plugins through a cache; refresh it after installing.
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
