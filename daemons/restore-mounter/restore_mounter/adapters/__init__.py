"""One module per external program or kernel interface restore-mounter drives."""
