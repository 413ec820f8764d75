"""``forvalue-ray report OUT``: a run at a glance — one self-contained HTML page, ``OUT/report/index.html``,
with its figures embedded (base64 PNG, so it opens from S3 or a laptop with no server) and saved beside it.

Works on the output of ``value`` (mean, groups, pairwise), ``score`` and ``select``, local or ``s3://``.
Pure reading and rendering, no Ray and no model. Bounded memory at any corpus size: the score parts are
read one at a time, keeping only the top and bottom N rows and a uniform sample (bottom-k of seeded random
keys) for the plots; per-target summaries are exact running sums. The text of the shown rows is joined from
the input through the shard-aligned layout — ``scores/<shard>.parquet`` holds the rows of the input shard
``<shard>`` of ``_plan.json`` (for ``score``: of the sketch index's plan) — reading only those rows' shards.

By concern: :mod:`.scan` (the one bounded pass over the parts), :mod:`.rows` (the shown rows' input text),
:mod:`.plots` (the figures), :mod:`.page` (the HTML) and :mod:`.write` (all of them, to ``OUT/report/``).
"""

from .page import STYLE, render, variant_text
from .plots import figures, rank_correlation
from .rows import FORMS, SNIPPET_CHARS, cut, index_dir, input_shards, join_rows, join_selection, snippet
from .scan import (DEFAULT_SAMPLE, DEFAULT_TOP, MAX_GROUP_CURVES, MAX_REASONS, MAX_TARGET_ROWS, REASON_EXAMPLES, Ranked,
                   Sample, Scan, Summary, reason_category, scan_scores, scan_selection)
from .write import write_report

__all__ = ["DEFAULT_SAMPLE", "DEFAULT_TOP", "FORMS", "MAX_GROUP_CURVES", "MAX_REASONS", "MAX_TARGET_ROWS",
           "REASON_EXAMPLES", "SNIPPET_CHARS", "STYLE", "Ranked", "Sample", "Scan", "Summary", "cut", "figures",
           "index_dir", "input_shards", "join_rows", "join_selection", "rank_correlation", "reason_category", "render",
           "scan_scores", "scan_selection", "snippet", "variant_text", "write_report"]
