"""forvalue-ray: forward-only data valuation (For-Value) for LLM fine-tuning data, on Ray Data."""

from ._version import __version__
from .api import (TokenContributions, centered_sketches, diagnostics, encode_rows, fit_subspace, group_scores,
                  pairwise_scores, prompt_fit, score_against, sketches, target_reference, target_statistics, token_contributions, value_scores)
from .center import CenteredSketches, center_target_stats
from .encode import Columns, Encoded, RowError
from .model import ValuationModel, from_hf, load_model
from .sketch import SketchTargets, compress_sketches, restore_sketches, score_sketches, sketch_targets
from .subspace import Subspace

__all__ = ["load_model", "from_hf", "ValuationModel", "value_scores", "pairwise_scores", "group_scores", "prompt_fit",
           "sketches", "target_statistics", "center_target_stats", "score_against", "diagnostics", "encode_rows",
           "centered_sketches", "CenteredSketches", "fit_subspace", "Subspace", "compress_sketches", "restore_sketches", "sketch_targets",
           "SketchTargets", "score_sketches", "token_contributions", "TokenContributions", "target_reference", "Columns",
           "Encoded", "RowError", "__version__"]
