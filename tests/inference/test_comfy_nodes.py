"""The ComfyUI node pack without ComfyUI: definitions, input checks, where bundles are found, the example
workflows and the packaging files. What needs ComfyUI itself is in tests/comfy_integration/."""

from __future__ import annotations

import inspect
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfy_nodes.nodes import (
    ParrotExpandPrompt,
    ParrotGuider,
    ParrotKSamplerConditioning,
    check_prompt,
    parse_rewards,
)
from comfy_nodes.paths import cached_hub_bundles, local_bundles, resolve_bundle
from parrot_pipeline import ParrotConfig

from ..helpers import add_to_hub_cache

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / "example_workflows" / "parrot_sd15.json"
API_WORKFLOW = REPO / "example_workflows" / "api" / "parrot_sd15_api.json"
# Every node is defined in one place; the loader's bundle list needs ComfyUI's folder_paths, the others don't.
OFFLINE_NODES = {"ParrotExpandPrompt", "ParrotGuider", "ParrotKSamplerConditioning"}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def config(**kwargs) -> ParrotConfig:
    return ParrotConfig(
        **{"base_model": "base", "reward_names": ["aesthetic", "clip_score", "sentiment"],
           "reward_identifiers": ["<reward 1>", "<reward 2>", "<reward 3>"], **kwargs}
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Definitions


def test_every_node_is_registered_with_a_display_name_and_a_consistent_definition():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    assert set(NODE_CLASS_MAPPINGS) == OFFLINE_NODES | {"ParrotBundleLoader"}
    for node in NODE_CLASS_MAPPINGS.values():
        assert node.CATEGORY == "Parrot"
        assert callable(getattr(node, node.FUNCTION))
        assert len(getattr(node, "RETURN_NAMES", node.RETURN_TYPES)) == len(node.RETURN_TYPES)
        assert len(getattr(node, "OUTPUT_TOOLTIPS", node.RETURN_TYPES)) == len(node.RETURN_TYPES)


@pytest.mark.parametrize("node_id", sorted(OFFLINE_NODES))
def test_declared_inputs_are_the_function_arguments(node_id):
    """ComfyUI calls FUNCTION with one keyword argument per declared input."""
    node = NODE_CLASS_MAPPINGS[node_id]
    declared = list(node.INPUT_TYPES()["required"])
    parameters = list(inspect.signature(getattr(node, node.FUNCTION)).parameters)[1:]
    assert declared == parameters
    for kind, *options in node.INPUT_TYPES()["required"].values():
        if kind in ("INT", "FLOAT"):
            assert options[0]["min"] <= options[0]["default"] <= options[0]["max"]


def test_importing_the_pack_loads_no_model_library_and_no_comfyui():
    """ComfyUI imports the checkout as a package from its folder, as this does: it must cost nothing heavy."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO / '__init__.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "heavy = ['torch', 'diffusers', 'transformers', 'peft', 'parrot_pipeline', 'comfy', 'folder_paths']\n"
        "print(sorted(module.NODE_CLASS_MAPPINGS), [name for name in heavy if name in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True)
    assert result.stdout.strip() == f"{sorted(NODE_CLASS_MAPPINGS)} []"


# ---------------------------------------------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize(
    ("text", "expected"),
    [("all", None), (" ALL ", None), ("none", []), ("", []), ("clip_score", ["clip_score"]),
     ("sentiment, aesthetic", ["sentiment", "aesthetic"])],
)  # fmt: skip
def test_rewards_field(text, expected):
    assert parse_rewards(text) == expected


def test_rewards_field_refuses_an_empty_entry():
    with pytest.raises(ValueError, match="`rewards` 'aesthetic,,sentiment' has an empty entry"):
        parse_rewards("aesthetic,,sentiment")


def test_reward_names_select_identifiers_in_the_given_order():
    assert config().select_identifiers(["sentiment", "aesthetic"], field="rewards") == ["<reward 3>", "<reward 1>"]
    with pytest.raises(ValueError, match=r"Unknown entry 'beauty' in `rewards`: .* reward names \['aesthetic'"):
        config().select_identifiers(["beauty"], field="rewards")
    without = config(reward_identifiers=[])
    with pytest.raises(ValueError, match="`rewards`: this bundle has no reward identifiers"):
        without.select_identifiers(["aesthetic"], field="rewards")


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_an_empty_prompt_is_refused_before_the_expander_runs(prompt):
    with pytest.raises(ValueError, match="`prompt` is empty: type the short prompt"):
        check_prompt(prompt)
    with pytest.raises(ValueError, match="`prompt` is empty"):
        ParrotExpandPrompt().expand(expander=None, prompt=prompt, seed=0, max_new_tokens=8, rewards="all")


@pytest.mark.parametrize(("w1", "w2", "field"), [(math.nan, 1.0, "w1"), (1.0, -0.5, "w2"), (1.0, math.inf, "w2")])
def test_guidance_scales_are_checked(w1, w2, field):
    """ComfyUI checks min/max of typed values; NaN and infinity pass that check, so the nodes check again."""
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number ≥ 0"):
        ParrotGuider().get_guider(model=None, original=[], expanded=[], negative=[], w1=w1, w2=w2)
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number ≥ 0"):
        ParrotKSamplerConditioning().combine(original=[], expanded=[], w1=w1, w2=w2)


def test_ksampler_conditioning_weights_each_prompt_and_sums_the_scales():
    original = [[torch.ones(1, 77, 8), {"pooled_output": torch.zeros(1, 8)}]]
    expanded = [[torch.zeros(1, 154, 8), {"strength": 0.5}]]
    positive, cfg = ParrotKSamplerConditioning().combine(original, expanded, w1=3.0, w2=2.0)
    assert cfg == 5.0
    assert [entry[0] for entry in positive] == [original[0][0], expanded[0][0]]
    assert positive[0][1] == {"pooled_output": original[0][1]["pooled_output"], "strength": 3.0}
    assert positive[1][1] == {"strength": 1.0}
    assert original[0][1] == {"pooled_output": original[0][1]["pooled_output"]}  # the inputs are left as they were


# ---------------------------------------------------------------------------------------------------------------
# Where bundles are found


def make_bundle(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "parrot_config.json").write_text("{}")
    return folder


def test_bundles_in_comfyuis_model_folders(tmp_path):
    loras, parrot, more = tmp_path / "loras", tmp_path / "parrot", tmp_path / "more-parrot"
    make_bundle(loras / "sub" / "nested")
    (loras / "plain_lora.safetensors").write_bytes(b"")
    (loras / "style-loras").mkdir()  # an ordinary folder of LoRA files: not a bundle
    make_bundle(parrot / "top")
    (parrot / "incomplete").mkdir()  # listed, so that the loader can say what is missing
    make_bundle(parrot / ".top.building-123")  # a bundle being written
    make_bundle(parrot / "sub" / "nested")  # the same name as in loras/: the first folder wins
    make_bundle(more / "extra")
    (parrot / "linked").symlink_to(make_bundle(tmp_path / "elsewhere"), target_is_directory=True)

    found = local_bundles([loras], [parrot, more, tmp_path / "missing"])
    assert sorted(found) == ["extra", "incomplete", "linked", "sub", "sub/nested", "top"]
    assert found["sub/nested"] == loras / "sub" / "nested"
    assert found["linked"] == parrot / "linked"


def test_only_listed_names_resolve(tmp_path):
    make_bundle(tmp_path / "parrot" / "mine")
    make_bundle(tmp_path / "outside")
    bundles = local_bundles([], [tmp_path / "parrot"])
    assert resolve_bundle("mine", bundles) == tmp_path / "parrot" / "mine"
    for name in ("../outside", str(tmp_path / "outside"), "mine/..", "hf:someone/else"):
        with pytest.raises(
            ValueError, match=rf"Parrot bundle '{name}' was not found\. Put bundle folders in .* found: mine\."
        ):
            resolve_bundle(name, bundles)


def test_hub_bundles_come_from_the_local_cache_only(tmp_path, bundle_dir, tiny_expander_dir):
    cache = tmp_path / "hub"
    snapshot = add_to_hub_cache(cache, "someone/parrot-bundle", bundle_dir)
    add_to_hub_cache(cache, "someone/plain-model", tiny_expander_dir)  # a cached model that is no bundle
    assert cached_hub_bundles(cache) == {"hf:someone/parrot-bundle": snapshot}
    assert (snapshot / "parrot_config.json").read_bytes() == (bundle_dir / "parrot_config.json").read_bytes()
    assert cached_hub_bundles(tmp_path / "no-cache-yet") == {}


# ---------------------------------------------------------------------------------------------------------------
# Example workflows and packaging


def test_ui_workflow_graph_is_consistent():
    workflow = json.loads(WORKFLOW.read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == len(workflow["links"])
    for link_id, source, source_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[source]["outputs"][source_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[source]["outputs"][source_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["type"] in (kind, "*")


def test_workflows_use_the_parrot_nodes_as_declared():
    """The Parrot nodes of both files: API inputs are the function's arguments, widget values fit their specs and
    are the UI file's, links leave from existing outputs."""
    api = json.loads(API_WORKFLOW.read_text())
    ui = {str(node["id"]): node for node in json.loads(WORKFLOW.read_text())["nodes"]}
    assert {key: node["class_type"] for key, node in api.items()} == {key: node["type"] for key, node in ui.items()}
    used = {node["class_type"] for node in api.values()} & set(NODE_CLASS_MAPPINGS)
    assert used == {"ParrotBundleLoader", "ParrotExpandPrompt", "ParrotGuider"}
    for key, node in api.items():
        for value in node["inputs"].values():
            if isinstance(value, list) and api[value[0]]["class_type"] in NODE_CLASS_MAPPINGS:
                assert value[1] < len(NODE_CLASS_MAPPINGS[api[value[0]]["class_type"]].RETURN_TYPES)
        if node["class_type"] not in NODE_CLASS_MAPPINGS:
            continue
        parrot_node = NODE_CLASS_MAPPINGS[node["class_type"]]
        assert set(node["inputs"]) == set(inspect.signature(getattr(parrot_node, parrot_node.FUNCTION)).parameters) - {
            "self"
        }
        if node["class_type"] not in OFFLINE_NODES:
            continue
        values = iter(ui[key]["widgets_values"])
        for name, (kind, *options) in parrot_node.INPUT_TYPES()["required"].items():
            if kind not in WIDGET_TYPES:
                continue
            assert next(values) == node["inputs"][name]
            if kind in ("INT", "FLOAT"):
                assert options[0]["min"] <= node["inputs"][name] <= options[0]["max"]
            if options[0].get("control_after_generate"):
                assert next(values) == "fixed"
        assert next(values, None) is None


def test_requirements_txt_is_the_package_dependencies_without_torch():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [
        line for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")
    ]
    assert sorted(requirements) == sorted(d for d in project["project"]["dependencies"] if not d.startswith("torch"))
    assert project["tool"]["comfy"]["PublisherId"] and project["tool"]["comfy"]["DisplayName"]
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["parrot_pipeline*"]


def test_every_dependency_has_a_floor_and_ci_pins_the_highest():
    """CI's floors leg pins what .ci/floors.py prints: every dependency needs a lower bound to be pinned at, and a
    package named in several places (transformers: 4.57.1 for inference, 5.6 for training) gets its highest."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert [r for r in requirements if ">=" not in r] == []

    def floors(*extras):
        result = subprocess.run([sys.executable, ".ci/floors.py", *extras], cwd=REPO, capture_output=True, text=True)
        return dict(line.split("==") for line in result.stdout.split())

    inference, training = floors("dev"), floors("train", "dev")
    assert inference["transformers"] == "4.57.1" and training["transformers"] == "5.6"
    assert inference["huggingface-hub"] == "0.34" and training["huggingface-hub"] == "1.5"
    assert "torch" not in training and training["torchvision"] == "0.29.1", "CI installs torch from its own files"
