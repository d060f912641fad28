"""omad's clients: one module per remote system (agents, VMA, CloudStack, vCenter)."""
