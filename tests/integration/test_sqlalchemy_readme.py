"""The documented SQLAlchemy example (docs/testing.md) runs as written: the block after ``<!-- sqlalchemy-example -->``
is saved as a test module and run by pytest in a subprocess, with pgguard's plugin fronting
this run's server (``PGGUARD_BACKEND_DSN``), as a user's suite would run it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgguard.testing.cluster import PostgresCluster

pytest.importorskip("sqlalchemy")
pytest.importorskip("greenlet")  # SQLAlchemy's asyncio extension needs it (sqlalchemy[asyncio])

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- sqlalchemy-example -->"


def readme_example() -> str:
    text = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    match = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert match is not None, f"docs/testing.md has no python block after {MARKER}"
    return match[1]


def test_readme_sqlalchemy_example_passes(pg: PostgresCluster, tmp_path: Path) -> None:
    module = tmp_path / "test_readme_sqlalchemy.py"
    module.write_text(readme_example(), encoding="utf-8")
    assert "import sqlalchemy" in module.read_text()  # complete: its imports are in the block
    env = {**os.environ, "PGGUARD_BACKEND_DSN": pg.dsn(), "PYTHONPATH": str(ROOT)}
    # Installed, pgguard registers its plugin (entry point pytest11); else name it.
    registered = any(ep.name == "pgguard" for ep in importlib.metadata.entry_points(group="pytest11"))
    plugin = [] if registered else ["-p", "pgguard.testing.plugin"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin,
         "-o", "asyncio_mode=strict", "--rootdir", str(tmp_path), str(module)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout
