"""Supervised fine-tuning and its measurements, for the selection benchmark (bench_selection.py).

One recipe for every selection method: a full fine-tune of the causal LM, loss on the response tokens only (the
product's own loss mask, :class:`forvalue_ray.encode.Encoder`: response + end-of-sequence token), AdamW with a
linear decay, the same number of optimizer steps whatever was selected, and a seed per run for the data order.
The measurements: mean test loss per response token, accuracy by ranking a template's distinct responses by
log-likelihood, and the per-row statistics the cheap baselines need (response NLL, mean-pooled final hidden state).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import numpy as np
import torch

from forvalue_ray.encode import IGNORE, Encoded, Encoder, RowError


def encode(tokenizer, rows: list[dict], max_length: int) -> tuple[list[Encoded], list[int]]:
    """Rows → Encoded with the product's loss mask, and the indices of the rows kept: rows longer than
    ``max_length`` tokens, or that cannot be encoded, are dropped, never truncated (a cut row loses its response)."""
    enc = Encoder(tokenizer, max_length=1 << 30)
    kept, index = [], []
    for i, row in enumerate(rows):
        try:
            e = enc(row, fallback_id=str(i))
        except RowError:
            continue
        if len(e.input_ids) <= max_length:
            kept.append(e)
            index.append(i)
    return kept, index


def pad(batch: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (IGNORE on padding)."""
    n = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, e in enumerate(batch):
        t = len(e.input_ids)
        ids[i, :t], labels[i, :t], mask[i, :t] = torch.from_numpy(e.input_ids), torch.from_numpy(e.labels), 1
    return ids.to(device), mask.to(device), labels.to(device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast where asked (CUDA, or a CPU that multiplies bf16 natively); fp32 otherwise."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def length_batches(rows: list[Encoded], batch_tokens: int, max_rows: int = 64):
    """Index batches of similar length (sorted), each at most ``batch_tokens`` padded tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * len(rows[i].input_ids) > batch_tokens or len(batch) == max_rows:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Softmax inputs in fp32, or the model's own precision when higher (fp64 models in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(model, ids, mask, labels) -> torch.Tensor:
    """log p(label_j | prefix) at every valued position j ≥ 1, 0 elsewhere: [B, T−1], at least fp32."""
    logits = at_least_fp32(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1])
    target = labels[:, 1:]
    valued = target != IGNORE
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valued, lp, torch.zeros_like(lp))


@torch.no_grad()
def response_stats(model, rows: list[Encoded], pad_id: int, *, batch_tokens: int = 16384, amp=None,
                   hidden: bool = False) -> dict[str, np.ndarray]:
    """Per row: summed response log-likelihood, number of valued tokens and (``hidden``) the final hidden
    state (after the final norm) mean-pooled over the response positions."""
    model.eval()
    dev = next(model.parameters()).device
    logp, count = np.zeros(len(rows)), np.zeros(len(rows), dtype=np.int64)
    pooled = None
    for idx in length_batches(rows, batch_tokens):
        ids, mask, labels = pad([rows[i] for i in idx], pad_id, dev)
        with autocast(dev, amp):
            if hidden:
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
                h = at_least_fp32(out.hidden_states[-1])
                valued = (labels != IGNORE).unsqueeze(-1).to(h.dtype)
                pool = (h * valued).sum(1) / valued.sum(1).clamp(min=1)
                if pooled is None:
                    pooled = np.zeros((len(rows), h.shape[-1]), dtype=np.float64)
                pooled[idx] = pool.cpu().numpy()
                logits = at_least_fp32(out.logits[:, :-1])
                target = labels[:, 1:]
                lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                lp = torch.where(target != IGNORE, lp, torch.zeros_like(lp))
            else:
                lp = token_logprobs(model, ids, mask, labels)
        logp[idx] = lp.sum(1).double().cpu().numpy()
        count[idx] = (labels[:, 1:] != IGNORE).sum(1).cpu().numpy()
    out = {"logp": logp, "n_tokens": count}
    if hidden:
        out["hidden"] = pooled
    return out


def train(model, rows: list[Encoded], pad_id: int, *, steps: int, batch_size: int, lr: float, seed: int,
          amp=None, log_every: int = 0, label: str = "") -> dict:
    """Fine-tune ``model`` in place on ``rows`` for exactly ``steps`` optimizer steps (epochs over a seeded
    permutation, reshuffled each epoch), mean loss over the batch's response tokens, AdamW, linear decay to 0."""
    dev = next(model.parameters()).device
    model.train()
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    order: list[int] = []
    losses, tokens, t0 = [], 0, time.time()
    for step in range(steps):
        while len(order) < batch_size:
            order += rng.permutation(len(rows)).tolist()
        batch, order = [rows[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask, labels = pad(batch, pad_id, dev)
        with autocast(dev, amp):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens += int(mask.sum())
        if log_every and (step + 1) % log_every == 0:
            print(f"  {label} step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.3f} "
                  f"{tokens / (time.time() - t0):.0f} tok/s", flush=True)
    model.eval()
    return {"train_loss_first": losses[0], "train_loss_last": float(np.mean(losses[-max(1, steps // 10):])),
            "train_tokens": tokens, "train_s": time.time() - t0}


def evaluate(model, test: list[Encoded], candidates: list[list[Encoded]] | None, answer: list[int | None],
             pad_id: int, *, amp=None) -> dict:
    """Mean test loss per response token; accuracy over the rows that have candidates (ranked by summed
    log-likelihood of each candidate response; ``answer[i]`` is the index of row i's true response)."""
    stats = response_stats(model, test, pad_id, amp=amp)
    loss = float(-stats["logp"].sum() / max(1, stats["n_tokens"].sum()))
    accuracy = None
    scored = [i for i, c in enumerate(candidates or []) if c and answer[i] is not None]
    if scored:
        flat = [e for i in scored for e in candidates[i]]
        lp = response_stats(model, flat, pad_id, amp=amp)["logp"]
        correct, at = 0, 0
        for i in scored:
            n = len(candidates[i])
            correct += int(np.argmax(lp[at:at + n]) == answer[i])
            at += n
        accuracy = correct / len(scored)
    return {"test_loss": loss, "accuracy": accuracy, "accuracy_rows": len(scored),
            "test_ppl": math.exp(min(loss, 50))}
