"""CI's sanitizer run: keep libasan in Python processes only.

.ci/run starts the suite as ``.ci/asan/python -m pytest``: that wrapper preloads libasan (the
ASan-built relay needs its runtime loaded first). Here, at start-up, every Python of the run
takes the preload out of its environment again and names the wrapper as ``sys.executable``, so
the pgguard processes the tests start (``sys.executable -m pgguard``) run under the sanitizer
too, while initdb, postgres, psql and pgbench (which hang under a preloaded libasan) do not.
"""

import os
import sys

_preload = os.environ.pop("LD_PRELOAD", "")
if "libasan" in _preload:
    os.environ["PGGUARD_ASAN_PRELOAD"] = _preload
if os.environ.get("PGGUARD_ASAN_PRELOAD"):
    os.environ.setdefault("PGGUARD_ASAN_PYTHON", sys.executable)
    sys.executable = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python")
