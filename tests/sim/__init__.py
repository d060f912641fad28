"""Simulators of the systems that cannot run here (VMA, vCenter), speaking their real protocols."""
