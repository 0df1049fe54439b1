"""
The built wheel, installed non-editable, gives twistd the plugin.

The session fixture builds the wheel once, from a copy of the tree (the source
stays clean), without build isolation when this environment has a setuptools
new enough (the test extra brings one), so nothing is fetched.  The test installs
it with ``--no-index --no-deps`` into a fresh virtualenv that finds its
dependencies in this environment's site-packages: it works offline.  ``tox -e
packaging`` is the fuller check (sdist, twine, a wheel with its dependencies).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.packaging

#: What the copy of the tree leaves out: caches, builds, environments.
LEFT_OUT = shutil.ignore_patterns(
    ".git", ".tox", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)
TWISTD = "from twisted.scripts.twistd import run; run()"


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _setuptools_builds() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # noqa: BLE001 - not installed, or an odd version: isolate the build
        return False


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once per session (per xdist worker)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=LEFT_OUT)
    isolation = [] if _setuptools_builds() else ["--use-pep517"]
    offline = ["--no-build-isolation"] if not isolation else []
    run(
        sys.executable,
        *("-m", "pip", "wheel", "--no-deps", "-q", *offline, *isolation),
        *("-w", str(tmp / "wheels"), str(source)),
    )
    (found,) = (tmp / "wheels").glob("llmproxy-*.whl")
    return found


def test_the_wheel_holds_the_dropin_and_the_default_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/llmproxy_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "twisted/plugins/dropin.cache" not in names
    assert "llmproxy/default.yaml" in names and "llmproxy/testing/mock.py" in names


def test_wheel_installs_the_twistd_plugin(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"))
    site = Path(str(site).strip())
    # The dependencies come from this environment (a .pth line adds its
    # site-packages after the venv's own; the .pth files there are not read,
    # so an editable install of the checkout does not leak in).
    (site / "_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(
        sys.executable,
        *("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site)),
        *("--find-links", str(wheel.parent), "llmproxy"),
    )
    listing = run(str(python), "-c", TWISTD, "--help", cwd=tmp_path)
    assert "llmproxy " in listing and "llmproxy-mock" in listing
    # Installed anywhere, it starts from its packaged default config, its own copy.
    options = run(
        str(python),
        "-c",
        "import llmproxy; from llmproxy.tap import Options;"
        "o = Options(); o.parseOptions([]); print(o.config.source); print(llmproxy.__file__)",
        cwd=tmp_path,
    )
    source, package = options.split("\n")[:2]
    assert source == "<built-in default>"
    assert package.startswith(str(site))
    # The dropin went where twistd looks (which copy of a dropin twistd loads
    # first follows Twisted's own place: this environment's, under tox).
    assert (site / "twisted" / "plugins" / "llmproxy_plugin.py").is_file()
    assert not (site / "twisted" / "plugins" / "__init__.py").exists()
    checked = run(str(python), "-c", TWISTD, "-n", "llmproxy", "--check-config", cwd=tmp_path)
    assert checked.splitlines()[-1] == "llmproxy: the built-in config is valid"
