"""The one-call Python API. The CLI calls exactly these functions.

    import nfb
    result = nfb.score("data.jsonl", "scored.parquet", model="path/to/rm")
    nfb.filter("scored.parquet", "kept.parquet", where="helpfulness >= 3")

Options are keyword-only and named like the CLI flags. Errors are `nfb.errors.NfbError`
subclasses, each carrying the exit code the CLI would end with.
"""

from __future__ import annotations

from nfb.filters import filter_rows as filter  # noqa: A001,F401
from nfb.merge import merge  # noqa: F401
from nfb.stats import stats  # noqa: F401
