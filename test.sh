#!/usr/bin/env bash
# Install what the tests need into .venv (reused when present) and run the suite; arguments go to
# pytest (e.g. `bash test.sh tests/test_toy.py`, or `bash test.sh -m "not slow"` for a quicker loop).
# The browser test of serve.html needs chromium: when none is on PATH, Debian's package is installed
# (once, as root); where that cannot be done the test is skipped and says why.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh test
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "test.sh: no chromium on PATH and not root: the browser test of serve.html is skipped (as root: apt-get install chromium)"
  elif ! command -v apt-get >/dev/null; then
    echo "test.sh: no chromium on PATH and no apt-get: the browser test of serve.html is skipped"
  else
    echo "test.sh: installing Debian's chromium for the browser test of serve.html (once)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null; } || echo "test.sh: chromium did not install: the browser test of serve.html is skipped"
  fi
fi
exec .venv/bin/python -m pytest "$@"
