"""CloudStack (OSSEA): saved connections, settings flows, this appliance's VM, networks and mappings."""
