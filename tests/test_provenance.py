"""What produced a result: package versions and the code revision that records and reports carry."""
from __future__ import annotations

import subprocess
from importlib import metadata

from nnunet_mim.apps.provenance import code_revision, package_versions


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
