"""node-postgres (npm ``pg``) through pgguard: query, prepared statement, transaction, 53300, queueing.

``pg`` is installed with npm into ``.cache/compat/node`` at the project root (ignored by git)
once and reused; the test skips when node or npm is missing or the install fails (offline).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from compat_harness import GUARD_TOML, check_scenario, run_scenario

HERE = Path(__file__).parent
CACHE = HERE.parent.parent / ".cache" / "compat" / "node"
# The major version tested; the installed one is reported in the test's output.
PACKAGE = "pg@8"


@pytest.fixture(scope="module")
def node_pg() -> tuple[str, Path]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed")
    modules = CACHE / "node_modules"
    if not (modules / "pg" / "package.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                [npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--no-save",
                 "--loglevel=error", PACKAGE],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install {PACKAGE} timed out (offline?)")
        if done.returncode != 0:
            pytest.skip(f"npm install {PACKAGE} failed (offline?): {done.stderr.strip()[-500:]}")
    version = json.loads((modules / "pg" / "package.json").read_text())["version"]
    print(f"node {subprocess.run([node, '--version'], capture_output=True, text=True).stdout.strip()}, pg {version}")
    return node, modules


async def test_node_postgres_through_pgguard(guard, node_pg: tuple[str, Path]) -> None:
    node, modules = node_pg
    g = await guard(GUARD_TOML)
    check_scenario(await run_scenario(g, [node, str(HERE / "compat.js")], {"NODE_PATH": str(modules)}))
    await g.wait_idle()
