"""Packaging: every imported package declared, optional stacks in extras (and not needed by
the core), the private APIs still used pinned here, and package discovery."""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ROBUSTNESS_STACK = {"imagecorruptions", "cv2", "skimage", "numba"}
CLUSTER_STACK = {"jsonschema", "kubernetes_validate"}
FIND = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]


def _shipped_roots() -> list[str]:
    """Top-level packages the wheel ships: folders with an ``__init__.py`` that the
    ``include`` patterns match (``zosam``, and any deployment package beside it)."""
    from fnmatch import fnmatch

    return sorted(p.parent.name for p in ROOT.glob("*/__init__.py")
                  if any(fnmatch(p.parent.name, pat) for pat in FIND["include"]))


def _dist_name(requirement: str) -> str:
    """``"ray[tune]==2.60.0"`` -> ``"ray"`` (PEP 503 normalised)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    """Distributions per group: ``core`` and each extra (self-references like ``zosam[a,b]`` expanded)."""
    groups = {"core": {_dist_name(r) for r in PYPROJECT["dependencies"]}}
    extras = PYPROJECT["optional-dependencies"]
    for extra, reqs in extras.items():
        names = set()
        for r in reqs:
            m = re.fullmatch(r"zosam\[([^\]]+)\]", r.strip())
            names |= {d for e in m.group(1).split(",") for d in map(_dist_name, extras[e.strip()])} if m \
                else {_dist_name(r)}
        groups[extra] = names
    return groups


def _imports(roots: list[str]) -> dict[str, list[tuple[str, bool]]]:
    """Top-level third-party module -> ``(file, at_module_level)`` for every import in the
    packages ``roots``, function-level (lazy) imports included."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(p for root in roots for p in (ROOT / root).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in roots:
                    found.setdefault(top, []).append((str(path.relative_to(ROOT)), id(node) in module_level))
    return found


def test_every_imported_package_is_declared() -> None:
    declared = set().union(*_declared().values())
    provided_by = importlib.metadata.packages_distributions()
    roots = _shipped_roots()
    assert "zosam" in roots
    imports = _imports(roots)
    assert {"torch", "ray", "mlflow", "optuna", "tqdm", "imagecorruptions"} <= set(imports)  # the walk sees them
    missing = {}
    for module, where in imports.items():
        dists = {_dist_name(d) for d in provided_by.get(module, [])}
        assert dists, f"{module} (imported by {where[0][0]}) is not installed"
        if not dists & declared:
            missing[module] = (sorted(dists), where[0][0])
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_optional_stacks_are_extras_and_imported_lazily() -> None:
    groups = _declared()
    provided_by = importlib.metadata.packages_distributions()
    for stack, extra in ((ROBUSTNESS_STACK, "robustness"), (CLUSTER_STACK, "cluster")):
        dists = {_dist_name(d) for m in stack for d in provided_by.get(m, [])}
        assert not dists & groups["core"], f"{extra} packages in the core dependencies: {dists & groups['core']}"
        assert groups[extra] <= groups["dev"], f"the dev extra lacks {extra}"  # the tests have everything
    assert "imagecorruptions-imaug" in groups["robustness"] and "jsonschema" in groups["cluster"]
    assert any(r == "tqdm==4.70.1" for r in PYPROJECT["dependencies"])
    optional = ROBUSTNESS_STACK | CLUSTER_STACK
    eager = {m: [f for f, top in where if top] for m, where in _imports(["zosam"]).items() if m in optional}
    assert not any(eager.values()), f"optional packages imported at module level: {eager}"


def test_the_core_runs_and_reads_cifar10c_without_the_robustness_stack(tmp_path: Path) -> None:
    """In a fresh interpreter where the robustness packages cannot be imported: the CLI and the
    data package import, a CIFAR-10-C set is read, and generating one names the extra."""
    root = tmp_path / "c10c"
    root.mkdir()
    images = np.random.default_rng(0).integers(0, 256, size=(5 * 3, 32, 32, 3), dtype=np.uint8)
    np.save(root / "contrast.npy", images)
    np.save(root / "labels.npy", np.array([1, 2, 3] * 5, dtype=np.uint8))
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(ROBUSTNESS_STACK)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")
sys.meta_path.insert(0, Block())
import zosam.cli, zosam.runner, zosam.data
from zosam.data import CorruptionSet, generate_cifar10c
from zosam.extras import MissingExtraError
split = CorruptionSet.open({str(root)!r}).load("contrast", 5)
assert split.images.shape == (3, 3, 32, 32) and split.labels.tolist() == [1, 2, 3], split
try:
    generate_cifar10c(split.images, split.labels, {str(tmp_path / "gen")!r}, ["contrast"], [1])
except MissingExtraError as e:
    print(e)
blocked = sorted(m for m in sys.modules if m.split(".")[0] in {sorted(ROBUSTNESS_STACK)!r})
print("loaded:", blocked)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert "pip install 'zosam[robustness]'" in lines[0] and "imagecorruptions" in lines[0]
    assert lines[1] == "loaded: []"
    assert not (tmp_path / "gen").exists()  # refused before writing anything


def test_imagecorruptions_private_helpers() -> None:
    """zosam.data.corruptions uses two private helpers of imagecorruptions-imaug (no public
    form takes CIFAR-10-C's constants). This fails first if an upgrade moves or changes them."""
    from imagecorruptions import corruptions as ic

    assert importlib.metadata.version("imagecorruptions-imaug") == "1.1.5"
    assert list(inspect.signature(ic._motion_blur).parameters) == ["x", "radius", "sigma", "angle"]
    glass = getattr(ic._shuffle_pixels_njit_glass_blur, "py_func", ic._shuffle_pixels_njit_glass_blur)
    assert list(inspect.signature(glass).parameters) == ["d0", "d1", "x", "c", "seed"]
    x = np.zeros((32, 32, 3), np.uint8)
    x[12:20, 12:20] = 255
    out = ic._motion_blur(x, radius=6, sigma=1, angle=0)
    assert out.shape == x.shape and out[16].sum() > 0


def test_ray_address_file_matches_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """zosam.bench.loopback_cluster writes Ray's address-file rule out (Ray has no public
    function for it); this compares it with Ray's private one, which breaks first if Ray moves it."""
    from ray._common.utils import get_ray_address_file

    from zosam.bench.loopback_cluster import ray_address_file

    for env in ({}, {"TMPDIR": str(tmp_path / "t")}, {"RAY_TMPDIR": str(tmp_path / "r"), "TMPDIR": "/x"}):
        for k in ("RAY_TMPDIR", "TMPDIR"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert ray_address_file() == Path(get_ray_address_file(None)), env


def test_ray_launcher_private_helpers() -> None:
    """zosam_cluster.launcher validates ``ray up`` configs offline with two private helpers of
    Ray (its public bootstrap_config contacts the cloud). This fails first if Ray moves them or
    stops reporting a schema error as jsonschema's ValidationError with a path."""
    import jsonschema
    from ray.autoscaler._private import util

    assert list(inspect.signature(util.prepare_config).parameters) == ["config"]
    assert list(inspect.signature(util.validate_config).parameters) == ["config"]
    config = util.prepare_config({"cluster_name": "c", "provider": {"type": "aws", "region": "us-west-2"}})
    util.validate_config(config)
    config["available_node_types"][config["head_node_type"]]["max_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError) as err:
        util.validate_config(config)
    assert list(err.value.absolute_path)[-1] == "max_workers"


def test_package_discovery_includes_every_package() -> None:
    """setuptools' discovery, as pyproject.toml configures it, finds every folder of the shipped
    packages with Python files (wherever code moves inside them), and each is a regular package."""
    from setuptools import find_namespace_packages

    found = set(find_namespace_packages(str(ROOT), include=FIND["include"], exclude=FIND.get("exclude", ())))
    folders = {".".join(p.parent.relative_to(ROOT).parts) for root in _shipped_roots()
               for p in (ROOT / root).rglob("*.py") if "__pycache__" not in p.parts}
    assert folders <= found, folders - found
    assert all((ROOT / f.replace(".", "/") / "__init__.py").is_file() for f in folders)
