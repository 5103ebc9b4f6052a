"""Issue 13: the folders client/ and management/ are the packages `meshssh_client` and
`meshmgmt`. From the repository root a stray `import client` would still work (the folder is
on sys.path) and hide until the wheel is installed, so these tests look for one."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support import REPO

INSTALLED_AS = {"meshsshd": "meshsshd", "client": "meshssh_client", "management": "meshmgmt"}
OLD_NAMES = ("client", "management")
SOURCE_DIRS = (*INSTALLED_AS, "tests", "bench", "scripts")


def _package_folders() -> set[str]:
    """Every folder below a package root that holds a file, named as installed."""
    names = set()
    for folder, top in INSTALLED_AS.items():
        for d in [REPO / folder, *(p for p in (REPO / folder).rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts:
                continue
            if any(f.is_file() and "__pycache__" not in f.parts for f in d.rglob("*")):
                names.add(".".join((top, *d.relative_to(REPO / folder).parts)))
    return names


def test_pyproject_lists_every_package_folder_under_its_installed_name() -> None:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = _package_folders()
    assert not folders - listed, (f"add {sorted(folders - listed)} to [tool.setuptools] packages in "
                                  "pyproject.toml, or the wheel leaves them out")
    assert not listed - folders, f"pyproject.toml lists packages with no folder: {sorted(listed - folders)}"
    assert setuptools["package-dir"] == {"meshssh_client": "client", "meshmgmt": "management"}


def _old_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in OLD_NAMES]
    return found


def test_no_source_file_imports_the_old_package_names() -> None:
    found = [hit for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py")) for hit in _old_imports(p)]
    assert not found, f"import meshssh_client / meshmgmt (the folders client/, management/) instead: {found}"


@pytest.mark.timeout(60)
def test_importing_every_module_from_the_repository_root_loads_no_old_name() -> None:
    """Catches what the AST misses: importlib and `-m` targets held in strings."""
    code = ("import importlib, pkgutil, sys\n"
            "import meshsshd, meshssh_client, meshmgmt\n"
            "from meshmgmt.store.migrate import import_all_models\n"
            "for pkg in (meshsshd, meshssh_client, meshmgmt):\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "import_all_models()\n"
            "print(' '.join(sorted(n for n in sys.modules if n.split('.')[0] in ('client', 'management'))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "", f"loaded under the old names: {r.stdout}"
