#!/usr/bin/env bash
# Set up a virtualenv in .venv, install olladmr into it and run the daemon in
# the foreground on its built-in defaults (127.0.0.1:40114 -> DMR at
# localhost:12434), or with whatever arguments follow, e.g. --config FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet .
.venv/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
cd /tmp  # run outside the checkout: the installed plugin and package are used
exec "$OLDPWD/.venv/bin/twistd" -n --pidfile= olladmr "$@"
