"""Installing worm_fast into an environment that already has its own torch.

* pyproject.toml declares ranges, not pins, which the tested releases satisfy, and
  setup.py refuses a torch below the same floor;
* a build that cannot see torch (pip's build isolation) stops with the instruction to
  build without isolation;
* the wheel, built from the sdist (as `make wheel` does) and installed into a fresh
  environment that reuses this one's torch and nothing else, runs `worm-fast backends`
  with its C++ kernels and a tiny search from outside the source tree, so that a module or
  data file missing from the sdist or the wheel fails here.
"""

import importlib.metadata
import os
import re
import runpy
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
TINY_SEARCH = [
    "--model", "resnet20", "--width", "0.25", "--train-subset", "96", "--test-subset", "64",
    "--batch-size", "32", "--epochs", "2", "--retrain-epochs", "1", "--window", "2",
    "--no-progress", "--no-plots",
]  # fmt: skip


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements() -> list[Requirement]:
    project = _project()
    return [Requirement(line) for line in project["dependencies"]] + [
        Requirement(line) for lines in project["optional-dependencies"].values() for line in lines
    ]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH, so that nothing resolves to the source tree."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


def test_dependencies_are_ranges_that_the_tested_releases_satisfy():
    for requirement in _requirements():
        assert all(spec.operator not in ("==", "===") for spec in requirement.specifier), (
            f"{requirement} pins a release: users' own environments cannot satisfy a pin"
        )
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional group this environment did not install
        assert requirement.specifier.contains(installed, prereleases=True), (
            f"{requirement} excludes the tested {requirement.name} {installed}"
        )


def test_setup_py_refuses_a_torch_below_the_floor_of_pyproject(monkeypatch):
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("WORM_FAST_NO_CUDA", "1")  # the CUDA branch sets TORCH_CUDA_ARCH_LIST
    setup_globals = runpy.run_path(str(ROOT / "setup.py"))
    (torch_requirement,) = [r for r in _requirements() if r.name == "torch"]
    assert str(torch_requirement.specifier) == f">={setup_globals['MIN_TORCH']}"
    script = (
        "import runpy, torch\n"
        "torch.__version__ = torch.torch_version.TorchVersion('2.5.1')\n"
        "runpy.run_path('setup.py')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert f"worm_fast needs torch>={setup_globals['MIN_TORCH']}" in result.stderr
    assert "torch 2.5.1" in result.stderr


def test_a_build_that_cannot_see_torch_stops_with_the_instruction():
    # What a build-isolated `pip install .` runs into: an environment without torch.
    script = "import runpy, sys\nsys.modules['torch'] = None\nrunpy.run_path('setup.py')\n"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "pip install --no-build-isolation ." in result.stderr, result.stderr


def test_wheel_from_the_sdist_runs_outside_the_source_tree(tmp_path):
    dist = tmp_path / "dist"
    # The CPU kernels only: nvcc would add minutes, and the packaging is the same.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        env=_clean_env(WORM_FAST_NO_CUDA="1"),
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("worm_fast-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "worm_fast").rglob("*.py")}
    assert modules - in_wheel == set(), "modules missing from the wheel"
    assert any(re.fullmatch(r"worm_fast/_C\.[^/]+\.so", name) for name in in_wheel)

    # A fresh environment that sees this one's packages (torch, the embedded data) after
    # its own site-packages: the "or equivalent" of --system-site-packages for a venv.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(purelib, "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --force-reinstall: this environment's own worm_fast (editable) has the same version.
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-deps", "--force-reinstall", "--quiet", str(wheel)],
        env=_clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            args, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "RuntimeWarning" not in result.stderr, result.stderr
        return result

    where = run(str(python), "-c", "import worm_fast; print(worm_fast.__file__)")
    assert where.stdout.strip() == f"{purelib}/worm_fast/__init__.py"
    backends = run(str(venv / "bin" / "worm-fast"), "backends").stdout
    assert re.search(r"^cpp\s+yes\s", backends, re.MULTILINE), backends
    run(str(venv / "bin" / "worm-fast"), "search", *TINY_SEARCH, "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "results.json").is_file()
