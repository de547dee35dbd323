import re

import pytest
import torch

from hellora_pl.datamodules import (
    ArithmeticDataModule,
    CausalLMCollator,
    build_char_tokenizer,
    generate_arithmetic_problems,
    load_tokenizer,
    tokenize_prompt_response,
)

EQUATION = re.compile(r"(\d+(?: [-+*] \d+)+) = (\d+)")
TRICKY = [
    "",
    " ",
    "  leading and trailing  ",
    "a  b   c",
    "line one\nline two\n\n  indented\n",
    "Mia has 7 + 5 = 12 apples.\n#### 12",
    "0123456789 -3.5e+10 (x*y)/z [1, 2]; {k: v}",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "<pad><eos> looks special but is text",
]


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_char_tokenizer()


@pytest.mark.parametrize("text", TRICKY)
def test_char_tokenizer_round_trip(char_tokenizer, text):
    ids = char_tokenizer.encode(text)
    assert len(ids) == len(text)
    assert char_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_char_tokenizer_vocab_and_special_ids(char_tokenizer):
    assert len(char_tokenizer) <= 128
    assert (char_tokenizer.pad_token_id, char_tokenizer.bos_token_id) == (0, 1)
    assert (char_tokenizer.eos_token_id, char_tokenizer.unk_token_id) == (2, 3)
    assert char_tokenizer("ab", add_special_tokens=True)["input_ids"] == char_tokenizer.encode("ab")
    assert char_tokenizer.padding_side == "right"
    assert load_tokenizer("builtin:char").get_vocab() == char_tokenizer.get_vocab()


def test_bad_tokenizer_name_raises_value_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"/nonexistent/tokenizer.*builtin:char"):
        load_tokenizer("/nonexistent/tokenizer")


def test_generator_is_deterministic_and_seed_dependent():
    assert generate_arithmetic_problems(50, seed=3) == generate_arithmetic_problems(50, seed=3)
    assert generate_arithmetic_problems(50, seed=3) != generate_arithmetic_problems(50, seed=4)


def test_generated_answers_are_correct():
    for problem in generate_arithmetic_problems(500, seed=0):
        question, answer = problem["question"], problem["answer"]
        assert len(question) + len(answer) < 160
        final = re.fullmatch(r"(?s).*\n#### (\d+)", answer)
        assert final, answer
        equations = EQUATION.findall(answer)
        assert equations, answer
        operands, previous = [], None
        for expression, result in equations:
            assert eval(expression) == int(result), answer  # noqa: S307 - digits and + - * only
            numbers = [int(x) for x in re.findall(r"\d+", expression)]
            # Chained steps start from the previous result; other numbers come from the question.
            operands += numbers[1:] if numbers[0] == previous else numbers
            previous = int(result)
        assert previous == int(final.group(1)) >= 0
        assert operands == [int(x) for x in re.findall(r"\d+", question)], problem


def test_tokenize_prompt_response_masks_prompt_and_truncates(char_tokenizer):
    example = tokenize_prompt_response(char_tokenizer, "Q: ", "42", max_length=16)
    assert example["input_ids"] == char_tokenizer.encode("Q: 42") + [2]
    assert example["labels"] == [-100] * 3 + char_tokenizer.encode("42") + [2]
    assert not example["truncated"]
    cut = tokenize_prompt_response(char_tokenizer, "Q: ", "42", max_length=4)
    assert cut["input_ids"] == example["input_ids"][:4] and cut["truncated"]


def test_collator_pads_right_and_keeps_eos_label_when_pad_is_eos():
    examples = [
        {"input_ids": [5, 6, 2], "labels": [-100, 6, 2]},
        {"input_ids": [7], "labels": [7]},
    ]
    batch = CausalLMCollator(pad_token_id=2)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [7, -100, -100]]


@pytest.fixture(scope="module")
def datamodule():
    dm = ArithmeticDataModule(num_train=200, num_val=50, seed=1, batch_size=8)
    dm.setup("fit")
    return dm


def test_batches_label_only_response_and_eos(datamodule):
    tok = datamodule.tokenizer
    answer_start = tok.encode("\nAnswer: ")
    for batch in [*datamodule.train_dataloader(), *datamodule.val_dataloader()]:
        assert batch["input_ids"].dtype == torch.long
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for ids, mask, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                     batch["labels"].tolist()):
            length = sum(mask)
            assert mask == [1] * length + [0] * (len(ids) - length)
            assert ids[length:] == [tok.pad_token_id] * (len(ids) - length)
            # The prompt ends right after the first "\nAnswer: ".
            prompt_len = next(i + len(answer_start) for i in range(length)
                              if ids[i:i + len(answer_start)] == answer_start)
            expected = [-100] * prompt_len + ids[prompt_len:length] + [-100] * (len(ids) - length)
            assert labels == expected
            assert labels[length - 1] == tok.eos_token_id


def test_train_shuffle_is_seeded_and_val_is_ordered(datamodule):
    first = next(iter(datamodule.train_dataloader()))["input_ids"]
    again = next(iter(datamodule.train_dataloader()))["input_ids"]
    assert torch.equal(first, again)
    val = next(iter(datamodule.val_dataloader()))["input_ids"]
    expected = CausalLMCollator(0)(datamodule._val_examples[:8])["input_ids"]
    assert torch.equal(val, expected)


def test_val_questions_disjoint_from_train(datamodule):
    assert len(datamodule.train_problems) == 200 and len(datamodule.val_problems) == 50
    train = {p["question"] for p in datamodule.train_problems}
    assert not train & {p["question"] for p in datamodule.val_problems}


def test_val_excludes_train_even_when_streams_overlap():
    # With 3000 train problems the raw val stream repeats ~10% of train questions; they must be dropped.
    dm = ArithmeticDataModule(num_train=3000, num_val=300, seed=0)
    dm.setup()
    train = {p["question"] for p in dm.train_problems}
    assert len(dm.val_problems) == 300
    assert not train & {p["question"] for p in dm.val_problems}


def test_truncation_is_counted():
    dm = ArithmeticDataModule(num_train=20, num_val=10, max_length=40)
    dm.setup()
    assert dm.num_truncated == 30
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] == 40
    untruncated = ArithmeticDataModule(num_train=20, num_val=10)
    untruncated.setup()
    assert untruncated.num_truncated == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"num_train": 0}, {"num_val": -1}, {"batch_size": 0}, {"max_length": 0}, {"num_workers": -1},
     {"tokenizer": ""}],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ArithmeticDataModule(**kwargs)
