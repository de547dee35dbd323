"""Task datamodules: sources, field mapping, malformed rows, templates, truncation, packing, mixing."""

import json

import datasets
import pytest
import torch

from conftest import tiny_olmoe
from hellora_pl.datamodules import CausalLMCollator, CodeDataModule, DataSource, MathDataModule, SafetyDataModule
from hellora_pl.datamodules.collate import IGNORE_INDEX
from hellora_pl.datamodules.encoding import pack_examples
from hellora_pl.datamodules.safety import mixture_sizes
from hellora_pl.datamodules.tokenizer import build_char_tokenizer

ROWS = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def math_module(tmp_path, rows=ROWS, **kwargs):
    kwargs.setdefault("train", DataSource(write_jsonl(tmp_path / "train.jsonl", rows)))
    kwargs.setdefault("val_size", 4)
    return MathDataModule(tokenizer="builtin:char", max_length=kwargs.pop("max_length", 96), **kwargs)


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_every_local_file_type_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"train.{suffix}"
    table = datasets.Dataset.from_list(ROWS)
    {
        "jsonl": lambda: table.to_json(path),
        "json": lambda: path.write_text(json.dumps(ROWS)),
        "csv": lambda: table.to_csv(path, index=False),
        "parquet": lambda: table.to_parquet(path),
    }[suffix]()
    dm = math_module(tmp_path, train=DataSource(str(path)))
    dm.setup("fit")
    assert dm.stats["train"].rows == 40 and dm.stats["train"].used == 40
    assert len(dm.train_dataloader().dataset) + len(dm.val_dataloader().dataset) == 40


def test_field_mapping_reads_other_column_names(tmp_path):
    rows = [{"query": row["question"], "solution": row["answer"]} for row in ROWS]
    source = DataSource(write_jsonl(tmp_path / "t.jsonl", rows), fields={"question": "query", "answer": "solution"})
    dm = math_module(tmp_path, train=source)
    dm.setup("fit")
    assert dm.stats["train"].used == 40


def test_missing_file_and_missing_fields_stop_at_setup_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        math_module(tmp_path, train=DataSource(str(tmp_path / "nowhere.jsonl"))).setup("fit")
    path = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    with pytest.raises(ValueError, match=r"other\.jsonl: no field 'question', 'answer'.*\['prompt', 'completion'\]"):
        math_module(tmp_path, train=DataSource(path)).setup("fit")
    with pytest.raises(ValueError, match="Unknown data format 'gsm9k'"):
        math_module(tmp_path, format="gsm9k")


def test_malformed_rows_are_counted_and_skipped(tmp_path):
    path = tmp_path / "messy.jsonl"
    lines = [json.dumps(row) for row in ROWS[:10]]
    lines += [
        '{"question": "cut off',  # not JSON
        json.dumps({"question": "no answer"}),
        json.dumps({"question": "number", "answer": 7}),
        json.dumps({"question": "  ", "answer": "#### 1"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    dm = math_module(tmp_path, train=DataSource(str(path)), val_size=0)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert (stats.rows, stats.used) == (14, 10)
    assert sum(stats.skipped.values()) == 4
    assert {"missing 'answer'", "'answer' is not text", "empty 'question'"} <= set(stats.skipped)
    assert any(reason.startswith("line 11 is not JSON") for reason in stats.skipped)
    batches = list(dm.train_dataloader())  # the epoch never meets a bad row
    assert sum(len(batch["input_ids"]) for batch in batches) == 10


def test_labels_cover_the_response_and_eos_only(tmp_path):
    dm = math_module(tmp_path, val_size=0, max_length=512)
    dm.setup("fit")
    tokenizer = dm.tokenizer
    example = dm._train[0]
    response = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    prompt = [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    text = tokenizer.decode(prompt)
    assert text.startswith("Question: What is ") and text.endswith("\nAnswer: ")
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) in {row["answer"] for row in ROWS}


def test_chat_template_renders_prompts_and_ends_turns(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    dm = math_module(tmp_path, val_size=0, max_length=512)
    dm._tokenizer = tokenizer
    dm.setup("fit")
    example = dm._train[0]
    prompt = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab == IGNORE_INDEX])
    response = tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])
    assert prompt.startswith("<user>What is ") and prompt.endswith("</user>\n<assistant>")
    assert response.endswith("</assistant>\n") and "####" in response  # the template's end of turn, no extra eos
    with pytest.raises(ValueError, match="no chat template"):
        math_module(tmp_path, template="chat").template  # noqa: B018


def test_truncation_is_counted_and_overlong_prompts_are_skipped(tmp_path):
    rows = [*ROWS[:5], {"question": "x" * 200, "answer": "#### 1"}]
    dm = math_module(tmp_path, rows=rows, val_size=0, max_length=40)
    dm.setup("fit")
    stats = dm.stats["train"]
    assert stats.skipped == {"prompt longer than max_length": 1}
    assert stats.truncated == 5 and all(len(ex["input_ids"]) == 40 for ex in dm._train)


def test_validation_rows_never_train_and_the_split_is_seeded(tmp_path):
    def split(seed):
        dm = math_module(tmp_path, val_size=0.25, seed=seed)
        dm.setup("fit")
        decode = dm.tokenizer.decode
        return {decode(ex["input_ids"]) for ex in dm._train}, {decode(ex["input_ids"]) for ex in dm._val}

    train, val = split(0)
    assert len(val) == 10 and len(train) == 30 and not train & val
    assert split(0) == (train, val) and split(1) != (train, val)


def test_packed_sequences_give_each_example_its_own_logits(tmp_path):
    dm = math_module(tmp_path, val_size=0, max_length=120, packing=True)
    dm.setup("fit")
    packed = dm._train
    assert len(packed) < 40 and sum(ex["position_ids"].count(0) for ex in packed) == 40
    model = tiny_olmoe(vocab_size=128, max_position_embeddings=256).eval()
    batch = CausalLMCollator(0)(packed[:2])
    assert "attention_mask" not in batch
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        row = packed[0]
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
        assert len(starts) > 2  # at least two examples share the row
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
            torch.testing.assert_close(logits[0, start:end], alone, rtol=1e-4, atol=1e-4)


def test_pack_examples_keeps_every_token_in_order():
    examples = [{"input_ids": [i] * n, "labels": [-100] + [i] * (n - 1)} for i, n in enumerate([3, 5, 2, 7, 1, 4], 1)]
    packed = pack_examples(examples, 8)
    assert [len(p["input_ids"]) for p in packed] == [8, 2, 8, 4]  # whole examples: 3+5 | 2 | 7+1 | 4
    assert sum((p["input_ids"] for p in packed), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((p["labels"] for p in packed), []) == sum((e["labels"] for e in examples), [])


def test_tokenization_is_cached_by_datasets(tmp_path):
    dm = math_module(tmp_path, val_size=0)
    dm.setup("fit")
    first = dm.encode(dm.train_source, dm.format, "train")
    second = dm.encode(dm.train_source, dm.format, "train")
    assert first.cache_files and first.cache_files == second.cache_files


@pytest.mark.parametrize(
    ("safety", "general", "fraction", "expected"),
    [
        (100, 900, 0.1, (100, 900)),
        (100, 900, None, (100, 900)),
        (500, 500, 0.2, (125, 500)),
        (100, 1000, 0.5, (100, 100)),
    ],
)
def test_safety_mixture_sizes(safety, general, fraction, expected):
    kept = mixture_sizes(safety, general, fraction)
    assert kept == expected
    if fraction is not None:
        assert abs(kept[0] / sum(kept) - fraction) < 0.01


def test_safety_module_mixes_refusals_with_general_instructions(tmp_path):
    refusals = [{"instruction": f"harm {i}", "output": "I cannot help with that."} for i in range(30)]
    general = [{"instruction": f"task {i}", "input": "ctx" if i % 2 else "", "output": f"done {i}"} for i in range(90)]
    dm = SafetyDataModule(
        tokenizer="builtin:char",
        train=DataSource(write_jsonl(tmp_path / "s.jsonl", refusals)),
        general=DataSource(write_jsonl(tmp_path / "g.jsonl", general)),
        safety_fraction=0.1,
        val_size=0,
        max_length=256,
    )
    dm.setup("fit")
    texts = [dm.tokenizer.decode(ex["input_ids"]) for ex in dm._train]
    assert sum("I cannot help" in t for t in texts) == 10 and sum("done" in t for t in texts) == 90
    assert any("### Instruction:\ntask 1\n\nctx\n\n### Response:\n" in t for t in texts)


def test_code_module_reads_the_mbpp_train_split(shared_data):
    dm = CodeDataModule(
        tokenizer="builtin:char",
        train=DataSource(str(shared_data / "mbpp" / "mbpp.jsonl"), split="train"),
        format="mbpp",
        benchmark="mbpp",
        benchmark_path=str(shared_data / "mbpp" / "mbpp.jsonl"),
        val_size=0,
        max_length=2048,
    )
    dm.setup("fit")
    assert dm.stats["train"].rows == 374  # tasks 601-974
    limited = CodeDataModule(
        tokenizer="builtin:char", format="mbpp", val_size=0, max_length=2048,
        train=DataSource(str(shared_data / "mbpp" / "mbpp.jsonl"), split="train", limit=50),
    )  # fmt: skip
    limited.setup("fit")
    assert limited.stats["train"].rows == 50
    dm.setup("test")
    assert len(dm.eval_task) == 500 and dm.eval_task.problems[0]["task_id"] == 11
    with pytest.raises(ValueError, match=r"1 <= k <= generation.num_samples \(1\)"):
        CodeDataModule(tokenizer="builtin:char", ks=[1, 10])
