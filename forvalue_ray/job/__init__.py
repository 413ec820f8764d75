"""The distributed job on Ray Data: a corpus planned into shards, each shard read, tokenized (CPU actors), scored or
sketched (GPU actors) and written as one part, exactly once and resumable; then ``verify`` and ``select`` as passes
over the same shards.

- :mod:`.config` — each command's settings (:class:`ValueConfig`, :class:`SketchConfig`, :class:`ScoreConfig`,
  composed from shared groups), with the help text of every flag;
- :mod:`.parts` — the output layout: plan, parts and their footers, ``run.json``;
- :mod:`.steps` — per-shard work, with no Ray in it;
- :mod:`.executor` — the only Ray code: actor pools, streaming in rounds, tasks, broadcasts, progress;
- :mod:`.passes` — ``value``, ``sketch``, ``score`` and ``verify``; :mod:`.selection` — ``select``.
"""

from .config import COMMANDS, CONFIGS, MODES, JobConfig, ScoreConfig, SketchConfig, ValueConfig, load_yaml
from .passes import run, run_score, run_sketch, run_value, verify
from .selection import select

__all__ = ["COMMANDS", "CONFIGS", "MODES", "JobConfig", "ScoreConfig", "SketchConfig", "ValueConfig", "load_yaml", "run",
           "run_score", "run_sketch", "run_value", "select", "verify"]
