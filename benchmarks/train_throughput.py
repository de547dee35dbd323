"""Whole training steps (forward + backward + AdamW) of an MoE LM: hellora_pl LoRA, HELLoRA, and PEFT LoRA,
against the floor of attention-only LoRA.

Why: the expert-path benchmark isolates one layer; what a user feels is tokens/s of a training
step with attention, routers and every layer adapted. The HELLoRA paper reports 1.9x training
throughput over LoRA; this measures our HELLoRA against PEFT's LoRA on the same model and batch,
and every method against attention-only LoRA: no adapter method on this model can be faster than
the step that adapts no expert at all.

    python benchmarks/train_throughput.py                  # --shape cpu: a tiny OLMoE-shaped model
    python benchmarks/train_throughput.py --shape olmoe    # OLMoE-1B-7B shape, random bf16 weights (GPU)
    python benchmarks/train_throughput.py --hidden 512 --intermediate 256 --experts 64 --top-k 8 \
        --layers 2 --tokens 256 --rank 8                   # any OLMoE-family shape

Methods: `attention_only` (hellora_pl's method of that name: LoRA on q, k, v and o, routers and
experts frozen; the floor), `lora` (hellora_pl, LoRA on attention, routers and every expert),
`hellora` (hellora_pl, the same but only each layer's hot experts: the top-k most selected on the
benchmark batch), and `peft` (PEFT 0.21 LoRA on the same targets as `lora`: attention by
`target_modules`, routers and fused experts by `target_parameters`). The PEFT model is made by
exporting our `lora` model with `hellora_pl.adapters.export_peft` and loading it with
`PeftModel.from_pretrained`, so its first loss must equal ours: that is checked before anything
is timed.

Shape options (--hidden, --intermediate, --experts, --top-k, --layers, --heads, --tokens, --rank,
--batch, --seq-len) override the `--shape` preset (the base: cpu on CPU, olmoe on CUDA); vocab and
dtype stay the preset's. --heads sets query and key/value heads alike. --tokens is tokens per
step: the batch (--batch, else the preset's) times seq_len = tokens / batch; with --seq-len and no
--batch, batch = tokens / seq_len. Every option is checked before any model is built.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import peft
import torch
from _common import (
    RESULTS_DIR,
    Timed,
    fmt_mb,
    load_average,
    machine_info,
    machine_markdown,
    markdown_table,
    max_error,
    measure_memory,
    pick_device,
    synchronize,
    text_table,
    time_interleaved,
    write_results,
)

from hellora_pl.adapters import adapter_state_dict, export_peft, inject_adapters
from hellora_pl.adapters.methods import resolve_method
from hellora_pl.backbones import BackboneConfig
from hellora_pl.backbones.shapes import SHAPES as MODEL_SHAPES
from hellora_pl.kernels import ExpertKernel
from hellora_pl.loading import load_backbone
from hellora_pl.routing import RoutingRecorder

FLOOR = "attention_only"
METHODS = (FLOOR, "lora", "hellora", "peft")
LABELS = {
    FLOOR: "hellora_pl attention-only LoRA (floor)",
    "lora": "hellora_pl LoRA (all experts)",
    "hellora": "hellora_pl HELLoRA (hot experts)",
    "peft": "PEFT LoRA (all experts)",
}
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelSetup:
    """A randomly initialised OLMoE-family model, its adapter rank and the benchmark batch."""

    config: dict
    rank: int
    batch: int
    seq_len: int
    dtype: str
    note: str = ""
    extra: dict = field(default_factory=dict)


_SMALL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 512}

SETUPS: dict[str, ModelSetup] = {
    "tiny": ModelSetup(
        {**_SMALL, "vocab_size": 128, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2},
        rank=4, batch=2, seq_len=8, dtype="float32", note="smoke test only",
    ),
    "cpu": ModelSetup(
        {**_SMALL, "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 32, "num_experts_per_tok": 4},
        rank=8, batch=4, seq_len=128, dtype="float32", note="OLMoE-shaped, scaled down for a CPU",
    ),
    "olmoe": ModelSetup(
        dict(MODEL_SHAPES["olmoe-1b-7b"].config), rank=32, batch=4, seq_len=1024, dtype="bfloat16",
        note="OLMoE-1B-7B shape (hellora_pl.backbones.shapes), random weights",
    ),
}  # fmt: skip

# Shape options: argparse dest -> the config keys it sets.
CONFIG_OPTIONS = {
    "hidden": ("hidden_size",),
    "intermediate": ("intermediate_size",),
    "experts": ("num_experts",),
    "top_k": ("num_experts_per_tok",),
    "layers": ("num_hidden_layers",),
    "heads": ("num_attention_heads", "num_key_value_heads"),
}
SIZE_OPTIONS = (*CONFIG_OPTIONS, "tokens", "rank", "batch", "seq_len")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _tokens_to_batch(tokens: int, batch: int | None, seq_len: int | None, default_batch: int) -> tuple[int, int]:
    """(batch, seq_len) for `tokens` per step: seq_len = tokens / batch, or batch = tokens / seq_len."""
    if batch is not None and seq_len is not None:
        if batch * seq_len != tokens:
            raise ValueError(f"--tokens {tokens} != --batch {batch} x --seq-len {seq_len}; give two of the three.")
        return batch, seq_len
    if seq_len is not None:
        if tokens % seq_len:
            raise ValueError(f"--tokens {tokens} is not a multiple of --seq-len {seq_len}; choose a multiple.")
        return tokens // seq_len, seq_len
    source = "the preset's" if batch is None else "--batch"
    batch = default_batch if batch is None else batch
    if tokens % batch:
        raise ValueError(
            f"--tokens {tokens} is not a multiple of the batch {batch} ({source}); choose a multiple of {batch} "
            "or pass --batch (sequences per step) that divides it."
        )
    return batch, tokens // batch


def resolve_setup(args: argparse.Namespace, base: ModelSetup) -> ModelSetup:
    """`base` with the shape options of `args` applied, every size checked; ValueError names the option to fix."""
    for dest in SIZE_OPTIONS:
        value = getattr(args, dest)
        if value is not None and value < 1:
            raise ValueError(f"{_flag(dest)} must be a positive integer, got {value}.")
    config = dict(base.config)
    for dest, keys in CONFIG_OPTIONS.items():
        if getattr(args, dest) is not None:
            config.update(dict.fromkeys(keys, getattr(args, dest)))
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    experts, top_k = config["num_experts"], config["num_experts_per_tok"]
    if hidden % heads:
        raise ValueError(f"{heads} attention heads do not divide hidden size {hidden}; pass --heads N that divides "
                         f"{hidden} (the head dimension is hidden / heads).")  # fmt: skip
    if (hidden // heads) % 2:
        raise ValueError(f"head dimension {hidden} / {heads} = {hidden // heads} is odd, and rotary embeddings need "
                         "an even one; choose --heads or --hidden so hidden / heads is even.")  # fmt: skip
    if heads % kv_heads:
        raise ValueError(f"{kv_heads} key/value heads do not divide {heads} attention heads; pass --heads.")
    if top_k > experts:
        raise ValueError(f"--top-k {top_k} is more than the {experts} experts; choose --top-k <= --experts.")
    if args.tokens is not None:
        batch, seq_len = _tokens_to_batch(args.tokens, args.batch, args.seq_len, base.batch)
    else:
        batch = base.batch if args.batch is None else args.batch
        seq_len = base.seq_len if args.seq_len is None else args.seq_len
    config["max_position_embeddings"] = max(config.get("max_position_embeddings") or 0, seq_len)
    return ModelSetup(config, rank=base.rank if args.rank is None else args.rank, batch=batch, seq_len=seq_len,
                      dtype=base.dtype, note=base.note, extra=dict(base.extra))  # fmt: skip


def results_stem(shape_name: str, setup: ModelSetup, base: ModelSetup, custom: bool, device, threads) -> str:
    """train_throughput_<preset>[_<sizes>]_<device>[_threads<n>]: a custom shape's sizes are in its name, so a run
    with options never overwrites a preset's results."""
    stem = f"train_throughput_{shape_name}"
    if custom:
        c = setup.config
        stem += (f"_h{c['hidden_size']}_i{c['intermediate_size']}_e{c['num_experts']}_k{c['num_experts_per_tok']}"
                 f"_l{c['num_hidden_layers']}_t{setup.batch * setup.seq_len}_r{setup.rank}")  # fmt: skip
        if c["num_attention_heads"] != base.config["num_attention_heads"]:
            stem += f"_a{c['num_attention_heads']}"
        if setup.batch != base.batch:
            stem += f"_b{setup.batch}"
    return stem + f"_{device.type}" + (f"_threads{threads}" if threads else "")


def make_model(setup: ModelSetup, device: torch.device, seed: int):
    with torch.device(device):
        return load_backbone(BackboneConfig(model_type="olmoe", config=dict(setup.config), dtype=setup.dtype,
                                            seed=seed))  # fmt: skip


def make_batch(setup: ModelSetup, vocab: int, device: torch.device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (setup.batch, setup.seq_len), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def _inject(model, plan, expert_kernel: str) -> None:
    """inject_adapters, passing the expert kernel where this hellora_pl version takes one."""
    if "expert_kernel" in inspect.signature(inject_adapters).parameters:
        inject_adapters(model, plan, expert_kernel=expert_kernel)
    else:
        inject_adapters(model, plan)


def adapt(model, method: str, batch: dict, rank: int, expert_kernel: str):
    """Inject hellora_pl's plan of `method` with its defaults (routers, where the method adapts them, at `rank`);
    HELLoRA's hot experts come from routing this batch."""
    profile = None
    if method == "hellora":
        with RoutingRecorder(model) as recorder, torch.no_grad():
            recorder.arm(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            profile = recorder.take()
    plan = resolve_method(method, rank=rank, alpha=2 * rank, router_rank=rank).build(model, profile)
    _inject(model, plan, expert_kernel)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0, or the equality check against PEFT would prove nothing
        for name, tensor in adapter_state_dict(model).items():
            if "lora_B" in name:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    return plan


def peft_from(model, plan, setup, device, seed) -> torch.nn.Module:
    """PEFT LoRA on the same targets and with the same adapter values as `model` (via export_peft)."""
    with tempfile.TemporaryDirectory() as directory:
        export_peft(model, plan, Path(directory) / "peft")
        base = make_model(setup, device, seed)
        peft_model = peft.PeftModel.from_pretrained(base, Path(directory) / "peft", is_trainable=True)
    return peft_model


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def logits_and_loss(model, batch):
    out = model(**batch)
    return out.logits.float(), out.loss.float()


def check_same(name: str, ours, theirs, base_logits, tol: float) -> dict:
    (our_logits, our_loss), (their_logits, their_loss) = ours, theirs
    logits_err = max_error(their_logits, our_logits)[1]
    loss_err = max_error(their_loss, our_loss)[1]
    effect = max_error(our_logits, base_logits)[1]
    passed = logits_err <= tol and loss_err <= tol and effect > 10 * tol
    return {
        "name": name,
        "passed": passed,
        "tolerance_rel": tol,
        "max_rel_error": {"logits": logits_err, "loss": loss_err},
        "adapter_effect_rel": effect,
        "loss": {"ours": our_loss.item(), "peft": their_loss.item()},
    }


def check_attention_only(model, plan, setup: ModelSetup) -> dict:
    """The floor trains exactly rank x (in + out) per q/k/v/o projection of every layer, and nothing else
    (attention_only leaves routers and experts frozen); the expected count comes from the config alone."""
    c = setup.config
    hidden, heads, kv_heads = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = hidden // heads
    per_layer = (hidden + heads * head_dim) * 2 + (hidden + kv_heads * head_dim) * 2  # q, o; k, v
    expected = setup.rank * per_layer * c["num_hidden_layers"]
    pattern = re.compile(r"\.self_attn\.(" + "|".join(ATTENTION_PROJECTIONS) + r")\.lora_[AB]$")
    names = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    outside = sorted(n for n in names if not pattern.search(n))
    tensors = 2 * len(ATTENTION_PROJECTIONS) * c["num_hidden_layers"]
    counted = sum(names.values())
    return {
        "name": "attention-only LoRA trains only q/k/v/o adapters (routers and experts frozen)",
        "passed": not outside and len(names) == tensors and counted == expected == plan.trainable_params,
        "max_rel_error": {},
        "trainable_tensors": {"counted": len(names), "expected": tensors},
        "trainable_params": {"counted": counted, "expected": expected, "plan": plan.trainable_params},
        "outside_attention": outside[:10],
    }


class Trainer:
    """One method's model, AdamW and the fixed batch; `step` is one full training step."""

    def __init__(self, name: str, model, batch: dict, lr: float = 1e-4):
        self.name, self.model, self.batch = name, model, batch
        self.params = trainable(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.model.train()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()
        self.optimizer.step()


def build(args, setup: ModelSetup, device: torch.device) -> tuple[dict, list[dict], dict]:
    """The four trained models, the correctness checks, and facts about the plans."""
    vocab = setup.config["vocab_size"]
    batch = make_batch(setup, vocab, device, args.seed + 1)
    tol = 1e-4 if setup.dtype == "float32" else 2e-2
    models, checks, facts = {}, [], {}
    for method in (FLOOR, "lora", "hellora"):
        model = make_model(setup, device, args.seed)
        base = logits_and_loss(model, batch)
        plan = adapt(model, method, batch, setup.rank, args.expert_kernel)
        facts[method] = {
            "trainable_params": sum(p.numel() for p in trainable(model)),
            "hot_experts_per_layer": [len(layer.hot_experts) for layer in plan.layers],
        }
        models[method] = model
        if method == FLOOR:
            checks.append(check_attention_only(model, plan, setup))
            continue
        twin = peft_from(model, plan, setup, device, args.seed)
        label = "LoRA (all experts)" if method == "lora" else "HELLoRA (hot experts; PEFT's cold experts zero)"
        checks.append(check_same(f"hellora_pl {label} == PEFT with the same adapters", logits_and_loss(model, batch),
                                 logits_and_loss(twin, batch), base[0], tol))  # fmt: skip
        if method == "lora":
            models["peft"] = twin
            facts["peft"] = {"trainable_params": sum(p.numel() for p in trainable(twin))}
        else:
            del twin
        gc.collect()
    checks.append(
        {
            "name": "PEFT trains as many parameters as hellora_pl LoRA",
            "passed": facts["peft"]["trainable_params"] == facts["lora"]["trainable_params"],
            "max_rel_error": {},
            "params": {m: facts[m]["trainable_params"] for m in ("lora", "peft")},
        }
    )
    return {m: Trainer(m, models[m], batch) for m in METHODS}, checks, facts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, with `args.setup` (the preset and shape options resolved) and `args.custom` (any shape option
    given); a bad value exits with argparse's usage error before any model is built."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SETUPS), default=None,
                        help="preset the shape options override (default: cpu on CPU, olmoe on CUDA)")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    sizes = parser.add_argument_group("shape options (override the preset)")
    sizes.add_argument("--hidden", type=int, default=None, help="hidden size")
    sizes.add_argument("--intermediate", type=int, default=None, help="each expert's intermediate size")
    sizes.add_argument("--experts", type=int, default=None, help="routed experts per layer")
    sizes.add_argument("--top-k", type=int, default=None, help="experts per token")
    sizes.add_argument("--layers", type=int, default=None, help="decoder layers")
    sizes.add_argument("--heads", type=int, default=None, help="attention heads (query and key/value alike)")
    sizes.add_argument("--tokens", type=int, default=None,
                       help="tokens per step: batch x (tokens / batch), batch from --batch or the preset")  # fmt: skip
    sizes.add_argument("--rank", type=int, default=None, help="LoRA rank of every adapter")
    sizes.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    sizes.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the shape's)")
    parser.add_argument(
        "--expert-kernel", default="auto", choices=get_args(ExpertKernel), help="hellora_pl expert kernel"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 warmup, 1 repeat (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown files")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.warmup, args.repeats = args.shape or "tiny", 1, 1
    for name, low in (("warmup", 0), ("repeats", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name} must be at least {low}, got {value}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device; use --device cpu (or auto).")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.shape = args.shape or ("olmoe" if cuda else "cpu")
    args.custom = any(getattr(args, dest) is not None for dest in SIZE_OPTIONS)
    try:
        args.setup = resolve_setup(args, SETUPS[args.shape])
    except ValueError as error:
        parser.error(f"{error} (base preset: --shape {args.shape})")
    return args


HEADERS = ["method", "ms/step (median)", "ms (min)", "tokens/s", "memory MB", "trainable params", "x attention-only",
           "PEFT ms / this"]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shape_name, setup = args.shape, args.setup
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    trainers, checks, facts = build(args, setup, device)
    tokens = setup.batch * setup.seq_len
    timed = [Timed(m, trainers[m].step) for m in METHODS]
    time_interleaved(timed, device, args.warmup, args.repeats)
    rows = []
    by_name = {t.name: t for t in timed}
    peft_ms, floor_ms = by_name["peft"].median_ms, by_name[FLOOR].median_ms
    for t in timed:
        trainer = trainers[t.name]
        exclude = [*trainer.model.parameters(), *trainer.batch.values()]
        memory = measure_memory(trainer.step, device, exclude)
        if device.type == "cuda":
            synchronize(device)
            memory["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        rows.append(
            {
                "method": t.name,
                "label": LABELS[t.name],
                "ms_median": round(t.median_ms, 3),
                "ms_min": round(t.min_ms, 3),
                "tokens_per_s": round(tokens / (t.median_ms / 1e3), 1),
                "ratio_to_floor": round(t.median_ms / floor_ms, 3),
                "peft_ms_over_this": round(peft_ms / t.median_ms, 3),
                "samples_ms": [round(1e3 * s, 3) for s in t.samples],
                **memory,
                **facts[t.name],
            }
        )
    by = {r["method"]: r for r in rows}
    summary = {
        "hellora_throughput_over_peft": by["hellora"]["peft_ms_over_this"],
        "lora_throughput_over_peft": by["lora"]["peft_ms_over_this"],
        "hellora_throughput_over_lora": round(by["lora"]["ms_median"] / by["hellora"]["ms_median"], 3),
        "paper_hellora_over_lora": 1.9,
        "floor_ms": round(floor_ms, 3),
        "hellora_over_floor": by["hellora"]["ratio_to_floor"],
        "lora_over_floor": by["lora"]["ratio_to_floor"],
        "peft_over_floor": by["peft"]["ratio_to_floor"],
    }
    payload = {
        "benchmark": "train_throughput",
        "shape_name": shape_name,
        "custom_shape": args.custom,
        "setup": asdict(setup),
        "tokens_per_step": tokens,
        "optimizer": "AdamW(lr=1e-4) over the trainable parameters",
        "floor": FLOOR,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "machine": machine_info(device, __file__, argv, load_at_start),
        "rows": rows,
        "checks": checks,
        "all_checks_passed": all(c["passed"] for c in checks),
        "summary": summary,
    }
    print(text_table(HEADERS, table_rows(rows, device)))
    print("\ncorrectness:")
    for check in checks:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in check["max_rel_error"].items())
        print(
            f"  [{'PASS' if check['passed'] else 'FAIL'}] {check['name']}"
            + (f": max rel error {errors}" if errors else "")
        )
    print(f"\nfloor: attention-only LoRA {summary['floor_ms']:.1f} ms/step; HELLoRA "
          f"{summary['hellora_over_floor']:.2f}x it, hellora_pl LoRA {summary['lora_over_floor']:.2f}x, "
          f"PEFT LoRA {summary['peft_over_floor']:.2f}x")  # fmt: skip
    print(f"throughput: HELLoRA {summary['hellora_throughput_over_peft']:.2f}x PEFT LoRA, hellora_pl LoRA "
          f"{summary['lora_throughput_over_peft']:.2f}x PEFT LoRA, HELLoRA "
          f"{summary['hellora_throughput_over_lora']:.2f}x hellora_pl LoRA (the paper: HELLoRA 1.9x LoRA)")  # fmt: skip
    stem = results_stem(shape_name, setup, SETUPS[shape_name], args.custom, device, args.threads)
    json_path, md_path = write_results(args.out, stem, payload, render_markdown(payload, device))
    print(f"\nwrote {json_path} and {md_path}")
    return payload


def table_rows(rows: list[dict], device: torch.device) -> list[list]:
    out = []
    for r in rows:
        memory = f"saved {fmt_mb(r['saved_bytes'])}"
        if device.type == "cuda":
            memory += f", peak {fmt_mb(r['peak_bytes'])}, max alloc {fmt_mb(r['max_allocated_bytes'])}"
        out.append([r["label"], f"{r['ms_median']:.1f}", f"{r['ms_min']:.1f}", f"{r['tokens_per_s']:.0f}", memory,
                    f"{r['trainable_params']:,}", f"{r['ratio_to_floor']:.2f}",
                    f"{r['peft_ms_over_this']:.2f}"])  # fmt: skip
    return out


def render_markdown(payload: dict, device: torch.device) -> str:
    setup, s = payload["setup"], payload["summary"]
    c = setup["config"]
    base = f"preset {payload['shape_name']}" + (" with shape options" if payload.get("custom_shape") else "")
    lines = [
        f"# Training throughput: forward + backward + AdamW ({base}, {device.type})",
        "",
        f"OLMoE-family model, random weights, {setup['dtype']}: {c['num_hidden_layers']} layers, H {c['hidden_size']}, "
        f"I {c['intermediate_size']}, E {c['num_experts']}, top-{c['num_experts_per_tok']}, "
        f"{c['num_attention_heads']} heads; LoRA rank {setup['rank']} on attention (q, k, v, o), routers and experts "
        f"(attention only for the floor); batch {setup['batch']} x {setup['seq_len']} = {payload['tokens_per_step']} "
        f"tokens. {setup['note']}. Median and min of {payload['repeats']} interleaved steps "
        f"after {payload['warmup']} warmup. Memory: bytes autograd saves for backward beyond parameters and the batch"
        + (" (CPU has no allocator statistics)." if device.type == "cpu" else "; CUDA peak above the start of a step."),
        "",
        markdown_table(HEADERS, table_rows(payload["rows"], device)),
        "",
        f"Floor (attention-only LoRA: the step no adapter method on this model can beat): {s['floor_ms']:.1f} ms/step; "
        f"HELLoRA {s['hellora_over_floor']:.2f}x it, hellora_pl LoRA {s['lora_over_floor']:.2f}x, "
        f"PEFT LoRA {s['peft_over_floor']:.2f}x.",
        "",
        f"HELLoRA: {s['hellora_throughput_over_peft']:.2f}x the throughput of PEFT LoRA, "
        f"{s['hellora_throughput_over_lora']:.2f}x hellora_pl LoRA (the HELLoRA paper reports 1.9x over LoRA); "
        f"hellora_pl LoRA: {s['lora_throughput_over_peft']:.2f}x PEFT LoRA.",
        "",
        "## Correctness",
        "",
    ]  # fmt: skip
    for check in payload["checks"]:
        errors = ", ".join(f"{k} {v:.1e}" for k, v in check["max_rel_error"].items())
        lines.append(f"- {'PASS' if check['passed'] else 'FAIL'} {check['name']}" + (f": {errors}" if errors else ""))
    lines += ["", "## Machine", "", machine_markdown(payload["machine"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
