"""LESS (Xia et al. 2024), the backward-based selection For-Value claims to match: per-sample gradients of LoRA
adapters on every layer, randomly projected, cosine between training and target rows, max over target examples.

Here with no warmup: the adapters are fresh (LoRA's B factors start at zero, so only the B factors have a
gradient; the A factors' gradients are exactly zero and left out). Per-sample gradients come from one batched
backward: for a linear layer y_t = W a_t the gradient of a row's loss is Σ_t g_tᵀ a_t over its own positions, so
hooks on each LoRA B layer keep a_t and g_t = ∂loss/∂y_t and one einsum per layer gives every row's gradient.
The projection is a seeded Gaussian matrix (entries N(0, 1/dim)) generated in blocks of rows, never held whole.
"""

from __future__ import annotations

import numpy as np
import torch

from sft import autocast, length_batches, pad

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraGradients:
    """Projected per-sample LoRA gradients of a causal LM (the model is wrapped with fresh adapters)."""

    def __init__(self, model, *, rank: int = 8, dim: int = 8192, seed: int = 0, block: int = 1 << 16):
        from peft import LoraConfig, get_peft_model

        targets = [t for t in LORA_TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
        torch.manual_seed(seed)
        self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                      target_modules=targets))
        self.layers = [m for n, m in self.model.named_modules()
                       if n.endswith("lora_B.default") and isinstance(m, torch.nn.Linear)]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for m in self.layers:
            m.weight.requires_grad_(True)
        self.n_params = sum(m.weight.numel() for m in self.layers)
        self.dim, self.seed, self.block = dim, seed, block
        self._saved: list = []
        for m in self.layers:
            m.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        a = inputs[0]
        slot = [a.detach(), None]
        self._saved.append(slot)
        output.register_hook(lambda g: slot.__setitem__(1, g.detach()))

    def _project(self, grads: torch.Tensor) -> torch.Tensor:
        """[B, P] → [B, dim] with the seeded Gaussian projection, generated block by block."""
        gen = torch.Generator(device=grads.device)
        out = torch.zeros(grads.shape[0], self.dim, device=grads.device, dtype=torch.float32)
        for b, start in enumerate(range(0, grads.shape[1], self.block)):
            stop = min(start + self.block, grads.shape[1])
            gen.manual_seed(self.seed * 1_000_003 + b)
            proj = torch.randn(stop - start, self.dim, generator=gen, device=grads.device) / self.dim ** 0.5
            out += grads[:, start:stop].float() @ proj
        return out

    def __call__(self, rows, pad_id: int, *, batch_tokens: int = 16384, amp=None) -> np.ndarray:
        """Unit-norm projected gradients of each row's mean response loss: [n, dim] float32."""
        dev = next(self.model.parameters()).device
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        self.model.eval()
        for idx in length_batches(rows, batch_tokens, max_rows=64):
            ids, mask, labels = pad([rows[i] for i in idx], pad_id, dev)
            self._saved = []
            with autocast(dev, amp):
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = labels[:, 1:]
            valued = (target != -100).float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
            per_row = (nll * valued).sum(1) / valued.sum(1).clamp(min=1)
            per_row.sum().backward()  # rows are independent: row i's gradient is that of its own mean loss
            grads = torch.cat([torch.einsum("bto,btr->bor", g.float(), a.float()).reshape(len(idx), -1)
                               for a, g in self._saved], dim=1)
            self.model.zero_grad(set_to_none=True)
            proj = self._project(grads)
            proj = proj / proj.norm(dim=1, keepdim=True).clamp(min=1e-30)
            out[idx] = proj.cpu().numpy()
        self._saved = []
        return out
