"""The expander: loading, batched seeded generation, the expanded-prompt text."""

import dataclasses
import shutil

from peft import PeftModel

from parrot_pipeline.expansion import (
    DEFAULT_TEMPLATE,
    ExpanderConfig,
    compose_expanded_prompt,
    expand_prompts,
    load_expander,
)
from parrot_pipeline.tiny import tiny_clip_tokenizer, tiny_gpt2_tokenizer


def test_default_template_is_the_papers_instruction():
    assert ExpanderConfig().instruction("a cat") == (
        "Input: a cat. This is a text input for image generation. Expand prompt for improving image quality. Output:"
    )
    assert DEFAULT_TEMPLATE.count("{prompt}") == 1


def test_compose_expanded_prompt():
    assert compose_expanded_prompt(["<reward 1>", "<reward 2>"], "a cat, 4k") == "<reward 1>, <reward 2>, a cat, 4k"
    assert compose_expanded_prompt([], "a cat") == "a cat"
    assert compose_expanded_prompt(["<reward 1>"], "") == "<reward 1>"


def test_batched_greedy_expansion_equals_one_by_one(tiny_expander_dir):
    model, tokenizer = load_expander(tiny_expander_dir)
    config = dataclasses.replace(ExpanderConfig(), do_sample=False, max_new_tokens=12)
    prompts = ["a cat", "a castle on a hill at sunset with dramatic clouds", "a dog"]
    batched = expand_prompts(model, tokenizer, prompts, config)
    assert batched == [expand_prompts(model, tokenizer, [p], config)[0] for p in prompts]
    assert all(text and not text.startswith("Input") for text in batched), "only the new text is returned"


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tiny_expander_dir):
    import torch

    model, tokenizer = load_expander(tiny_expander_dir)
    config = ExpanderConfig(max_new_tokens=10)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = expand_prompts(model, tokenizer, ["a cat", "a dog"], config, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert expand_prompts(model, tokenizer, ["a cat", "a dog"], config, seed=1) == first
    assert expand_prompts(model, tokenizer, ["a cat", "a dog"], config, seed=2) != first


def test_loading_an_adapter_folder_attaches_it_to_its_base(bundle_dir, tiny_expander_dir, tmp_path):
    base, _ = load_expander(tiny_expander_dir)
    elsewhere = tmp_path / "expander-base"
    shutil.copytree(tiny_expander_dir, elsewhere)
    adapted, tokenizer = load_expander(bundle_dir / "expander", base_model=str(elsewhere))
    assert isinstance(adapted, PeftModel)
    assert adapted.active_peft_config.base_model_name_or_path == str(elsewhere), "names the base actually loaded"
    assert tokenizer.pad_token == tokenizer.eos_token
    config = ExpanderConfig(do_sample=False, max_new_tokens=8)
    assert expand_prompts(adapted, tokenizer, ["a cat"], config) != expand_prompts(base, tokenizer, ["a cat"], config)


def test_tiny_tokenizers_keep_prompt_words_whole():
    clip = tiny_clip_tokenizer()
    assert clip.tokenize("a photo of a cat, highly detailed") == [
        "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ",</w>", "highly</w>", "detailed</w>"
    ]  # fmt: skip
    gpt2 = tiny_gpt2_tokenizer()
    assert gpt2.tokenize(" a photo of a cat") == ["Ġa", "Ġphoto", "Ġof", "Ġa", "Ġcat"]
    assert gpt2.decode(gpt2(" a castle at sunset").input_ids) == " a castle at sunset"
