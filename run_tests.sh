#!/usr/bin/env bash
# Set up everything on a fresh machine (a virtual environment in .venv) and run the test suite.
#   bash run_tests.sh             # all tests (the README gives the measured time)
#   bash run_tests.sh -k masking  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_venv.sh
export nnUNet_def_n_proc="${nnUNet_def_n_proc:-1}"
exec "$VENV/bin/pytest" -q -p no:cacheprovider --durations=20 tests "$@"
