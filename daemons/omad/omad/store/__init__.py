"""omad's SQLite store: one connection in WAL mode, parameterised SQL only, numbered migrations."""
