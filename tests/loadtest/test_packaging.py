"""What each extra carries: the serving code imports nothing the `serve` extra lacks, the load tester declares what
it uses, and pyproject's package data patterns match real files."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
NOT_FOR_SERVING = ("torch", "torchvision", "timm", "matplotlib", "requests", "locust")

# Refuses torch/matplotlib/requests for everyone (the serve extra installs none of them) and psutil for steerprune's
# own modules (BentoML depends on psutil itself; our serving code must not).
BLOCKER = r'''
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("torch", "matplotlib", "requests"):
            raise ImportError(f"blocked: {name}")
        if top == "psutil":
            f = sys._getframe(1)
            while f is not None and f.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                f = f.f_back
            if f is not None and f.f_globals.get("__name__", "").startswith("steerprune"):
                raise ImportError(f"blocked: {name} imported by {f.f_globals['__name__']}")
        return None

sys.meta_path.insert(0, Blocker())
'''


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_serving_imports_without_torch_matplotlib_requests_psutil():
    code = BLOCKER + (
        "import steerprune.service.service, steerprune.service.engine, steerprune.service.preprocess, "
        "steerprune.service.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'requests'))\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"BENTOML_DO_NOT_TRACK": "true", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_the_blocker_really_blocks():
    """The test above would pass vacuously if the blocker blocked nothing."""
    code = BLOCKER + "import steerprune.loadtest.probes as p\np.server_rss_mb(1)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "blocked: psutil imported by steerprune.loadtest.probes" in out.stderr
    out = subprocess.run([sys.executable, "-c", BLOCKER + "import matplotlib\n"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "blocked: matplotlib" in out.stderr


def test_serve_extras_carry_serving_only():
    for extra, runtime in (("serve", "onnxruntime"), ("serve-gpu", "onnxruntime-gpu")):
        names = _names(EXTRAS[extra])
        assert {"bentoml", runtime, "pillow", "numpy"} <= names, (extra, names)
        assert not names & set(NOT_FOR_SERVING), (extra, names)
        assert not names & {"onnxruntime", "onnxruntime-gpu"} - {runtime}  # never both runtimes
    assert {"aiohttp", "prometheus-client", "psutil", "matplotlib", "locust"} <= _names(EXTRAS["loadtest"])


def _third_party_imports(folder: Path) -> dict[str, set[str]]:
    """Top-level module names imported anywhere in folder/*.py (function-level imports too) -> importing files."""
    found: dict[str, set[str]] = {}
    for f in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                top = m.split(".")[0]
                if top != "steerprune" and top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, set()).add(f.name)
    return found


def _requires(dist: str) -> set[str]:
    """Names of what installing `dist` installs directly (its unconditional requirements)."""
    try:
        reqs = importlib.metadata.requires(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return set()
    return _names([r for r in reqs if "extra ==" not in r])


def _undeclared(folder: str, extras: tuple[str, ...], transitive: bool) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    declared = _names(PYPROJECT["project"]["dependencies"]) | set().union(*(_names(EXTRAS[e]) for e in extras))
    if transitive:  # what the install brings with the declared packages
        declared |= set().union(*(_requires(d) for d in declared))
    bad = []
    for module, files in sorted(_third_party_imports(ROOT / folder).items()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            bad.append(f"{folder}/{sorted(files)} import {module} ({', '.join(sorted(names))})")
    return bad


def test_the_load_tester_declares_what_it_imports():
    assert _undeclared("loadtest", ("loadtest",), transitive=False) == []


def test_serving_imports_only_what_the_serve_extra_installs():
    """Directly or through BentoML (its web stack: starlette, anyio, pydantic): `pip install '.[serve]'` has it."""
    assert _undeclared("service", ("serve",), transitive=True) == []


def test_packages_map_to_folders_and_package_data_matches_files():
    st = PYPROJECT["tool"]["setuptools"]
    assert {"steerprune.loadtest": "loadtest", "steerprune.bench": "bench"}.items() <= st["package-dir"].items()
    assert set(st["packages"]) == set(st["package-dir"])
    for pkg, folder in st["package-dir"].items():
        assert (ROOT / folder / "__init__.py").is_file(), pkg
    for pkg, patterns in st.get("package-data", {}).items():
        for pattern in patterns:
            assert list((ROOT / st["package-dir"][pkg]).glob(pattern)), f"{pkg}: {pattern} matches no file"
