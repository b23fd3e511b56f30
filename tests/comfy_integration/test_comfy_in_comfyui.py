"""The Parrot nodes inside a real ComfyUI: startup, the example workflow, guidance and LoRA equalities, bad input.

Runs only where ``COMFYUI_PATH`` points at a ComfyUI checkout and pytest runs in ComfyUI's Python environment
(see the README's ComfyUI section). Everything goes through a ComfyUI server on loopback: prompts are API-format
graphs of real nodes, results come back as the files SaveImage and SaveLatent write.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from parrot_pipeline.bundle import read_bundle
from parrot_pipeline.expansion import compose_expanded_prompt, expand_prompts
from parrot_pipeline.guidance import parrot_guidance

from .assets import BUNDLE, CHECKPOINT
from .conftest import HUB_BUNDLE, REPO
from .server import execution_error

pytestmark = pytest.mark.skipif(
    not os.environ.get("COMFYUI_PATH"),
    reason="COMFYUI_PATH is not set: the ComfyUI integration suite needs a ComfyUI checkout (README, ComfyUI section)",
)

PARROT_NODES = {
    "ParrotBundleLoader": "Parrot Bundle Loader",
    "ParrotExpandPrompt": "Parrot Expand Prompt",
    "ParrotGuider": "Parrot Guider",
    "ParrotKSamplerConditioning": "Parrot Conditioning (KSampler)",
}
WORKFLOW = REPO / "example_workflows" / "parrot_sd15.json"
API_WORKFLOW = REPO / "example_workflows" / "api" / "parrot_sd15_api.json"
BUNDLE_LORA = f"{BUNDLE}/parrot_lora_kohya.safetensors"
PROMPT = "a red fox in the snow"
W1, W2 = 3.0, 2.0


def example_prompt(steps: int = 2, size: int = 64) -> dict:
    """The example workflow (API twin) on the random SD 1.5 model at ``size``×``size`` with ``steps`` steps."""
    prompt = json.loads(API_WORKFLOW.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = CHECKPOINT
    prompt["2"]["inputs"]["bundle"] = BUNDLE
    prompt["11"]["inputs"]["steps"] = steps
    prompt["12"]["inputs"].update(width=size, height=size)
    return prompt


def base_graph(model=("2", 0)) -> dict:
    """Checkpoint, bundle, expansion and the three encodings of the example; ``model`` feeds the samplers."""
    prompt = example_prompt(steps=1)
    for node in ("4", "8", "13", "14", "15"):
        del prompt[node]
    prompt["11"]["inputs"]["model"] = list(model)
    return prompt


def sample_one_step(prompt: dict, guider: list, name: str) -> None:
    """One Euler step from the highest noise level: its ``denoised_output`` is the guider's denoised prediction."""
    node = f"sample_{name}"
    prompt[node] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {
            "noise": ["9", 0],
            "guider": guider,
            "sampler": ["10", 0],
            "sigmas": ["11", 0],
            "latent_image": ["12", 0],
        },
    }
    prompt[f"save_{name}"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [node, 1], "filename_prefix": f"test/{name}"},
    }
    prompt[f"save_{name}_x"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [node, 0], "filename_prefix": f"test/{name}_x"},
    }


def basic_guider(prompt: dict, cond: list, name: str, model=("2", 0)) -> None:
    prompt[f"guider_{name}"] = {"class_type": "BasicGuider", "inputs": {"model": list(model), "conditioning": cond}}
    sample_one_step(prompt, [f"guider_{name}", 0], name)


def saved_latents(entry: dict, output: Path) -> dict[str, torch.Tensor]:
    """The tensors SaveLatent wrote, by filename prefix (``test/<name>``)."""
    latents = {}
    for result in entry["outputs"].values():
        for item in result.get("latents", []):
            name = re.sub(r"_\d{5}_\.latent$", "", item["filename"])
            latents[name] = load_file(output / item["subfolder"] / item["filename"])["latent_tensor"]
    return latents


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------


def test_comfyui_loads_every_parrot_node(comfy_server, sd15):
    log = comfy_server.log_text()
    imports = log[log.index("Import times for custom nodes:") :].splitlines()
    ours = [line for line in imports[1:6] if "parrot-pipeline" in line]
    assert len(ours) == 1 and "IMPORT FAILED" not in ours[0], imports[:6]
    assert float(ours[0].split()[0]) < 1.0  # seconds: nothing heavy at import
    assert "Unable to parse pyproject.toml" not in log

    info = comfy_server.get("/object_info")
    for node_id, display_name in PARROT_NODES.items():
        assert info[node_id]["display_name"] == display_name
        assert info[node_id]["category"] == "Parrot"
    bundles = info["ParrotBundleLoader"]["input"]["required"]["bundle"][0]
    # The cached bundle under models/loras, the folders under models/parrot, the Hub bundle in the cache
    assert BUNDLE in bundles and "no-config" in bundles and "pickled" in bundles
    assert f"hf:{HUB_BUNDLE}" in bundles
    assert info["ParrotExpandPrompt"]["output_name"] == ["expanded", "original"]


def test_ui_workflow_is_its_api_twin(comfy_server):
    """Reading the UI workflow's widget values with ComfyUI's own input specs gives exactly the API twin."""
    workflow = json.loads(WORKFLOW.read_text())
    info = comfy_server.get("/object_info")
    links = {link[0]: link for link in workflow["links"]}
    converted = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]
        linked = {entry["name"]: links[entry["link"]] for entry in node["inputs"] if entry["link"] is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        for section in ("required", "optional"):
            for name in spec["input_order"].get(section, []):
                kind, options = (spec["input"][section][name] + [{}])[:2]
                is_widget = isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                value = next(values) if is_widget else None
                if is_widget and options.get("control_after_generate"):
                    assert next(values) in ("fixed", "increment", "decrement", "randomize")
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                elif is_widget:
                    inputs[name] = value
        assert next(values, None) is None, f"node {node['id']} has more widget values than {node['type']} has widgets"
        converted[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": node["title"]}}
    assert converted == json.loads(API_WORKFLOW.read_text())


def test_example_workflow_makes_an_image(comfy_server, sd15):
    """The example workflow runs at 64×64 with 2 steps; the expansion shown is the library's for the same seed."""
    entry = comfy_server.run_ok(example_prompt(steps=2, size=64))
    saved = entry["outputs"]["15"]["images"][0]
    image = np.asarray(Image.open(comfy_server.base / "output" / saved["subfolder"] / saved["filename"]))
    assert image.shape == (64, 64, 3)
    assert image.std() > 1  # an image, not a constant fill

    bundle = read_bundle(sd15 / "loras" / BUNDLE)
    lm, tokenizer = bundle.load_expander(torch_dtype=torch.float32)
    config = dataclasses.replace(bundle.config.expander, max_new_tokens=77)
    expansion = expand_prompts(lm, tokenizer, [PROMPT], config, seed=0)[0]
    assert entry["outputs"]["4"]["text"] == [compose_expanded_prompt(["<reward 1>", "<reward 2>"], expansion)]
    assert "Requested to load ExpanderModule" in comfy_server.log_text()  # the LM ran under ComfyUI's model management


def test_expansion_seed_and_reward_subset(comfy_server, sd15):
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "ParrotBundleLoader", "inputs": {"model": ["1", 0], "bundle": BUNDLE, "strength": 1.0}},
    }
    for name, seed, rewards in (("a", 7, "clip_score"), ("b", 8, "clip_score"), ("c", 7, "none")):
        prompt[f"expand_{name}"] = {
            "class_type": "ParrotExpandPrompt",
            "inputs": {"expander": ["2", 1], "prompt": PROMPT, "seed": seed, "max_new_tokens": 20, "rewards": rewards},
        }
        prompt[f"show_{name}"] = {"class_type": "PreviewAny", "inputs": {"source": [f"expand_{name}", 0]}}
    outputs = comfy_server.run_ok(prompt)["outputs"]
    a, b, c = (outputs[f"show_{name}"]["text"][0] for name in "abc")
    assert a.startswith("<reward 2>, ")
    assert a != b  # another seed, another expansion
    assert a == "<reward 2>, " + c  # same seed: same expansion, identifiers as asked


def test_parrot_guider_equals_dual_cfg_and_the_guidance_function(comfy_server, sd15):
    prompt = base_graph()
    prompt["parrot"] = {
        "class_type": "ParrotGuider",
        "inputs": {
            "model": ["2", 0],
            "original": ["5", 0],
            "expanded": ["6", 0],
            "negative": ["7", 0],
            "w1": W1,
            "w2": W2,
        },
    }
    sample_one_step(prompt, ["parrot", 0], "parrot")
    prompt["dual"] = {
        "class_type": "DualCFGGuider",
        "inputs": {"model": ["2", 0], "cond1": ["6", 0], "cond2": ["5", 0], "negative": ["7", 0],
                   "cfg_conds": W2, "cfg_cond2_negative": W1 + W2, "style": "regular"},
    }  # fmt: skip
    sample_one_step(prompt, ["dual", 0], "dual")
    prompt["parrot_w2_0"] = copy.deepcopy(prompt["parrot"])
    prompt["parrot_w2_0"]["inputs"]["w2"] = 0.0
    sample_one_step(prompt, ["parrot_w2_0", 0], "parrot_w2_0")
    prompt["cfg"] = {
        "class_type": "CFGGuider", "inputs": {"model": ["2", 0], "positive": ["5", 0], "negative": ["7", 0], "cfg": W1}
    }  # fmt: skip
    sample_one_step(prompt, ["cfg", 0], "cfg")
    for name, cond in (("original", "5"), ("expanded", "6"), ("negative", "7")):
        basic_guider(prompt, [cond, 0], name)
    prompt["ksampler_cond"] = {
        "class_type": "ParrotKSamplerConditioning",
        "inputs": {"original": ["5", 0], "expanded": ["6", 0], "w1": W1, "w2": W2},
    }
    prompt["ksampler"] = {
        "class_type": "KSampler",
        "inputs": {"model": ["2", 0], "seed": 0, "steps": 1, "cfg": ["ksampler_cond", 1], "sampler_name": "euler",
                   "scheduler": "normal", "positive": ["ksampler_cond", 0], "negative": ["7", 0],
                   "latent_image": ["12", 0], "denoise": 1.0},
    }  # fmt: skip
    prompt["save_ksampler"] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": ["ksampler", 0], "filename_prefix": "test/ksampler"},
    }
    # ComfyUI's guidance hooks: TCFG (pre-CFG) and CFGZeroStar (post-CFG) patched onto the model
    prompt["tcfg"] = {"class_type": "TCFG", "inputs": {"model": ["2", 0]}}
    prompt["hooked"] = {"class_type": "CFGZeroStar", "inputs": {"model": ["tcfg", 0]}}
    for name, node in (("parrot_hooked", "parrot"), ("parrot_w2_0_hooked", "parrot_w2_0"), ("cfg_hooked", "cfg")):
        prompt[name] = copy.deepcopy(prompt[node])
        prompt[name]["inputs"]["model"] = ["hooked", 0]
        sample_one_step(prompt, [name, 0], name)

    latents = saved_latents(comfy_server.run_ok(prompt), comfy_server.base / "output")
    parrot = latents["parrot"]
    assert_close(parrot, latents["dual"])
    assert_close(parrot, parrot_guidance(latents["negative"], latents["original"], latents["expanded"], W1, W2))
    assert (parrot - parrot_guidance(latents["negative"], latents["original"], None, W1, 0.0)).abs().max() > 1e-2
    assert torch.equal(latents["parrot_w2_0"], latents["cfg"])  # w2 = 0 is ComfyUI's CFG, bit for bit
    assert_close(latents["ksampler"], latents["parrot_x"])  # KSampler + Parrot Conditioning: the same step
    # The hooks see what they see under CFGGuider (w2 = 0), and act on the Parrot step too
    assert torch.equal(latents["parrot_w2_0_hooked"], latents["cfg_hooked"])
    assert (latents["cfg_hooked"] - latents["cfg"]).abs().max() > 1e-3
    assert (latents["parrot_hooked"] - parrot).abs().max() > 1e-3


def test_bundle_lora_is_comfyuis_lora_loader(comfy_server, sd15):
    """The Bundle Loader's model is LoraLoaderModelOnly's with the bundle's kohya file, every key loaded; the Hub
    cache copy of the bundle loads the same."""
    prompt = base_graph()
    prompt["lora_loader"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": BUNDLE_LORA, "strength_model": 0.7},
    }
    prompt["2"]["inputs"]["strength"] = 0.7
    prompt["hub_loader"] = {
        "class_type": "ParrotBundleLoader", "inputs": {"model": ["1", 0], "bundle": f"hf:{HUB_BUNDLE}", "strength": 0.7}
    }  # fmt: skip
    for name, model in (
        ("bundle", ("2", 0)),
        ("lora", ("lora_loader", 0)),
        ("hub", ("hub_loader", 0)),
        ("base", ("1", 0)),
    ):
        basic_guider(prompt, ["5", 0], name, model=model)
    log_start = len(comfy_server.log_text())
    latents = saved_latents(comfy_server.run_ok(prompt), comfy_server.base / "output")
    log = comfy_server.log_text()[log_start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log
    assert torch.equal(latents["bundle"], latents["lora"])
    assert torch.equal(latents["bundle"], latents["hub"])
    assert (latents["bundle"] - latents["base"]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("bundle", "prompt_text", "message"),
    [
        ("no-config", PROMPT, r"is not a Parrot bundle: the folder has no parrot_config\.json\. Put the whole"),
        ("pickled", PROMPT, r"pickle format \['extra_weights\.bin'\]; bundles must use \.safetensors only"),
        ("corrupt-kohya", PROMPT, r"parrot_lora_kohya\.safetensors could not be read as a safetensors file"),
        ("other-architecture", PROMPT, r"does not fit this model: it was trained on .* Load a checkpoint"),
        ("no-expander-folder", PROMPT, r"describes an expander but the expander/ folder is missing"),
        (
            "missing-expander-base",
            PROMPT,
            r"could not load the expander from expander/ \(base model .*deleted-expander-base",
        ),
        (BUNDLE, "   ", r"`prompt` is empty: type the short prompt"),
    ],
)
def test_bad_input_is_a_node_error_and_the_server_keeps_going(comfy_server, sd15, bundle, prompt_text, message):
    prompt = example_prompt()
    prompt["2"]["inputs"]["bundle"] = bundle
    prompt["3"]["inputs"]["prompt"] = prompt_text
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    assert re.search(message, execution_error(entry)), execution_error(entry)
    assert comfy_server.get("/system_stats")["system"]["comfyui_version"]


def test_a_name_outside_the_listed_bundles_is_refused_before_running(comfy_server, sd15):
    prompt = example_prompt()
    prompt["2"]["inputs"]["bundle"] = "../loras/" + BUNDLE
    status, answer = comfy_server.post("/prompt", {"prompt": prompt})
    assert status == 400
    assert answer["node_errors"]["2"]["errors"][0]["type"] == "value_not_in_list"
