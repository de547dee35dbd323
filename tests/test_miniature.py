"""The pretrained miniature MoE (issue 17): its corpus, a smoke version of its pretraining (CI runs
this; the real run is by hand), exact resume, the routing report, and the shipped checkpoint."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import miniature_corpus as corpus  # noqa: E402
import miniature_routing  # noqa: E402
import pretrain_miniature  # noqa: E402

from hellora_pl.backbones import BackboneConfig  # noqa: E402
from hellora_pl.datamodules.arithmetic import generate_arithmetic_problems  # noqa: E402
from hellora_pl.loading import load_backbone  # noqa: E402

SHIPPED = REPO / "models" / "hellora-mini-olmoe"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMOKE = ["--steps", "4", "--layers", "1", "--experts", "4", "--top-k", "2", "--hidden", "32", "--heads", "2",
         "--expert-width", "16", "--vocab", "320", "--val-windows", "2", "--seq", "32", "--batch", "2", "--threads", "1",
         "--save-every", "2", "--log-every", "1"]  # fmt: skip
LOSS_RTOL = 1e-4  # the card's losses and a reload's: the same bf16 weights and windows, fp32 sums


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """Small stand-ins for the three sources: generated GSM8K-style lines, a few real stdlib modules,
    reST files made of real module docstrings (with a literal block and roles to clean)."""
    root = tmp_path_factory.mktemp("sources")
    gsm8k = root / "gsm8k"
    gsm8k.mkdir()
    problems = generate_arithmetic_problems(400, seed=3)
    gsm8k.joinpath("train.jsonl").write_text("\n".join(json.dumps(p) for p in problems) + "\n")
    stdlib = root / "stdlib"
    stdlib.mkdir()
    modules = ["os", "glob", "fnmatch", "textwrap", "shlex", "bisect", "heapq", "string", "colorsys", "keyword", "abc", "copy"]
    for name in modules:
        stdlib.joinpath(f"{name}.py").write_text((STDLIB / f"{name}.py").read_text())
    (stdlib / "test").mkdir()
    stdlib.joinpath("test", "test_excluded.py").write_text("EXCLUDED = True\n")
    docs = root / "docs"
    docs.mkdir()
    for name in modules:
        text = __import__(name).__doc__ or name
        docs.joinpath(f"{name}.rst.txt").write_text(
            f"{name}\n=====\n\nSee :func:`~{name}.thing <x>` for ``details``. Example::\n\n    >>> secret_code()\n    1\n\n{text}\n"
        )
    return {"gsm8k": gsm8k, "stdlib": stdlib, "docs": docs}


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pretrain(sources, out: Path, work: Path, *extra: str) -> int:
    argv = ["--gsm8k", str(sources["gsm8k"]), "--stdlib", str(sources["stdlib"]), "--python-docs", str(sources["docs"])]
    return pretrain_miniature.main([*argv, "--out", str(out), "--work", str(work), *SMOKE, *extra])


def test_clean_rest_keeps_prose_and_drops_code_and_markup():
    text = "Title\n=====\n\nUse :func:`~os.path.join <j>` and ``x``. For example::\n\n    code = 1\n    more = 2\n\nBack to prose.\n\n.. note::\n\n   Indented note text.\n\n.. code-block:: python\n\n   hidden = 3\n\n.. function:: f(x)\n\n   Return x.\n\n>>> 1 + 1\n"
    cleaned = corpus.clean_rest(text)
    assert "code = 1" not in cleaned and "hidden" not in cleaned and "function" not in cleaned and ">>>" not in cleaned and "=====" not in cleaned and ".. note" not in cleaned
    assert "Use os.path.join and x. For example:" in cleaned
    assert "Back to prose." in cleaned and "Indented note text." in cleaned and "Return x." in cleaned


def test_split_depends_on_names_only():
    docs = [corpus.Document("code", f"stdlib/m{i}.py", "x") for i in range(400)]
    train, val = corpus.split(docs)
    train_r, val_r = corpus.split(reversed(docs))
    assert {d.name for d in val} == {d.name for d in val_r} and 0 < len(val) < 60
    assert len(train) + len(val) == 400


def test_sources_are_checked_before_reading(tmp_path):
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        corpus.load_documents(tmp_path, tmp_path, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        corpus.math_documents(tmp_path)


def test_tokenizer_is_deterministic_and_spells_digits_singly(sources):
    docs = corpus.load_documents(sources["gsm8k"], sources["stdlib"], sources["docs"])
    assert not any("test_excluded" in d.name for d in docs["code"])
    assert not any("secret_code" in d.text for d in docs["prose"])
    train = {d: corpus.split(v)[0] for d, v in docs.items()}
    first, second = corpus.train_tokenizer(train, 320), corpus.train_tokenizer(train, 320)
    assert first.get_vocab() == second.get_vocab() and len(first) == 320
    ids = first("has 1234 apples", add_special_tokens=False)["input_ids"]
    assert [first.decode([i]) for i in ids if first.decode([i]).strip().isdigit()] == ["1", "2", "3", "4"]
    assert first.decode(ids) == "has 1234 apples"


def test_smoke_pretraining_writes_a_loadable_model_whose_losses_match_its_card(sources, tmp_path, restore_threads):
    out = tmp_path / "model"
    assert pretrain(sources, out, tmp_path / "work") == 0
    card = json.loads((out / "card.json").read_text())
    assert card["recipe"]["steps"] == 4 and len(card["loss_curve"]) >= 1
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    model = load_backbone(BackboneConfig(pretrained=str(out))).eval()
    windows = {d: t.long() for d, t in load_file(str(out / "val_tokens.safetensors")).items()}
    assert set(windows) == set(corpus.DOMAINS) and all(w.shape == (2, 32) for w in windows.values())
    losses = pretrain_miniature.validation_losses(model, windows)
    for domain, loss in losses.items():
        assert loss == pytest.approx(card["val_loss_bf16"][domain], rel=LOSS_RTOL)
    assert "## Reproduce" in (out / "README.md").read_text()


def test_an_interrupted_pretraining_resumes_to_the_same_weights(sources, tmp_path, restore_threads):
    assert pretrain(sources, tmp_path / "straight", tmp_path / "w1") == 0
    assert pretrain(sources, tmp_path / "split", tmp_path / "w2", "--stop-after", "2") == 0
    assert not (tmp_path / "split").exists() and torch.load(tmp_path / "w2" / "state.pt", weights_only=False)["step"] == 2
    assert pretrain(sources, tmp_path / "split", tmp_path / "w2") == 0
    straight = torch.load(tmp_path / "w1" / "state.pt", weights_only=False)["model"]
    resumed = torch.load(tmp_path / "w2" / "state.pt", weights_only=False)["model"]
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-6, rtol=0), name
    # the same recipe but a different one: refused, nothing trained on a mismatched state
    with pytest.raises(SystemExit, match="another recipe"):
        pretrain(sources, tmp_path / "other", tmp_path / "w2", "--lr", "0.01")


def test_bad_options_are_refused_before_anything_is_read_or_written(sources, tmp_path, capsys, restore_threads):
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.joinpath("keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        pretrain(sources, existing, tmp_path / "work")
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert existing.joinpath("keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        pretrain(sources, tmp_path / "new", tmp_path / "work", "--top-k", "8")
    assert "--top-k 8 > --experts 4" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "work").exists()


def test_routing_report_runs_on_a_smoke_model(sources, tmp_path, restore_threads):
    out = tmp_path / "model"
    assert pretrain(sources, out, tmp_path / "work") == 0
    assert miniature_routing.main(["--model", str(out), "--out-dir", str(tmp_path / "results")]) == 0
    data = json.loads((tmp_path / "results" / "miniature_routing.json").read_text())
    stats = data["results"]["pretrained"]
    assert set(stats["pairs"]) == {"code/math", "code/prose", "math/prose"}
    assert all(len(h) == 1 and len(h[0]) == 2 for h in stats["hot"].values())  # 1 layer, k = top-k = 2
    for values in stats["pairs"].values():
        assert all(0.0 <= x <= 1.0 for x in values["overlap"])
    assert (tmp_path / "results" / "miniature_routing.png").stat().st_size > 1000


def test_routing_stats_on_known_profiles():
    from hellora_pl.routing import RoutingProfile

    def profile(counts):
        counts = torch.tensor([counts], dtype=torch.int64)
        return RoutingProfile([0], counts, counts.double(), int(counts.sum()) // 2, 2)

    stats = miniature_routing.routing_stats({"a": profile([5, 4, 1, 0]), "b": profile([0, 1, 4, 5])}, k=2)
    assert stats["hot"] == {"a": [[0, 1]], "b": [[2, 3]]}
    assert stats["pairs"]["a/b"]["overlap"] == [0.0]
    assert stats["coverage"]["a on b"]["mean"] == pytest.approx(0.1)
    assert stats["own_hot_share"]["a"] == pytest.approx(0.9)


# -- the shipped checkpoint ----------------------------------------------------------------------


def test_the_shipped_miniature_loads_is_small_and_matches_its_card():
    card = json.loads((SHIPPED / "card.json").read_text())
    assert (SHIPPED / "model.safetensors").stat().st_size <= 20 * 2**20
    model = load_backbone(BackboneConfig(pretrained=str(SHIPPED))).eval()
    windows = {d: t.long() for d, t in load_file(str(SHIPPED / "val_tokens.safetensors")).items()}
    losses = pretrain_miniature.validation_losses(model, windows)
    for domain in corpus.DOMAINS:
        assert losses[domain] == pytest.approx(card["val_loss_bf16"][domain], rel=LOSS_RTOL)
        assert losses[domain] < 4.0, (domain, losses[domain])  # learned: a uniform guess over 4096 tokens is 8.3


def test_shipped_names_resolve_to_the_models_folder_and_unknown_ones_are_refused(tmp_path, monkeypatch):
    from hellora_pl.backbones import shipped
    from hellora_pl.datamodules.tokenizer import load_tokenizer

    assert BackboneConfig(pretrained="hellora:mini-olmoe").pretrained == str(SHIPPED)
    assert BackboneConfig(pretrained="allenai/OLMoE-1B-7B-0924").pretrained == "allenai/OLMoE-1B-7B-0924"
    assert len(load_tokenizer("hellora:mini-olmoe")) == json.loads((SHIPPED / "card.json").read_text())["recipe"]["vocab"]
    with pytest.raises(ValueError, match="hellora:mini-olmoe"):
        BackboneConfig(pretrained="hellora:mini-mixtral")
    monkeypatch.setattr(shipped, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="pip install -e"):
        BackboneConfig(pretrained="hellora:mini-olmoe")
