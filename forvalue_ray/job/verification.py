"""``verify``: is an output complete and exactly-once? Every shard is checked by its own task; the driver
aggregates counts only."""

from __future__ import annotations

import posixpath

from .. import io
from . import executor
from .parts import COUNTS, PLAN_FILE, RunOutput
from .steps import check_shard


def verify(out: str) -> tuple[list[str], dict]:
    """Problems found (empty when the output is complete and exactly-once) and the counts checked."""
    problems: list[str] = []
    output = RunOutput(out)
    if not output.has_plan():
        return [f"{out} has no {PLAN_FILE}: not a forvalue-ray output"], {}
    plan, shards = output.load_plan()
    kind = plan["kind"]
    done, rejected_parts = output.finished(kind), output.finished("rejected")
    pending = shards.without(done)
    if pending:
        problems.append(f"{len(pending)} of {len(shards)} shards have no {kind} part (first: {pending[0].key}); "
                        f"re-run the same command to finish them")
    finished = shards.only(done)
    unrejected = finished.without(rejected_parts)
    if unrejected:
        problems.append(f"{len(unrejected)} finished shards lack their rejected part (first: {unrejected[0].key})")
    planned = shards.only(done | rejected_parts).keys()
    extra = sorted((done | rejected_parts) - set(planned))
    if extra:
        problems.append(f"{len(extra)} parts belong to no planned shard (first: {extra[0]})")
    fs, base = io.filesystem(out)
    leftovers = [f for f in fs.find(base) if posixpath.basename(f).startswith(".tmp-")]
    if leftovers:
        problems.append(f"{len(leftovers)} unfinished temporary files (first: {leftovers[0]})")
    totals = dict.fromkeys(COUNTS, 0)
    executor.init_ray(None)
    for res in executor.shard_pass(finished, check_shard, out=out, kind=kind):
        for k in COUNTS:
            totals[k] += res["counts"][k]
        problems += res["problems"]
    n_dup, examples = executor.duplicate_ids(out, kind, finished.keys(), totals["scored"])
    if n_dup:
        problems.append(f"{n_dup} ids are scored more than once (e.g. {', '.join(map(repr, examples))}); "
                        f"give rows unique ids, or drop the duplicates from the input")
    if not pending and output.has_run():
        counts = output.load_run()["counts"]
        if any(counts.get(k) != v for k, v in totals.items()):
            problems.append(f"run.json counts {counts} disagree with the parts {totals}")
    elif not pending:
        problems.append("run.json is missing: the run did not finish writing its summary")
    return problems, {**totals, "shards": len(shards), "finished_shards": len(finished)}
