"""The budget report as text for a terminal."""

from __future__ import annotations


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:g}"


def _format_value(value, unit: str) -> str:
    if unit == "ratio":
        return f"{100 * value:.2f} %"
    if unit == "bytes":
        return f"{value / 2**30:.2f} GiB ({value:,} B)"
    if unit == "params":
        return f"{value:,} ({_si(value)}) params"
    if unit == "FLOPs/token":
        return f"{round(value):,} ({_si(value)}) FLOPs/token"
    return f"{value} {unit}"


def _names(names: list[str]) -> str:
    return ",".join(names) if names else "none"


def _attention(settings: dict) -> str:
    """The adapted attention projections; per layer type (mixer class) for a hybrid decoder."""
    per_type = settings.get("mixer_projections") or {}
    if not per_type:
        return _names(settings["attention_modules"])
    return " | ".join(f"{kind} {_names(names)}" for kind, names in per_type.items())


def format_text(report: dict) -> str:
    """The report as aligned text: the backbone and method, then one line per figure with how it is counted."""
    b, s = report["backbone"], report["settings"]
    adapted = report["adapted_experts"]
    per_layer = (
        f"{adapted['per_layer_min']}"
        if adapted["per_layer_min"] == adapted["per_layer_max"]
        else f"{adapted['per_layer_min']}-{adapted['per_layer_max']}"
    )
    lines = [
        f"hellora_pl budget: {report['method']} on {b['source']}",
        f"  backbone   {b['model_type']}: {b['decoder_layers']} layers, {b['moe_layers']} MoE layers x "
        f"{b['num_experts']} experts, top-{b['top_k']}; expert matrices "
        + ", ".join(f"{n} {s_[0]}x{s_[1]}" for n, s_ in b["expert_shapes"].items()),
        f"  method     {report['summary']}",
        f"  adapters   rank {s['rank']} (alpha {s['alpha']:g}); attention {_attention(s)}; "
        f"router {'rank ' + str(s['router_rank']) if s['router_rank'] is not None else 'frozen'}; "
        f"shared experts {_names(s['shared_expert_modules'])}; experts {_names(s['expert_modules'])} "
        f"({s['expert_adapter']}) on {per_layer} per MoE layer, {adapted['total']} in all",
        "  policy     " + ", ".join(f"{k}={v}" for k, v in s["policy"].items()),
        f"  routing    {report['routing']['assumed']}: {report['routing']['detail']}",
        "",
    ]
    width = max(len(f["label"]) for f in report["figures"].values())
    values = {key: _format_value(f["value"], f["unit"]) for key, f in report["figures"].items()}
    value_width = max(len(v) for v in values.values())
    for key, fig in report["figures"].items():
        lines.append(f"  {fig['label']:<{width}}  {values[key]:>{value_width}}   {fig['how']}")
    if report["notes"]:
        lines.append("")
        lines.extend(f"  note: {note}" for note in report["notes"])
    lines.append("  (how each figure is counted: the docstring of hellora_pl/budget/__init__.py)")
    if "memory" in report:
        lines.extend(format_memory(report["memory"]))
    return "\n".join(lines)


def format_memory(memory: dict) -> list[str]:
    """The memory breakdown, one line per figure with how it is counted."""
    s = memory["settings"]
    lines = [
        "",
        f"  memory     per rank: batch {s['batch_size']} x {s['seq_len']} tokens; weights {s['dtype']}"
        f" ({s['quantization']}); adapters {s['adapter_dtype']}; gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; FSDP ranks {s['fsdp']}",
    ]
    width = max(len(f["label"]) for f in memory["figures"].values())
    for fig in memory["figures"].values():
        value = f"{fig['value'] / 2**30:.2f} GiB ({fig['value'] / 1e9:.2f} GB)"
        lines.append(f"  {fig['label']:<{width}}  {value:>24}   {fig['how']}")
    lines.extend(f"  note: {note}" for note in memory["notes"])
    lines.append("  (how each memory term is counted: the docstring of hellora_pl/memory.py)")
    return lines
