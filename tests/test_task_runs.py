"""`python -m hellora_pl fit` then `test` on the tiny twin of each task family: the benchmark runs
end to end (generation, scoring, sandbox for code), logs its metric and saves every sample."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, private_rendezvous
from hellora_pl.cli import main

METRICS = {
    "math": ("test/gsm8k/strict", "test/gsm8k/flexible"),
    "code": ("test/humaneval/pass@1",),
    "safety": ("test/refusal/refusal_rate",),
}


def scalars(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("task", ["math", "code", "safety"])
def test_fit_then_test_runs_the_benchmark(tmp_path, shared_data, monkeypatch, task):
    monkeypatch.chdir(REPO)  # the twins name ../shared/data relative to the repo root
    config = REPO / "configs" / "tiny" / "olmoe" / f"hellora_{task}.yaml"
    common = [
        "--config", str(config), "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    checkpoint = next((tmp_path / "hellora" / "version_0" / "checkpoints").glob("*.ckpt"))
    main(["test", *common, f"--ckpt_path={checkpoint}"])

    log_dir = tmp_path / "hellora" / "version_1"
    values = scalars(log_dir)
    for name in METRICS[task]:
        assert name in values and 0.0 <= values[name] <= 1.0
    [samples] = (log_dir / "generations").glob("test_*.jsonl")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1]  # eval_limit 2, in order
    assert all(len(r["completions"]) == 1 for r in records)
    if task == "math":
        assert values["test/gsm8k/strict"] == sum(r["strict"][0] for r in records) / 2
    if task == "code":
        assert values["test/humaneval/pass@1"] == sum(r["passed"][0] for r in records) / 2
        assert all(r["status"][0] in {"passed", "failed", "timeout", "memory", "killed", "error"} for r in records)
    if task == "safety":
        assert values["test/refusal/refusal_rate"] == sum(r["refused"][0] for r in records) / 2


def test_benchmark_in_validation_with_a_configured_judge(tmp_path, shared_data, monkeypatch):
    """evaluate_in_validation runs the benchmark beside val/loss; a judge comes from the config by class_path."""
    monkeypatch.chdir(REPO)
    main(
        [
            "fit", "--config", str(REPO / "configs" / "tiny" / "olmoe" / "lora_safety.yaml"),
            "--trainer.enable_progress_bar=false", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
            f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--data.init_args.evaluate_in_validation=true",
            "--data.init_args.judge.class_path=hellora_pl.evaluation.KeywordJudge",
            '--data.init_args.judge.init_args.keywords=[""]',  # the empty keyword is in every response
        ]
    )  # fmt: skip
    values = scalars(tmp_path / "hellora" / "version_0")
    assert values["val/refusal/refusal_rate"] == 1.0
    assert values["val/refusal/refusal_rate/advbench_harmful_behaviors"] == 1.0
    assert "val/loss" in values
    assert len(list((tmp_path / "hellora" / "version_0" / "generations").glob("val_refusal_step2.jsonl"))) == 1


def test_two_process_test_run_scores_each_problem_once(tmp_path, shared_data, monkeypatch):
    """Under DDP (2 CPU processes, gloo) every problem is generated on exactly one rank and the
    reduced metric equals the single-process one over the same, identical completions."""
    monkeypatch.chdir(REPO)
    config = REPO / "configs" / "tiny" / "olmoe" / "hellora_math.yaml"

    def run(root, *extra):
        main(
            [
                "test", "--config", str(config), "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
                "--data.init_args.eval_limit=5", "--data.init_args.eval_batch_size=2", *extra,
            ]
        )  # fmt: skip
        log_dir = root / "hellora" / "version_0"
        records = [
            json.loads(line)
            for path in (log_dir / "generations").glob("*.jsonl")
            for line in path.read_text().splitlines()
        ]
        return (
            scalars(log_dir),
            sorted(records, key=lambda r: r["index"]),
            sorted((log_dir / "generations").glob("*.jsonl")),
        )

    one, one_records, one_files = run(tmp_path / "one")
    with private_rendezvous() as rendezvous:
        for name, value in rendezvous.items():  # monkeypatch also removes the MASTER_PORT Lightning leaves set
            monkeypatch.setenv(name, value)
        two, two_records, two_files = run(tmp_path / "two", "--trainer.devices=2", "--trainer.strategy=ddp_spawn")
    assert [f.name for f in two_files] == ["test_gsm8k_step0_rank0.jsonl", "test_gsm8k_step0_rank1.jsonl"]
    assert [r["index"] for r in two_records] == [0, 1, 2, 3, 4]  # each once, none repeated to even the shards
    # Greedy completions are text: only a near-tie (~1e-6) of the top two logits could tell the layouts apart.
    assert two_records == one_records
    flexible = sum(r["flexible"][0] for r in one_records) / 5
    assert one["test/gsm8k/flexible"] == pytest.approx(flexible) and two["test/gsm8k/flexible"] == pytest.approx(
        flexible
    )
