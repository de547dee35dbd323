"""Batched generation: left padding changes nothing, stop strings cut, sampling is seeded."""

import pytest
import torch

from conftest import tiny_olmoe
from hellora_pl.datamodules import PromptCollator, build_char_tokenizer
from hellora_pl.evaluation.generation import GenerationConfig, generate_completions, truncate_at_stop

PROMPTS = ["Question: 2 + 3?\nAnswer: ", "Q: hi\nA: ", "Question: what is seven times six, exactly?\nAnswer: "]


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_char_tokenizer()
    model = tiny_olmoe(vocab_size=128, max_position_embeddings=256, initializer_range=0.3).eval()
    return model, tokenizer


def batch_of(tokenizer, prompts):
    examples = [{"prompt_ids": tokenizer.encode(p), "problem_index": i} for i, p in enumerate(prompts)]
    return PromptCollator(tokenizer.pad_token_id)(examples)


def test_prompt_collator_pads_on_the_left(setup):
    _, tokenizer = setup
    batch = batch_of(tokenizer, PROMPTS)
    lengths = [len(p) for p in PROMPTS]
    assert batch["prompt_ids"].shape == (3, max(lengths)) and batch["problem_index"] == [0, 1, 2]
    for row, length in enumerate(lengths):
        assert batch["prompt_attention_mask"][row].tolist() == [0] * (max(lengths) - length) + [1] * length
        assert tokenizer.decode(batch["prompt_ids"][row, -length:]) == PROMPTS[row]


def test_batched_greedy_equals_one_prompt_at_a_time(setup):
    model, tokenizer = setup
    config = GenerationConfig(max_new_tokens=12)
    batch = batch_of(tokenizer, PROMPTS)
    together = generate_completions(model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], config)
    for index, prompt in enumerate(PROMPTS):
        alone = batch_of(tokenizer, [prompt])
        single = generate_completions(model, tokenizer, alone["prompt_ids"], alone["prompt_attention_mask"], config)
        assert together[index] == single[0]
    assert any(text for [text] in together)  # the random model does emit characters


def test_stop_strings_cut_the_completion(setup):
    model, tokenizer = setup
    batch = batch_of(tokenizer, PROMPTS[:1])
    free = generate_completions(
        model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], GenerationConfig(max_new_tokens=16)
    )[0][0]
    assert len(free) >= 4
    stop = free[2:4]
    cut = generate_completions(
        model,
        tokenizer,
        batch["prompt_ids"],
        batch["prompt_attention_mask"],
        GenerationConfig(max_new_tokens=16, stop=[stop]),
    )[0][0]
    assert cut == free[: free.find(stop)]
    assert truncate_at_stop("abc\ndef\nclass X", ["\nclass", "\ndef"]) == "abc"
    assert truncate_at_stop("no stop here", None) == "no stop here"


def test_sampling_draws_num_samples_reproducibly(setup):
    model, tokenizer = setup
    batch = batch_of(tokenizer, PROMPTS[:2])
    config = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.5, num_samples=4, seed=3)
    first = generate_completions(
        model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], config, batch_seed=0
    )
    again = generate_completions(
        model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], config, batch_seed=0
    )
    other = generate_completions(
        model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], config, batch_seed=1
    )
    assert [len(samples) for samples in first] == [4, 4]
    assert first == again and first != other
    assert len(set(first[0])) > 1  # samples differ from one another
    state = torch.random.get_rng_state()
    generate_completions(model, tokenizer, batch["prompt_ids"], batch["prompt_attention_mask"], config)
    assert torch.equal(state, torch.random.get_rng_state())  # the training RNG stream is left alone


def test_bad_generation_settings_are_refused():
    with pytest.raises(ValueError, match="num_samples > 1 needs do_sample"):
        GenerationConfig(num_samples=5)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GenerationConfig(max_new_tokens=0)
