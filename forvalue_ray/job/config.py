"""The jobs' configurations: one dataclass per command (:class:`ValueConfig`, :class:`SketchConfig`,
:class:`ScoreConfig`), each composed from shared groups of settings (output, inputs, model, data, valuation,
centering, sketch, execution) whose fields carry their command-line help. The command line builds each subcommand's
flags from its config; YAML job configs use the same flat keys."""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields, make_dataclass
from inspect import get_annotations
from typing import ClassVar

from ..encode import Columns
from ..io import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_ROWS
from ..readout import DEFAULT_VOCAB_CHUNK
from ..sketch import DEFAULT_SKETCH_DIM, STORAGES
from ..subspace import parse_shape

MODES = ("mean", "groups", "pairwise")
# `sketch` centers on the mean gradient of this many sampled rows unless told otherwise: at dim 4096 in int8 that
# index met per-target Spearman ≥ 0.95 and AUC within 0.002 of exact where the raw one did not (benchmarks/docs/storage.md)
SKETCH_CENTER_ROWS = 1000


def opt(default, help_text: str | None = None, *, result: bool = True, added: bool = False, **kw):
    """A config field with its command-line help next to it; ``result=False`` marks an execution setting, one that
    never changes a result (so it stays out of the output's plan fingerprint); ``added=True`` a result setting added
    after outputs were written without it, counted only when set (so those outputs keep their fingerprint)."""
    return field(default=default, metadata={"help": help_text, "result": result, "added": added}, **kw)


# ---- the groups -----------------------------------------------------------------------------------------------------


@dataclass
class JobConfig:
    """What every command's config has: the command, its output and the shards its work is cut into."""

    title: ClassVar[str] = "output"
    command: str = field(default="", init=False)
    out: str = opt("", "output directory (local, s3://, gs://)")
    shard_rows: int = opt(DEFAULT_SHARD_ROWS, "rows per shard (the unit of work, output and resume)")
    shard_bytes: int = opt(DEFAULT_SHARD_BYTES, "bytes per JSONL shard")

    @classmethod
    def from_dict(cls, d: dict) -> "JobConfig":
        """The config of ``d``'s flat keys (dashes or underscores); on :class:`JobConfig` itself, of the command
        ``d`` names (default ``value``). Another command's keys are ignored: one YAML may serve several commands,
        and the run.json of an older version holds every command's keys."""
        clean = {k.replace("-", "_"): v for k, v in d.items()}
        command = clean.pop("command", cls.command or "value")
        if command not in CONFIGS:
            raise ValueError(f"command must be one of {COMMANDS}, not {command!r}")
        if cls is not JobConfig and command != cls.command:
            raise ValueError(f"command {command!r} given to a {cls.command} config")
        config = CONFIGS[command]
        names = {f.name for f in fields(config) if f.init}
        known = set().union(*({f.name for f in fields(c)} for c in CONFIGS.values()))
        unknown = sorted(set(clean) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are the CLI flags: {sorted(names)}")
        return config(**{k: v for k, v in clean.items() if k in names})

    def result_fields(self) -> dict:
        """The settings this command's result depends on (its execution settings excluded)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("result", True)
                and not (f.metadata.get("added") and getattr(self, f.name) is None)}

    def validate(self) -> None:
        if not self.out:
            raise ValueError("--out is required")


@dataclass
class ValueInputs:
    title: ClassVar[str] = "inputs"
    train: str | None = opt(None, "training data: file, directory, glob, s3:// or gs:// (Parquet, JSONL, HF "
                                  "save_to_disk)")
    target: str | None = opt(None, "target data (same forms as --train)")
    target_stats: str | None = opt(None, "reuse target statistics from an earlier run (OUT/target)")


@dataclass
class SketchInputs:
    title: ClassVar[str] = "inputs"
    data: str | None = opt(None, "data to sketch")


@dataclass
class ScoreInputs:
    title: ClassVar[str] = "inputs"
    index: str | None = opt(None, "sketch index of the rows to score")
    target_index: str | None = opt(None, "sketch index of the target rows")


@dataclass
class ModelArgs:
    title: ClassVar[str] = "model"
    model: str = opt("smollm2", "local HF directory, hub id, .gguf file, or 'smollm2' (the embedded default)")
    dtype: str | None = opt("auto", "float32, bfloat16, float16, float64, bfloat16-autocast (every matmul in bf16, "
                                    "weights and residual stream in float32) or auto: bfloat16 on GPU, bfloat16-autocast "
                                    "on CPUs that multiply bf16 natively (AMX, AVX512-BF16) for 16-bit or quantized "
                                    "weights, float32 elsewhere; run.json records the choice and why")
    adapter: str | None = opt(None, "a PEFT/LoRA adapter directory applied to the model")
    revision: str | None = opt(None, "hub revision of --model")
    trust_remote_code: bool = opt(False, "allow the model's own code (hub models that need it)")
    attn_implementation: str | None = opt(None, "eager, sdpa or flash_attention_2 (default: the model's)")


# one field `<name>_column` per column of encode.Columns, with its default
ColumnArgs = make_dataclass(
    "ColumnArgs", [(f"{c.name}_column", str, opt(c.default, f"the rows' {c.name} column")) for c in fields(Columns)],
    namespace={"title": "data"})


@dataclass
class DataArgs(ColumnArgs):
    title: ClassVar[str] = "data"
    format: str = opt("auto", "auto, parquet, jsonl or arrow")
    form: str = opt("auto", "auto, text, prompt_response, messages or input_ids (auto: first present)")
    max_length: int | None = opt(None, "truncate rows to this many tokens (default: the model's context length)")
    overlong: str = opt("truncate", "truncate or reject rows over --max-length")
    response_eos: bool = opt(True, "value the end-of-sequence token after each response (prompt/response rows)")

    def columns(self) -> Columns:
        return Columns(**{c.name: getattr(self, f"{c.name}_column") for c in fields(Columns)})

    def encode_kw(self) -> dict:
        """Keyword arguments of the row encoder."""
        columns = self.columns()
        return {"max_length": self.max_length, "overlong": self.overlong, "columns": columns, "form": self.form,
                "image_column": columns.images, "response_eos": self.response_eos}


@dataclass
class Grouping:
    title: ClassVar[str] = "valuation"
    group_column: str | None = opt(None, "target column naming each row's group (groups mode; sketch keeps it in "
                                         "the index)")


@dataclass
class Valuation(Grouping):
    mode: str = opt("mean", f"one of {MODES}")
    normalize: bool = opt(False, "cosine For-Value (divide by gradient norms)")

    def check_mode(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, not {self.mode!r}")
        if self.mode == "groups" and not self.group_column:
            raise ValueError("--mode groups needs --group-column (the target column naming each row's group)")


@dataclass
class PromptFit:
    title: ClassVar[str] = "valuation"
    prompt_fit_column: str | None = opt(None, "also score each prompt/response row's response under the prompt of the "
                                              "next row of its shard with the same value in this column (e.g. task "
                                              "or template): output column prompt_fit = NLL(other prompt) − NLL(own "
                                              "prompt) per token; near or below 0, the response does not belong to "
                                              "its prompt (mislabeled). One more forward pass per row",
                                        added=True)


@dataclass
class Centering:
    title: ClassVar[str] = "centering"
    center: int | None = opt(None, "center on the mean gradient μ of a seeded random sample of this many rows, saved "
                                   "under OUT/center. value: μ is subtracted from the target statistics (mean/groups "
                                   "modes; default 0). sketch: a control variate, the same estimate with less "
                                   f"variance (default {SKETCH_CENTER_ROWS}; build the target index with "
                                   "--center-stats OUT/center)")
    center_seed: int = opt(0, "seed of the centering sample")
    center_stats: str | None = opt(None, "reuse an earlier run's OUT/center")

    def check_centering(self) -> None:
        if (self.center or self.center_stats) and (self.center < 0 or (self.center and self.center_stats)):
            raise ValueError("centering: give --center N (a sample of N training rows, N > 0) or --center-stats "
                             "DIR (an earlier run's OUT/center), not both")


@dataclass
class SketchArgs:
    title: ClassVar[str] = "sketch"
    dim: int = opt(DEFAULT_SKETCH_DIM, "sketch size")
    seed: int = opt(0, "sketch hash seed")
    storage: str = opt("int8", "sketch index storage: float32, float16, int8 (one float32 scale per row; 4x smaller) "
                               "or binary (1 bit per number, rotated signs, two float32 per row: 32x smaller; "
                               "--dim 8192 makes a 1 KB row, more faithful than int8 at --dim 1024)")
    subspace: str | None = opt(None, "K1xK2 (e.g. 32x16): keep each centered row's coordinates in a subspace of K1 "
                                     "vocabulary x K2 hidden directions fitted on the centering sample exactly, and "
                                     "sketch only the rest in --dim numbers (a row holds K1*K2 + dim); still unbiased, "
                                     "far less variance where the corpus is alike. Saved as OUT/center/"
                                     "subspace.safetensors; a target index built with --center-stats OUT/center uses it",
                               added=True)

    def check_storage(self) -> None:
        if self.storage not in STORAGES:
            raise ValueError(f"--storage must be one of {STORAGES}, not {self.storage!r}")
        k1, k2 = parse_shape(self.subspace) if self.subspace is not None else (0, 0)
        if self.storage == "binary" and (k1 * k2 + self.dim) % 8:
            raise ValueError(f"--storage binary packs 8 numbers to a byte: a row's length (--dim {self.dim}"
                             + (f" + {k1 * k2} subspace coordinates" if k1 else "") + ") must be a multiple of 8")


@dataclass
class Replicas:
    """How each model replica runs (never changes a result)."""

    title: ClassVar[str] = "execution"
    gpus_per_actor: float = opt(0.0, "GPUs per replica (fractional ok)", result=False)
    cpus_per_actor: float = opt(1.0, "CPUs per replica", result=False)
    batch_tokens: int = opt(4096, "padded tokens per forward pass", result=False)
    vocab_chunk: int = opt(DEFAULT_VOCAB_CHUNK, "vocabulary rows per LM-head block", result=False)
    target_block_rows: int = opt(64, "target rows per task of the target pass (partials are summed in block order, so "
                                     "the statistics never depend on how many replicas ran)", result=False)

    def actor_resources(self) -> dict:
        """Ray resources of one model replica."""
        return {"num_cpus": self.cpus_per_actor, **({"num_gpus": self.gpus_per_actor} if self.gpus_per_actor else {})}


@dataclass
class Execution:
    """Where and how the job runs (never changes a result)."""

    title: ClassVar[str] = "execution"
    num_actors: str = opt("1", "model replicas: N, or MIN-MAX to autoscale", result=False)
    ray_address: str | None = opt(None, "Ray cluster address (default: RAY_ADDRESS, else a local Ray)", result=False)
    overwrite: bool = opt(False, "replace a different job's output", result=False)
    progress: bool = opt(True, "show a progress bar", result=False)
    extra: dict = field(default_factory=dict, metadata={"result": False})

    def check_execution(self) -> None:
        actor_range(self.num_actors)


@dataclass
class ModelJob(Replicas, Centering, DataArgs, ModelArgs):
    """What value and sketch share: a model's replicas over encoded rows, optionally centered."""

    def load_kw(self) -> dict:
        """Keyword arguments of a model replica's loading."""
        return {"dtype": self.dtype, "adapter": self.adapter, "attn_implementation": self.attn_implementation,
                "trust_remote_code": self.trust_remote_code, "gpus": self.gpus_per_actor}

    def center_sample(self, path: str) -> "ValueConfig":
        """The target pass over the centering sample at ``path``: this job's model, encoding, centering and
        execution, in mean mode."""
        kept = {f.name: getattr(self, f.name) for c in (ModelJob, Execution, JobConfig) for f in fields(c) if f.init}
        return ValueConfig(**{**kept, "target": path, "format": "auto", "mode": "mean"})


# ---- the commands ---------------------------------------------------------------------------------------------------


@dataclass
class ValueConfig(Execution, ModelJob, PromptFit, Valuation, ValueInputs, JobConfig):
    """``forvalue-ray value``'s settings."""

    summary: ClassVar[str] = "score training rows against a target set"
    command: str = field(default="value", init=False)

    def __post_init__(self):
        if self.center is None:  # the paper's score
            self.center = 0

    @property
    def scored_data(self) -> str | None:
        """The rows this command scores."""
        return self.train

    def validate(self) -> None:
        super().validate()
        self.check_mode()
        if not (self.train and (self.target or self.target_stats)):
            raise ValueError("value needs --train and --target (or --target-stats)")
        if self.target_stats and self.mode == "pairwise":
            raise ValueError("--target-stats holds mean/group statistics; pairwise mode needs --target")
        self.check_centering()
        if self.center or self.center_stats:
            if self.normalize:
                raise ValueError("--center is defined for the plain For-Value inner product only: drop --normalize "
                                 "or --center")
            if self.mode == "pairwise":
                raise ValueError("--center subtracts the sample's mean gradient from the target statistics of mean "
                                 "or groups mode; pairwise mode keeps no statistics: use --mode mean or groups")
        self.check_execution()


@dataclass
class SketchConfig(Execution, ModelJob, SketchArgs, Grouping, SketchInputs, JobConfig):
    """``forvalue-ray sketch``'s settings."""

    summary: ClassVar[str] = "build a sketch index (index once, query many)"
    command: str = field(default="sketch", init=False)

    def __post_init__(self):
        if self.center is None:  # a centered index (see SKETCH_CENTER_ROWS), unless an earlier μ is reused
            self.center = 0 if self.center_stats else SKETCH_CENTER_ROWS

    @property
    def scored_data(self) -> str | None:
        """The rows this command sketches."""
        return self.data

    def validate(self) -> None:
        super().validate()
        self.check_centering()
        if not self.data:
            raise ValueError("sketch needs --data")
        self.check_storage()
        if self.subspace and not (self.center or self.center_stats):
            raise ValueError("--subspace is fitted on the centering sample: drop --center 0 (or give --center-stats)")
        self.check_execution()


@dataclass
class ScoreConfig(Execution, Valuation, ScoreInputs, JobConfig):
    """``forvalue-ray score``'s settings."""

    summary: ClassVar[str] = "score a sketch index against a target index"
    command: str = field(default="score", init=False)

    def validate(self) -> None:
        super().validate()
        self.check_mode()
        if not (self.index and self.target_index):
            raise ValueError("score needs --index and --target-index")
        self.check_execution()


CONFIGS: dict[str, type[JobConfig]] = {"value": ValueConfig, "sketch": SketchConfig, "score": ScoreConfig}
COMMANDS = tuple(CONFIGS)


def flag_groups(config: type[JobConfig]) -> list[tuple[str, list[Field]]]:
    """A command's settings by group, in order, as its flags are listed (``command`` and ``extra`` are no flags)."""
    groups: dict[str, list[Field]] = {}
    for f in fields(config):
        if f.name in ("command", "extra"):
            continue
        owner = next(k for k in reversed(config.__mro__) if f.name in get_annotations(k))
        groups.setdefault(owner.title, []).append(f)
    return list(groups.items())


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
