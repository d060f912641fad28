"""Code shared by the OMA daemons."""
