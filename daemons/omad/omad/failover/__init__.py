"""Failover: test, live, end of a test, rollback — persistent step jobs (steps.py runs them)."""
