"""The config files: generated twins are up to date, and every tiny twin fits on CPU."""

import json
import subprocess
import sys

import pytest

from conftest import REPO, tiny_twin_cli
from hellora_pl.adapters import injected_hot_experts
from hellora_pl.callbacks.injection import injection_callback
from hellora_pl.cli import main

TINY = sorted((REPO / "configs" / "tiny").glob("*/*.yaml"))
TINY_MATH = [path for path in TINY if path.stem.endswith("_math")]
REAL = sorted(path for path in (REPO / "configs").glob("*/*.yaml") if path.parent.name != "tiny")


def test_generated_configs_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(REPO / "configs" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # backbone families x methods x tasks, the 4-bit Mixtral twin, and today's models' twins (3 families x 2 methods, math)
    assert len(TINY) == 7 * 6 * 3 + 1 + 3 * 2
    generated = [path for path in REAL if path.parent.name != "fsdp"]  # configs/fsdp is written by hand
    # checkpoints x methods x tasks, 4-bit Mixtral HELLoRA, and today's models (3 checkpoints x hellora/lora, math)
    assert len(generated) == 5 * 6 * 3 + 1 + 3 * 2


@pytest.mark.parametrize("path", REAL, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_real_config_parses(path, capsys):
    """Every class path and argument of the real configs is valid (nothing is loaded)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "pretrained:" in printed and "class_path: hellora_pl.datamodules." in printed


@pytest.mark.parametrize("path", TINY_MATH, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_tiny_twin_fits(tmp_path, path, shared_data, monkeypatch):
    monkeypatch.chdir(REPO)  # the twins name ../shared/data relative to the repo root
    cli = tiny_twin_cli(path, tmp_path)
    cli.trainer.fit(cli.model, cli.datamodule)
    plan = injection_callback(cli.trainer).plan
    assert plan.method == path.stem.removesuffix("_math").removeprefix("qlora_")
    assert injected_hot_experts(cli.model.model) == plan.hot_experts()
    assert (tmp_path / "hellora" / "version_0" / "hellora" / "plan.json").is_file()
    assert cli.trainer.global_step == 3


def _generate_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("configs_generate", REPO / "configs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = _generate_module()


@pytest.mark.parametrize("backbone, method", sorted(GENERATE.PREDICTED_PEAK), ids=lambda v: str(v))
def test_memory_notes_of_todays_configs_are_the_budget_tools(backbone, method, capsys):
    """The peak each real config's header cites is what its cited budget command prints now."""
    from hellora_pl.budget.cli import main as budget

    command = GENERATE.budget_command(backbone, method)
    assert command in (REPO / "configs" / backbone / f"{method}_math.yaml").read_text()
    budget([*command.split()[3:], "--json"])
    total = json.loads(capsys.readouterr().out)["memory"]["figures"]["total"]
    gib = GENERATE.PREDICTED_PEAK[backbone, method].split(" GiB")[0]
    assert f"{total['value'] / 2**30:.2f}" == gib, total
