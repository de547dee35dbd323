"""FSDP2 (ModelParallelStrategy) on 2 CPU processes with gloo: the plan is the single-process one, every
rank picks the same experts, plan.json is written once, and a sharded checkpoint resumes.

Lightning launches ModelParallelStrategy by re-running the script, so the sharded fit runs this file
as a script in a subprocess (not pytest itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import assert_plans_match, private_rendezvous
from hellora_pl.adapters import AdapterPlan

HERE = Path(__file__).resolve().parent


def _backbone(quantization: str | None):
    from conftest import TINY_OLMOE
    from hellora_pl import BackboneConfig
    from hellora_pl.backbones.tiny import TINY_CONFIGS

    if quantization is None:
        return BackboneConfig(model_type="olmoe", config=TINY_OLMOE)
    config = dict(TINY_CONFIGS["mixtral"][1])
    return BackboneConfig(model_type="mixtral", config=config, dtype="bfloat16", quantization=quantization)


def _held_bytes(model) -> dict[str, int]:
    """What this rank holds of the base: NF4 storage (buffers) and its shards of the other frozen parameters."""
    from hellora_pl.adapters import adapter_state_dict
    from hellora_pl.quant import quantized_storage

    adapters = set(adapter_state_dict(model))
    dense = 0
    for name, param in model.named_parameters():
        if name not in adapters and param.numel() > 0:
            local = param.to_local() if hasattr(param, "to_local") else param
            dense += local.numel() * local.element_size()
    nf4 = sum(t.numel() * t.element_size() for t in quantized_storage(model).values())
    return {"nf4": nf4, "dense": dense}


def _fit(root: str, max_steps: int, ckpt_path: str | None, devices: int, quantization: str | None = None) -> None:
    """One fit of tiny OLMoE (or 4-bit tiny Mixtral) with HELLoRA; each rank writes what it injected and holds."""
    sys.path.insert(0, str(HERE))
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from conftest import RandomTokens, make_trainer
    from hellora_pl import HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback
    from hellora_pl.adapters import injected_hot_experts

    module = HelloraModule(_backbone(quantization), learning_rate=1e-2, warmup=1, gradient_checkpointing=True)
    kwargs = {}
    if devices > 1:
        kwargs = {
            "devices": devices,
            "strategy": ModelParallelStrategy(
                data_parallel_size=devices, tensor_parallel_size=1, process_group_backend="gloo"
            ),
        }
    callbacks = [
        RoutingProfilerCallback(num_batches=2),
        HotExpertInjectionCallback(rank=4, alpha=8, overwrite=ckpt_path is not None),
        ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=3, save_top_k=-1),
    ]
    trainer = make_trainer(root, max_steps, callbacks, **kwargs)
    trainer.fit(module, datamodule=RandomTokens(), ckpt_path=ckpt_path)
    hot = injected_hot_experts(module.model)
    record = {"hot": {str(k): v for k, v in hot.items()}, "step": trainer.global_step, **_held_bytes(module.model)}
    Path(root, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _run_sharded(root: Path, max_steps: int, ckpt_path: Path | None = None, quantization: str | None = None) -> None:
    args = [sys.executable, str(Path(__file__).resolve()), str(root), str(max_steps), str(ckpt_path or "")]
    args.append(quantization or "")
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    with private_rendezvous() as rendezvous:  # a port no suite running beside this one can take
        # the whole test takes ~60 s on 2 cores; the limit leaves room for a second suite running beside it
        done = subprocess.run(args, env={**env, **rendezvous}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def test_two_process_fsdp_matches_single_process_plan_and_resumes(tmp_path):
    _fit(str(tmp_path / "one"), 3, None, devices=1)
    single = AdapterPlan.read(tmp_path / "one" / "run" / "version_0" / "hellora" / "plan.json")

    _run_sharded(tmp_path / "two", 3)
    plans = list((tmp_path / "two").rglob("plan.json"))
    assert [p.relative_to(tmp_path / "two") for p in plans] == [Path("run/version_0/hellora/plan.json")]
    # Same experts, counts and sizes; gate_mass sums were reduced in another order (and thread count).
    assert_plans_match(AdapterPlan.read(plans[0]), single)
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {str(k): v for k, v in single.hot_experts().items()}
    assert [r["hot"] for r in ranks] == [expected, expected]
    assert [r["step"] for r in ranks] == [3, 3]
    checkpoint = tmp_path / "two" / "ckpt" / "epoch=1-step=3.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard per rank

    _run_sharded(tmp_path / "two", 6, checkpoint)
    resumed = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in resumed] == [6, 6]
    assert [r["hot"] for r in resumed] == [expected, expected]


def test_two_process_fsdp_on_a_4bit_base_keeps_nf4_whole_and_shards_the_rest(tmp_path):
    """FSDP2 shards parameters only: each rank holds all NF4 storage and half the 16-bit parameters,
    as the memory estimate predicts per rank."""
    import pytest

    pytest.importorskip("bitsandbytes")
    from hellora_pl.loading import load_backbone
    from hellora_pl.memory import MemorySettings, quantized_tensor_ids, replicated_bytes, weight_bytes

    _fit(str(tmp_path / "one"), 3, None, devices=1, quantization="nf4")
    single_plan = AdapterPlan.read(tmp_path / "one" / "run" / "version_0" / "hellora" / "plan.json")
    single = json.loads((tmp_path / "one" / "rank0.json").read_text())

    _run_sharded(tmp_path / "two", 3, quantization="nf4")
    two_plan = AdapterPlan.read(tmp_path / "two" / "run" / "version_0" / "hellora" / "plan.json")
    assert_plans_match(two_plan, single_plan)  # gate_mass: another reduction order, within tolerance
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [3, 3] and ranks[0]["hot"] == ranks[1]["hot"] == single["hot"]
    assert [r["nf4"] for r in ranks] == [single["nf4"], single["nf4"]] and single["nf4"] > 0  # whole on each rank
    assert sum(r["dense"] for r in ranks) == single["dense"]  # the rest split between the ranks
    assert all(0.4 < r["dense"] / single["dense"] < 0.6 for r in ranks)

    config = _backbone("nf4")
    config.quantization = None
    dense_model = load_backbone(config)  # the 16-bit model the estimate reads
    settings = MemorySettings(dtype="bfloat16", quantization="nf4", fsdp=2)
    quantized = quantized_tensor_ids(dense_model, settings)
    replicated = replicated_bytes(dense_model, settings, quantized)
    predicted_dense = weight_bytes(dense_model, settings, quantized) - replicated
    assert replicated == single["nf4"]  # the NF4 code book is shared, not stored per tensor
    assert predicted_dense == single["dense"]


if __name__ == "__main__":  # the sharded fit; Lightning re-runs this for rank 1
    root, steps, ckpt, quantization = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4] or None
    _fit(root, steps, ckpt, devices=2, quantization=quantization)
