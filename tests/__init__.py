"""The OMA test suite: real daemons, real tools, simulators for what cannot run here."""
