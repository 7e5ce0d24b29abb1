"""nfb: score datasets of LLM conversations offline with Nemotron feedback and reward models."""

__version__ = "0.1.0"
