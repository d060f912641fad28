"""The VMware side: saved vCenter credentials, discovery through the VMA, VM contexts and the VM inventory."""
