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

from hellora_pl.adapters import AdapterPlan

HERE = Path(__file__).resolve().parent


def _fit(root: str, max_steps: int, ckpt_path: str | None, devices: int) -> None:
    """One fit of tiny OLMoE with HELLoRA; each rank writes the experts it injected to rank<r>.json."""
    sys.path.insert(0, str(HERE))
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from conftest import TINY_OLMOE, RandomTokens, make_trainer
    from hellora_pl import BackboneConfig, HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback
    from hellora_pl.adapters import injected_hot_experts

    module = HelloraModule(
        BackboneConfig(model_type="olmoe", config=TINY_OLMOE), learning_rate=1e-2, warmup=1, gradient_checkpointing=True
    )
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
    record = {"hot": {str(k): v for k, v in hot.items()}, "step": trainer.global_step}
    Path(root, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _run_sharded(root: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    args = [sys.executable, str(Path(__file__).resolve()), str(root), str(max_steps), str(ckpt_path or "")]
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-4000:]


def test_two_process_fsdp_matches_single_process_plan_and_resumes(tmp_path):
    _fit(str(tmp_path / "one"), 3, None, devices=1)
    single = AdapterPlan.read(tmp_path / "one" / "run" / "version_0" / "hellora" / "plan.json")

    _run_sharded(tmp_path / "two", 3)
    plans = list((tmp_path / "two").rglob("plan.json"))
    assert [p.relative_to(tmp_path / "two") for p in plans] == [Path("run/version_0/hellora/plan.json")]
    assert AdapterPlan.read(plans[0]) == single
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


if __name__ == "__main__":  # the sharded fit; Lightning re-runs this for rank 1
    root, steps, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None
    _fit(root, steps, ckpt, devices=2)
