#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, install the offline data sources (Debian mricron-data into a
# user cache, nilearn from PyPI; nothing is downloaded at run time), then plan, pretrain (HybridMIM), finetune
# from scratch and from the pretrained weights, predict and evaluate on real scans (about 30 min on 2 CPU cores).
#   bash run_demo.sh           # outputs in demo_output/
#   bash run_demo.sh --quick   # a few minutes: tiny data and budget
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_venv.sh
NNUNET_MIM_USER_INSTALL=1 PYTHON="$VENV/bin/python" bash scripts/install_data_sources.sh \
    || echo "WARNING: mricron-data unavailable; the demo falls back to the MNI152 tissue dataset (nilearn)" >&2
exec "$VENV/bin/nnunet_mim" demo "$@"
