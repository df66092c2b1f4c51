#!/usr/bin/env bash
# Set up a virtualenv in .venv (installing olladmr as a real, non-editable
# package with its test extras), type-check the package (mypy.ini) and run
# the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The dashboard's tests drive a real headless Chromium: Debian's, installed
# here when missing (as root, or with password-less sudo).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo="none"; fi
  if [ "$sudo" != none ] && command -v apt-get >/dev/null 2>&1; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  else
    echo "scripts/test.sh: chromium is missing and cannot be installed here; the browser tests will be skipped" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ".[test]"
# twistd discovers plugins through a cache; refresh it after installing.
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
