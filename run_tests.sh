#!/usr/bin/env bash
# Set up everything on a fresh machine (a virtual environment in .venv) and run the test suite.
#   bash run_tests.sh             # all tests (the README gives the measured time)
#   bash run_tests.sh -k masking  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_venv.sh
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
# One pytest-xdist worker per core (at most 4); a test file stays on one worker, so its module fixtures are built once.
# `-n 0` runs everything in this process (for a debugger).
exec "$VENV/bin/pytest" -q -p no:cacheprovider --durations=20 -n auto --maxprocesses 4 --dist loadfile tests "$@"
