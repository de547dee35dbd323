"""Peak GPU memory of one training step, before training: `python -m hellora_pl.budget --memory`.

Counted from the shapes of a meta-device model and the same `AdapterPlan` a fit injects, for
one rank with `batch_size` sequences of `seq_len` tokens (N = B T tokens, k = top-k, S = N k
routed rows of a MoE layer, S_hot = the rows landing on its adapted experts, from the routing
profile or uniform routing). d = bytes of the base dtype, a = bytes of the adapter dtype.

How each term is counted
------------------------
weights      every base parameter at d bytes; with --quantization nf4 the tensors hellora_pl.quant
             replaces (`quantized_parameters`: attention, shared-expert and router matrices and
             fused experts of MoE layers; not the embeddings, lm_head, norms, dense layers' MLPs or
             other small gates) are stored as its NF4Weight holds them
             (`quant.nf4.nf4_bytes`: blocksize 64, one fp32 absmax per block): ceil(n/2) +
             4 ceil(n/64) bytes (0.5625 B/param); nf4-dq (compress_statistics) quantizes the absmax
             to 8 bits in blocks of 256 with an fp32 scale per block and an fp32 offset: ceil(n/2)
             + ceil(n/64) + 4 ceil(ceil(n/64)/256) + 4 bytes (0.5159 B/param). The NF4 code book
             and the 8-bit map are shared by every weight (about 1 KiB, not counted). The rest
             stays at d.
adapters     every adapter tensor held (LoRI's frozen A and dense B, DR-LoRA at r_max) at a
             bytes, LoRI's bool masks (1 B per B element) and the int64 hot-expert and slot maps.
             Adapter terms here (elements, LoRA activations) are sums over `adapter_sites`.
gradients    one per trainable tensor element (the base is frozen), at a bytes; LoRI's dense B
             gets a dense gradient. Counted in full (grads are freed before each forward and
             are all alive by the end of the backward).
optimizer    torch AdamW, as HelloraModule builds it: exp_avg and exp_avg_sq in the parameter's
             dtype, 2 a bytes per trainable element. No fp32 master copy: with --adapter-dtype
             bfloat16 the moments are bf16 too. The step counters are host tensors (not counted).
activations  the bytes autograd saves for the backward (tensors that are not parameters),
             per decoder layer, as the hellora expert path and transformers' modules save them:
               RMSNorm        fp32 input 4 N H + rsqrt 4 N, twice per layer (the first
                              layer's input norm saves nothing: embeddings need no grad);
                              q/k norms (OLMoE, Qwen3) the same on q and k widths
               attention      SDPA (flash/efficient kernels, no T x T matrix) keeps q, k, v
                              and its output at d, and fp32 logsumexp 4 N heads; LoRA keeps its
                              input cast to a (one copy per projection; shared when a = d) and
                              x A^T, a N r, per adapted projection
               router         fp32 softmax 4 N E, top-k indices 8 N k, renormalised weights
                              4 N (k + 1) when the model renormalises; with router LoRA its
                              input d N H and W + BA, d E H
               experts        sort maps 2 x 8 S, gate_up output d S 2I, activation d S I,
                              down output d S H, routing weights d S; LoRA on the S_hot rows:
                              inputs a S_hot (H + I), x A^T 2 a S_hot r, the updates added in
                              place d S_hot (2I + H), the row index 8 S_hot
               shared experts d N 3 I_s, plus LoRA inputs a N (2H + I_s) and a N 3 r when adapted
             then the final norm (4 N H + 4 N), fp32 log-probs 4 N V and labels 8 N, and RoPE's
             cos and sin, 2 T head_dim d. With --gradient-checkpointing each decoder layer
             keeps only its input, d N H, and its activations come back one layer at a time.
transients   on top of the above, the largest of: the loss (two fp32 [N, V] gradients during
             the log-softmax backward, 8 N V); one layer's backward (its expert-path gradients
             d S (2I + I + H), plus with checkpointing that layer's recomputed activations, plus
             with nf4 the largest weight dequantized to d, a fused [E, 2I, H] experts tensor).
FSDP (N ranks) weights, adapters, gradients and optimizer state are divided by N (rounded up),
             except NF4 storage: it is held in buffers, which FSDP2 does not shard, so every
             rank keeps all of it; activations are per rank; the root unit (embeddings,
             lm_head, final norm) stays gathered for the step and one decoder layer's sharded
             parameters are gathered at a time, each at its stored bytes.
Not counted: the CUDA context and kernels' workspaces (cuBLAS, NCCL; about 0.5-1 GiB), allocator
fragmentation, DeepSeek-MLA and ModuleList expert layouts in detail (counted as above, not
validated), and attention with a T x T mask (padding or packing on the math kernel).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapters.plan import AdapterPlan
from .adapters.sites import AdapterSite, adapter_sites, allocated_elements, gradient_elements
from .backbones import architecture_for
from .quant.model import quantized_parameters
from .quant.nf4 import nf4_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
QUANTIZATIONS = ("none", "nf4", "nf4-dq")


@dataclass(frozen=True)
class MemorySettings:
    """One rank's training step: what the memory figures are counted for."""

    batch_size: int = 1
    seq_len: int = 2048
    dtype: str = "bfloat16"
    adapter_dtype: str = "float32"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    fsdp: int = 1

    def __post_init__(self):
        for name in ("dtype", "adapter_dtype"):
            value = DTYPE_ALIASES.get(getattr(self, name), getattr(self, name))
            if value not in DTYPE_BYTES:
                raise ValueError(f"--{name.replace('_', '-')} {value!r}: choose one of {', '.join(DTYPE_BYTES)}.")
            object.__setattr__(self, name, value)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization {self.quantization!r}: choose one of {', '.join(QUANTIZATIONS)}.")
        if self.quantization != "none" and self.dtype == "float32":
            raise ValueError("--quantization nf4 computes in 16 bits; give --dtype bfloat16 or float16.")
        for name in ("batch_size", "seq_len", "fsdp"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


# -- stored weights -------------------------------------------------------------------------


def quantized_tensor_ids(model: nn.Module, settings: MemorySettings) -> set[int]:
    """The base tensors `settings` store in NF4: exactly those hellora_pl.quant replaces
    (`quantized_parameters`: attention, shared-expert and router matrices and fused experts; the
    embeddings, lm_head, norms and dense layers' MLPs stay at d)."""
    if settings.quantization == "none":
        return set()
    return {id(param) for param in quantized_parameters(model)}


def is_quantized(param: torch.Tensor, quantized: set[int]) -> bool:
    return id(param) in quantized


def tensor_bytes(param: torch.Tensor, settings: MemorySettings, quantized: set[int]) -> int:
    """Stored bytes of one base tensor under `settings`."""
    if is_quantized(param, quantized):
        return nf4_bytes(param.numel(), settings.quantization == "nf4-dq")
    return DTYPE_BYTES[settings.dtype] * param.numel()


def weight_bytes(module: nn.Module, settings: MemorySettings, quantized: set[int]) -> int:
    """Stored bytes of every parameter of `module` (each tensor once)."""
    return sum(tensor_bytes(p, settings, quantized) for p in module.parameters())


def replicated_bytes(module: nn.Module, settings: MemorySettings, quantized: set[int]) -> int:
    """Stored bytes FSDP2 does not shard: NF4 storage lives in buffers, and fully_shard shards parameters only."""
    return sum(tensor_bytes(p, settings, quantized) for p in module.parameters() if is_quantized(p, quantized))


def largest_quantized_tensor(model: nn.Module, quantized: set[int]) -> int:
    """Elements of the largest quantized weight (what a dequantization materialises at once)."""
    return max((p.numel() for p in model.parameters() if is_quantized(p, quantized)), default=0)


# -- adapters -------------------------------------------------------------------------------


def adapter_elements(sites: list[AdapterSite]) -> tuple[int, int]:
    """(elements held, elements that train): LoRI trains its dense B only; DR-LoRA holds r_max."""
    return allocated_elements(sites), gradient_elements(sites)


def _routed_by_layer(sites: list[AdapterSite]) -> dict[int, list[AdapterSite]]:
    """The routed-expert sites of each MoE layer that has adapted experts, in plan order."""
    routed: dict[int, list[AdapterSite]] = {}
    for site in sites:
        if site.kind == "routed_expert":
            routed.setdefault(site.layer, []).append(site)
    return routed


def adapter_buffer_bytes(plan: AdapterPlan, sites: list[AdapterSite]) -> int:
    """The int64 hot-expert and expert -> slot maps (and DR-LoRA's active ranks) per adapted layer."""
    total = 0
    for group in _routed_by_layer(sites).values():
        hot = len(group[0].experts)
        total += 8 * (hot + plan.num_experts) + (8 * hot if plan.dynamic_rank is not None else 0)
    return total


# -- activations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Widths:
    """The per-token widths the activation terms need, read off the config and the modules."""

    hidden: int
    q: int
    k: int
    v: int
    out: int
    heads: int
    head_dim: int
    q_norm_rows: int  # rsqrt values per token of the q norm (0: no q/k norm)
    k_norm_rows: int
    vocab: int


def attention_widths(model: nn.Module, layer: nn.Module | None = None) -> Widths:
    """q, k, v and output widths of the attention (MLA: heads x qk/v head dims); the q/k norm rows are those of
    `layer`'s own mixer (default: the first attention layer's, so a hybrid's DeltaNet layers do not hide them)."""
    cfg = model.config
    arch = architecture_for(model)
    if layer is None:
        layers = arch.decoder_layers(model)
        layer = next((x for x in layers if _mixer_path(arch, x) == arch.attention), layers[0])
    attention = arch.attention_module(layer)
    mixer = arch.layer_mixer(layer)
    projections = set(mixer[1]) if mixer is not None else set()  # the linears this layer's mixer has
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    if getattr(cfg, "qk_nope_head_dim", None) is not None:
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = k = heads * qk
        v = out = heads * cfg.v_head_dim
        head_dim = cfg.qk_rope_head_dim
    elif {"q_proj", "k_proj", "o_proj"} <= projections:
        # This layer's own widths: layers may differ (Gemma-4's full-attention layers: wider heads, no v_proj).
        # q counts the query heads only (q_proj may also emit an output gate: Qwen3-Next, Qwen3.5).
        head_dim = getattr(attention, "head_dim", None) or _linear(attention, "o_proj").in_features // heads
        q, k = heads * head_dim, _linear(attention, "k_proj").out_features
        v = _linear(attention, "v_proj").out_features if "v_proj" in projections else k
        out = _linear(attention, "o_proj").in_features
    else:
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        q, k, v, out = heads * head_dim, kv_heads * head_dim, kv_heads * head_dim, heads * head_dim
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    q_rows = q // q_norm.weight.numel() if q_norm is not None else 0
    k_rows = k // k_norm.weight.numel() if k_norm is not None else 0
    vocab = model.get_output_embeddings().weight.shape[0]
    return Widths(hidden, q, k, v, out, heads, head_dim, q_rows, k_rows, vocab)


def _linear(module: nn.Module, name: str) -> nn.Module | None:
    """`module.<name>`, or the base layer a LoRA wrapper holds there."""
    child = getattr(module, name, None)
    return getattr(child, "base_layer", child)


def _rms_norm(tokens: int, width: int, rows_per_token: int = 1) -> int:
    """An RMSNorm keeps its fp32 input and the fp32 rsqrt per normalised row."""
    return 4 * tokens * width + 4 * tokens * rows_per_token


def _mixer_path(arch, layer: nn.Module) -> str | None:
    found = arch.layer_mixer(layer)
    return None if found is None else found[0]


def mixer_activations(
    arch, layer: nn.Module, layer_sites: list[AdapterSite], w: Widths, n: int, s: MemorySettings
) -> int:
    """Bytes one decoder layer's token mixer saves, by its type: attention (`attention_activations`, with this
    layer's q/k norms); another mixer (linear attention, DeltaNet, Mamba) keeps its projections' outputs (its
    recurrence's own state is not counted); none when the layer's mixer is its MoE block."""
    path = _mixer_path(arch, layer)
    if path is None:
        return 0
    if path == arch.attention:
        return attention_activations(layer_sites, w, n, s)
    mixer = arch.attention_module(layer)
    outputs = sum(child.out_features for child in mixer.children() if isinstance(child, nn.Linear))
    lora = lora_input_activations([x for x in layer_sites if x.kind == "attention"], n, s)
    return DTYPE_BYTES[s.dtype] * n * outputs + lora


def attention_activations(layer_sites: list[AdapterSite], w: Widths, n: int, s: MemorySettings) -> int:
    """Bytes one decoder layer's attention block saves (input norm excluded)."""
    d = DTYPE_BYTES[s.dtype]
    total = d * n * (w.q + w.k + w.v + w.out) + 4 * n * w.heads  # SDPA: q, k, v, out, logsumexp
    if w.q_norm_rows:
        total += _rms_norm(n, w.q, w.q_norm_rows) + _rms_norm(n, w.k, w.k_norm_rows)
    return total + lora_input_activations([x for x in layer_sites if x.kind == "attention"], n, s)


def lora_input_activations(attention_sites: list[AdapterSite], n: int, s: MemorySettings) -> int:
    """Attention LoRA: each projection keeps its input cast to the adapter dtype, and x A^T.

    Without a cast (adapter dtype = base dtype) q, k and v read one saved tensor.
    """
    inputs = {site.name: site.shape[1] for site in attention_sites}
    a = DTYPE_BYTES[s.adapter_dtype]
    total = sum(a * n * site.rank for site in attention_sites)
    if s.adapter_dtype != s.dtype:
        return total + a * n * sum(inputs.values())
    shared = max((width for name, width in inputs.items() if name != "o_proj"), default=0)
    return total + a * n * (shared + inputs.get("o_proj", 0))


def router_activations(model: nn.Module, layer_sites: list[AdapterSite], n: int, s: MemorySettings) -> int:
    """Bytes one MoE layer's router saves: softmax, top-k, renormalisation, router LoRA (input, W + BA)."""
    arch = architecture_for(model)
    cfg = model.config
    experts, k = arch.num_experts(cfg), arch.top_k(cfg)
    d = DTYPE_BYTES[s.dtype]
    total = 4 * n * experts + 8 * n * k
    if getattr(cfg, "norm_topk_prob", True):
        total += 4 * n * (k + 1)
    for site in layer_sites:
        if site.kind == "router":
            out_features, in_features = site.shape
            total += d * n * in_features + d * out_features * in_features
    return total


def expert_widths(shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(2I, I): the width of the gate and up outputs together (one fused gate_up_proj, or a ModuleList
    expert's gate_proj and up_proj) and the intermediate width down_proj reads."""
    return sum(out for name, (out, _) in shapes.items() if name != "down_proj"), shapes["down_proj"][1]


def expert_activations(
    routed: list[AdapterSite], shapes: dict, rows: float, hot_rows: float, hidden: int, s: MemorySettings
) -> float:
    """Bytes one MoE layer's routed experts save on `rows` routed rows, `hot_rows` of them on the
    adapted experts (`routed`: the layer's routed-expert sites)."""
    d, a = DTYPE_BYTES[s.dtype], DTYPE_BYTES[s.adapter_dtype]
    two_i, inter = expert_widths(shapes)
    total = 2 * 8 * rows + d * rows * (two_i + inter + hidden + 1)
    if not routed or hot_rows == 0:
        return total
    total += 8 * hot_rows
    for site in routed:
        out_features, in_features = site.shape
        total += a * hot_rows * in_features + d * hot_rows * out_features
        if site.form != "full":
            rank = site.rank
            total += a * hot_rows * (rank + -rank % max(1, 16 // a))  # grouped_mm pads x A^T rows to 16 B
    return total


def shared_expert_activations(moe, layer_sites: list[AdapterSite], n: int, s: MemorySettings) -> int:
    """Bytes a shared-expert MLP saves: gate, up and activation outputs, LoRA inputs when adapted."""
    if moe.shared is None:
        return 0
    d, a = DTYPE_BYTES[s.dtype], DTYPE_BYTES[s.adapter_dtype]
    width = moe.shared.down_proj.weight.shape[1]
    total = 3 * d * n * width
    for site in layer_sites:
        if site.kind == "shared_expert":
            total += a * n * (site.shape[1] + site.rank)
    return total


def dense_mlp_activations(layer: nn.Module, n: int, s: MemorySettings) -> int:
    """A dense (non-MoE) MLP layer, frozen: gate, up and activation outputs."""
    mlp = getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    return 3 * DTYPE_BYTES[s.dtype] * n * down.weight.shape[1] if down is not None else 0


def hot_row_share(routed: list[AdapterSite], shares: torch.Tensor, slot: int) -> float:
    """The share of a MoE layer's routed rows (row `slot` of `shares`) that land on its adapted experts."""
    return float(shares[slot, list(routed[0].experts) if routed else []].sum())


def layer_activations(
    model: nn.Module, sites: list[AdapterSite], shares: torch.Tensor, s: MemorySettings
) -> list[float]:
    """Saved bytes of each decoder layer without checkpointing (`sites`: the plan's adapter sites)."""
    arch = architecture_for(model)
    w = attention_widths(model)
    n, k = s.tokens, arch.top_k(model.config)
    moe_layers = {moe.index: moe for moe in arch.moe_layers(model)}
    slots = {index: slot for slot, index in enumerate(moe_layers)}
    by_layer: dict[int, list[AdapterSite]] = {}
    for site in sites:
        by_layer.setdefault(site.layer, []).append(site)
    result = []
    for index, layer in enumerate(arch.decoder_layers(model)):
        layer_sites = by_layer.get(index, [])
        total = (_rms_norm(n, w.hidden) if index > 0 else 0) + _rms_norm(n, w.hidden)
        total += mixer_activations(arch, layer, layer_sites, attention_widths(model, layer), n, s)
        moe = moe_layers.get(index)
        if moe is None:
            total += dense_mlp_activations(layer, n, s)
        else:
            rows = n * k
            shapes = arch.expert_shapes(moe.experts)
            routed = [x for x in layer_sites if x.kind == "routed_expert"]
            hot_rows = rows * hot_row_share(routed, shares, slots[index])
            total += router_activations(model, layer_sites, n, s)
            total += expert_activations(routed, shapes, rows, hot_rows, w.hidden, s)
            total += shared_expert_activations(moe, layer_sites, n, s)
        result.append(total)
    return result


def head_activations(w: Widths, s: MemorySettings) -> int:
    """Final norm, fp32 log-probs and labels for the loss, RoPE's cos and sin."""
    n = s.tokens
    return _rms_norm(n, w.hidden) + 4 * n * w.vocab + 8 * n + 2 * s.seq_len * w.head_dim * DTYPE_BYTES[s.dtype]


def activation_bytes(
    model: nn.Module, plan: AdapterPlan, shares: torch.Tensor, s: MemorySettings, sites: list[AdapterSite] | None = None
) -> dict:
    """Saved activations with and without checkpointing, and the largest layer's (for the recompute).

    `sites`: the plan's adapter sites when the caller has them already (else listed here)."""
    layers = layer_activations(model, adapter_sites(model, plan) if sites is None else sites, shares, s)
    w = attention_widths(model)
    head = head_activations(w, s)
    checkpointed = len(layers) * DTYPE_BYTES[s.dtype] * s.tokens * w.hidden
    return {
        "plain": round(sum(layers) + head),
        "checkpointed": round(checkpointed + head),
        "largest_layer": round(max(layers, default=0)),
        "head": head,
    }


# -- the report -----------------------------------------------------------------------------


def _figure(value: int, how: str, label: str) -> dict:
    return {"label": label, "value": int(value), "unit": "bytes", "how": how}


def _sharded(value: int, ranks: int) -> int:
    return math.ceil(value / ranks)


@dataclass(frozen=True)
class StepTerms:
    """The byte counts (and element counts for the "how" texts) that one rank's step adds up."""

    weights: int  # every base tensor at its stored bytes, on one unsharded copy
    replicated: int  # of which NF4 storage (buffers: FSDP2 does not shard them)
    adapters: int  # adapter tensors, LoRI masks, int64 expert maps
    held: int  # adapter elements held
    trainable: int  # adapter elements that train
    acts: dict  # `activation_bytes`
    loss_peak: int
    layer_peak: int
    dequantized: int
    recompute: int
    gathered: int  # FSDP: the root unit + the largest decoder layer, gathered


def memory_report(
    model: nn.Module, plan: AdapterPlan, shares: torch.Tensor, s: MemorySettings, sites: list[AdapterSite] | None = None
) -> dict:
    """The memory breakdown of one rank's training step (`shares`: [MoE layers, E] selection shares;
    `sites`: the plan's adapter sites when the caller has them already)."""
    terms = step_terms(model, plan, shares, s, adapter_sites(model, plan) if sites is None else sites)
    figures = {**persistent_figures(terms, s), **step_figures(terms, s)}
    persistent = sum(figures[key]["value"] for key in ("weights", "adapters", "gradients", "optimizer"))
    activations = figures["activations"]["value"]
    peak = persistent + activations + max(terms.loss_peak, terms.layer_peak) + terms.gathered
    figures["total"] = _figure(
        peak,
        "weights + adapters + gradients + optimizer + activations + the larger transient + FSDP gathered",
        "predicted peak per rank",
    )
    return {"settings": asdict(s), "figures": figures, "notes": memory_notes(s)}


def step_terms(
    model: nn.Module, plan: AdapterPlan, shares: torch.Tensor, s: MemorySettings, sites: list[AdapterSite]
) -> StepTerms:
    """Count every term of the step: stored weights, adapters, activations, transients, FSDP gathering."""
    quantized = quantized_tensor_ids(model, s)
    held, trainable = adapter_elements(sites)
    mask_bytes = trainable if plan.lori is not None else 0
    weights = weight_bytes(model, s, quantized)
    replicated = replicated_bytes(model, s, quantized)
    acts = activation_bytes(model, plan, shares, s, sites)
    loss_peak, layer_peak, dequantized, recompute = transient_bytes(model, s, quantized, acts)
    return StepTerms(
        weights=weights,
        replicated=replicated,
        adapters=DTYPE_BYTES[s.adapter_dtype] * held + mask_bytes + adapter_buffer_bytes(plan, sites),
        held=held,
        trainable=trainable,
        acts=acts,
        loss_peak=loss_peak,
        layer_peak=layer_peak,
        dequantized=dequantized,
        recompute=recompute,
        gathered=fsdp_gathered_bytes(model, s, quantized, weights - replicated),
    )


def transient_bytes(model: nn.Module, s: MemorySettings, quantized: set[int], acts: dict) -> tuple[int, int, int, int]:
    """(loss, one layer's backward, of which the dequantized weight, of which the recomputed activations).

    The loss: two fp32 [N, V] gradients in the log-softmax backward. One layer's backward: its
    expert-path gradients d S (2I + I + H), the recomputed layer with checkpointing, the largest
    weight dequantized with nf4.
    """
    arch = architecture_for(model)
    d = DTYPE_BYTES[s.dtype]
    w = attention_widths(model)
    rows = s.tokens * arch.top_k(model.config)
    moe_layers = arch.moe_layers(model)
    expert_grads = 0
    if moe_layers:
        shapes = arch.expert_shapes(moe_layers[0].experts)
        expert_grads = d * rows * (sum(expert_widths(shapes)) + w.hidden)
    dequantized = d * largest_quantized_tensor(model, quantized)
    recompute = acts["largest_layer"] if s.gradient_checkpointing else 0
    loss_peak = 8 * s.tokens * w.vocab
    return loss_peak, expert_grads + recompute + dequantized, dequantized, recompute


def fsdp_gathered_bytes(model: nn.Module, s: MemorySettings, quantized: set[int], sharded_total: int) -> int:
    """FSDP: the root unit (all sharded bytes outside the decoder layers) stays gathered, plus the
    largest decoder layer's sharded parameters; 0 on one rank. `sharded_total`: the model's sharded bytes."""
    if s.fsdp <= 1:
        return 0
    layers = architecture_for(model).decoder_layers(model)
    sharded = [weight_bytes(layer, s, quantized) - replicated_bytes(layer, s, quantized) for layer in layers]
    return sharded_total - sum(sharded) + max(sharded)  # the root unit + the largest layer


def persistent_figures(t: StepTerms, s: MemorySettings) -> dict:
    """Weights, adapters, gradients and optimizer state per rank, with how each is counted."""
    d, a, ranks = DTYPE_BYTES[s.dtype], DTYPE_BYTES[s.adapter_dtype], s.fsdp
    quant = {
        "none": f"{d} B/param",
        "nf4": "NF4: ceil(n/2) + 4 ceil(n/64) B per quantized weight",
        "nf4-dq": "NF4 + double quant: ceil(n/2) + ceil(n/64) + 4 ceil(n/16384) + 4 B per quantized weight",
    }
    shard = f" / {ranks} ranks" if ranks > 1 else ""
    return {
        "weights": _figure(
            _sharded(t.weights - t.replicated, ranks) + t.replicated,
            quant[s.quantization]
            + f"; embeddings, lm_head, norms at {d} B"
            + shard
            + (
                " (NF4 storage whole on every rank: FSDP2 shards parameters, not buffers)"
                if t.replicated and shard
                else ""
            ),
            "base weights",
        ),
        "adapters": _figure(
            _sharded(t.adapters, ranks),
            f"{t.held:,} adapter elements x {a} B (+ LoRI masks 1 B, expert maps int64)" + shard,
            "adapter tensors",
        ),
        "gradients": _figure(
            _sharded(a * t.trainable, ranks),
            f"{t.trainable:,} trainable elements x {a} B; base frozen" + shard,
            "gradients",
        ),
        "optimizer": _figure(
            _sharded(2 * a * t.trainable, ranks),
            f"AdamW exp_avg + exp_avg_sq at {a} B each, no master copy" + shard,
            "optimizer state",
        ),
    }


def step_figures(t: StepTerms, s: MemorySettings) -> dict:
    """Activations (both settings and the one in use), the transients and FSDP's gathered parameters."""
    d = DTYPE_BYTES[s.dtype]
    ckpt = "with" if s.gradient_checkpointing else "without"
    activations = t.acts["checkpointed"] if s.gradient_checkpointing else t.acts["plain"]
    return {
        "activations_no_checkpointing": _figure(
            t.acts["plain"],
            f"saved for backward, {s.batch_size} x {s.seq_len} tokens per rank, all layers",
            "activations, no checkpointing",
        ),
        "activations_checkpointing": _figure(
            t.acts["checkpointed"],
            f"each layer's input {d} N H + final norm, log-probs 4 N V, labels, RoPE",
            "activations, checkpointing",
        ),
        "activations": _figure(activations, f"the step as set: {ckpt} gradient checkpointing", "activations"),
        "transient_loss": _figure(
            t.loss_peak, "two fp32 [N, V] gradients in the log-softmax backward, 8 N V", "transient: logits and loss"
        ),
        "transient_layer": _figure(
            t.layer_peak,
            "one layer's backward: expert-path gradients d S (3I + H)"
            + (" + its recomputed activations" if t.recompute else "")
            + (" + the largest weight dequantized" if t.dequantized else ""),
            "transient: one layer's backward",
        ),
        "transient_dequantized": _figure(
            t.dequantized, f"largest quantized weight at {d} B (part of the layer term)", "of which: dequantized weight"
        ),
        "fsdp_gathered": _figure(
            t.gathered,
            "root unit (embeddings, lm_head, norm) + the largest decoder layer's sharded parameters, gathered",
            "FSDP gathered parameters",
        ),
    }


def memory_notes(s: MemorySettings) -> list[str]:
    notes = ["Not counted: the CUDA context and library workspaces (about 0.5-1 GiB) and allocator fragmentation."]
    if s.quantization != "none":
        notes.append(
            "NF4 covers the attention, router, shared-expert and fused expert weights of MoE layers (what "
            "hellora_pl.quant replaces); "
            "dequantizing a whole fused experts tensor at once is the transient counted."
        )
    if s.fsdp > 1:
        notes.append("FSDP with backward prefetch can hold a second decoder layer gathered; not counted.")
    return notes


__all__ = [
    "MemorySettings",
    "activation_bytes",
    "adapter_elements",
    "memory_report",
    "nf4_bytes",
]
