"""The package's layers import in one direction: core <- architectures <- nnunet glue <- trainers <- apps.

Read from the source (every ``import``, including those inside functions), so a cycle or an upward import fails
here before it becomes a run-time surprise.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: layer of each source folder (module prefix -> rank); a module may import its own rank or lower ones
LAYERS = {
    "nnunet_mim.core": 0,
    "nnunet_mim.architectures": 1,
    "nnunet_mim.nnunet": 2,
    "nnunet_mim.trainers": 3,
    "nnunet_mim.apps": 4,
}
FOLDERS = {"nnunet_mim.core": ROOT / "nnunet_mim" / "core", "nnunet_mim.architectures": ROOT / "architectures",
           "nnunet_mim.nnunet": ROOT / "nnunet_mim" / "nnunet", "nnunet_mim.trainers": ROOT / "trainers",
           "nnunet_mim.apps": ROOT / "nnunet_mim" / "apps"}


def layer_of(module: str) -> int | None:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None


def imports_of(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def all_sources() -> list[tuple[str, Path]]:
    return [(prefix, p) for prefix, folder in FOLDERS.items() for p in sorted(folder.rglob("*.py"))]


def test_every_source_file_belongs_to_a_layer():
    layered = {p for _, p in all_sources()}
    stray = [p.relative_to(ROOT) for p in (ROOT / "nnunet_mim").glob("*.py") if p.name != "__init__.py"]
    assert not stray, f"modules outside the layer folders: {stray}"
    assert len(layered) > 30


@pytest.mark.parametrize("prefix,path", all_sources(), ids=lambda v: str(v).replace(str(ROOT) + "/", ""))
def test_imports_point_downwards(prefix, path):
    rank = LAYERS[prefix]
    upward = [f"line {line}: {name} ({[k for k, v in LAYERS.items() if v == layer_of(name)][0]})"
              for line, name in imports_of(path) if (layer_of(name) or -1) > rank]
    assert not upward, f"{path.relative_to(ROOT)} ({prefix}) imports a higher layer: {upward}"
    if rank == 0:
        third = [name for _, name in imports_of(path) if name.split(".")[0] in ("nnunetv2", "batchgenerators")]
        assert not third, f"core modules are pure torch math; {path.name} imports {third}"


def test_ext_path_does_not_import_torch():
    code = ("import sys; from nnunet_mim.apps.cli import main; main(['ext-path']); "
            "assert 'torch' not in sys.modules, 'ext-path imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ext_trainers")


def test_the_working_tree_is_what_python_imports():
    """From the checkout's root (where ./nnunet_mim could shadow the installed package) and from elsewhere."""
    code = "import nnunet_mim.trainers.hybridmim as m, nnunet_mim.architectures.sac_vit as a; print(m.__file__, a.__file__)"
    for cwd in (ROOT, ROOT / "tests"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        trainer, arch = proc.stdout.split()
        assert Path(trainer) == ROOT / "trainers" / "hybridmim.py"
        assert Path(arch) == ROOT / "architectures" / "sac_vit.py"


def test_a_regular_install_ships_every_module(tmp_path):
    """``pip install .`` (not editable) must carry every source file of every layer, and the trainer index."""
    import zipfile

    import shutil

    source = tmp_path / "src"  # a clean copy: setuptools would reuse a stale build/ folder of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info",
                                                                 "__pycache__", "demo_output*"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("nnunet_mim-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = {f"{prefix.replace('.', '/')}/{p.relative_to(folder).as_posix()}"
                for prefix, folder in FOLDERS.items() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"nnunet_mim/{p.name}" for p in (ROOT / "nnunet_mim").glob("*.py")}
    expected |= {f"nnunet_mim/ext_trainers/{p.name}" for p in (ROOT / "nnunet_mim" / "ext_trainers").glob("*.py")}
    assert sorted(expected - shipped) == []
