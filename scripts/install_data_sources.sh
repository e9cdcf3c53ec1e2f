#!/usr/bin/env bash
# Install the offline data sources used by `nnunet_mim build-data` (nnunet_mim itself never downloads data):
#   * Debian package mricron-data (Colin27 ch2, AAL atlas, INIA19 macaque T1). Skipped if already present in
#     $nnUNet_mim_mricron_dir (or $NNUNET_MIM_MRICRON_DIR), /usr/share/mricron/templates or the cache dir. Otherwise `apt-get install` when
#     running as root, else (or if that fails) `apt-get download` + `dpkg-deb -x` into
#     ${nnUNet_mim_data_cache:-$HOME/.cache/nnunet_mim}/mricron-data (or $NNUNET_MIM_DATA_CACHE) (no root needed).
#     NNUNET_MIM_USER_INSTALL=1 skips the system-wide install even as root (e.g. in shared containers).
#   * PyPI package nilearn (MNI152 2009a T1/GM/WM ship inside the wheel) in the current Python environment.
# Usage: bash scripts/install_data_sources.sh   (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail

PYTHON="${PYTHON:-python}"
CACHE="${nnUNet_mim_data_cache:-${NNUNET_MIM_DATA_CACHE:-$HOME/.cache/nnunet_mim}}"
CACHE_TEMPLATES="$CACHE/mricron-data/usr/share/mricron/templates"
NEEDED=(ch2.nii.gz aal.nii.gz aal.nii.txt inia19-t1-brain.nii.gz)

has_templates() {
    local d="$1" f
    [ -n "$d" ] || return 1
    for f in "${NEEDED[@]}"; do [ -f "$d/$f" ] || return 1; done
}

install_mricron() {
    local d
    for d in "${nnUNet_mim_mricron_dir:-${NNUNET_MIM_MRICRON_DIR:-}}" /usr/share/mricron/templates "$CACHE_TEMPLATES"; do
        if has_templates "$d"; then echo "mricron-data: found in $d"; return 0; fi
    done
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "mricron-data: apt-get not available; install the Debian package mricron-data by other means" \
             "and set nnUNet_mim_mricron_dir to its templates folder" >&2
        return 1
    fi
    if [ "$(id -u)" = "0" ] && [ "${NNUNET_MIM_USER_INSTALL:-0}" != "1" ]; then
        if DEBIAN_FRONTEND=noninteractive apt-get install -y mricron-data \
                && has_templates /usr/share/mricron/templates; then
            echo "mricron-data: installed system-wide in /usr/share/mricron/templates"; return 0
        fi
        echo "mricron-data: apt-get install failed; falling back to apt-get download" >&2
    fi
    local tmp; tmp="$(mktemp -d)"
    (cd "$tmp" && apt-get download mricron-data) || {
        echo "mricron-data: 'apt-get download mricron-data' failed (package lists outdated? try" \
             "'apt-get update' as root; the package is in Debian/Ubuntu main/universe)" >&2
        rm -rf "$tmp"; return 1; }
    mkdir -p "$CACHE/mricron-data"
    dpkg-deb -x "$tmp"/mricron-data_*.deb "$CACHE/mricron-data"
    rm -rf "$tmp"
    has_templates "$CACHE_TEMPLATES" || { echo "mricron-data: unpacked but templates missing" >&2; return 1; }
    echo "mricron-data: unpacked into $CACHE_TEMPLATES"
}

install_nilearn() {
    if "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nilearn') is None)"; then
        echo "nilearn: already installed for $PYTHON"
    else
        "$PYTHON" -m pip install nilearn
    fi
}

status=0
install_mricron || status=1
install_nilearn || status=1
exit $status
