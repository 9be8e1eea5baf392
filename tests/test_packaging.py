"""The built wheel and sdist, installed into fresh venvs, estimate right with no network and no
tiktoken cache: the demo runs outside a checkout and a prompt a byte count would push past the
free tier's 8,000-token input cap is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
import budgetguard
from budgetguard import BudgetGuard, load_config
assert "site-packages" in budgetguard.__file__, budgetguard.__file__  # the installed copy, not the checkout
guard = BudgetGuard(load_config(sys.argv[1]), redis_url="memory://packaging")
text = " ".join(["budget", "reserved", "before", "the", "call"][i % 5] for i in range(1800))[:9000]
d = guard.check("carol", "gpt-4o-mini", [{"role": "user", "content": text}], max_tokens=100)
guard.close()
print(len(text), d.estimated_input_tokens, d.allowed, d.reason)
assert len(text) == 9000 and d.estimated_input_tokens < 8000 and d.allowed, d.reason
"""


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    out = tmp_path_factory.mktemp("dist")
    # python -m build makes the sdist, then the wheel from that sdist (hatchling from PyPI).
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("budgetguard_redis-*.whl")
    (sdist,) = out.glob("budgetguard_redis-*.tar.gz")
    yield {"wheel": wheel, "sdist": sdist}


def test_the_wheel_and_sdist_carry_the_encodings_and_the_sample(dists: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(dists["wheel"]).namelist())
    for member in ("budgetguard/encodings/o200k_base.tiktoken", "budgetguard/encodings/cl100k_base.tiktoken",
                   "budgetguard/encodings/NOTICE", "budgetguard/sample_limits.yaml", "budgetguard/lua/reserve.lua"):
        assert member in names, member
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(dists["wheel"]).read(metadata).decode()
    assert "Name: budgetguard-redis" in text
    assert "Provides-Extra: proxy" in text
    core = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core if "uvicorn" in line or "starlette" in line], core  # the proxy's extra
    with tarfile.open(dists["sdist"]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if "/" in m.name}
    assert "budgetguard/encodings/o200k_base.tiktoken" in members and "budgetguard/sample_limits.yaml" in members


def _fresh_venv(where: Path) -> Path:
    """A new venv that borrows this environment's installed dependencies (no index needed),
    but not the checkout: budgetguard itself must come from the distribution installed."""
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # A .pth line adds a directory, but the .pth files inside it (this environment's editable
    # install of the checkout) are not read.
    Path(site, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installed_package_estimates_right_offline(kind: str, dists: dict[str, Path], tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    install = [str(python), "-m", "pip", "install", "-q", "--no-deps", str(dists[kind])]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    work = tmp_path / "elsewhere"  # outside the checkout: no limits.yaml, no tests/data
    work.mkdir()
    cache = tmp_path / "empty-tiktoken-cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PYTHONPATH")}
    # No tiktoken cache, and any download fails at once (no proxy answers there).
    env.update(TIKTOKEN_CACHE_DIR=str(cache), HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    command = tmp_path / "venv" / "bin" / "budgetguard"

    demo = subprocess.run([str(command), "demo"], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.startswith("budgetguard demo: the sample limits.yaml")
    assert "tiktoken" not in demo.stderr, demo.stderr
    assert list(cache.iterdir()) == []  # nothing was downloaded

    init = subprocess.run([str(command), "init"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    check = subprocess.run([str(python), "-c", CHECK, "limits.yaml"], cwd=work, env=env, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "tiktoken" not in check.stderr, check.stderr
