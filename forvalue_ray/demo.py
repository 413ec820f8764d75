"""``forvalue-ray demo``: the embedded default end to end — a generated corpus, SmolLM2, a local Ray.

The corpus is the sentence-transformation task (DataInf protocol) with some responses corrupted; the target
is a few validation rows of one transformation. Rows of that transformation should rank highest and the
corrupted ones low among them.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from . import io
from .pipeline import JobConfig
from .tasks import make_task

TARGET_CLASS = 0


def write_demo_data(data_dir: str, seed: int = 0) -> tuple[str, str]:
    train, val = make_task("sentence", seed=seed, n_classes=5, n_train_per_class=12, n_val_per_class=4, noise=0.2)
    os.makedirs(data_dir, exist_ok=True)
    train_path, target_path = f"{data_dir}/train.parquet", f"{data_dir}/target.parquet"
    pq.write_table(pa.Table.from_pylist(train), train_path, row_group_size=20)
    pq.write_table(pa.Table.from_pylist([r for r in val if r["class"] == TARGET_CLASS]), target_path)
    return train_path, target_path


def run_demo(out: str = "forvalue-demo", *, num_actors: str = "1", model: str = "smollm2", show: int = 5) -> dict:
    from .cli import run_job

    train_path, target_path = write_demo_data(os.path.join(out, "data"))
    cfg = JobConfig(command="value", model=model, train=train_path, target=target_path,
                    out=os.path.join(out, "value"), num_actors=num_actors, shard_rows=20, overwrite=True,
                    form="text")  # all tokens of text, as the paper values this task
    run = run_job(cfg)
    scores = io.read_parts(io.join(cfg.out, "scores")).to_pylist()
    rows = {r["id"]: r for r in pq.read_table(train_path).to_pylist()}
    ranked = sorted(scores, key=lambda r: -r["score"])

    def line(r):
        row = rows[r["id"]]
        flag = " CORRUPTED" if row["corrupted"] else ""
        return f"  {r['score']:>12.2f}  class {row['class']}{flag}  {row['text'].splitlines()[-1].strip()[:70]}"

    title = make_task("sentence", n_classes=5, n_train_per_class=1, n_val_per_class=1)[0][TARGET_CLASS]["text"]
    print(f"\nTarget: {title.splitlines()[0][:110]}")
    print(f"Most valuable of {len(scores)} training rows:")
    print("\n".join(line(r) for r in ranked[:show]))
    print("Least valuable:")
    print("\n".join(line(r) for r in ranked[-show:]))
    top = ranked[: sum(1 for r in rows.values() if r["class"] == TARGET_CLASS)]
    hit = sum(rows[r["id"]]["class"] == TARGET_CLASS for r in top) / max(len(top), 1)
    print(f"Share of the target's class among the top {len(top)}: {hit:.0%}  (outputs under {out}/)")
    return {"run": run, "top_class_share": hit}
