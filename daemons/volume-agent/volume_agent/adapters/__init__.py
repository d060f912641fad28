"""volume-agent's adapters: one module per external program or kernel interface."""
