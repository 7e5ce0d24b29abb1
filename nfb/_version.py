"""The version of nfb: a leaf that imports nothing, so any layer may read it."""

__version__ = "0.3.0.dev0"
