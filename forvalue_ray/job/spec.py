"""``resolve``: a job's config turned, once and up front, into what its passes read: the output, the input's
shards, the model (loadable path, provenance, fingerprint), the plan (its settings with the stamps of every input
and reused artifact, and its fingerprint), the target pass and the centering. The passes then take the values they
need from the :class:`RunSpec`, never the config."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import io
from ..encode import Columns
from ..io import Shards
from ..sketch import BINARY_ROTATION
from .config import JobConfig, actor_range
from .parts import RunOutput, plan_record


@dataclass(frozen=True)
class Model:
    """What a model replica loads, and how many replicas run."""

    path: str  # loadable (a GGUF converted once, on the driver)
    provenance: dict
    fingerprint: str
    load_kw: dict
    resources: dict  # Ray resources of one replica
    actors: tuple[int, int]  # a fixed pool (N, N) or an autoscaling range
    vocab_chunk: int
    batch_tokens: int
    target_block_rows: int
    trust_remote_code: bool


@dataclass(frozen=True)
class Reading:
    """How input rows are read and encoded: training, target and sample rows alike."""

    encode_kw: dict
    columns: Columns
    format: str
    shard_rows: int
    shard_bytes: int
    exclude: str  # the job's own output folder: never one of its inputs


@dataclass(frozen=True)
class TargetSpec:
    """One target pass: which rows, how they are routed, which statistics they make and where they are saved
    (value's --target, or the centering sample)."""

    rows: str  # the target rows (a file, a folder or a glob), read and encoded as the training rows are
    mode: str = "mean"  # mean | groups | pairwise
    group_column: str | None = None  # groups mode: the column naming each row's group
    normalize: bool = False
    dense: bool = False  # statistics to be centered (centering subtracts dense ones)
    artifact: str = "target"  # saved as OUT/<artifact>


@dataclass(frozen=True)
class CenterSpec:
    """Centering on μ: the target pass over a seeded random sample of the input's rows, or an earlier run's μ."""

    rows: int  # the sample's size (0 when reused)
    seed: int
    reused: str | None  # --center-stats: an earlier run's OUT/center
    train_files: list  # the sampled input's stamp, recorded with the sample (sample.json)
    subspace: str | None = None  # sketch --subspace K1xK2: fitted on the same sample, saved beside μ


@dataclass(frozen=True)
class RunSpec:
    command: str
    kind: str  # what the parts hold: scores | sketches
    out: RunOutput
    overwrite: bool
    config: dict  # every setting, as run.json records it
    shards: Shards  # the input's, planned
    plan: dict  # OUT/_plan.json's record: what the result depends on (inputs stamped) and its fingerprint
    model: Model | None  # None for score (no model: sketches only)
    reading: Reading | None
    mode: str
    normalize: bool
    group_column: str | None
    ray_address: str | None
    progress: bool
    target: TargetSpec | None = None  # value: the target pass over --target (None: --target-stats reused)
    target_stats: str | None = None
    center: CenterSpec | None = None  # value, sketch: None when not centered
    prompt_fit_column: str | None = None  # value: the key of each row's partner prompt
    sketch: dict | None = None  # sketch: dim, seed, storage, subspace (K1xK2 or None)
    actors: tuple[int, int] | None = None  # score: its actors' pool (no model)
    index: str | None = None  # score: the index, the target index and their index.json
    target_index: str | None = None
    index_meta: dict | None = None
    target_index_meta: dict | None = None


def model_identity(cfg: JobConfig) -> tuple[str, dict, str]:
    """The loadable model path (GGUF converted once, here on the driver), its provenance and fingerprint."""
    from ..model import adapter_provenance, choose_dtype, model_fingerprint, resolve_model, weights_and_matmul_dtype

    model_path, provenance = resolve_model(cfg.model, cfg.revision)
    provenance.update(adapter_provenance(cfg.adapter))
    if cfg.dtype in (None, "auto"):  # chosen here, once, and handed to every replica (see model_load_kw)
        provenance["dtype"], provenance["dtype_reason"] = choose_dtype("cuda" if cfg.gpus_per_actor else "cpu",
                                                                       model_path)
    else:
        weights_and_matmul_dtype(cfg.dtype)  # refuses a name it does not know
        provenance["dtype"] = cfg.dtype
    return model_path, provenance, model_fingerprint(provenance)


def model_load_kw(cfg, provenance: dict) -> dict:
    """A replica's loading: the config's, in the dtype the driver chose (every replica alike, whatever its node)."""
    return {**cfg.load_kw(), "dtype": provenance["dtype"]}


def artifact_stamp(path: str | None):
    """A reused artifact's identity in the plan: its content (see artifacts.artifact_identity)."""
    from ..artifacts import artifact_identity

    return artifact_identity(path) if path else None


def resolve(cfg: JobConfig) -> RunSpec:
    """Validate ``cfg`` and resolve, once, everything its passes read: the model is checked before any plan is
    written (a typo fails with nothing to replace); reused artifacts are stamped by content, so one rebuilt in place
    is another job, never mixed into this one's outputs."""
    cfg.validate()
    # a sketch has no mode: its rows are scored (against μ, when centered) as the mean mode does
    common = {"command": cfg.command, "overwrite": cfg.overwrite, "config": asdict(cfg),
              "mode": getattr(cfg, "mode", "mean"), "normalize": getattr(cfg, "normalize", False),
              "group_column": cfg.group_column, "ray_address": cfg.ray_address, "progress": cfg.progress}
    if cfg.command == "score":
        # indexes from before --storage hold float32; from before centering, raw sketches
        meta, tmeta = ({"storage": "float32", "center_id": None, **RunOutput(url).load_index()}
                       for url in (cfg.index, cfg.target_index))
        check_pair(cfg.index, cfg.target_index, meta, tmeta)
        for option, url, m in (("--index", cfg.index, meta), ("--target-index", cfg.target_index, tmeta)):
            check_binary_rotation(option, url, m)
        shards = io.plan_shards(RunOutput(cfg.index).parts_dir("sketches"), "parquet", cfg.shard_rows,
                                cfg.shard_bytes)
        settings = {**cfg.result_fields(), "index": meta, "target_index": tmeta,
                    "target_files": io.file_stamp(RunOutput(cfg.target_index).parts_dir("sketches"))}
        return RunSpec(**common, out=RunOutput(cfg.out), kind="scores", shards=shards,
                       plan=plan_record("scores", settings, shards), model=None,
                       reading=None, actors=actor_range(cfg.num_actors), index=cfg.index,
                       target_index=cfg.target_index, index_meta=meta, target_index_meta=tmeta)
    # the driver's resolving first (reused artifacts, model), then the inputs and settings: plain values for the
    # passes, no step of theirs reaches back for the config
    reused = {"target": artifact_stamp(cfg.target_stats)} if cfg.command == "value" and cfg.target_stats else {}
    reused["center"] = artifact_stamp(cfg.center_stats)
    path, provenance, fp = model_identity(cfg)
    shards = io.plan_shards(cfg.scored_data, cfg.format, cfg.shard_rows, cfg.shard_bytes, exclude=cfg.out)
    centered = bool(cfg.center or cfg.center_stats)
    if cfg.command == "value":
        stamps = {"target": reused.get("target") or io.file_stamp(cfg.target, exclude=cfg.out),
                  "train_files": io.file_stamp(cfg.train, exclude=cfg.out)}
        target = None if cfg.target_stats else TargetSpec(
            cfg.target, cfg.mode, cfg.group_column if cfg.mode == "groups" else None, cfg.normalize, dense=centered)
        own = {"target": target, "target_stats": cfg.target_stats, "prompt_fit_column": cfg.prompt_fit_column}
        subspace, sampled = None, stamps["train_files"]
    else:
        # binary rows restore only through the rotation they were written with: in index.json, and in the plan's
        # settings so that a run's parts from another rotation are never resumed into it
        rotation = {"rotation": BINARY_ROTATION} if cfg.storage == "binary" else {}
        stamps = {"data_files": io.file_stamp(cfg.data, exclude=cfg.out), **rotation}
        own = {"sketch": {"dim": cfg.dim, "seed": cfg.seed, "storage": cfg.storage, "subspace": cfg.subspace,
                          **rotation}}
        subspace, sampled = cfg.subspace, stamps["data_files"]
    settings = {**cfg.result_fields(), "model_fingerprint": fp, **stamps, "center": reused["center"]}
    load_kw, resources, actors = model_load_kw(cfg, provenance), cfg.actor_resources(), actor_range(cfg.num_actors)
    encode_kw, columns = cfg.encode_kw(), cfg.columns()
    center = CenterSpec(cfg.center, cfg.center_seed, cfg.center_stats, sampled, subspace) if centered else None
    model = Model(path, provenance, fp, load_kw, resources, actors, cfg.vocab_chunk, cfg.batch_tokens,
                  cfg.target_block_rows, cfg.trust_remote_code)
    reading = Reading(encode_kw, columns, cfg.format, cfg.shard_rows, cfg.shard_bytes, cfg.out)
    kind = "scores" if cfg.command == "value" else "sketches"
    return RunSpec(**common, out=RunOutput(cfg.out), kind=kind, shards=shards, plan=plan_record(kind, settings, shards),
                   model=model, reading=reading, center=center, **own)


def check_pair(index: str, target_index: str, meta: dict, tmeta: dict) -> None:
    """An index and a target index score together only when sketched alike, on the same μ (or both raw). Their
    storage may differ: each restores on its own, and a target index kept finer than the index it scores (targets
    are few) adds none of its own rounding to the estimate."""
    from ..artifacts import check_compatible

    if meta["center_id"] != tmeta["center_id"]:
        raise ValueError(center_mismatch(index, target_index, meta, tmeta))
    check_compatible("--target-index", meta, tmeta, ("model_fingerprint", "dim", "seed"))


def check_binary_rotation(option: str, url: str, meta: dict) -> None:
    """Refuse a binary index written with another rotation (one from before the two-round rotation records none):
    its signs would restore as other numbers, and every score would be wrong without an error."""
    if meta.get("storage") == "binary" and meta.get("rotation") != BINARY_ROTATION:
        raise ValueError(f"{option} {url} is a binary index written by an earlier forvalue-ray "
                         f"({meta.get('forvalue_ray', 'unknown version')}), whose rotation "
                         f"({meta.get('rotation') or 'one Hartley round'}) this version does not restore "
                         f"(it uses {BINARY_ROTATION}); rebuild it with `forvalue-ray sketch --storage binary ...`")


def center_mismatch(index: str, target_index: str, meta: dict, tmeta: dict) -> str:
    """Why an index and a target index do not pair by their centering μ, and the command that fixes it."""
    artifact = (meta.get("center") or {}).get("artifact") or RunOutput(index).artifact("center")
    rebuild = f"rebuild the target index with `forvalue-ray sketch --center-stats {artifact} ...`"
    if meta["center_id"] and not tmeta["center_id"]:
        return (f"--index {index} is centered (μ {meta['center_id']}) but --target-index {target_index} is "
                f"raw (built with --center 0): estimates add up only on the same μ; {rebuild}")
    if tmeta["center_id"] and not meta["center_id"]:
        return (f"--target-index {target_index} is centered (μ {tmeta['center_id']}) but --index {index} is "
                f"raw (built with --center 0): rebuild the target index raw (`forvalue-ray sketch --center 0 ...`), "
                f"or center the index (`forvalue-ray sketch` without --center 0) and then the target index on it")
    return (f"--index {index} and --target-index {target_index} are centered on different μ "
            f"({meta['center_id']} and {tmeta['center_id']}): estimates add up only on the same μ; {rebuild}")
