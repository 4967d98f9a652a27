#!/usr/bin/env bash
# The README's test command after set-up: lint, types, then every test (root-only ones included when root).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check edge_lb healthchecks tests
.venv/bin/mypy
.venv/bin/pytest -q --durations=15 "$@"  # the slowest tests named: CI time stays visible
