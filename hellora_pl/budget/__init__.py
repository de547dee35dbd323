"""Budget of a method on a backbone, before any training: `python -m hellora_pl.budget`.

For one backbone (a built-in shape, a local config.json, or a hub id) and one method, print
the numbers that decide between methods. The model is built on the meta device (shapes only,
no memory); the adapter placement is the same `build_plan` a fit uses.

How each figure is counted
--------------------------
Matrices are [out, in]. Fused experts count as the model stores them: transformers 5 keeps
gate and up as ONE [2I, H] matrix (`gate_up_proj`) and `down_proj` as [H, I], so one expert
LoRA has r (2I + H) + r (H + I) parameters, not the r (I + H) x 3 of three separate matrices.

Every adapter figure is a sum over `adapter_sites(model, plan)` (hellora_pl/adapters/sites.py),
the list injection builds from; the plan's settings come from `resolve_method`, as in a fit.

Parameters
  trainable parameters  LoRA r (out + in) per adapted matrix, at the attention/shared-expert
      rank, the router rank, and each expert's rank; ESFT's full-rank
      deltas out x in per adapted expert matrix; LoRI (HELLoRI) counts B only (A stays frozen
      at its init) times the kept density, i.e. with the sparsity mask in force. DR-LoRA's
      ranks start small and grow until they fill the budget of a uniform rank r on the same
      experts; its figure is that full budget (= LoRA at r on those experts); the count at the
      start (rank_init) and the allocation (every expert at r_max, masked) are listed too.
  adapter parameters allocated  every adapter tensor held in memory: LoRI's frozen A and its
      dense B, DR-LoRA at r_max.
  share of the model  trainable / every parameter of the base (embeddings included).
  LoRA-on-all  `lora_everywhere`: LoRA at r on every attention projection, the router, the
      shared experts and every expert of every MoE layer.

Adapter FLOPs per token (forward only; a multiply-add is 2 FLOPs; adds, scaling, dropout
and the backward are not counted; the backward is about twice the forward for each)
  LoRA on a matrix costs x A^T then (.) B^T: 2 r (in + out) per row it acts on; a full-rank
  delta costs 2 in out. LoRI is counted with a dense B (no sparse kernels), like LoRA.
  attention, router and shared-expert adapters act on every token: summed once per layer.
  Expert adapters act per routed (token, expert) pair: each MoE layer adds
      sum over its adapted experts e of  P(e) * top_k * flops_per_selection(e),
  P(e) = counts[l, e] / counts[l].sum() from the routing profile, or 1/E when routing is
  assumed uniform. LoRA-on-all's expert term is top_k * flops_per_selection whatever the
  routing (its P sums to 1 over all experts). DR-LoRA is counted at the full budget (r on
  every adapted expert); its forward as executed runs at r_max with masked rank slices,
  listed as a separate figure.

Base model
  total parameters  every parameter once (tied embeddings once).
  active parameters per token  every parameter except the input embedding (a lookup, no
      matmul), with each MoE layer's routed experts counted as top_k of E; shared experts,
      dense layers, attention, routers, norms and lm_head in full.
  forward FLOPs per token  2 x active parameters (attention scores over the sequence are not
      counted: they depend on context length, not on the method).
  weight memory at 16 bits  2 bytes per parameter.
  weight memory at 4 bits  NF4 as hellora_pl.quant stores it: every weight with 2+ dimensions
      (attention, MLP, expert and router matrices) takes 0.5 byte per weight plus one fp32
      absmax per 64-weight block (0.5625 byte per weight; per tensor ceil(n/2) + 4 ceil(n/64)
      bytes, no double quantization: `hellora_pl.quant.nf4.nf4_bytes`, the formula the memory
      estimate uses too); the input embedding, lm_head, norms and biases stay 16-bit.

With --memory the report adds the predicted peak GPU memory of one training step (weights,
adapters, gradients, optimizer state, activations with and without checkpointing, transients,
FSDP sharding); those rules are in the docstring of `hellora_pl/memory.py`.
"""

from __future__ import annotations

from .backbone import load_config
from .cli import main, make_parser, memory_settings, run
from .counting import base_figures, check_ranks
from .profile import read_profile, selection_shares, uniform_profile
from .report import budget
from .text import format_memory, format_text

__all__ = [
    "base_figures",
    "budget",
    "check_ranks",
    "format_memory",
    "format_text",
    "load_config",
    "main",
    "make_parser",
    "memory_settings",
    "read_profile",
    "run",
    "selection_shares",
    "uniform_profile",
]
