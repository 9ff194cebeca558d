"""Test helpers for pgguard and its users: a throwaway PostgreSQL, an in-process pgguard, fixtures."""

from pgguard.testing.cluster import PostgresCluster

__all__ = ["PostgresCluster"]
