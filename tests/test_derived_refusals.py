"""What a derived family refuses (issue 25, item 6 and the ops it does not have): each with one line naming
what is wrong, and nothing written. Also what the front door says of a derived build: `compose inspect`'s
derivation, the processor files it carries, the model card's loading class."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_trust_spec import refused

import derived_zoo as zoo
from compose.cli import main
from compose.sources import clear_cache


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("derived-refusals"), {}

    def get(t: str) -> Path:
        if t not in made:
            made[t] = zoo.save(root / t, t)
        return made[t]

    return get


def copy(src: Path, dest: Path) -> Path:
    clear_cache()
    return Path(shutil.copytree(src, dest))


def spec(tmp_path: Path, model: dict, **top) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"model": model, **top}))
    return str(path)


def load(ref: Path) -> dict:
    return {"op": "load", "ref": str(ref)}


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_model_type_transformers_does_not_know_runs_no_code(capsys, tmp_path, zoo_dir):
    src = copy(zoo_dir("olmo2"), tmp_path / "remote")
    edit_config(src, model_type="my_new_arch", architectures=["MyNewArchForCausalLM"],
                auto_map={"AutoModelForCausalLM": "modeling_mine.MyNewArchForCausalLM"})
    marker = tmp_path / "ran"
    (src / "modeling_mine.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], "'my_new_arch'", "trust_remote_code")
    assert not marker.exists()


def test_a_tensor_the_class_does_not_have_is_named(capsys, tmp_path, zoo_dir):
    src = copy(zoo_dir("olmo2"), tmp_path / "extra")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.self_attn.extra_proj.weight"] = weights["model.layers.1.self_attn.q_proj.weight"].clone()
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], "model.layers.1.self_attn.extra_proj.weight",
            "Olmo2ForCausalLM")


def test_a_tensor_the_checkpoint_lacks_is_named(capsys, tmp_path, zoo_dir):
    src = copy(zoo_dir("qwen2_5_vl"), tmp_path / "missing")
    weights = load_file(src / "model.safetensors")
    dropped = next(k for k in weights if k.startswith("visual."))
    del weights[dropped]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], f"no tensor {dropped}")


def test_a_tensor_of_another_shape_is_named(capsys, tmp_path, zoo_dir):
    src = copy(zoo_dir("olmo2"), tmp_path / "shape")
    edit_config(src, intermediate_size=96)
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], "mlp.", "has shape", "[96, 64]")


def test_a_config_transformers_rejects_quotes_its_reason(capsys, tmp_path, zoo_dir):
    src = copy(zoo_dir("cohere2"), tmp_path / "rejected")
    edit_config(src, layer_types=["sliding_attention"] * 3)
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], "transformers' Cohere2Config rejects config.json",
            "layer_types")


def test_a_quantized_checkpoint_is_refused(capsys, tmp_path, zoo_dir):
    src = copy(zoo_dir("olmo2"), tmp_path / "quantized")
    edit_config(src, quantization_config={"quant_method": "fp8"})
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], "quantized")


@pytest.mark.parametrize("model,needle", [
    ({"op": "moe", "kind": "upcycle", "model": "SRC", "num_experts": 2, "top_k": 1}, "needs a hand-written family"),
    ({"op": "calm", "anchor": "SRC", "augment": "SRC"}, "CALM needs a hand-written family"),
])
def test_ops_that_need_a_hand_written_module(capsys, tmp_path, zoo_dir, model, needle):
    src = load(zoo_dir("olmo2"))
    model = {k: (src if v == "SRC" else v) for k, v in model.items()}
    refused(capsys, tmp_path, ["build", spec(tmp_path, model)], needle, "olmo2")


@pytest.mark.parametrize("fmt", ["torch", "onnx", "gguf"])
def test_formats_that_need_a_hand_written_module(capsys, tmp_path, zoo_dir, fmt):
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(zoo_dir("olmo2"))), "--format", f"hf,{fmt}"],
            f"--format {fmt}", "Olmo2ForCausalLM")


def test_a_layer_order_a_field_cannot_say_is_refused(capsys, tmp_path, zoo_dir):
    """DeepSeek-V3's first_k_dense_replace counts leading dense layers: an MoE layer before a dense one is
    refused, naming the field and where its layers would be."""
    src = load(zoo_dir("deepseek_v3"))
    model = {"op": "stack", "slices": [{"op": "layers", "model": src, "start": 2, "stop": 4},
                                       {"op": "layers", "model": src, "start": 0, "stop": 2}]}
    refused(capsys, tmp_path, ["build", spec(tmp_path, model)], "first_k_dense_replace", "[2]")


def test_a_tokenizer_source_needs_a_hand_written_module(capsys, tmp_path, zoo_dir):
    src = str(zoo_dir("olmo2"))
    model = {"op": "merge", "method": "linear", "tokenizer_source": "union",
             "models": [{"model": {"op": "load", "ref": src}, "parameters": {"weight": 0.5}},
                        {"model": {"op": "load", "ref": src}, "parameters": {"weight": 0.5}}]}
    refused(capsys, tmp_path, ["build", spec(tmp_path, model)], "tokenizer_source", "olmo2")


def test_inspect_shows_the_derivation(capsys, tmp_path, zoo_dir):
    src = zoo_dir("glm4_moe")
    model = {"op": "expand_blocks", "model": load(src), "positions": [0, 3]}
    assert main(["inspect", spec(tmp_path, model)]) == 0
    out = capsys.readouterr().out
    assert f"family {src}: glm4_moe, derived from transformers' Glm4MoeForCausalLM: decoder stack model.layers" in out
    assert "per-layer fields: first_k_dense_replace (prefix)" in out
    assert "residual-output projections: mlp.down_proj.weight, mlp.experts.0.down_proj.weight" in out
    assert "rewritten first_k_dense_replace = 2" in out  # layer 0 (dense) and its copy lead
    assert "rewritten num_hidden_layers = 6" in out
    assert "%layers.1 = Layer(new copy of %0 layer 0, first_k_dense_replace=true)" in out


def test_processor_files_are_carried_and_checked(capsys, tmp_path, zoo_dir):
    """An image-text-to-text source's processor files go into the output (AutoImageProcessor loads them); one
    that names code of its own (auto_map) is refused, and nothing is written."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    src = copy(zoo_dir("llava"), tmp_path / "with-processor")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(src)
    out = tmp_path / "built"
    assert main(["build", spec(tmp_path, load(src)), "-o", str(out)]) == 0
    assert (out / "preprocessor_config.json").read_bytes() == (src / "preprocessor_config.json").read_bytes()
    assert AutoImageProcessor.from_pretrained(out).crop_size == {"height": 32, "width": 32}

    config = json.loads((src / "preprocessor_config.json").read_text())
    config["auto_map"] = {"AutoImageProcessor": "processing_mine.MyProcessor"}
    (src / "preprocessor_config.json").write_text(json.dumps(config))
    clear_cache()
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], "preprocessor_config.json", "auto_map")


def test_layers_that_take_deepstack_features_stay_leading(capsys, tmp_path, zoo_dir):
    """Qwen3-VL adds the vision tower's DeepStack features to its first decoder layers (as many as
    vision_config.deepstack_visual_indexes): a stack that moves another layer there is refused."""
    src = load(zoo_dir("qwen3_vl"))
    model = {"op": "stack", "slices": [{"op": "layers", "model": src, "start": 1, "stop": 4},
                                       {"op": "layers", "model": src, "start": 0, "stop": 1}]}
    refused(capsys, tmp_path, ["build", spec(tmp_path, model)], "deepstack_visual_indexes", "[3]")


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["export", "--format", "onnx"]])
def test_commands_that_need_generated_code_say_so(capsys, tmp_path, zoo_dir, command):
    out = tmp_path / "built"
    assert main(["build", spec(tmp_path, load(zoo_dir("olmo2"))), "-o", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main([command[0], str(out), *command[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Olmo2ForCausalLM" in err[0] and "load it with transformers" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_card_of_an_image_text_to_text_build_loads_it_as_one(tmp_path, zoo_dir):
    from huggingface_hub import ModelCard

    out = tmp_path / "built"
    assert main(["build", spec(tmp_path, load(zoo_dir("qwen2_5_vl"))), "-o", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text"
    assert "AutoModelForImageTextToText.from_pretrained(" in card.text


@pytest.mark.parametrize("key", ["num_hidden_layers", "n_routed_experts"])
def test_counts_are_bounded_before_the_class_is_built(capsys, tmp_path, zoo_dir, key):
    """A billion layers (or experts) would hang transformers' class even on the meta device: refused first."""
    src = copy(zoo_dir("deepseek_v3"), tmp_path / "huge")
    edit_config(src, **{key: 10**9})
    refused(capsys, tmp_path, ["build", spec(tmp_path, load(src))], key, "1,000,000,000")


def test_a_vl_class_whose_language_model_has_a_module_is_read_by_it(capsys, tmp_path, zoo_dir):
    """Gemma 3's image-text-to-text class holds a gemma3_text language model, which compose has a module for:
    that module reads the decoder's layers (and names what LLaMA-Pro zeroes), inside the derived class."""
    src = zoo_dir("gemma3")
    assert main(["inspect", spec(tmp_path, {"op": "expand_blocks", "model": load(src), "positions": [1]})]) == 0
    out = capsys.readouterr().out
    assert "language model: read by the hand-written gemma3_text module (families/gemma3.py)" in out
    assert "%layers.2 = Layer(new copy of %0 layer 1, layer_types=\"full_attention\", read by gemma3_text)" in out
