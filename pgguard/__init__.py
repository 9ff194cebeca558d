"""pgguard: a PostgreSQL connection-limit enforcement proxy (queue or reject, per role)."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
