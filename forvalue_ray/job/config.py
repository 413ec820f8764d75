"""The job's configuration: every flag of ``value`` / ``sketch`` / ``score``, in four groups (model, data, valuation,
execution), each with its help text. The command line and YAML job configs use the same keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..encode import Columns
from ..io import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ROWS
from ..readout import DEFAULT_VOCAB_CHUNK
from ..sketch import DEFAULT_SKETCH_DIM, STORAGES

MODES = ("mean", "groups", "pairwise")
COMMANDS = ("value", "sketch", "score")
# `sketch` centers on the mean gradient of this many sampled rows unless told otherwise: at dim 4096 in int8 that
# index met per-target Spearman ≥ 0.95 and AUC within 0.002 of exact where the raw one did not (benchmarks/README.md)
SKETCH_CENTER_ROWS = 1000


def opt(default, help_text: str | None = None, **kw):
    """A config field with its command-line help next to it."""
    return field(default=default, metadata={"help": help_text}, **kw)


@dataclass
class JobConfig:
    """Every flag of the value / sketch / score commands (YAML job configs use the same keys)."""

    command: str = "value"
    out: str = opt("", "output directory (local, s3://, gs://)")
    # model
    model: str = opt("smollm2", "local HF directory, hub id, .gguf file, or 'smollm2' (the embedded default)")
    dtype: str | None = opt(None, "weights' dtype (default: bfloat16 on GPU, float32 on CPU)")
    adapter: str | None = opt(None, "a PEFT/LoRA adapter directory applied to the model")
    revision: str | None = opt(None, "hub revision of --model")
    trust_remote_code: bool = opt(False, "allow the model's own code (hub models that need it)")
    attn_implementation: str | None = opt(None, "eager, sdpa or flash_attention_2 (default: the model's)")
    # data
    train: str | None = opt(None, "training data: file, directory, glob, s3:// or gs:// (Parquet, JSONL, HF "
                                  "save_to_disk)")
    target: str | None = opt(None, "target data (same forms as --train)")
    data: str | None = opt(None, "data to sketch")
    format: str = opt("auto", "auto, parquet, jsonl or arrow")
    form: str = opt("auto", "auto, text, prompt_response, messages or input_ids (auto: first present)")
    id_column: str = "id"
    text_column: str = "text"
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    images_column: str = "images"
    input_ids_column: str = "input_ids"
    labels_column: str = "labels"
    max_length: int | None = opt(None, "truncate rows to this many tokens (default: the model's context length)")
    overlong: str = opt("truncate", "truncate or reject rows over --max-length")
    response_eos: bool = opt(True, "value the end-of-sequence token after each response (prompt/response rows)")
    # valuation
    mode: str = opt("mean", f"one of {MODES}")
    group_column: str | None = opt(None, "target column naming each row's group (groups mode; sketch keeps it in "
                                         "the index)")
    normalize: bool = opt(False, "cosine For-Value (divide by gradient norms)")
    target_stats: str | None = opt(None, "reuse target statistics from an earlier run (OUT/target)")
    center: int | None = opt(None, "center on the mean gradient μ of a seeded random sample of this many rows, saved "
                                   "under OUT/center. value: μ is subtracted from the target statistics (mean/groups "
                                   "modes; default 0). sketch: a control variate, the same estimate with less "
                                   f"variance (default {SKETCH_CENTER_ROWS}; build the target index with "
                                   "--center-stats OUT/center)")
    center_seed: int = opt(0, "seed of the centering sample")
    center_stats: str | None = opt(None, "reuse an earlier run's OUT/center")
    dim: int = opt(DEFAULT_SKETCH_DIM, "sketch size")
    seed: int = opt(0, "sketch hash seed")
    storage: str = opt("int8", "sketch index storage: float32, float16 or int8 (one float32 scale per row; 4x smaller)")
    index: str | None = opt(None, "sketch index of the rows to score")
    target_index: str | None = opt(None, "sketch index of the target rows")
    # execution (never changes a result)
    num_actors: str = opt("1", "model replicas: N, or MIN-MAX to autoscale")
    gpus_per_actor: float = opt(0.0, "GPUs per replica (fractional ok)")
    cpus_per_actor: float = opt(1.0, "CPUs per replica")
    batch_tokens: int = opt(4096, "padded tokens per forward pass")
    vocab_chunk: int = opt(DEFAULT_VOCAB_CHUNK, "vocabulary rows per LM-head block")
    shard_rows: int = opt(DEFAULT_SHARD_ROWS, "rows per shard (the unit of work, output and resume)")
    shard_bytes: int = opt(DEFAULT_SHARD_BYTES, "bytes per JSONL shard")
    ray_address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    overwrite: bool = opt(False, "replace a different job's output")
    progress: bool = opt(True, "show a progress bar")
    extra: dict = field(default_factory=dict)

    EXECUTION = ("num_actors", "gpus_per_actor", "cpus_per_actor", "batch_tokens", "vocab_chunk", "ray_address",
                 "overwrite", "progress", "extra")

    def __post_init__(self):
        if self.center is None:  # value: the paper's score; sketch: a centered index (see SKETCH_CENTER_ROWS)
            self.center = SKETCH_CENTER_ROWS if self.command == "sketch" and not self.center_stats else 0

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        names = {f.name for f in fields(cls)}
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = sorted(set(clean) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are the CLI flags: {sorted(names)}")
        return cls(**clean)

    def columns(self) -> Columns:
        return Columns(id=self.id_column, text=self.text_column, prompt=self.prompt_column,
                       response=self.response_column, messages=self.messages_column,
                       input_ids=self.input_ids_column, labels=self.labels_column)

    def encode_kw(self) -> dict:
        """Keyword arguments of the row encoder."""
        return {"max_length": self.max_length, "overlong": self.overlong, "columns": self.columns(),
                "form": self.form, "image_column": self.images_column, "response_eos": self.response_eos}

    def load_kw(self) -> dict:
        """Keyword arguments of a model replica's loading."""
        return {"dtype": self.dtype, "adapter": self.adapter, "attn_implementation": self.attn_implementation,
                "trust_remote_code": self.trust_remote_code, "gpus": self.gpus_per_actor}

    def actor_resources(self) -> dict:
        """Ray resources of one model replica."""
        return {"num_cpus": self.cpus_per_actor, **({"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {})}

    UNUSED = {"value": ("data", "dim", "seed", "storage", "index", "target_index"),
              "sketch": ("train", "target", "mode", "normalize", "target_stats", "index", "target_index"),
              "score": ("train", "target", "data", "dim", "seed", "storage", "target_stats", "center", "center_seed",
                        "center_stats", "model", "dtype", "adapter",
                        "revision", "format", "form", "max_length", "overlong", "response_eos")}

    def result_fields(self) -> dict:
        """The settings this command's result depends on (execution settings and other commands' flags excluded)."""
        skip = set(self.EXECUTION) | set(self.UNUSED.get(self.command, ()))
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def validate(self) -> None:
        if self.command not in COMMANDS:
            raise ValueError(f"command must be one of {COMMANDS}, not {self.command!r}")
        if not self.out:
            raise ValueError("--out is required")
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, not {self.mode!r}")
        if self.mode == "groups" and not self.group_column:
            raise ValueError("--mode groups needs --group-column (the target column naming each row's group)")
        if self.command == "value" and not (self.train and (self.target or self.target_stats)):
            raise ValueError("value needs --train and --target (or --target-stats)")
        if self.command == "value" and self.target_stats and self.mode == "pairwise":
            raise ValueError("--target-stats holds mean/group statistics; pairwise mode needs --target")
        if self.command in ("value", "sketch") and (self.center or self.center_stats):
            if self.center < 0 or (self.center and self.center_stats):
                raise ValueError("centering: give --center N (a sample of N training rows, N > 0) or --center-stats "
                                 "DIR (an earlier run's OUT/center), not both")
        if self.command == "value" and (self.center or self.center_stats):
            if self.normalize:
                raise ValueError("--center is defined for the plain For-Value inner product only: drop --normalize "
                                 "or --center")
            if self.mode == "pairwise":
                raise ValueError("--center subtracts the sample's mean gradient from the target statistics of mean "
                                 "or groups mode; pairwise mode keeps no statistics: use --mode mean or groups")
        if self.command == "sketch" and not self.data:
            raise ValueError("sketch needs --data")
        if self.storage not in STORAGES:
            raise ValueError(f"--storage must be one of {STORAGES}, not {self.storage!r}")
        if self.command == "score" and not (self.index and self.target_index):
            raise ValueError("score needs --index and --target-index")
        actor_range(self.num_actors)


def actor_range(spec) -> tuple[int, int]:
    """'4' → (4, 4); '1-8' → (1, 8): a fixed pool or an autoscaling range."""
    text = str(spec)
    lo, _, hi = text.partition("-")
    try:
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"--num-actors must be N or MIN-MAX, not {spec!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"--num-actors must satisfy 1 <= MIN <= MAX, not {spec!r}")
    return lo_i, hi_i


def load_yaml(path: str) -> dict:
    """A YAML job config (local or remote) as a dict of flag names to values."""
    import yaml

    from .. import io

    fs, p = io.filesystem(path)
    with fs.open(p, "r") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job config must be a mapping of flag names to values")
    return data
