"""Replication of VMware disks into CloudStack volumes: the VMA writes them over NBD, omad orchestrates."""
