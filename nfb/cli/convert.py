"""Commands registered on nfb.cli.app (see nfb/cli/__init__.py)."""
