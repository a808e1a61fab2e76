#!/usr/bin/env bash
# Install what the tests need into .venv (reused when present) and run the suite; arguments go to
# pytest (e.g. `bash test.sh tests/test_toy.py`, or `bash test.sh -m "not slow"` for a quicker loop).
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh test
exec .venv/bin/python -m pytest "$@"
