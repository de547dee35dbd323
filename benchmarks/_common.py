"""Shared benchmark plumbing: interleaved timing, memory meters, machine facts, JSON + markdown output.

Both benchmark scripts print a table and write `<name>.json` and `<name>.md` side by side, so a
figure in a report can always be traced to the machine and the exact command that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- machine -------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(device: torch.device, script: str, argv: Sequence[str] | None, load_at_start=None) -> dict:
    """What a reader needs to reproduce or discount a figure (the CPU is shared: load average too)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in ["python", f"benchmarks/{Path(script).name}", *argv]),
    }
    info["load_average_1_5_15min_at_start"] = load_at_start
    info["load_average_1_5_15min_at_end"] = load_average()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- memory --------------------------------------------------------------------------------


class SavedTensorBytes:
    """Bytes of distinct storages autograd saves for backward, leaving out tensors that exist anyway.

    torch keeps no allocator statistics on CPU, but what a forward saves for its backward is exact
    and is the activation memory a training step holds: it is the CPU stand-in for peak memory.
    Parameters and inputs passed in `exclude` are not counted (they are alive whatever the method).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    @property
    def nbytes(self) -> int:
        return sum(self._seen.values())


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return (tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes())


def measure_memory(step: Callable[[], None], device: torch.device, exclude: Iterable[torch.Tensor]) -> dict:
    """Saved-for-backward bytes of one step, and the CUDA peak above the memory already allocated."""
    meter = SavedTensorBytes(exclude)
    peak = None
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with meter.hooks():
        step()
    if device.type == "cuda":
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return {"saved_bytes": meter.nbytes, "peak_bytes": peak}


# -- timing --------------------------------------------------------------------------------


@dataclass
class Timed:
    """One variant's step and its wall-clock samples (seconds)."""

    name: str
    step: Callable[[], None]
    samples: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.samples)

    @property
    def min_ms(self) -> float:
        return 1e3 * min(self.samples)


def time_interleaved(variants: Sequence[Timed], device: torch.device, warmup: int, repeats: int) -> None:
    """Warm each variant up, then time them in turns, rotating the order every round.

    Interleaving spreads a shared machine's load over every variant alike, so ratios between
    variants stay meaningful even when absolute times wander.
    """
    for variant in variants:
        for _ in range(warmup):
            variant.step()
    synchronize(device)
    for round_ in range(repeats):
        shift = round_ % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            synchronize(device)
            start = time.perf_counter()
            variant.step()
            synchronize(device)
            variant.samples.append(time.perf_counter() - start)


# -- output --------------------------------------------------------------------------------


def fmt_mb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def machine_markdown(info: dict) -> str:
    lines = [f"- {key}: `{value}`" for key, value in info.items() if key != "command"]
    lines.append(f"- command: `{info['command']}`")
    return "\n".join(lines)


def write_results(out_dir: Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def max_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max abs error relative to the largest reference value)."""
    got, want = got.detach().float(), want.detach().float()
    err = (got - want).abs().max().item()
    return err, err / max(want.abs().max().item(), 1e-30)
