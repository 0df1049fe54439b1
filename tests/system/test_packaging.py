"""The built wheel, installed non-editable in a fresh virtualenv, gives twistd the plugin."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheel_installs_the_twistd_plugin(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT))
    (wheel,) = wheels.glob("llmproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/llmproxy_plugin.py" in names
    assert "twisted/__init__.py" not in names and "twisted/plugins/__init__.py" not in names
    assert "llmproxy/default.yaml" in names and "llmproxy/testing/mock.py" in names

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", str(wheel))
    listing = run(str(env / "bin" / "twistd"), "--help", cwd=tmp_path)
    assert "llmproxy " in listing and "llmproxy-mock" in listing
    # Installed anywhere, it starts from its packaged default config.
    options = run(
        str(python),
        "-c",
        "from llmproxy.tap import Options; o = Options(); o.parseOptions([]);"
        "print(o.config.source)",
        cwd=tmp_path,
    )
    assert options.strip() == "<built-in default>"
