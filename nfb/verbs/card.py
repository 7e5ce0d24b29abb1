"""`--card`: a Hugging Face dataset card (README.md) beside a finished output.

The card is README.md in the output's directory (or beside an s3://... output): YAML
metadata between `---` lines, then a short text. The metadata has the Hub's own keys
(`configs` naming the data file, so the directory can be pushed to the Hub as it is;
`tags`) and an `nfb` block: version, task, model, revision, recipe and its card, sampling
or weights, every column with its Arrow type (which ones nfb added), the counts (rows, error
rows by reason), and the feedback level histogram or the score quantiles (as `nfb stats`
computes them, from the output file itself).

A README.md that nfb did not write is never replaced: that is an error before the run.
"""

from __future__ import annotations

import os

import yaml

from nfb.errors import UsageError
from nfb.io import storage

MARK = "<!-- written by nfb --card; run the same command again to refresh it -->"


def card_path(output: str) -> str:
    if storage.is_url(output):
        return output.rsplit("/", 1)[0] + "/README.md"
    return os.path.join(os.path.dirname(os.path.abspath(output)), "README.md")


def _read(path: str) -> bytes | None:
    if storage.is_url(path):
        return storage.read_bytes(path)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        from nfb.io.outputs import describe
        raise UsageError(f"{path}: cannot read it ({describe(e)}); move it, or write the "
                         "output into another directory") from None


def check_card(output: str) -> None:
    """Before the run: --card needs a file output, and must not replace someone's README."""
    if output == "-":
        raise UsageError("--card writes README.md beside the output: it needs an output "
                         "file, not '-'")
    path = card_path(output)
    old = _read(path)
    if old is not None and MARK.encode() not in old:
        raise UsageError(f"{path} exists and was not written by nfb: move it, or write the "
                         "output into another directory")


def _stats(output: str, prefix: str) -> dict:
    from nfb.verbs.stats import compute_stats
    return compute_stats([output], prefix)


def card_metadata(output: str) -> dict:
    """The card's YAML metadata for the finished output."""
    from nfb.io.writers import read_metadata
    from nfb.verbs.scored import file_schema

    meta = read_metadata(output) or {}
    settings = meta.get("task_settings") or {}
    added = meta.get("columns") or []
    schema = file_schema(output)
    st = _stats(output, meta.get("prefix") or "")
    name = os.path.basename(output.rstrip("/"))
    task = meta.get("task")
    nfb: dict = {
        "version": meta.get("nfb_version"), "task": task, "model": meta.get("model"),
        "revision": meta.get("revision"), "recipe": settings.get("recipe"),
        "model_card": settings.get("card"), "inputs": meta.get("inputs"),
        "started": meta.get("started"), "finished": meta.get("finished"),
        "columns": [{"name": f.name, "type": str(f.type), "added_by_nfb": f.name in added}
                    for f in schema],
        "counts": {"rows": st["rows"], "error_rows": st["error_rows"],
                   "errors": st["errors"]},
    }
    if settings.get("sampling"):
        nfb["sampling"] = settings["sampling"]
    if settings.get("weights"):
        nfb["weights"] = settings["weights"]
    if "levels" in st:
        nfb["levels"] = st["levels"]
        nfb["level_mean"] = st.get("level_mean")
    if st.get("quantiles"):
        nfb["quantiles"] = st["quantiles"]
    tags = ["nfb", "synthetic", {"feedback": "llm-feedback", "score": "reward-model",
                                 "judge": "llm-as-a-judge"}.get(task, "scored")]
    return {"configs": [{"config_name": "default",
                         "data_files": [{"split": "train", "path": name}]}],
            "tags": tags, "nfb": nfb}


def render_card(meta: dict) -> str:
    nfb = meta["nfb"]
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100)
    counts = nfb["counts"]
    errors = ", ".join(f"{k} {v:,}" for k, v in counts["errors"].items()) or "none"
    lines = [
        "---", head.rstrip("\n"), "---", MARK, "",
        f"# {meta['configs'][0]['data_files'][0]['path']}", "",
        f"Rows scored offline by nfb {nfb['version']} with `{nfb['model']}`"
        + (f" (recipe `{nfb['recipe']}`" + (f", [model card]({nfb['model_card']})"
                                             if nfb.get("model_card") else "") + ")"
           if nfb.get("recipe") else "") + f", task `{nfb['task']}`.", "",
        f"- rows: {counts['rows']:,}; rows with `nfb_error`: {counts['error_rows']:,} "
        f"({errors})",
    ]
    if nfb.get("levels"):
        lines.append("- feedback levels: " + ", ".join(f"{k}: {v:,}"
                                                       for k, v in nfb["levels"].items()))
    for col, q in (nfb.get("quantiles") or {}).items():
        if q.get("count"):
            lines.append(f"- `{col}`: mean {q['mean']:.4g}, p5 {q['p5']:.4g}, "
                         f"p50 {q['p50']:.4g}, p95 {q['p95']:.4g} ({q['count']:,} values)")
    lines += ["", "The columns nfb added are described in nfb's README (data contract); the "
              "YAML above lists every column with its type.", ""]
    return "\n".join(lines)


def write_card(output: str) -> str:
    """Write README.md beside the finished `output`; returns its path."""
    text = render_card(card_metadata(output)).encode()
    path = card_path(output)
    if storage.is_url(path):
        storage.write_bytes(path, text)
        return path
    from nfb.io.outputs import OutputLock, temp_path, write_error

    with OutputLock(path):   # two runs writing into one folder never share the card
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(e, path) from None
    return path
