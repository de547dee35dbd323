"""Whole training steps (forward + backward + AdamW) of an MoE LM: hellora_pl LoRA, HELLoRA, and PEFT LoRA.

Why: the expert-path benchmark isolates one layer; what a user feels is tokens/s of a training
step with attention, routers and every layer adapted. The HELLoRA paper reports 1.9x training
throughput over LoRA; this measures our HELLoRA against PEFT's LoRA on the same model and batch.

    python benchmarks/train_throughput.py                  # --shape cpu: a tiny OLMoE-shaped model
    python benchmarks/train_throughput.py --shape olmoe    # OLMoE-1B-7B shape, random bf16 weights (GPU)

Methods: `lora` (hellora_pl, LoRA on attention, routers and every expert), `hellora` (hellora_pl,
the same but only each layer's hot experts: the top-k most selected on the benchmark batch), and
`peft` (PEFT 0.21 LoRA on the same targets: attention by `target_modules`, routers and fused
experts by `target_parameters`). The PEFT model is made by exporting our `lora` model with
`hellora_pl.adapters.export_peft` and loading it with `PeftModel.from_pretrained`, so its first
loss must equal ours: that is checked before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

from hellora_pl.adapters import adapter_state_dict, build_plan, export_peft, inject_adapters
from hellora_pl.backbones import BackboneConfig
from hellora_pl.backbones.shapes import SHAPES as MODEL_SHAPES
from hellora_pl.loading import load_backbone
from hellora_pl.routing import AllExperts, RoutingRecorder, TopKPerLayer

METHODS = ("lora", "hellora", "peft")
LABELS = {
    "lora": "hellora_pl LoRA (all experts)",
    "hellora": "hellora_pl HELLoRA (hot experts)",
    "peft": "PEFT LoRA (all experts)",
}


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


def make_model(setup: ModelSetup, device: torch.device, seed: int, layers: int | None):
    config = dict(setup.config)
    if layers is not None:
        config["num_hidden_layers"] = layers
    with torch.device(device):
        model = load_backbone(BackboneConfig(model_type="olmoe", config=config, dtype=setup.dtype, seed=seed))
    return model


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
    """Inject hellora_pl's `lora` or `hellora` plan; HELLoRA's hot experts come from routing this batch."""
    profile = None
    policy = AllExperts()
    if method == "hellora":
        policy = TopKPerLayer()
        with RoutingRecorder(model) as recorder, torch.no_grad():
            recorder.arm(batch)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            profile = recorder.take()
    plan = build_plan(model, policy, profile, rank=rank, alpha=2 * rank, router_rank=rank, method=method)
    _inject(model, plan, expert_kernel)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0, or the equality check against PEFT would prove nothing
        for name, tensor in adapter_state_dict(model).items():
            if "lora_B" in name:
                tensor.copy_(0.05 * torch.randn(tensor.shape, generator=generator))
    return plan


def peft_from(model, plan, setup, device, seed, layers) -> torch.nn.Module:
    """PEFT LoRA on the same targets and with the same adapter values as `model` (via export_peft)."""
    with tempfile.TemporaryDirectory() as directory:
        export_peft(model, plan, Path(directory) / "peft")
        base = make_model(setup, device, seed, layers)
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
    """The three trained models, the correctness checks, and facts about the plans."""
    vocab = setup.config["vocab_size"]
    batch = make_batch(setup, vocab, device, args.seed + 1)
    tol = 1e-4 if setup.dtype == "float32" else 2e-2
    models, checks, facts = {}, [], {}
    for method in ("lora", "hellora"):
        model = make_model(setup, device, args.seed, args.layers)
        base = logits_and_loss(model, batch)
        plan = adapt(model, method, batch, setup.rank, args.expert_kernel)
        facts[method] = {
            "trainable_params": sum(p.numel() for p in trainable(model)),
            "hot_experts_per_layer": [len(layer.hot_experts) for layer in plan.layers],
        }
        twin = peft_from(model, plan, setup, device, args.seed, args.layers)
        label = "LoRA (all experts)" if method == "lora" else "HELLoRA (hot experts; PEFT's cold experts zero)"
        checks.append(check_same(f"hellora_pl {label} == PEFT with the same adapters", logits_and_loss(model, batch),
                                 logits_and_loss(twin, batch), base[0], tol))  # fmt: skip
        models[method] = model
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
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SETUPS), default=None, help="default: cpu on CPU, olmoe on CUDA")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the shape's)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the shape's)")
    parser.add_argument("--expert-kernel", default="auto", help="hellora_pl expert kernel: auto, torch or triton")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 warmup, 1 repeat (tests)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and markdown files")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shape, args.warmup, args.repeats = args.shape or "tiny", 1, 1
    return args


HEADERS = ["method", "ms/step (median)", "ms (min)", "tokens/s", "memory MB", "trainable params", "PEFT ms / this"]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    shape_name = args.shape or ("olmoe" if device.type == "cuda" else "cpu")
    setup = SETUPS[shape_name]
    overrides = {k: v for k, v in (("batch", args.batch), ("seq_len", args.seq_len)) if v is not None}
    if overrides:
        setup = ModelSetup(**{**asdict(setup), **overrides})
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    trainers, checks, facts = build(args, setup, device)
    tokens = setup.batch * setup.seq_len
    timed = [Timed(m, trainers[m].step) for m in METHODS]
    time_interleaved(timed, device, args.warmup, args.repeats)
    rows = []
    peft_ms = next(t for t in timed if t.name == "peft").median_ms
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
    }
    payload = {
        "benchmark": "train_throughput",
        "shape_name": shape_name,
        "setup": asdict(setup),
        "tokens_per_step": tokens,
        "optimizer": "AdamW(lr=1e-4) over the trainable parameters",
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
    print(f"\nthroughput: HELLoRA {summary['hellora_throughput_over_peft']:.2f}x PEFT LoRA, hellora_pl LoRA "
          f"{summary['lora_throughput_over_peft']:.2f}x PEFT LoRA, HELLoRA {summary['hellora_throughput_over_lora']:.2f}x "
          "hellora_pl LoRA (the paper: HELLoRA 1.9x LoRA)")  # fmt: skip
    stem = f"train_throughput_{shape_name}_{device.type}" + (f"_threads{args.threads}" if args.threads else "")
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
                    f"{r['trainable_params']:,}", f"{r['peft_ms_over_this']:.2f}"])  # fmt: skip
    return out


def render_markdown(payload: dict, device: torch.device) -> str:
    setup, s = payload["setup"], payload["summary"]
    c = setup["config"]
    lines = [
        f"# Training throughput: forward + backward + AdamW ({payload['shape_name']}, {device.type})",
        "",
        f"OLMoE-family model, random weights, {setup['dtype']}: {c['num_hidden_layers']} layers, H {c['hidden_size']}, "
        f"I {c['intermediate_size']}, E {c['num_experts']}, top-{c['num_experts_per_tok']}; LoRA rank {setup['rank']} "
        f"on attention (q, k, v, o), routers and experts; batch {setup['batch']} x {setup['seq_len']} = "
        f"{payload['tokens_per_step']} tokens. {setup['note']}. Median and min of {payload['repeats']} interleaved steps "
        f"after {payload['warmup']} warmup. Memory: bytes autograd saves for backward beyond parameters and the batch"
        + (" (CPU has no allocator statistics)." if device.type == "cpu" else "; CUDA peak above the start of a step."),
        "",
        markdown_table(HEADERS, table_rows(payload["rows"], device)),
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
