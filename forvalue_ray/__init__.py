"""forvalue-ray: forward-only data valuation (For-Value) for LLM fine-tuning data, on Ray Data."""

__version__ = "0.1.0"

from .api import (center_target_stats, diagnostics, encode_rows, group_scores, pairwise_scores,  # noqa: E402
                  score_against, sketches, target_statistics, value_scores)
from .encode import Columns, Encoded, RowError  # noqa: E402
from .model import ValuationModel, from_hf, load_model  # noqa: E402
from .sketch import compress_sketches, restore_sketches, score_sketches  # noqa: E402

__all__ = ["load_model", "from_hf", "ValuationModel", "value_scores", "pairwise_scores", "group_scores",
           "sketches", "target_statistics", "center_target_stats", "score_against", "diagnostics", "encode_rows",
           "compress_sketches", "restore_sketches", "score_sketches", "Columns", "Encoded", "RowError", "__version__"]
