"""``forvalue-ray``: the command line, thin over :mod:`forvalue_ray.job` (the passes) and :mod:`report`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields

from .job import COMMANDS, CONFIGS, JobConfig, load_yaml, run
from .job.config import flag_groups
from .report import DEFAULT_SAMPLE, DEFAULT_TOP


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_job_flags(p: argparse.ArgumentParser, config: type[JobConfig]) -> None:
    """Every field of the command's config as a flag, by group; defaults are None so a --config file can fill what's
    not given."""
    p.add_argument("--config", help="YAML whose keys are these flags (underscores or dashes); flags override it")
    for title, group in flag_groups(config):
        g = p.add_argument_group(title)
        for f in group:
            kw = {"dest": f.name, "default": None, "help": f.metadata.get("help")}
            if f.type in ("bool", bool) or isinstance(f.default, bool):
                if f.default is True:  # on by default: the flag turns it off
                    kw["help"] = f"turns off what is on by default: {kw['help']}"
                    g.add_argument(_flag("no_" + f.name), action="store_false", **kw)
                    continue
                g.add_argument(_flag(f.name), action="store_true", **kw)
            else:
                conv = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
                g.add_argument(_flag(f.name), type=conv, **kw)


def job_config(command: str, args: argparse.Namespace) -> JobConfig:
    base = {}
    if getattr(args, "config", None):
        base = load_yaml(args.config)
        base.pop("command", None)
    config = CONFIGS[command]
    given = {f.name: getattr(args, f.name) for f in fields(config) if getattr(args, f.name, None) is not None}
    return config.from_dict({**base, **given})


def prompt_fit_threshold(text: str) -> float | str:
    """``--min-prompt-fit``: a number (nats per token) or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"a number or 'auto', not {text!r}")
    return value


def cmd_select(args) -> int:
    from .job import select

    res = select(args.scores, args.data, args.out, top_fraction=args.top_fraction, top_k=args.top_k,
                 bottom_fraction=args.bottom_fraction, budget_tokens=args.budget_tokens, per_group=args.per_group,
                 target=args.target, combine=args.combine, min_prompt_fit=args.min_prompt_fit,
                 by=args.by, overwrite=args.overwrite)
    print(json.dumps(res))
    return 0


def cmd_explain(args) -> int:
    from .job.explain import explain

    ids = None if args.ids is None else [i for i in args.ids.split(",") if i]
    res = explain(args.scores, args.out, ids=ids, top=args.top, bottom=args.bottom, target=args.target,
                  per_group=args.per_group, local_rows=args.local_rows)
    print(json.dumps(res))
    return 0


def cmd_verify(args) -> int:
    from .job import verify

    problems, counts = verify(args.dir)
    for p in problems:
        print(f"FAIL: {p}")
    print(json.dumps({"ok": not problems, **counts}))
    return 1 if problems else 0


def cmd_report(args) -> int:
    from .report import write_report

    print(write_report(args.dir, top=args.top, sample=args.sample))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, num_actors=args.num_actors, model=args.model)
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    return submit(args.address or os.environ.get("RAY_ADDRESS"), args.config, wait=not args.no_wait, python=args.python,
                  runtime_env=args.runtime_env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forvalue-ray", description="Forward-only data valuation (For-Value) on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, config in CONFIGS.items():
        _add_job_flags(sub.add_parser(name, help=config.summary), config)
    p = sub.add_parser("run", help="run the job a YAML config describes (the `ray job submit` entrypoint)")
    p.add_argument("--config", required=True)
    p = sub.add_parser("select", help="write the top (or bottom) rows by value in the data's own format")
    p.add_argument("--scores", required=True, help="output directory of value/score")
    p.add_argument("--data", help="the data that was scored (the default; another input is refused)")
    p.add_argument("--out", required=True)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--top-fraction", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--bottom-fraction", type=float)
    g.add_argument("--budget-tokens", type=int,
                   help="the longest prefix of the ranking whose valued tokens (n_tokens) sum to at most this")
    p.add_argument("--per-group", help="select within each value of this data column")
    p.add_argument("--target", help="groups/pairwise: rank by this target (default: mean over targets)")
    p.add_argument("--combine", choices=["max", "round-robin"],
                   help="groups/pairwise: rank by a row's max over targets, or interleave the targets' rankings "
                        "(round-robin: each target's best, then each one's second best, ..., a row once)")
    p.add_argument("--min-prompt-fit", type=prompt_fit_threshold, metavar="X|auto",
                   help="rank only rows whose prompt_fit (value --prompt-fit-column) is at least X (e.g. 0: drop "
                        "responses their own prompt predicts no better than another's), or with 'auto' at least the "
                        "spread of the negative fits of their own --prompt-fit-column value (a mislabeled row's fit "
                        "is noise around 0, so 0 keeps half of them); rows without one stay")
    p.add_argument("--by", choices=["value", "embed", "value+embed"], default="value",
                   help="rank by the value (default), by the cosine of the row's mean final hidden state to the "
                        "target's (embed: an embedding-similarity selection from the same forward; pairwise scores), "
                        "or by the sum of the two cosines (value+embed: value --mode pairwise --normalize)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier, different selection in --out (never any other folder)")
    p = sub.add_parser("explain", help="why rows score what they do: each valued token's term of the score")
    p.add_argument("--scores", required=True, help="output directory of `value` (its model, form, mode and target "
                                                   "statistics are reused)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ids", help="comma-separated row ids")
    g.add_argument("--bottom", type=int, help="the K lowest-scoring rows (per group with --per-group)")
    g.add_argument("--top", type=int, help="the K highest-scoring rows (per group with --per-group)")
    p.add_argument("--target", help="groups/pairwise: explain the score against this target (default: the mean "
                                    "over targets)")
    p.add_argument("--per-group", help="--top/--bottom within each value of this data column")
    p.add_argument("--out", required=True, help="writes OUT/tokens.parquet and OUT/index.html (OUT/explain is "
                                                "linked by `report` without more ado)")
    p.add_argument("--local-rows", type=int, default=256,
                   help="up to this many rows are explained in-process on the driver; more go through model actors")
    p = sub.add_parser("verify", help="check an output is complete and exactly-once against its input")
    p.add_argument("dir")
    p = sub.add_parser("report", help="an HTML page about a value/score/select output: OUT/report/index.html")
    p.add_argument("dir", help="the output directory (local, s3://, gs://)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help="rows shown at the top and at the bottom")
    p.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help="rows sampled (uniformly) for the plots")
    p = sub.add_parser("demo", help="value a small generated corpus with the embedded SmolLM2 on a local Ray")
    p.add_argument("--out", default="forvalue-demo")
    p.add_argument("--num-actors", default="1")
    p.add_argument("--model", default="smollm2")
    p = sub.add_parser("submit", help="submit a YAML-described job to a Ray cluster and follow it")
    p.add_argument("--address", help="Ray dashboard URL, e.g. http://head:8265 (default: RAY_ADDRESS)")
    p.add_argument("--config", required=True)
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--python", default="python",
                   help="the cluster's interpreter with forvalue-ray's dependencies (default: `python` on the head's PATH)")
    p.add_argument("--runtime-env", help="YAML of Ray runtime_env keys for the job (image_uri, pip, env_vars, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ray_was_up = _ray_is_up()
    try:
        if args.command in COMMANDS:
            run(job_config(args.command, args))
            return 0
        if args.command == "run":
            data = load_yaml(args.config)
            command = data.pop("command", "value")
            if command not in COMMANDS:
                raise ValueError(f"{args.config}: command must be one of {COMMANDS}, not {command!r}")
            run(JobConfig.from_dict({**data, "command": command}))
            return 0
        return {"select": cmd_select, "explain": cmd_explain, "verify": cmd_verify, "report": cmd_report,
                "demo": cmd_demo, "submit": cmd_submit}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, OSError) as e:
        bare_path = isinstance(e, FileNotFoundError) and " " not in str(e)  # fsspec raises with just the path
        what = f"not found: {e}" if bare_path else e
        print(f"forvalue-ray {args.command}: error: {what}", file=sys.stderr)
        return 2
    finally:
        if not ray_was_up and _ray_is_up():  # a local Ray this command started ends with it (main() may be called
            sys.modules["ray"].shutdown()     # in-process, e.g. by a test or a notebook)


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")  # not imported: not up (and no import just to ask)
    return ray is not None and ray.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
