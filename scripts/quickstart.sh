#!/usr/bin/env bash
# Set up (idempotent), then compress the embedded SmolLM2-135M by 20% and evaluate it.
# --force: re-running the quickstart replaces its previous output in runs/quickstart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/workbench run profiles/quickstart.toml --force "$@"
