#!/usr/bin/env bash
# A light virtual environment with another nnunetv2 release, to run nnunet_mim against it (tests, CI):
#
#   bash scripts/nnunet_version_env.sh 2.6.4            # -> .venv-nnunet-2.6.4/
#   bash scripts/nnunet_version_env.sh 2.7.0 /tmp/env   # another folder
#
# The new environment reuses the main one (.venv, or $NNUNET_MIM_VENV: torch, dynamic-network-architectures,
# nnunet_mim itself as installed there) through a .pth file that adds the main site-packages *after* its own, so
# only nnunetv2 VERSION is installed (pip install --no-deps), plus any dependency of that release whose required
# version the main environment does not meet. No second torch. Console scripts: bin/nnUNetv2_* of that release and
# bin/nnunet_mim. Idempotent: a working environment of that version is left as it is.
#
# Needs a package registry (nnunetv2 is fetched with pip). Prints the environment's folder on the last line.
set -euo pipefail

VERSION="${1:?usage: bash scripts/nnunet_version_env.sh VERSION [FOLDER]   (e.g. 2.6.4)}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MAIN="${NNUNET_MIM_VENV:-.venv}"
case "$MAIN" in /*) ;; *) MAIN="$ROOT/$MAIN" ;; esac
TARGET="${2:-$ROOT/.venv-nnunet-$VERSION}"
case "$TARGET" in /*) ;; *) TARGET="$PWD/$TARGET" ;; esac
MAIN_PY="$MAIN/bin/python"
[ -x "$MAIN_PY" ] || { echo "No main environment at $MAIN: run 'bash run_tests.sh -k nothing' (or scripts/setup_venv.sh) first." >&2; exit 1; }

purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

# The check: nnunetv2 is imported from the environment's own site-packages and has the requested version.
CHECK='
import importlib.metadata as md, os, sys, sysconfig
import nnunetv2
own = os.path.realpath(sysconfig.get_paths()["purelib"])
where = os.path.realpath(nnunetv2.__file__)
version = md.version("nnunetv2")
if version != sys.argv[1] or not where.startswith(own + os.sep):
    sys.exit(f"nnunetv2 {version} imported from {where}; expected {sys.argv[1]} from {own}")
print(f"nnunetv2 {version} from {where}")
'

if [ -x "$TARGET/bin/python" ] && "$TARGET/bin/python" -c "$CHECK" "$VERSION" 2>/dev/null; then
    echo "$TARGET"
    exit 0
fi

"$MAIN_PY" -m venv --clear --without-pip "$TARGET"
OWN_SP="$(purelib "$TARGET/bin/python")"
MAIN_SP="$(purelib "$MAIN_PY")"
# addsitedir (not a bare path line) so that the main environment's own .pth files (the editable nnunet_mim) apply
echo "import site; site.addsitedir('$MAIN_SP')" > "$OWN_SP/_nnunet_mim_main_environment.pth"

PIP=("$MAIN_PY" -m pip --python "$TARGET/bin/python" --disable-pip-version-check)
# --ignore-installed: the main environment's nnunetv2 (visible through the .pth file) must not satisfy it
"${PIP[@]}" install -q --no-deps --ignore-installed "nnunetv2==$VERSION"

# Dependencies of this release that the (shared) environment does not satisfy: installed into the new one only.
UNMET="$("$TARGET/bin/python" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement

for text in md.requires("nnunetv2") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        installed = md.version(req.name)
    except md.PackageNotFoundError:
        installed = None
    if installed is None or not req.specifier.contains(installed, prereleases=True):
        print(str(req).split(";")[0])
EOF
)"
if [ -n "$UNMET" ]; then
    echo "nnunetv2 $VERSION needs, beyond the main environment: $(echo $UNMET)"
    # shellcheck disable=SC2086
    "${PIP[@]}" install -q $UNMET
fi

cat > "$TARGET/bin/nnunet_mim" <<EOF
#!$TARGET/bin/python
import sys
from nnunet_mim.apps.cli import main
sys.exit(main())
EOF
chmod +x "$TARGET/bin/nnunet_mim"

"$TARGET/bin/python" -c "$CHECK" "$VERSION"
echo "$TARGET"
