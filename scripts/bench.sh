#!/usr/bin/env bash
# Benchmarks side by side with OpenSSH sshd (not part of the tests). Arguments go to
# `python -m bench` (e.g. --size 64M --rounds 2, --only bulk).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
.venv/bin/pip install -q -e '.[test,bench]'
exec .venv/bin/python -m bench "$@"
