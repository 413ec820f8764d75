"""Named on-disk artifacts: target statistics (safetensors + JSON provenance) and sketch-index metadata.

An artifact records the model fingerprint it was built with and refuses to mix with another.
"""

from __future__ import annotations

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import io
from .engine import TargetStats, TargetTokens
from .readout import ReferenceTokens
from .subspace import Subspace

STATS_FILE = "target_stats.safetensors"
STATS_META = "target_stats.json"
SUBSPACE_FILE = "subspace.safetensors"  # beside a centering sample's statistics: the index's fitted subspace


def save_target_stats(stats: TargetStats, out_dir: str) -> None:
    fs, base = io.filesystem(out_dir)
    fs.makedirs(base, exist_ok=True)
    if stats.form == "dense":
        tensors = {"stats": stats.stats}
    else:  # the target's valued tokens: h', y', lse', group, weight
        t = stats.tokens.tokens
        tensors = {"h": t.h, "y": t.y, "lse": t.lse, "group": t.seg, "weights": stats.tokens.weights}
    with fs.open(f"{base}/{STATS_FILE}", "wb") as fh:
        fh.write(st_save({k: v.contiguous() for k, v in tensors.items()}))
    io.write_json_atomic(io.join(out_dir, STATS_META), {
        "names": stats.names, "counts": stats.counts, "normalize": stats.normalize, "form": stats.form,
        "shape": list(tensors["stats" if stats.form == "dense" else "h"].shape), "provenance": stats.provenance})


def load_target_stats(path: str) -> TargetStats:
    """Load from the artifact directory (or its .safetensors file)."""
    base = path[: -len("/" + STATS_FILE)] if path.endswith(STATS_FILE) else path.rstrip("/")
    if not io.exists(io.join(base, STATS_META)):
        raise FileNotFoundError(f"no target statistics at {path}: expected {STATS_FILE} and {STATS_META} "
                                f"(written by `forvalue-ray value` under OUT/target/)")
    meta = io.read_json(io.join(base, STATS_META))
    fs, p = io.filesystem(io.join(base, STATS_FILE))
    with fs.open(p, "rb") as fh:
        t = st_load(fh.read())
    head = (meta["names"], meta["normalize"], meta["counts"], meta["provenance"])
    if meta.get("form", "dense") == "dense":
        return TargetStats(t["stats"], *head)
    return TargetStats(None, *head, tokens=TargetTokens(ReferenceTokens(t["h"], t["y"], t["lse"], t["group"]),
                                                        t["weights"]))


def save_subspace(subspace: Subspace, out_dir: str) -> None:
    io.write_bytes_atomic(io.join(out_dir, SUBSPACE_FILE), st_save(
        {"vocab": subspace.vocab.cpu().contiguous(), "hidden": subspace.hidden.cpu().contiguous()}))


def load_subspace(path: str) -> Subspace | None:
    """The fitted subspace saved beside centering statistics (``OUT/center``), or None where there is none."""
    base = path[: -len("/" + STATS_FILE)] if path.endswith(STATS_FILE) else path.rstrip("/")
    if not io.exists(io.join(base, SUBSPACE_FILE)):
        return None
    fs, p = io.filesystem(io.join(base, SUBSPACE_FILE))
    with fs.open(p, "rb") as fh:
        t = st_load(fh.read())
    return Subspace(t["vocab"], t["hidden"])


def artifact_identity(path: str) -> dict:
    """What a reused artifact (``--target-stats``, ``--center-stats``) is, by content: the SHA-256 of its
    statistics and of its metadata, plus the provenance it records. A run's plan holds it, so an artifact rebuilt
    in place (another target, another model) is another job, never mixed into the outputs of the first."""
    base = path[: -len("/" + STATS_FILE)] if path.endswith(STATS_FILE) else path.rstrip("/")
    if not io.exists(io.join(base, STATS_META)):
        raise FileNotFoundError(f"no target statistics at {path}: expected {STATS_FILE} and {STATS_META} "
                                f"(written by `forvalue-ray value` under OUT/target/)")
    return {"sha256": {name: content_sha256(io.join(base, name)) for name in (STATS_FILE, STATS_META)},
            "provenance": io.read_json(io.join(base, STATS_META)).get("provenance")}


def content_sha256(url: str) -> str:
    """A file's SHA-256: local files through the model cache's digest cache (path, size, mtime_ns), remote ones
    streamed."""
    import hashlib

    fs, p = io.filesystem(url)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        from .model import file_sha256

        return file_sha256(p)
    h = hashlib.sha256()
    with fs.open(p, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def check_compatible(kind: str, expected: dict, found: dict, keys=("model_fingerprint",)) -> None:
    """Refuse to mix artifacts built with different models (or seeds, dims…)."""
    diffs = [f"{k}: {found.get(k)!r} != {expected.get(k)!r}" for k in keys if found.get(k) != expected.get(k)]
    if diffs:
        raise ValueError(f"{kind} is incompatible with this run ({'; '.join(diffs)}); rebuild it with the same "
                         f"model and settings")

