#!/usr/bin/env bash
# Shared set-up of run_demo.sh and run_tests.sh: a virtual environment with PyTorch and nnunet_mim.
# Sourced, not run; sets VENV. Idempotent: a second run only re-installs nnunet_mim itself.
VENV="${NNUNET_MIM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
# Every package at the version CI tests (constraints.txt), so that seeded runs repeat on a new machine.
CONSTRAINTS="$(dirname "${BASH_SOURCE[0]}")/../constraints.txt"
# PyTorch first, pinned there: torch 2.14.1 + torchvision 0.29.1 (CUDA builds that also run on the CPU). PyPI's
# CPU-only torch 2.13 does not work here: nnunetv2 pulls in timm -> torchvision, which then crashes beside it.
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" torch torchvision
# An editable install of this checkout: Python imports the working tree (trainers/ and architectures/ as
# nnunet_mim.trainers and nnunet_mim.architectures, from any folder), so tests and the demo run the code you see.
# Users install the same package with a plain `pip install .`. Then the extras (pytest, nilearn).
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" --no-deps -e . \
    && "$VENV/bin/pip" install -q -c "$CONSTRAINTS" -e ".[test,data]"
