"""nfb: score datasets of LLM conversations offline with Nemotron feedback and reward models.

The one-call API (see `nfb.api`): `nfb.feedback`, `nfb.score`, `nfb.judge`, `nfb.filter`,
`nfb.stats`, `nfb.merge`, `nfb.convert`, `nfb.pairs`, `nfb.evaluate`, `nfb.report`. Errors are
`nfb.errors.NfbError` subclasses with the exit code the CLI would use.
"""

import sys
import types

from nfb._version import __version__  # noqa: F401

_API = ("feedback", "score", "judge", "filter", "stats", "merge", "convert", "pairs", "evaluate",
        "report")


class _Package(types.ModuleType):
    """`nfb.stats` is the API function (`nfb.api.stats`), looked up at each access."""

    def __getattribute__(self, name: str):
        if name in _API:
            from nfb import api
            return getattr(api, name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted([*globals(), *_API])
