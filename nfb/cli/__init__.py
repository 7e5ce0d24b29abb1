"""The `nfb` command line: a face over `nfb.api`. Flags map to the library's keyword arguments,
results and `nfb.errors` map to exit codes (see `nfb.cli.app`), and nothing else happens here.

One module per family of commands, each registering on the shared Typer `app`:
run (feedback, score), verbs (filter, stats, merge), prefs (pairs, eval, report),
convert (convert), tools (models, demo).
"""

from nfb.cli import convert, prefs, run, tools, verbs  # noqa: F401,E402  (register commands)
from nfb.cli.app import app, main  # noqa: F401
