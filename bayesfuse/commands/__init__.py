"""Subcommands of the ``bayesfuse`` command line (one module each)."""
