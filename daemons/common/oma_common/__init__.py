"""What the four OMA daemons share: config, logging, sd_notify, errors, schemas and unix-socket RPC."""

__version__ = "0.1.0"
