"""Persistent jobs: every long operation is a row with named steps and progress, recovered after a crash."""
