"""omad's adapters: one module per external program or kernel interface it uses itself."""
