#!/usr/bin/env bash
# Install what the tests need into .venv (reused when present) and run the suite.
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh test
exec .venv/bin/python -m pytest "$@"
