"""`python -m hellora_pl.budget --memory`: exact bytes on real tiny models, activations vs autograd, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from hellora_pl.adapters import DynamicRankSpec, LoRISpec, build_plan, inject_adapters
from hellora_pl.backbones import BackboneConfig
from hellora_pl.backbones.tiny import TINY_CONFIGS
from hellora_pl.budget import main, selection_shares, uniform_profile
from hellora_pl.loading import load_backbone
from hellora_pl.memory import (
    MemorySettings,
    activation_bytes,
    memory_report,
    nf4_bytes,
    quantized_tensor_ids,
    replicated_bytes,
    weight_bytes,
)
from hellora_pl.routing import RoutingRecorder, TopKPerLayer

B, T = 2, 32


def tiny_model(family: str, dtype: str = "bfloat16"):
    """A tiny model a little wider than TINY_CONFIGS, so activations dominate small bookkeeping tensors."""
    model_type, config = TINY_CONFIGS[family]
    config = {**config, "hidden_size": 64, "intermediate_size": 48, "vocab_size": 256, "num_attention_heads": 4}
    config["num_key_value_heads"] = 2 if family == "mixtral" else 4  # Mixtral: grouped-query attention
    return load_backbone(BackboneConfig(model_type=model_type, config=config, dtype=dtype))


def plan_for(model, method: str, profile=None, adapter_dtype: str = "float32"):
    options = {"lori": LoRISpec(0.5, "model", masked=True)} if method == "hellori" else {}
    if method == "dr_lora":
        options["dynamic_rank"] = DynamicRankSpec(rank_init=2, rank_max=8)
    return build_plan(
        model, TopKPerLayer(k=2), profile or uniform_profile(model), rank=4, alpha=4, router_rank=4,
        dtype=adapter_dtype, method=method, **options,
    )  # fmt: skip


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def values(report: dict) -> dict:
    return {key: figure["value"] for key, figure in report["figures"].items()}


@pytest.mark.parametrize("method", ["hellora", "hellori", "dr_lora"])
def test_weights_adapters_gradients_optimizer_are_exact(method):
    model = tiny_model("olmoe")
    plan = plan_for(model, method)
    settings = MemorySettings(batch_size=B, seq_len=T)
    figures = values(memory_report(model, plan, selection_shares(uniform_profile(model)), settings))
    assert figures["weights"] == nbytes(model.parameters())

    inject_adapters(model, plan, expert_kernel="torch")
    adapter_names = ("lora_", "hot_experts", "slot_of_expert")
    held = [
        t for name, t in [*model.named_parameters(), *model.named_buffers()] if any(n in name for n in adapter_names)
    ]
    assert figures["adapters"] == nbytes(held)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 256, (B, T))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert figures["gradients"] == nbytes(p.grad for p in trainable)
    optimizer.step()
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert figures["optimizer"] == nbytes(moments)
    assert all(state["step"].dim() == 0 for state in optimizer.state.values())  # host scalars, not counted


def measured_saved_bytes(model, ids) -> int:
    """Bytes autograd saves for the backward: unique storages that are not parameters or buffers."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


# Measured estimate / saved bytes (2 x 32 tokens, bf16 base, rank 4, 2 hot experts, router LoRA):
#   no checkpointing, fp32 adapters: olmoe 0.99987, mixtral 0.99985 (a few scalars are not counted);
#   bf16 adapters (olmoe): 0.9979 (the attention LoRA sizes with no cast are the least exact part);
#   checkpointing: 1.0206 for both (RoPE's cos and sin, 2 T head_dim d, are held by the checkpoint's
#   arguments rather than saved through autograd, so the hooks do not see them; the estimate counts them).
@pytest.mark.parametrize(
    "family,checkpointing,adapter_dtype,tolerance",
    [
        ("olmoe", False, "float32", 0.005),
        ("mixtral", False, "float32", 0.005),
        ("olmoe", False, "bfloat16", 0.005),
        ("olmoe", True, "float32", 0.03),
        ("mixtral", True, "float32", 0.03),
    ],
)
def test_activation_estimate_matches_saved_bytes(family, checkpointing, adapter_dtype, tolerance):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        model(input_ids=ids)
    profile = recorder.profile()  # the batch's own routing, so the hot-row count is exact
    plan = plan_for(model, "hellora", profile, adapter_dtype)
    settings = MemorySettings(
        batch_size=B, seq_len=T, adapter_dtype=adapter_dtype, gradient_checkpointing=checkpointing
    )
    estimate = activation_bytes(model, plan, profile.load(), settings)
    inject_adapters(model, plan, expert_kernel="torch")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    measured = measured_saved_bytes(model, ids)
    predicted = estimate["checkpointed" if checkpointing else "plain"]
    assert predicted / measured == pytest.approx(1.0, abs=tolerance)
    if not checkpointing:
        assert estimate["checkpointed"] < predicted / 4


def test_fsdp_halves_the_sharded_terms():
    model = tiny_model("mixtral")
    plan = plan_for(model, "hellora")
    shares = selection_shares(uniform_profile(model))
    one = values(memory_report(model, plan, shares, MemorySettings(batch_size=B, seq_len=T)))
    two = values(memory_report(model, plan, shares, MemorySettings(batch_size=B, seq_len=T, fsdp=2)))
    for key in ("weights", "adapters", "gradients", "optimizer"):
        assert two[key] == (one[key] + 1) // 2
    assert two["activations"] == one["activations"]  # per rank
    assert one["fsdp_gathered"] == 0 < two["fsdp_gathered"] < one["weights"]


def test_fsdp_does_not_shard_nf4_storage():
    """NF4 codes are buffers, which FSDP2 leaves whole (tests/test_fsdp.py measures it on 2 ranks)."""
    model = tiny_model("mixtral")
    plan = plan_for(model, "hellora")
    shares = selection_shares(uniform_profile(model))
    quantized = dict(batch_size=B, seq_len=T, dtype="bfloat16", quantization="nf4")
    one = values(memory_report(model, plan, shares, MemorySettings(**quantized)))
    two = values(memory_report(model, plan, shares, MemorySettings(**quantized, fsdp=2)))
    nf4 = replicated_bytes(model, MemorySettings(**quantized), quantized_tensor_ids(model, MemorySettings(**quantized)))
    assert 0 < nf4 < one["weights"]
    assert two["weights"] == nf4 + (one["weights"] - nf4 + 1) // 2
    assert two["adapters"] == (one["adapters"] + 1) // 2


def test_nf4_bytes_per_weight():
    assert nf4_bytes(64 * 1024) == 32 * 1024 + 4 * 1024  # 0.5625 B/param; the code book is shared
    assert nf4_bytes(10**9) / 10**9 == pytest.approx(0.5 + 4 / 64, abs=1e-6)
    assert nf4_bytes(10**9, double_quant=True) / 10**9 == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-6)


@pytest.mark.parametrize("quantization", ["nf4", "nf4-dq"])
def test_nf4_formula_equals_what_a_quantized_tiny_model_stores(quantization):
    """The one NF4 byte formula (quant.nf4.nf4_bytes) against NF4Weight's buffers after quantize_model,
    per tensor and for the whole model, as the memory estimate and the budget count it."""
    pytest.importorskip("bitsandbytes")
    from hellora_pl.budget import base_figures
    from hellora_pl.quant import NF4Weight, quantize_model, quantized_bytes

    dense = tiny_model("mixtral")
    model = tiny_model("mixtral")
    quantize_model(model, quantization)
    stored = [m for m in model.modules() if isinstance(m, NF4Weight)]
    assert {m.double_quant for m in stored} == {quantization == "nf4-dq"}
    assert {m.role for m in stored} == {"attention", "router", "experts"}
    for weight in stored:
        assert nf4_bytes(weight.numel(), weight.double_quant) == weight.nbytes()
    assert sum(nf4_bytes(w.numel(), w.double_quant) for w in stored) == sum(
        entry["bytes"] for entry in quantized_bytes(model).values()
    )
    held = nbytes(model.parameters()) + sum(w.nbytes() for w in stored)  # the rest stays bf16
    settings = MemorySettings(batch_size=B, seq_len=T, quantization=quantization)
    assert weight_bytes(dense, settings, quantized_tensor_ids(dense, settings)) == held
    if quantization == "nf4":
        assert base_figures(dense)["bytes_nf4"] == held  # the budget's 4-bit figure, no double quant


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_nf4_estimate_counts_only_what_quant_replaces(family):
    """Dense layers' MLPs (DeepSeek's first layer) and small gates (Qwen2-MoE's shared_expert_gate) stay
    16-bit in a 4-bit model; the estimate and the budget count exactly the tensors quantize_model replaces."""
    pytest.importorskip("bitsandbytes")
    from hellora_pl.budget import base_figures
    from hellora_pl.quant import NF4Weight, quantize_model

    dense = tiny_model(family)
    model = tiny_model(family)
    quantize_model(model, "nf4")
    stored = [m for m in model.modules() if isinstance(m, NF4Weight)]
    held = nbytes(model.parameters()) + sum(w.nbytes() for w in stored)
    assert any(p.dim() >= 2 for p in model.parameters() if p is not model.get_input_embeddings().weight)
    settings = MemorySettings(batch_size=B, seq_len=T, quantization="nf4")
    assert weight_bytes(dense, settings, quantized_tensor_ids(dense, settings)) == held
    assert base_figures(dense)["bytes_nf4"] == held


def memory_json(capsys, *args: str) -> dict:
    main([*args, "--memory", "--json"])
    return json.loads(capsys.readouterr().out)["memory"]


def test_mixtral_weights_at_bf16_and_nf4(capsys):
    common = ["--shape", "mixtral-8x7b", "--method", "hellora", "--rank", "32", "--router-rank", "8", "--hot-k", "2"]
    bf16 = values(memory_json(capsys, *common))
    nf4 = memory_json(capsys, *common, "--quantization", "nf4", "--gradient-checkpointing")
    assert bf16["weights"] / 1e9 == pytest.approx(93.4, abs=0.5)  # 46.7B parameters x 2 B
    assert values(nf4)["weights"] / 1e9 == pytest.approx(26.6, abs=0.5)
    assert nf4["settings"]["gradient_checkpointing"] and nf4["settings"]["quantization"] == "nf4"
    figures = values(nf4)
    assert figures["activations"] == figures["activations_checkpointing"] < figures["activations_no_checkpointing"]
    assert figures["total"] < 80e9  # the one-80GB-GPU setting


def test_cli_memory_json_on_olmoe_and_text_lines(capsys):
    result = subprocess.run(
        [sys.executable, "-m", "hellora_pl.budget", "--shape", "olmoe-1b-7b", "--method", "hellora", "--rank", "32",
         "--hot-k", "8", "--memory", "--json", "--fsdp", "2", "--seq-len", "1024"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    memory = report["memory"]
    assert memory["settings"] == {
        "batch_size": 1, "seq_len": 1024, "dtype": "bfloat16", "adapter_dtype": "float32",
        "quantization": "none", "gradient_checkpointing": False, "fsdp": 2,
    }  # fmt: skip
    figures = values(memory)
    trainable = report["figures"]["trainable_params"]["value"]
    assert figures["optimizer"] == 2 * figures["gradients"] == 2 * (4 * trainable // 2)  # fp32 moments, halved
    assert all(f["how"] and f["unit"] == "bytes" for f in memory["figures"].values())

    text_report = main(["--shape", "olmoe-1b-7b", "--method", "hellora", "--rank", "32", "--memory"])
    text = capsys.readouterr().out
    for figure in text_report["memory"]["figures"].values():
        assert (
            sum(line.strip().startswith(figure["label"] + "  ") and figure["how"] in line for line in text.splitlines())
            == 1
        )
    main(["--shape", "olmoe-1b-7b", "--json"])
    assert "memory" not in json.loads(capsys.readouterr().out)  # unchanged without --memory


def test_bad_memory_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--shape", "olmoe-1b-7b", "--memory", "--quantization", "nf4", "--dtype", "float32"])
    assert "computes in 16 bits" in capsys.readouterr().err
