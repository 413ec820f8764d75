"""The distributed job on Ray Data: a corpus planned into shards, each shard read, tokenized (CPU actors), scored or
sketched (GPU actors) and written as one part, exactly once and resumable; then ``verify`` and ``select`` as passes
over the same shards.

- :mod:`.config` — each command's settings (:class:`ValueConfig`, :class:`SketchConfig`, :class:`ScoreConfig`,
  composed from shared groups), with the help text of every flag;
- :mod:`.parts` — the output layout (:class:`~.parts.RunOutput`): plan, parts and their footers, ``run.json``;
- :mod:`.spec` — a job's config resolved once: model, input shards and stamps, the plan's settings;
- :mod:`.steps` — per-shard work, with no Ray in it;
- :mod:`.executor` — the only Ray code: actor pools, streaming in rounds, tasks, broadcasts, progress;
- :mod:`.passes` — ``value``, ``sketch``, ``score``, with :mod:`.target` and :mod:`.center` (their target
  passes); :mod:`.verification` — ``verify``; :mod:`.selection` — ``select``.
"""

from .config import COMMANDS, CONFIGS, MODES, JobConfig, ScoreConfig, SketchConfig, ValueConfig, load_yaml
from .passes import run, run_score, run_sketch, run_value
from .selection import select
from .verification import verify

__all__ = ["COMMANDS", "CONFIGS", "MODES", "JobConfig", "ScoreConfig", "SketchConfig", "ValueConfig", "load_yaml", "run",
           "run_score", "run_sketch", "run_value", "select", "verify"]
