"""nfb: score datasets of LLM conversations offline with Nemotron feedback and reward models.

The one-call API (see `nfb.api`): `nfb.feedback`, `nfb.score`, `nfb.filter`, `nfb.stats`,
`nfb.merge`, `nfb.convert`, `nfb.pairs`, `nfb.evaluate`, `nfb.report`. Errors are
`nfb.errors.NfbError` subclasses with the exit code the CLI would use.
"""

__version__ = "0.2.0"

_API = ("feedback", "score", "filter", "stats", "merge", "convert", "pairs", "evaluate",
        "report", "models")


def __getattr__(name: str):
    if name in _API:
        from nfb import api
        return getattr(api, name)
    raise AttributeError(f"module 'nfb' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
