"""`nfb pairs`: chosen/rejected pairs for DPO from scored files, within a prompt.

A scalar Bradley-Terry reward is comparable only between responses to the same prompt, so
pairs are always made inside a group. Three shapes of scored data are read:

- (a) one response per row (`prompt`, `response`, `reward`), grouped by `group_by`
  (e.g. `prompt`);
- (b) several named response fields per row (`chosen`, `rejected`, ... with
  `chosen_reward`, `rejected_reward`, ...): each row is a group (or `group_by` joins rows);
- (c) a list field (`responses` with the aligned list `responses_reward`): each row is a
  group (or `group_by` joins rows).

Every shape is first made long: one entry per response (group, position, prompt, response,
score), in input order; then DuckDB ranks the responses within each group (best-worst) or
self-joins the group (all-pairs). Ties and null scores never make a pair; they are counted.

The output is TRL's DPO format, `prompt`, `chosen`, `rejected`, plus `chosen_score`,
`rejected_score`, `margin` and the `nfb_row` of both sides (and the `group_by` column when it
is not the prompt).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nfb.errors import InputError, UsageError
from nfb.verbs.scored import Shape, detect_shape, load, resolve, unified_schema

STRATEGIES = ("best-worst", "all-pairs")


def long_form(table: pa.Table, shape: Shape, *, group_col: str | None, prompt_col: str | None,
              row_col: str | None) -> tuple[pa.Table, int]:
    """One entry per response: g (group key), pos (input order), grow (the row's position),
    prompt, response, score, nfb_row. Returns it and the number of list rows skipped because
    their lists of responses and scores differ in length."""
    n = len(table)
    rowpos = np.arange(n, dtype=np.int64)

    def col(c, default=None):
        return table.column(c) if c else pa.nulls(n, default or pa.null())

    base = {
        "grow": pa.array(rowpos),
        "g": col(group_col) if group_col else pa.array(rowpos),
        "prompt": col(prompt_col),
        "nfb_row": col(row_col, pa.int64()) if row_col else pa.array(rowpos),
    }
    if shape.kind == "row":
        t = pa.table({**base, "pos": pa.array(rowpos),
                      "response": table.column(shape.responses[0]),
                      "score": pc.cast(table.column(shape.scores[0]), pa.float64())})
        return t, 0
    if shape.kind == "fields":
        k = len(shape.responses)
        types = {table.schema.field(r).type for r in shape.responses}
        text_type = types.pop() if len(types) == 1 else pa.string()
        parts = []
        for i, (r, s) in enumerate(zip(shape.responses, shape.scores)):
            resp = table.column(r)
            if resp.type != text_type:
                resp = pc.cast(resp, text_type)
            parts.append(pa.table({**base, "pos": pa.array(rowpos * k + i),
                                   "response": resp,
                                   "score": pc.cast(table.column(s), pa.float64())}))
        t = pa.concat_tables(parts)
        return t.take(pc.sort_indices(t, [("pos", "ascending")])), 0
    # list
    resp = table.column(shape.responses[0]).combine_chunks()
    scores = table.column(shape.scores[0]).combine_chunks()
    rl = pc.fill_null(pc.list_value_length(resp), 0).to_numpy(zero_copy_only=False)
    sl = pc.fill_null(pc.list_value_length(scores), 0).to_numpy(zero_copy_only=False)
    ok = rl == sl
    bad = int((~ok & ((rl > 0) | (sl > 0))).sum())
    if not ok.all():
        keep = pa.array(ok)
        resp, scores = resp.filter(keep), scores.filter(keep)
        base = {k: v.filter(keep) for k, v in base.items()}
    parents = pc.list_parent_indices(resp)
    flat_r = pc.list_flatten(resp)
    flat_s = pc.cast(pc.list_flatten(scores), pa.float64())
    expanded = {k: pc.take(v, parents) for k, v in base.items()}
    # position: the row's position times the longest list, plus the index in the list
    width = int(max(rl.max(initial=0), 1))
    counts = pc.list_value_length(resp).to_numpy(zero_copy_only=False)
    idx = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0)
    pos = expanded["grow"].to_numpy(zero_copy_only=False) * width + idx.astype(np.int64)
    return pa.table({**expanded, "pos": pa.array(pos, pa.int64()), "response": flat_r,
                     "score": flat_s}), bad


# ----------------------------------------------------------------------------- pairing


def arrow_result(cursor) -> pa.Table:
    """A DuckDB result as an Arrow table (DuckDB 2 renamed fetch_arrow_table)."""
    import warnings

    fetch = getattr(cursor, "to_arrow_table", None) or cursor.fetch_arrow_table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "makes an extra copy": small results here
        out = fetch()
    return out.read_all() if hasattr(out, "read_all") else out


@dataclass
class PairsResult:
    """What `nfb pairs` did: counts for the summary, and where the pairs went."""

    output: str
    shape: str
    score: str
    rows: int = 0                 # input rows
    error_rows: int = 0           # rows with an nfb_error
    responses: int = 0            # responses seen
    null_scores: int = 0          # responses without a score (error rows included): dropped
    null_groups: int = 0          # responses whose group key is null: dropped
    misaligned_rows: int = 0      # list rows whose responses and scores differ in length
    groups: int = 0               # groups with at least one scored response
    small_groups: int = 0         # groups with fewer than two scored responses: no pair
    ties: int = 0                 # candidate pairs with equal scores: dropped
    below_margin: int = 0         # candidate pairs with margin < min_margin: dropped
    over_per_group: int = 0       # all-pairs: pairs beyond --per-group: dropped
    pairs: int = 0                # pairs written
    groups_with_pairs: int = 0
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _pairs_sql(strategy: str, per_group: int | None) -> tuple[str, str]:
    """(candidate pairs, ranked) SQL over the table `resp` (scored responses)."""
    if strategy == "best-worst":
        cand = """
            WITH r AS (
              SELECT *, row_number() OVER (PARTITION BY g ORDER BY score DESC, pos) AS rk,
                        count(*) OVER (PARTITION BY g) AS n
              FROM resp)
            SELECT a.g, a.grow AS grow, a.prompt,
                   a.response AS chosen, b.response AS rejected,
                   a.score AS chosen_score, b.score AS rejected_score,
                   a.score - b.score AS margin,
                   a.nfb_row AS chosen_nfb_row, b.nfb_row AS rejected_nfb_row,
                   a.rk AS rk, a.pos AS apos, b.pos AS bpos, a.gpos AS gpos
            FROM r a JOIN r b ON a.g IS NOT DISTINCT FROM b.g AND b.rk = a.n + 1 - a.rk
            WHERE a.rk <= least(a.n // 2, ?)
        """
        return cand, "rk"
    cand = """
        SELECT a.g, a.grow AS grow, a.prompt,
               CASE WHEN a.score >= b.score THEN a.response ELSE b.response END AS chosen,
               CASE WHEN a.score >= b.score THEN b.response ELSE a.response END AS rejected,
               greatest(a.score, b.score) AS chosen_score,
               least(a.score, b.score) AS rejected_score,
               abs(a.score - b.score) AS margin,
               CASE WHEN a.score >= b.score THEN a.nfb_row ELSE b.nfb_row END AS chosen_nfb_row,
               CASE WHEN a.score >= b.score THEN b.nfb_row ELSE a.nfb_row END AS rejected_nfb_row,
               0 AS rk, a.pos AS apos, b.pos AS bpos, a.gpos AS gpos
        FROM resp a JOIN resp b ON a.g IS NOT DISTINCT FROM b.g AND a.pos < b.pos
    """
    return cand, "margin DESC, apos, bpos"


def make_pairs(long: pa.Table, *, strategy: str, min_margin: float, per_group: int | None,
               res: PairsResult) -> pa.Table:
    """The pairs of a long table (see long_form), in input order of their groups."""
    import duckdb

    res.responses = len(long)
    scored = long.filter(pc.and_(pc.is_valid(long.column("score")),
                                 pc.invert(pc.is_nan(pc.fill_null(long.column("score"), 0.0)))))
    res.null_scores = len(long) - len(scored)
    null_g = pc.is_null(scored.column("g"))
    res.null_groups = int(pc.sum(null_g).as_py() or 0)
    scored = scored.filter(pc.invert(null_g))
    con = duckdb.connect(config={"threads": 2})
    try:
        con.register("resp0", scored)
        con.execute("CREATE TEMP TABLE resp AS "
                    "SELECT *, min(pos) OVER (PARTITION BY g) AS gpos FROM resp0")
        sizes = con.execute("SELECT count(*) AS n FROM resp GROUP BY g").fetchnumpy()["n"]
        res.groups = int(len(sizes))
        res.small_groups = int((sizes < 2).sum())
        cand, order = _pairs_sql(strategy, per_group)
        params = [per_group if per_group else 1] if strategy == "best-worst" else []
        con.execute(f"CREATE TEMP TABLE cand AS {cand}", params)
        ties, below = con.execute(
            "SELECT count(*) FILTER (WHERE margin = 0), "
            "count(*) FILTER (WHERE margin > 0 AND margin < ?) FROM cand",
            [min_margin]).fetchone()
        res.ties, res.below_margin = int(ties), int(below)
        kept = f"""
            SELECT *, row_number() OVER (PARTITION BY g ORDER BY {order}) AS k FROM cand
            WHERE margin > 0 AND margin >= ?"""
        limit = "WHERE k <= ?" if per_group and strategy == "all-pairs" else ""
        lparams = [min_margin] + ([per_group] if limit else [])
        if limit:
            res.over_per_group = int(con.execute(
                f"SELECT count(*) FROM ({kept}) WHERE k > ?", lparams).fetchone()[0])
        out = arrow_result(con.execute(
            f"SELECT * FROM ({kept}) {limit} ORDER BY gpos, k", lparams))
    finally:
        con.close()
    res.pairs = len(out)
    res.groups_with_pairs = len(pc.unique(out.column("g"))) if len(out) else 0
    return out


def _output_table(out: pa.Table, *, group_name: str | None, prompt_name: str) -> pa.Table:
    cols = {}
    if group_name and group_name != prompt_name:
        cols[group_name] = out.column("g")
    cols["prompt"] = out.column("prompt")
    for c in ("chosen", "rejected", "chosen_score", "rejected_score", "margin",
              "chosen_nfb_row", "rejected_nfb_row"):
        cols[c] = out.column(c)
    return pa.table(cols)


def pairs(inputs, output: str, *, group_by: str | None = None, min_margin: float = 0.0,
          per_group: int | None = None, strategy: str = "best-worst", score: str | None = None,
          prefix: str = "", prompt_field: str = "prompt",
          response_field: list[str] | str | None = None,
          responses_field: str | None = None) -> PairsResult:
    """`nfb pairs` as one call: write DPO pairs (`prompt`, `chosen`, `rejected`, both scores,
    `margin`) made within each group of `inputs` to `output` (.parquet, .jsonl, .jsonl.gz or
    '-'). Returns the counts (pairs written, ties, null scores, groups too small, ...).

    - `group_by`: the column that groups one-response-per-row data (required there, e.g.
      "prompt"); with several responses per row each row is a group unless it is given.
    - `strategy`: "best-worst" pairs the best response of a group with the worst (with
      `per_group` K: the k-th best with the k-th worst, k <= K, each response used once; the
      first of equal scores ranks higher); "all-pairs" makes every pair of different scores,
      keeping the `per_group` largest margins.
    - `min_margin`: drop pairs whose score difference is below it (ties are always dropped).
    - `score`: which score to compare ("reward", "helpfulness", "feedback_level", ...); by
      default reward, else the mean level, else the level.
    """
    from nfb.io.writers import OutputWriter, output_format
    from nfb.verbs.scored import metadata

    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    if per_group is not None and per_group < 1:
        raise UsageError("--per-group must be at least 1")
    try:
        min_margin = float(min_margin)
    except (TypeError, ValueError):
        raise UsageError(f"--min-margin {min_margin!r} is not a number") from None
    if min_margin < 0 or min_margin != min_margin:
        raise UsageError("--min-margin must be a number >= 0")
    try:
        output_format(str(output))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(response_field, str):
        response_field = [response_field]
    from nfb.io.outputs import check_not_input, guarded

    files = resolve(inputs, exclude=str(output))
    check_not_input(str(output), files)
    schema = unified_schema(files)
    shape = detect_shape(schema, prefix=prefix, score=score, response_field=response_field,
                         responses_field=responses_field)
    names = schema.names
    if group_by is not None and group_by not in names:
        raise UsageError(f"--group-by {group_by}: no such column (columns: {', '.join(names)})")
    if shape.kind == "row" and not group_by:
        raise UsageError("one response per row: say which rows answer the same prompt with "
                         "--group-by (e.g. --group-by prompt); rewards are comparable only "
                         "within a prompt")
    if prompt_field not in names:
        if shape.kind == "row" and group_by:
            prompt_col = group_by
        else:
            raise UsageError(f"--prompt-field {prompt_field}: no such column (columns: "
                             f"{', '.join(names)})")
    else:
        prompt_col = prompt_field
    err_col, row_col = prefix + "nfb_error", prefix + "nfb_row"
    need = [c for c in (group_by, prompt_col, *shape.responses, *shape.scores) if c]
    need += [c for c in (err_col, row_col) if c in names]
    table = load(files, need, schema)
    res = PairsResult(output=str(output), shape=shape.kind, score=shape.score)
    res.rows = len(table)
    if err_col in names:
        res.error_rows = int(pc.sum(pc.is_valid(table.column(err_col))).as_py() or 0)
    long, res.misaligned_rows = long_form(
        table, shape, group_col=group_by, prompt_col=prompt_col,
        row_col=row_col if row_col in names else None)
    del table
    out = make_pairs(long, strategy=strategy, min_margin=min_margin, per_group=per_group,
                     res=res)
    del long
    out = _output_table(out, group_name=group_by, prompt_name="prompt")
    res.settings = {"inputs": files, "group_by": group_by, "strategy": strategy,
                    "min_margin": min_margin, "per_group": per_group, "score": shape.score,
                    "score_columns": shape.scores, "responses": shape.responses,
                    "shape": shape.kind, "prompt_field": prompt_col, "prefix": prefix}
    meta = dict(metadata(files[0]) if files else {})
    counts = {k: v for k, v in res.as_dict().items()
              if k not in ("settings", "output", "shape", "score")}
    meta["pairs"] = {**res.settings, "counts": counts}
    try:
        with guarded(str(output), files), OutputWriter(str(output), out.schema, meta) as w:
            w.write(out)
    except OSError as e:
        raise InputError(f"{output}: cannot write ({e.strerror or e})") from None
    return res
