"""What produced a result: package versions and the code revision that records and reports carry."""
from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

from nnunet_mim.apps.provenance import RESULT_PACKAGES, code_revision, package_versions

ROOT = Path(__file__).resolve().parents[1]


def test_package_versions_are_the_installed_ones():
    versions = package_versions(("torch", "nnunetv2", "surely-not-a-package-xyz"))
    assert versions == {"torch": metadata.version("torch"), "nnunetv2": metadata.version("nnunetv2"),
                        "surely-not-a-package-xyz": "not installed"}


def test_code_revision_names_the_commit_and_says_when_the_code_differs(tmp_path):
    assert code_revision(tmp_path) is None  # not a git checkout: an installed copy
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_revision(tmp_path) == head
    (tmp_path / "b.py").write_text("untracked files do not count\n")
    assert code_revision(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_revision(tmp_path) == head + "+modified"


def _pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_declared_dependency_inside_its_declared_range():
    """A dependency added to setup.py without a pin, or a pin outside setup.py's range, would make the set-up of a
    fresh machine (scripts/setup_venv.sh installs with constraints.txt) fail or float."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    pins = _pins()
    declared = [Requirement(r) for r in metadata.requires("nnunet_mim")]
    assert {"torch", "nnunetv2", "pytest", "nilearn"} <= {canonicalize_name(r.name) for r in declared}
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in setup.py but not pinned in constraints.txt"
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (req, pins[name])
    for name in RESULT_PACKAGES:  # what records name is what the set-up pins
        assert canonicalize_name(name) in pins, name
