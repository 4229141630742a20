"""The `rstar` command line: an app around the library and the four services."""
