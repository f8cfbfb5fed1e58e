#!/bin/sh
# The GPU acceptance run (benchmarks/gpu_acceptance.py) from anywhere; arguments pass through (--smoke, --out DIR).
cd "$(dirname "$0")/.." && exec "${PYTHON:-python3}" benchmarks/gpu_acceptance.py "$@"
