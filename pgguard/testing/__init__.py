"""Test helpers for pgguard and its users: a throwaway PostgreSQL, an in-process pgguard, fixtures."""

from pgguard.testing.cluster import PostgresCluster
from pgguard.testing.guard import AsyncGuard, ClientInfo, Guard, aguard, guard

__all__ = ["PostgresCluster", "Guard", "AsyncGuard", "ClientInfo", "guard", "aguard"]
