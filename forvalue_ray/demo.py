"""``forvalue-ray demo``: the embedded default end to end — a generated corpus, SmolLM2, a local Ray.

The corpus is the sentence-transformation task (DataInf protocol) with 20% of the responses corrupted
(another class's transformation). Two runs:

1. the paper's score (mean mode, all tokens) against a few validation rows of one transformation: rows of
   that transformation rank highest — but a corrupted row of it can rank high too, since the shared prompt
   template carries much of the gradient;
2. the recipe for corrupted responses (docs/concepts.md): response tokens against clean examples of every class
   (groups mode), each row's own-class score minus the mean of the other classes: corrupted rows come last.

Each run ends with its HTML report (``forvalue-ray report``).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import io
from .job import ValueConfig, run
from .job.parts import RunOutput
from .report import write_report
from .sample_data import sentence_task

TARGET_CLASS = 0
N_CLASSES = 5


def write_demo_data(data_dir: str, seed: int = 0) -> dict[str, str]:
    """train.parquet, target.parquet (validation rows of TARGET_CLASS) and classes.parquet (all validation rows)."""
    train, val = sentence_task(seed=seed, n_classes=N_CLASSES, n_train_per_class=12, n_val_per_class=4, noise=0.2)
    os.makedirs(data_dir, exist_ok=True)
    paths = {name: f"{data_dir}/{name}.parquet" for name in ("train", "target", "classes")}
    pq.write_table(pa.Table.from_pylist(train), paths["train"], row_group_size=20)
    pq.write_table(pa.Table.from_pylist([r for r in val if r["class"] == TARGET_CLASS]), paths["target"])
    pq.write_table(pa.Table.from_pylist(val), paths["classes"])
    return paths


def own_class_contrast(scores: dict, names: list[str], classes: dict) -> dict:
    """id → own-class score minus the mean score against the other classes (groups-mode scores)."""
    out = {}
    for rid, row in scores.items():
        own = names.index(str(classes[rid]))
        out[rid] = row[own] - np.mean([v for k, v in enumerate(row) if k != own])
    return out


def run_demo(out: str = "forvalue-demo", *, num_actors: str = "1", model: str = "smollm2", show: int = 5) -> dict:
    paths = write_demo_data(os.path.join(out, "data"))
    rows = {r["id"]: r for r in pq.read_table(paths["train"]).to_pylist()}
    common = dict(model=model, train=paths["train"], num_actors=num_actors, shard_rows=20,
                  overwrite=True)

    def line(rid, value):
        row = rows[rid]
        flag = " CORRUPTED" if row["corrupted"] else ""
        return f"  {value:>12.2f}  class {row['class']}{flag}  {row['text'].splitlines()[-1].strip()[:70]}"

    # 1. the paper's score: all tokens of text, against one transformation
    cfg = ValueConfig(**common, target=paths["target"], out=os.path.join(out, "value"), form="text")
    result = run(cfg)
    scores = io.read_parts(RunOutput(cfg.out).parts_dir("scores")).to_pylist()
    ranked = sorted(scores, key=lambda r: -r["score"])
    title = sentence_task(n_classes=N_CLASSES, n_train_per_class=1, n_val_per_class=1)[0][TARGET_CLASS]["text"]
    print(f"\nTarget: {title.splitlines()[0][:110]}")
    print(f"Most valuable of {len(scores)} training rows:")
    print("\n".join(line(r["id"], r["score"]) for r in ranked[:show]))
    print("Least valuable:")
    print("\n".join(line(r["id"], r["score"]) for r in ranked[-show:]))
    top = ranked[: sum(1 for r in rows.values() if r["class"] == TARGET_CLASS)]
    hit = sum(rows[r["id"]]["class"] == TARGET_CLASS for r in top) / max(len(top), 1)
    print(f"Share of the target's class among the top {len(top)}: {hit:.0%}")
    reports = [write_report(cfg.out)]

    # 2. corrupted responses: response tokens, own class against the other classes
    cfg = ValueConfig(**common, target=paths["classes"], out=os.path.join(out, "classes"), form="prompt_response",
                      mode="groups", group_column="class")
    run(cfg)
    table = io.read_parts(RunOutput(cfg.out).parts_dir("scores"))
    names = RunOutput(cfg.out).load_targets()
    contrast = own_class_contrast(dict(zip(table["id"].to_pylist(), table["scores"].to_pylist())), names,
                                  {rid: r["class"] for rid, r in rows.items()})
    by_contrast = sorted(contrast.items(), key=lambda kv: kv[1])
    n_bad = sum(r["corrupted"] for r in rows.values())
    print("\nFinding corrupted responses (the recipe of docs/concepts.md: --form prompt_response --mode groups "
          "--group-column class;\nown-class score minus the mean of the other classes):")
    print(f"Lowest of {len(contrast)} rows:")
    print("\n".join(line(rid, value) for rid, value in by_contrast[:show]))
    caught = sum(rows[rid]["corrupted"] for rid, _ in by_contrast[:n_bad]) / max(n_bad, 1)
    print(f"Share of corrupted rows among the lowest {n_bad}: {caught:.0%} (they are {n_bad / len(rows):.0%} "
          f"of the corpus)")
    reports.append(write_report(cfg.out))
    print("\nReports (open in a browser):\n" + "\n".join(f"  {os.path.abspath(p)}" for p in reports))
    return {"run": result, "top_class_share": hit, "corrupted_share_at_bottom": caught, "reports": reports}
