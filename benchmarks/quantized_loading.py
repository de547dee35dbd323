"""Peak host memory of loading a pretrained MoE in 4 bits: quantize while loading vs load, then quantize.

A Mixtral-shaped model with random weights is saved as a 16-bit checkpoint (per-expert tensors,
as transformers writes them); each way of loading it then runs in its own process, which samples
its anonymous resident memory (RssAnon: the heap, not the checkpoint's page cache) every few
milliseconds. Reported: peak and final memory above the process's baseline after imports, next
to the 16-bit model, the 4-bit model and the largest fused tensor, which bound what each way
should need.

    python benchmarks/quantized_loading.py                       # 4 layers, H 1024, I 3584, E 8
    python benchmarks/quantized_loading.py --layers 8 --quantization nf4-dq
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, load_average, machine_info, markdown_table, text_table, write_results  # noqa: E402

MODES = {
    "bf16": "from_pretrained in bf16, no quantization",
    "load_then_quantize": "from_pretrained in bf16, then quantize_model",
    "quantize_on_load": "load_backbone(pretrained, quantization): quantized tensor by tensor while loading",
}


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon (Linux only)")


class PeakSampler:
    """Samples RssAnon in a thread; `peak` is the largest value seen (and the value at stop)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak, self._stop = interval_s, rss_anon_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so 'held after' counts live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(mode: str, path: str, quantization: str) -> dict:
    """Runs in its own process: load the checkpoint one way, report memory above the baseline."""
    from transformers import AutoModelForCausalLM

    from hellora_pl.backbones import BackboneConfig
    from hellora_pl.loading import load_backbone
    from hellora_pl.quant import quantize_model, quantized_bytes

    torch.set_num_threads(1)
    baseline = rss_anon_bytes()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if mode == "quantize_on_load":
            model = load_backbone(BackboneConfig(pretrained=path, dtype="bfloat16", quantization=quantization))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
            if mode == "load_then_quantize":
                quantize_model(model, quantization)
    seconds = time.perf_counter() - start
    report = quantized_bytes(model)
    gc.collect()
    release_free_heap()
    return {
        "mode": mode,
        "peak_bytes": sampler.peak - baseline,
        "final_bytes": rss_anon_bytes() - baseline,
        "seconds": round(seconds, 2),
        "quantized_bytes": int(sum(entry["bytes"] for entry in report.values())),
    }


def build_checkpoint(args: argparse.Namespace, path: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mixtral",
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(args.hidden // 512, 1),
        vocab_size=args.vocab,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    state = model.state_dict()
    experts = [t for n, t in state.items() if ".experts." in n]
    facts = {
        "config": {
            k: getattr(config, k)
            for k in ("hidden_size", "intermediate_size", "num_local_experts", "num_hidden_layers", "vocab_size")
        },  # fmt: skip
        "model_bf16_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "experts_bf16_bytes": sum(t.numel() * t.element_size() for t in experts),
        "largest_fused_tensor_bf16_bytes": max(t.numel() * t.element_size() for t in experts),
        "checkpoint_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
    }
    del model, state, experts
    return facts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--quantization", choices=("nf4", "nf4-dq"), default="nf4")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.quantization)))
        return None
    load_at_start = load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hellora_quantized_loading_") as directory:
        facts = build_checkpoint(args, Path(directory))
        for mode in MODES:
            command = [sys.executable, __file__, "--child", mode, directory, "--quantization", args.quantization]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    by = {row["mode"]: row for row in rows}
    summary = {
        "quantize_on_load_peak_over_load_then_quantize_peak": round(
            by["quantize_on_load"]["peak_bytes"] / by["load_then_quantize"]["peak_bytes"], 3
        ),
        "quantize_on_load_peak_minus_4bit_model_over_largest_fused_tensor": round(
            (by["quantize_on_load"]["peak_bytes"] - by["quantize_on_load"]["final_bytes"])
            / facts["largest_fused_tensor_bf16_bytes"],
            2,
        ),
    }
    payload = {
        "benchmark": "quantized_loading",
        "quantization": args.quantization,
        "measure": (
            "RssAnon (anonymous resident memory) above the process's baseline after imports, sampled every 2 ms; "
            "'held after' once loading is done, after gc and malloc_trim. The checkpoint is memory-mapped: "
            "tensors kept as they are stored (embeddings, norms) stay file-backed pages, outside RssAnon"
        ),
        "checkpoint": facts,
        "machine": machine_info(torch.device("cpu"), __file__, argv, load_at_start),
        "rows": rows,
        "summary": summary,
    }
    headers = ["load", "peak MB", "held after MB", "seconds"]
    table = [[MODES[r["mode"]], mb(r["peak_bytes"]), mb(r["final_bytes"]), r["seconds"]] for r in rows]
    print(text_table(headers, table))
    print(
        f"\n16-bit model {mb(facts['model_bf16_bytes'])} MB, largest fused expert tensor "
        f"{mb(facts['largest_fused_tensor_bf16_bytes'])} MB; quantize-on-load peak is "
        f"{summary['quantize_on_load_peak_over_load_then_quantize_peak']:.2f}x load-then-quantize's"
    )
    stem = f"quantized_loading_{args.quantization}_{args.layers}layers"
    markdown = "\n".join(
        [
            f"# Peak host memory loading a 4-bit ({args.quantization}) Mixtral-shaped model",
            "",
            f"Command: `{payload['machine']['command']}` on {payload['machine']['cpu']} "
            f"({payload['machine']['cores']} cores), {payload['machine']['date']}.",
            f"Checkpoint: {facts['config']}, 16-bit model {mb(facts['model_bf16_bytes'])} MB, "
            f"largest fused expert tensor {mb(facts['largest_fused_tensor_bf16_bytes'])} MB.",
            f"Measure: {payload['measure']}.",
            "",
            markdown_table(headers, table),
        ]
    )
    json_path, md_path = write_results(args.out, stem, payload, markdown)
    print(f"\nwrote {json_path} and {md_path}")
    return payload


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f}"


if __name__ == "__main__":
    main()
