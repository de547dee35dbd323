"""Ctrl-C and SIGTERM keep the work (InterruptCheckpoint) and a fit ends with a summary (RunSummary).

The CLI runs are the quickstart shortened to 8 steps, in subprocesses: a callback below sends the
signal to its own process while a chosen optimizer step is under way.
"""

import json
import os
import shlex
import signal
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO, TINY_OLMOE, RandomTokens, make_trainer
from hellora_pl import BackboneConfig, HelloraModule, InterruptCheckpoint, RunSummary
from hellora_pl.callbacks.cli_commands import export_command, hellora_cli_argv, rerun_command

TESTS = REPO / "tests"
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
SHORT = [
    "--trainer.max_steps=8",
    "--trainer.val_check_interval=4",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.num_train=96",  # 6 batches of 16 an epoch: step 3 is mid-epoch
    "--data.init_args.num_val=16",
]


class SignalAtStep(pl.Callback):
    """Sends `signal_name` to this process `times` times at the start of the first batch of
    optimizer step `step` (so with gradient accumulation, mid-accumulation)."""

    def __init__(self, step: int, signal_name: str = "SIGINT", times: int = 1):
        self.step, self.signal_name, self.times, self.sent = step, signal_name, times, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == self.step - 1:
            self.sent = True
            for _ in range(self.times):
                os.kill(os.getpid(), getattr(signal, self.signal_name))


def report_callbacks() -> list[str]:
    """InterruptCheckpoint and RunSummary through trainer.callbacks, unless the CLI already adds them."""
    from hellora_pl import cli

    forced = set(getattr(cli, "CALLBACK_GROUPS", {}).values())
    return [
        f"--trainer.callbacks+=hellora_pl.{cls.__name__}"
        for cls in (InterruptCheckpoint, RunSummary)
        if cls not in forced
    ]


def signal_callback(step: int, signal_name: str) -> str:
    spec = {"class_path": "test_run_report.SignalAtStep", "init_args": {"step": step, "signal_name": signal_name}}
    return "--trainer.callbacks+=" + json.dumps(spec)


def run(command: list[str], cwd):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # every run on the same threads: resumed losses compare exactly
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def fit(cwd, *extra):
    return run(
        [sys.executable, "-m", "hellora_pl", "fit", "--config", QUICKSTART, *SHORT, *report_callbacks(), *extra], cwd
    )


def run_dir(cwd, version: int):
    return cwd / "runs" / "quickstart" / "hellora" / f"version_{version}"


def scalars(directory, tag) -> dict[int, float]:
    events = EventAccumulator(str(directory))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in events.Scalars(tag)}


def printed_resume_command(output: str) -> list[str]:
    lines = output.splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith("[hellora] resume (from ")]
    return shlex.split(lines[at + 1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    return cwd, fit(cwd)


@pytest.fixture(scope="module")
def sigint_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sigint")
    return cwd, fit(cwd, signal_callback(3, "SIGINT"))


def test_sigint_writes_a_checkpoint_and_its_printed_command_resumes_exactly(sigint_run, uninterrupted):
    cwd, output = sigint_run
    checkpoint = run_dir(cwd, 0) / "checkpoints" / "interrupted.ckpt"
    assert f"[hellora] SIGINT: stopped after global step 3; checkpoint: {checkpoint}" in output
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 3
    assert scalars(run_dir(cwd, 0), "train/loss").keys() == {0, 1, 2}
    assert not scalars(run_dir(cwd, 0), "val/loss")  # stopping ran no extra validation
    command = printed_resume_command(output)
    assert command[:4] == ["python", "-m", "hellora_pl", "fit"]
    assert command[-2:] == ["--ckpt_path", str(checkpoint)] and command.count("--ckpt_path") == 1

    run([sys.executable, *command[1:]], cwd)  # the printed command, as printed

    resumed, straight = run_dir(cwd, 1), run_dir(uninterrupted[0], 0)
    summary = json.loads((resumed / "summary.json").read_text())
    assert (summary["global_step"], summary["steps_this_run"], summary["status"]) == (8, 5, "finished")
    resumed_losses = scalars(resumed, "train/loss")
    assert min(resumed_losses) == 3  # the first step after the checkpoint's three
    straight_losses = scalars(straight, "train/loss")
    # Same data order (stateful loaders), same threads: the same numbers, exactly.
    assert resumed_losses == {step: straight_losses[step] for step in range(3, 8)}
    assert scalars(resumed, "val/loss") == scalars(straight, "val/loss")


def test_sigterm_under_gradient_accumulation_waits_for_the_optimizer_step(tmp_path):
    output = fit(tmp_path, "--trainer.accumulate_grad_batches=2", signal_callback(2, "SIGTERM"))
    checkpoint = run_dir(tmp_path, 0) / "checkpoints" / "interrupted.ckpt"
    assert f"[hellora] SIGTERM: stopped after global step 2; checkpoint: {checkpoint}" in output
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    # The signal came during the first half of step 2: both halves ran before the save.
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4
    assert printed_resume_command(output)[-2:] == ["--ckpt_path", str(checkpoint)]
    assert "SIGTERMException" not in output and "Traceback" not in output


def test_summary_matches_the_logged_metrics_and_names_files_that_exist(uninterrupted):
    cwd, output = uninterrupted
    directory = run_dir(cwd, 0)
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 8 and summary["steps_this_run"] == 8
    for key in ("plan", "adapters", "best_checkpoint", "last_checkpoint"):
        assert summary[key] and os.path.exists(summary[key]), key
    assert summary["method"] == "hellora" and summary["trainable_params"] > 0
    train, val = scalars(directory, "train/loss"), scalars(directory, "val/loss")
    # TensorBoard keeps float32, as the metrics were: the same number, to float32 precision.
    assert summary["metrics"]["train/loss"] == pytest.approx(train[7], rel=1e-6)
    assert summary["metrics"]["val/loss"] == pytest.approx(val[7], rel=1e-6)
    assert summary["best_score"] == pytest.approx(min(val.values()), rel=1e-6)
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0
    assert summary["wall_time_s"] > summary["train_step_time_s"] > 0
    commands = summary["commands"]
    assert shlex.split(commands["resume"])[-2:] == ["--ckpt_path", summary["last_checkpoint"]]
    assert shlex.split(commands["test"])[3] == "test"
    assert shlex.split(commands["test"])[-2:] == ["--ckpt_path", summary["best_checkpoint"]]
    peft = shlex.split(commands["export_peft"])
    assert peft[3:9] == ["export", "--ckpt_path", summary["best_checkpoint"], "--format", "peft", "--out"]
    assert "--format merged" in commands["export_merged"]
    assert "[hellora] ---- run summary ----" in output and f"  summary   {directory / 'summary.json'}" in output


# -- in process: the details, on a tiny model ----------------------------------------------


def tiny_module():
    return HelloraModule(BackboneConfig(model_type="olmoe", config=TINY_OLMOE), learning_rate=1e-2, warmup=1)


def handlers():
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}


def test_signal_handlers_are_replaced_during_training_only_and_lightning_never_sees_sigterm(tmp_path):
    before = handlers()
    interrupt = InterruptCheckpoint()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints")
    callbacks = [interrupt, checkpoints, SignalAtStep(2, "SIGTERM")]
    # min_steps would keep a plain `should_stop` going; an interrupt stops anyway.
    trainer = make_trainer(tmp_path, 6, callbacks, accumulate_grad_batches=2, min_steps=6)
    trainer.fit(tiny_module(), datamodule=RandomTokens(num_batches=8))
    assert (trainer.global_step, interrupt.stopped_at_step) == (2, 2)
    assert interrupt.received == signal.SIGTERM and not trainer.received_sigterm
    assert "val/loss" not in trainer.callback_metrics  # stopping ran no extra validation
    assert interrupt.checkpoint_path == (tmp_path / "checkpoints" / "interrupted.ckpt").absolute()
    state = torch.load(interrupt.checkpoint_path, map_location="cpu", weights_only=False)
    assert state["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 4
    assert handlers() == before


@pytest.mark.parametrize("inherited", [signal.default_int_handler, signal.SIG_IGN], ids=["foreground", "background"])
def test_a_second_ctrl_c_aborts_at_once_without_a_checkpoint(tmp_path, inherited):
    # A job started in the background by a shell without job control inherits SIGINT ignored;
    # the first Ctrl-C is still caught, and the second must still abort.
    original = signal.signal(signal.SIGINT, inherited)
    try:
        _second_ctrl_c_aborts(tmp_path)
    finally:
        signal.signal(signal.SIGINT, original)


def _second_ctrl_c_aborts(tmp_path):
    before = handlers()
    interrupt = InterruptCheckpoint()
    trainer = make_trainer(
        tmp_path, 6, [interrupt, ModelCheckpoint(dirpath=tmp_path / "checkpoints"), SignalAtStep(2, "SIGINT", times=2)]
    )
    with pytest.raises(SystemExit):  # Lightning's answer to KeyboardInterrupt
        trainer.fit(tiny_module(), datamodule=RandomTokens())
    assert interrupt.received == signal.SIGINT and interrupt.checkpoint_path is None
    assert trainer.global_step == 1 and not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()
    assert handlers() == before


@pytest.mark.parametrize("setting", ["no ModelCheckpoint", "fast_dev_run"])
def test_without_checkpointing_an_interrupt_writes_nothing_and_says_so(tmp_path, setting, caplog):
    interrupt, summary = InterruptCheckpoint(), RunSummary()
    options = {"enable_checkpointing": False} if setting == "no ModelCheckpoint" else {"fast_dev_run": 3}
    trainer = make_trainer(tmp_path, 6, [interrupt, summary, SignalAtStep(2, "SIGINT")], **options)
    with caplog.at_level("INFO"):
        trainer.fit(tiny_module(), datamodule=RandomTokens())
    assert interrupt.stopped_at_step == 2 and trainer.global_step == 2 and interrupt.checkpoint_path is None
    assert not list(tmp_path.rglob("*.ckpt"))
    expected = "checkpointing is disabled" if setting == "no ModelCheckpoint" else "fast_dev_run writes no checkpoint"
    assert expected in caplog.text and "nothing was saved" in caplog.text
    assert summary.summary["status"] == "interrupted by SIGINT" and summary.summary["interrupted_checkpoint"] is None
    written = list(tmp_path.rglob("summary.json"))
    assert len(written) == (0 if setting == "fast_dev_run" else 1)  # a dry run writes nothing permanent


def test_summary_without_an_injection_callback_counts_the_attention_mask_tokens(tmp_path):
    summary_callback = RunSummary()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = make_trainer(tmp_path, 3, [summary_callback, checkpoints])
    data = RandomTokens()
    for example in data.examples:
        example["attention_mask"][7:] = 0  # 3 of each row's 10 tokens are padding
    trainer.fit(tiny_module(), datamodule=data)
    summary = json.loads((tmp_path / "run" / "version_0" / "summary.json").read_text())
    assert summary["tokens"] == 3 * 2 * 7  # 3 batches of 2 rows of 7 real tokens
    assert summary["plan"] is None and summary["adapters"] is None
    assert summary["global_step"] == 3 and summary["metrics"]["train/loss"] == pytest.approx(
        float(trainer.callback_metrics["train/loss"]), rel=0
    )
    last = summary["last_checkpoint"]
    assert summary["commands"]["resume"] == f"trainer.fit(model, datamodule, ckpt_path={last!r})"  # not the CLI


def test_commands_repeat_the_fit_arguments_without_the_old_checkpoint():
    main = str(REPO / "hellora_pl" / "__main__.py")
    argv = [main, "fit", "--config", "my config.yaml", "--ckpt_path", "old.ckpt", "--ckpt_path=older.ckpt", "--x=1"]
    assert rerun_command("test", "new.ckpt", argv) == (
        "python -m hellora_pl test --config 'my config.yaml' --x=1 --ckpt_path new.ckpt"
    )
    assert hellora_cli_argv(["/usr/bin/hellora-pl", "fit"]) == ["fit"]
    assert rerun_command("fit", "new.ckpt", ["train.py", "fit"]) is None  # not the hellora_pl CLI
    assert export_command("merged", "out", adapter_path="run/hellora", argv=argv) == (
        "python -m hellora_pl export --adapter_path run/hellora --config 'my config.yaml' --format merged --out out"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [({"signals": ["SIGFOO"]}, "'SIGFOO'"), ({"filename": "dir/x.ckpt"}, "without folders")],
)
def test_bad_interrupt_settings_are_refused_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InterruptCheckpoint(**kwargs)
