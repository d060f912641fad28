"""Adapters: one module per external program or kernel interface nbd-pool drives."""
