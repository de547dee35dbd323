"""Pretrain the miniature OLMoE that hellora_pl ships: real text from three domains, one CPU core.

    python benchmarks/pretrain_miniature.py --python-docs pydoc/usr/share/doc/python3.11/html/_sources

reads GSM8K (``../shared/data/gsm8k``), this interpreter's standard library and the Python
documentation (see ``miniature_corpus``), trains a byte-level BPE tokenizer on them, pretrains an
OLMoE from a seed and writes, under ``--out``: the config and bf16 weights (``model.safetensors``),
the tokenizer, each domain's validation windows (``val_tokens.safetensors``), ``card.json`` (recipe,
data, losses per domain of the shipped bf16 weights, steps, wall time, command, versions) and the
model card ``README.md``. The run is a function of its options and the seed: every step's batch is
drawn from a generator seeded by (seed, step), and ``--work`` keeps a resumable state every
``--save-every`` steps, so an interrupted run continues where it stopped and ends with the same
weights. ``--stop-after N`` stops after step N (to split a run, and for the resume test).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import miniature_corpus as corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "hellora-mini-olmoe"
DEFAULT_GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
STATE = "state.pt"


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    steps: int = 1600
    batch: int = 16
    seq: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.01
    vocab: int = 4096
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    experts: int = 32
    top_k: int = 4
    expert_width: int = 64
    val_windows: int = 64
    threads: int = 1


def olmoe_config(recipe: Recipe, tokenizer):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.expert_width,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        num_experts=recipe.experts,
        num_experts_per_tok=recipe.top_k,
        max_position_embeddings=recipe.seq,
        router_aux_loss_coef=recipe.aux_loss_coef,
        output_router_logits=False,  # fine-tuning adds the aux loss where the method asks for it
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warmup, then cosine down to ``min_lr_ratio`` of the peak."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(streams: list[np.ndarray], recipe: Recipe, step: int) -> torch.Tensor:
    """Step ``step``'s batch: each row a random window of a uniformly drawn domain, seeded by (seed, step)."""
    rng = np.random.default_rng([recipe.seed, step])
    rows = []
    for domain in rng.integers(0, len(streams), recipe.batch):
        stream = streams[domain]
        start = rng.integers(0, len(stream) - recipe.seq)
        rows.append(stream[start : start + recipe.seq])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


@torch.no_grad()
def validation_losses(model, windows: dict[str, torch.Tensor], chunk: int = 16) -> dict[str, float]:
    """Mean next-token cross-entropy per domain (no auxiliary loss)."""
    was_training = model.training
    model.eval()
    losses = {}
    for domain, tokens in windows.items():
        total, count = 0.0, 0
        for start in range(0, len(tokens), chunk):
            ids = tokens[start : start + chunk].long()
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += ids[:, 1:].numel()
        losses[domain] = total / count
    model.train(was_training)
    return losses


def parse_args(argv=None) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gsm8k", type=Path, default=DEFAULT_GSM8K, help="folder holding GSM8K's train.jsonl")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]), help="the standard library's folder")
    parser.add_argument("--python-docs", type=Path, required=True, help=f"the docs' _sources folder: {corpus.PYTHON_DOCS_HINT}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "pretrain_miniature", help="where the resumable training state is kept")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this step (state kept in --work)")
    for name, value in asdict(Recipe()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    recipe = Recipe(**{name: getattr(args, name) for name in asdict(Recipe())})
    positive = {k: v for k, v in asdict(recipe).items() if k not in ("seed", "warmup", "weight_decay", "aux_loss_coef", "min_lr_ratio")}
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in positive.items() if v <= 0]
    if recipe.top_k > recipe.experts:
        bad.append(f"--top-k {recipe.top_k} > --experts {recipe.experts}")
    if recipe.hidden % recipe.heads:
        bad.append(f"--hidden {recipe.hidden} is not a multiple of --heads {recipe.heads}")
    if bad:
        parser.error("bad recipe: " + "; ".join(bad))
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} already holds files; pass --overwrite to replace them, or another --out")
    return args, recipe


def prepare(args, recipe: Recipe):
    """Tokenizer, training token streams and validation windows, rebuilt from the sources on every
    start (about 25 s; deterministic, so a resumed run gets the same ones)."""
    docs = corpus.load_documents(args.gsm8k, args.stdlib, args.python_docs)
    train_docs, val_docs = {}, {}
    for domain in corpus.DOMAINS:
        train_docs[domain], val_docs[domain] = corpus.split(docs[domain])
    tokenizer = corpus.train_tokenizer(train_docs, recipe.vocab)
    streams = [corpus.token_stream(tokenizer, train_docs[d]) for d in corpus.DOMAINS]
    windows = {
        d: torch.from_numpy(corpus.validation_windows(corpus.token_stream(tokenizer, val_docs[d]), recipe.seq, recipe.val_windows))
        for d in corpus.DOMAINS
    }
    data = {
        d: {"documents": len(docs[d]), "train_tokens": int(len(s)), "val_documents": len(val_docs[d])}
        for d, s in zip(corpus.DOMAINS, streams)
    }
    return tokenizer, streams, windows, data


def main(argv=None) -> int:
    args, recipe = parse_args(argv)
    torch.set_num_threads(recipe.threads)
    started = time.monotonic()
    from transformers import OlmoeForCausalLM

    tokenizer, streams, windows, data = prepare(args, recipe)
    print(f"data: {json.dumps(data)} ({time.monotonic() - started:.0f} s)", flush=True)
    torch.manual_seed(recipe.seed)
    model = OlmoeForCausalLM(olmoe_config(recipe, tokenizer)).float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    step, log, train_seconds = 0, [], 0.0
    state_path = args.work / STATE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["recipe"] != asdict(recipe):
            raise SystemExit(f"{state_path} was saved with another recipe; delete it or pass the same options ({state['recipe']})")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log, train_seconds = state["step"], state["log"], state["train_seconds"]
        print(f"resumed at step {step} from {state_path}", flush=True)
    model.train()
    window_start = time.monotonic()
    while step < recipe.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        ids = batch_at(streams, recipe, step)
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        lm = out.loss.item() - recipe.aux_loss_coef * out.aux_loss.item()
        log.append({"step": step, "loss": round(lm, 5), "aux": round(out.aux_loss.item(), 5)})
        if step % args.log_every == 0 or step == recipe.steps:
            elapsed = time.monotonic() - window_start
            print(f"step {step}/{recipe.steps} loss {lm:.4f} aux {out.aux_loss.item():.4f} ({train_seconds + elapsed:.0f} s)", flush=True)
        if step % args.save_every == 0 or step == args.stop_after or step == recipe.steps:
            train_seconds += time.monotonic() - window_start
            window_start = time.monotonic()
            args.work.mkdir(parents=True, exist_ok=True)
            state = {"recipe": asdict(recipe), "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log, "train_seconds": train_seconds}
            torch.save(state, state_path.with_suffix(".tmp"))
            state_path.with_suffix(".tmp").replace(state_path)
        if step == args.stop_after:
            print(f"stopped after step {step}; run the same command again to continue", flush=True)
            return 0
    write_release(args, recipe, model, tokenizer, windows, data, log, train_seconds, time.monotonic() - started)
    return 0


def write_release(args, recipe, model, tokenizer, windows, data, log, train_seconds, wall_seconds) -> None:
    """bf16 weights, tokenizer, validation windows, card.json and README.md under --out."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    fp32_losses = validation_losses(model, windows)
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    save_file({d: w.to(torch.int32).contiguous() for d, w in windows.items()}, str(out / "val_tokens.safetensors"))
    shipped = validation_losses(model.float(), {d: t.long() for d, t in load_file(str(out / "val_tokens.safetensors")).items()})
    last = log[-100:]
    card = {
        "model": "hellora-mini-olmoe",
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (out / "model.safetensors").stat().st_size,
        "data": data,
        "val_loss_bf16": {d: round(v, 5) for d, v in shipped.items()},
        "val_loss_fp32_before_rounding": {d: round(v, 5) for d, v in fp32_losses.items()},
        "train_loss_last_100_steps": round(sum(r["loss"] for r in last) / len(last), 5),
        "aux_loss_last_100_steps": round(sum(r["aux"] for r in last) / len(last), 5),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/pretrain_miniature.py", *(sys.argv[1:])]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": __import__("transformers").__version__, "tokenizers": __import__("tokenizers").__version__},
        "loss_curve": [r for r in log if r["step"] % 50 == 0 or r["step"] == len(log)],
    }
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    (out / "README.md").write_text(model_card(card))
    print(f"wrote {out}: val loss (bf16) {card['val_loss_bf16']}, {card['weights_bytes'] / 2**20:.1f} MiB", flush=True)


def model_card(card: dict) -> str:
    r = card["recipe"]
    rows = "\n".join(
        f"| {d} | {card['data'][d]['documents']} | {card['data'][d]['train_tokens']:,} | {card['val_loss_bf16'][d]:.4f} | {math.exp(card['val_loss_bf16'][d]):.1f} |"
        for d in corpus.DOMAINS
    )
    return f"""# hellora-mini-olmoe

A miniature OLMoE pretrained by hellora_pl on one CPU core, so that its routing means something:
HELLoRA's hot experts on it are the experts a task really uses. It is a research toy for studying
MoE fine-tuning methods, not a useful language model.

- Architecture: OLMoE (transformers `OlmoeForCausalLM`), {r['layers']} layers, hidden {r['hidden']}, {r['heads']} heads,
  {r['experts']} experts of width {r['expert_width']} with top-{r['top_k']} routing, vocabulary {r['vocab']}, context {r['seq']}.
- {card['parameters']:,} parameters, stored in bf16: {card['weights_bytes'] / 2**20:.1f} MiB.
- Trained {r['steps']} steps of {r['batch']} x {r['seq']} tokens (AdamW, peak lr {r['lr']}, cosine, load-balancing
  coefficient {r['aux_loss_coef']}), seed {r['seed']}, {r['threads']} torch thread(s): {card['train_seconds'] / 60:.0f} min of training,
  {card['wall_seconds'] / 60:.0f} min in all.

## Data and licences

| domain | documents | train tokens | val loss (bf16 weights) | val perplexity |
| --- | --- | --- | --- | --- |
{rows}

- math: GSM8K train questions and worked solutions (MIT, openai/grade-school-math), calculator annotations removed.
- code: the Python {card['versions']['python']} standard library's `.py` files (PSF licence), without tests and demos.
- prose: the Python 3.11 documentation's reST sources from Debian's `python3.11-doc` (PSF licence),
  literal blocks and directives removed.
- Not used: the instruction/refusal data in `../shared/data/safety` (CC-BY-NC-4.0, which would bind these weights).

{corpus.VAL_PERCENT}% of each domain's documents (by a hash of their names) are held out; `val_tokens.safetensors`
holds the first {r['val_windows']} windows of {r['seq']} tokens of each domain's held-out text, on which the losses above
are measured (`tests/test_miniature.py` checks them).

## Reproduce

```
apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb pydoc
{card['command']}
```

Versions: {', '.join(f'{k} {v}' for k, v in card['versions'].items())}. `card.json` holds the recipe, the data sizes,
the losses and the loss curve.
"""


if __name__ == "__main__":
    raise SystemExit(main())
