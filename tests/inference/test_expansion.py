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


def test_log_probs_of_a_sampled_expansion_are_those_of_the_distribution_it_was_drawn_from(tiny_expander_dir):
    """On-policy: under top-k and temperature, each token's log-prob is log_softmax of the processed scores
    ``generate`` sampled from; the model's full softmax would be another, off-policy number."""
    import torch

    from parrot_pipeline.expansion import continuation_log_probs, generate_expansions

    model, tokenizer = load_expander(tiny_expander_dir)
    config = ExpanderConfig(max_new_tokens=10, top_k=5, temperature=0.7)
    expansions = generate_expansions(model, tokenizer, ["a cat", "a castle on a hill"], config, seed=3,
                                     record_support=True)  # fmt: skip
    assert expansions.support.shape[:2] == expansions.new_tokens.shape
    assert (expansions.support.sum(dim=2) <= 5).all(), "top-k leaves at most k tokens"
    inputs = tokenizer([config.instruction(p) for p in ["a cat", "a castle on a hill"]], return_tensors="pt",
                       padding=True, padding_side="left")  # fmt: skip
    with torch.no_grad():
        on_policy = continuation_log_probs(model, expansions.input_ids, expansions.attention_mask,
                                           expansions.new_tokens, expansions.new_mask, expansions.support, 0.7)
        full = continuation_log_probs(model, expansions.input_ids, expansions.attention_mask, expansions.new_tokens,
                                      expansions.new_mask)  # fmt: skip
        # the hand computation: the processed scores of the sampling run, re-drawn with the same seed
        torch.manual_seed(3)
        output = model.generate(**inputs, max_new_tokens=10, do_sample=True, top_k=5, temperature=0.7,
                                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(output.sequences[:, inputs.input_ids.shape[1]:], expansions.new_tokens)
    scores = torch.log_softmax(torch.stack(output.scores, dim=1).float(), dim=-1)
    per_token = scores.gather(2, expansions.new_tokens.unsqueeze(2)).squeeze(2)
    expected = torch.where(expansions.new_mask.bool(), per_token, 0.0).sum(dim=1)
    torch.testing.assert_close(on_policy, expected, rtol=1e-4, atol=1e-4)
    assert (on_policy - full).abs().min() > 1e-2, "the truncated, tempered distribution differs from the full one"


def test_a_reinforce_step_with_a_positive_weight_makes_the_sampled_expansion_likelier(tiny_expander_dir):
    import torch

    from parrot_pipeline.expansion import add_lora, continuation_log_probs, generate_expansions

    for weight in (1.0, -1.0):
        model, tokenizer = load_expander(tiny_expander_dir)
        model = add_lora(model, rank=4)
        config = ExpanderConfig(max_new_tokens=8)
        expansions = generate_expansions(model, tokenizer, ["a cat"], config, seed=0, record_support=True)
        args = (expansions.input_ids, expansions.attention_mask, expansions.new_tokens, expansions.new_mask,
                expansions.support, config.temperature)  # fmt: skip
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        before = continuation_log_probs(model, *args)
        (-(weight * before)).sum().backward()  # the trainer's REINFORCE loss
        optimizer.step()
        with torch.no_grad():
            after = continuation_log_probs(model, *args)
        assert (after > before.detach()).all() if weight > 0 else (after < before.detach()).all()


def test_an_expander_without_tokenizer_files_takes_the_named_tokenizer(tiny_expander_dir, tmp_path):
    """Promptist's repository has no tokenizer; it uses GPT-2's."""
    import pytest

    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_expander_dir / name, model_only / name)
    with pytest.raises(ValueError, match="no tokenizer files .* name the tokenizer it uses .`expander_tokenizer`."):
        load_expander(model_only)
    _, tokenizer = load_expander(model_only, tokenizer=tiny_expander_dir)
    assert tokenizer.tokenize(" a cat") == ["Ġa", "Ġcat"]
