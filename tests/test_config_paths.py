"""Data paths in a config file resolve against its folder; on the command line, against the working directory."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_OLMOE, tiny_twin_cli
from hellora_pl.cli import HelloraCLI, main
from hellora_pl.datamodules.paths import DataFileNotFoundError, check_data_files
from hellora_pl.module import HelloraModule

TWIN = REPO / "configs" / "tiny" / "olmoe" / "hellora_math.yaml"
GSM8K_ROW = {"question": "Mia has 2 apples and buys 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"}


def write_rows(path: Path, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(GSM8K_ROW) + "\n" for _ in range(count)))
    return path


def write_config(folder: Path, train_path: str) -> Path:
    """A tiny OLMoE on MathDataModule whose training data is `train_path`, written as given."""
    config = {
        "trainer": {"accelerator": "cpu", "logger": False, "max_steps": 1, "default_root_dir": str(folder / "runs")},
        "model": {"backbone": {"model_type": "olmoe", "config": {**TINY_OLMOE, "vocab_size": 128}}},
        "data": {
            "class_path": "hellora_pl.datamodules.MathDataModule",
            "init_args": {
                "train": {"path": train_path}, "tokenizer": "builtin:char", "template": "plain", "val_size": 2,
            },
        },
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder / "run.yaml"


def datamodule(*args: str):
    return HelloraCLI(HelloraModule, subclass_mode_data=True, run=False, args=list(args)).datamodule


def test_twin_finds_its_data_from_any_folder(tmp_path, shared_data, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo root: ../shared/data does not exist from here
    assert not (tmp_path / ".." / "shared" / "data").exists()
    cli = tiny_twin_cli(TWIN, tmp_path / "logs")
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3
    train = shared_data / "gsm8k" / "train.jsonl"
    assert Path(cli.datamodule.train_source.path).resolve() == train.resolve()
    # The saved config names the resolved file, so it reruns from any folder too.
    saved = yaml.safe_load((tmp_path / "logs" / "hellora" / "version_0" / "config.yaml").read_text())
    assert Path(saved["data"]["init_args"]["train"]["path"]).resolve() == train.resolve()


@pytest.mark.parametrize("where", ["config", "flag"])
def test_relative_path_resolves_where_it_was_written(tmp_path, monkeypatch, where):
    """In a config file: against its folder. On the command line: against the working directory."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    config = write_config(project, "data/train.jsonl")
    write_rows(project / "data" / "train.jsonl", 12)
    write_rows(elsewhere / "data" / "train.jsonl", 7)  # the same relative path from the working directory
    monkeypatch.chdir(elsewhere)
    flag = ["--data.init_args.train.path=data/train.jsonl"] if where == "flag" else []
    dm = datamodule("--config", "../project/run.yaml", *flag)
    expected, rows = (project, 12) if where == "config" else (elsewhere, 7)
    assert dm.train_source.path == str(expected / "data" / "train.jsonl")
    assert dm.train_source.path.config == (str(config.resolve()) if where == "config" else None)
    dm.setup("fit")
    assert dm.stats["train"].rows == rows


def test_hub_dataset_names_stay_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = datamodule("--config", str(write_config(tmp_path / "project", "openai/gsm8k")))
    assert dm.train_source.path == "openai/gsm8k" and not dm.train_source.path.local


def test_missing_data_file_is_one_clear_message(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "project", "data/missing.jsonl")
    monkeypatch.chdir(tmp_path)
    resolved = str(tmp_path / "project" / "data" / "missing.jsonl")

    # The config still parses and prints without its data.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert f"path: {resolved}" in capsys.readouterr().out

    dm = datamodule("--config", str(config))
    for error in (lambda: check_data_files(dm, "fit"), lambda: dm.setup("fit")):
        with pytest.raises(DataFileNotFoundError) as caught:
            error()
        message = str(caught.value)
        assert "'data/missing.jsonl'" in message and resolved in message and str(config.resolve()) in message
        assert len(message.splitlines()) == 1
    assert "--data.init_args.train.path" in str(pytest.raises(DataFileNotFoundError, check_data_files, dm, "fit").value)
    check_data_files(dm, "test")  # test reads only the benchmark, which this config has none of

    # Through the CLI: the message, without a traceback.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config)])
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    assert "'data/missing.jsonl'" in printed and resolved in printed and "Traceback" not in printed
