"""A zoo of tiny random checkpoints for the derived family's parametrised tests.

Each entry of CASES names a transformers model_type and the config kwargs that shrink it (hidden 64, 4 heads,
vocab 256, 4 decoder layers, 4 experts with top-2 where it routes). Everything is built with transformers' OWN
config and model classes, nothing is downloaded, so a test can ask "does compose read every decoder transformers
can build" without a network or a hub cache. `save` writes what `save_pretrained` writes, nothing more.

The kwargs are chosen so that a checkpoint is not degenerate: untied lm_heads for most types (a few tied ones
stay tied), sliding windows (8) shorter than the test sequences (12), both kinds of layer wherever a type has a
layer pattern, dense and MoE layers where a type mixes them, and every parameter perturbed after init so that a
zero bias or a unit norm read from the wrong place shows. Per-layer lists (layer_types, no_rope_layers,
moe_layers) are never fixed here: the config classes derive them from num_hidden_layers (or _SIZED does, from the
same count), so `layers=` sizes them. VL types keep their text decoder in text_config, and `layers=` sizes that.

This is a test helper, deliberately independent of compose.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

VOCAB = 256
PAD, BOS, EOS = 0, 1, 2  # every case puts its special text ids here; text_inputs draws from [3, vocab)
WINDOW = 8  # sliding windows shorter than text_inputs' 12 tokens, so the window is actually crossed

# The shared shape of a tiny decoder; each entry overrides what its config names differently or needs.
_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS,
             eos_token_id=EOS, tie_word_embeddings=False)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def _t(**kw) -> dict:
    return {**_TINY, **kw}


# Image placeholder ids sit at the top of the tiny vocab, away from the text ids text_inputs draws.
IMAGE, VIDEO, V_START, V_END, BOI, EOI = 255, 254, 252, 253, 250, 251
IMAGE_SIZE, PATCH = 32, 8  # a 4x4 grid of patches per image

CASES: dict[str, dict] = {
    # ---- text decoders (AutoModelForCausalLM) ----
    # Qwen3.5's hybrid decoder: gated-delta-net linear attention and gated full attention, alternating.
    "qwen3_5_text": _t(head_dim=16, full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=16),
    "qwen3_next": _t(head_dim=16, full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4,
                     linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                     shared_expert_intermediate_size=32, **_MOE),
    # MLA: low-rank q and kv, a rope part and a no-rope part of each head; layer 0 dense, layers 1.. MoE.
    "deepseek_v3": _t(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                      qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, n_group=1,
                      topk_group=1, first_k_dense_replace=1, **_MOE),
    "glm4_moe": _t(head_dim=16, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                   first_k_dense_replace=1, use_qk_norm=True, **_MOE),
    # Attention sinks and biases; layer_types alternate sliding/full by default.
    "gpt_oss": _t(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                  max_position_embeddings=131072),  # = yarn's original 4096 x factor 32, as its rope expects
    # Gemma 4: per-layer-input embeddings off (hidden_size_per_layer_input=0, which the class allows); layer_types
    # from _SIZED (5 sliding : 1 full, the last full); full layers get their own (global) head_dim. Tied.
    "gemma4_text": _t(head_dim=16, global_head_dim=32, hidden_size_per_layer_input=0, vocab_size_per_layer_input=VOCAB,
                      sliding_window=WINDOW, final_logit_softcapping=30.0, tie_word_embeddings=True),
    "cohere2": _t(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2, logit_scale=0.5,
                  tie_word_embeddings=True),  # Command R7B is tied
    "olmo3": _t(sliding_window=WINDOW),  # sliding x3, full x1
    "olmo2": _t(),
    # Yarn rope with llama-4 attention scaling, from the class defaults; max positions = 16384 x factor 16.
    "ministral3": _t(head_dim=16, max_position_embeddings=262144),
    "ministral": _t(head_dim=16, sliding_window=WINDOW),
    "smollm3": _t(tie_word_embeddings=True),  # no_rope_layers: every 4th layer has no rope
    # Granite's four scalar multipliers, off 1.0 so that a reader ignoring one would show.
    "granite": _t(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.05),
    "granitemoe": _t(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0,
                     logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.05),
    "exaone4": _t(head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2),
    "ernie4_5": _t(head_dim=16, use_bias=True, tie_word_embeddings=True),
    # Layer 0 dense, 1.. MoE (moe_layer_end_index follows `layers`, see _SIZED).
    "ernie4_5_moe": _t(moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_intermediate_size=32,
                       moe_layer_start_index=1),
    "seed_oss": _t(head_dim=16, attention_bias=True, attention_dropout=0.0, residual_dropout=0.0),
    "hunyuan_v1_dense": _t(head_dim=16),
    # Every layer routes; the experts and the shared MLP both use intermediate_size.
    "hunyuan_v1_moe": _t(head_dim=16, intermediate_size=32, num_experts=4, moe_topk=2),
    # Odd layers MoE, even dense; every 4th layer has no rope and global attention, the rest chunked.
    "llama4_text": _t(head_dim=16, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
                      num_experts_per_tok=2, interleave_moe_layer_step=2, attention_chunk_size=WINDOW),
    "olmoe": _t(intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "starcoder2": _t(sliding_window=WINDOW, tie_word_embeddings=True),  # biases everywhere, LayerNorm
    "stablelm": _t(use_qkv_bias=True),  # partial rotary 0.25, LayerNorm
    "cohere": _t(logit_scale=0.5, use_qk_norm=True),
    "glm": _t(head_dim=16),  # partial rotary 0.5, qkv bias
    "glm4": _t(head_dim=16),  # glm plus post-attention/post-mlp norms
    "helium": _t(head_dim=16),
    "arcee": _t(head_dim=16),  # relu2 MLP without a gate
    # xIELU activation with learned parameters, qk norms, llama3 rope (whose original 8192 positions must be fewer).
    "apertus": _t(max_position_embeddings=65536),
    # Layer 0 dense, 1.. MoE with a shared expert.
    "dots1": _t(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, **_MOE),
    "bitnet": _t(),
    "nemotron": _t(head_dim=16),  # LayerNorm1P, relu2, partial rotary 0.5
    "phimoe": _t(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    # Falcon-7B style: one kv head (multi_query), parallel attention and MLP. Fields of its own names.
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128, num_hidden_layers=4,
                   num_attention_heads=4, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS,
                   eos_token_id=EOS, tie_word_embeddings=False),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS,
                     eos_token_id=EOS, tie_word_embeddings=False),
    "phi": _t(num_key_value_heads=4),  # partial rotary 0.5, biases, one LayerNorm per block
    "qwen2_moe": _t(num_experts=4, shared_expert_intermediate_size=64, **_MOE),  # shared expert with a gate
    "qwen3_moe": _t(head_dim=16, num_experts=4, **_MOE),
}

# ---- image-text-to-text (AutoModelForImageTextToText): a tiny vision tower and a tiny text decoder ----
_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=PATCH)
_QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                    temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64)
_VL_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS)

CASES.update({
    # Gemma 3: siglip, average-pooled to mm_tokens_per_image tokens; sliding/full alternate. Tied.
    "gemma3": dict(text_config=dict(_VL_TEXT, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                    sliding_window_pattern=2, tie_word_embeddings=True),
                   vision_config=_SIGLIP, mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=BOI,
                   eoi_token_index=EOI, tie_word_embeddings=True),
    # Mistral 3: pixtral with 2x2 patch merging; the decoder is a plain mistral.
    "mistral3": dict(text_config=dict(_VL_TEXT, model_type="mistral", tie_word_embeddings=False),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, head_dim=16, image_size=IMAGE_SIZE, patch_size=PATCH),
                     image_token_index=IMAGE, tie_word_embeddings=False),
    # Qwen2.5-VL: windowed vision attention (block 1 full), 3-part mrope summing to head_dim / 2.
    "qwen2_5_vl": dict(text_config=dict(_VL_TEXT, tie_word_embeddings=False,
                                        rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                             mrope_section=[2, 3, 3])),
                       vision_config=dict(_QWEN_VISION, window_size=16, fullatt_block_indexes=[1]),
                       image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
                       vision_end_token_id=V_END, tie_word_embeddings=False),
    # Qwen3-VL: interleaved mrope, deepstack features from vision block 0 added into decoder layer 0.
    "qwen3_vl": dict(text_config=dict(_VL_TEXT, tie_word_embeddings=False,
                                      rope_parameters=dict(rope_type="default", rope_theta=5e5,
                                                           mrope_section=[4, 2, 2], mrope_interleaved=True)),
                     vision_config=dict(_QWEN_VISION, num_position_embeddings=16, deepstack_visual_indexes=[0]),
                     image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
                     vision_end_token_id=V_END, tie_word_embeddings=False),
    # LLaVA: CLIP without its CLS token (default strategy), 16 patches -> 16 image tokens.
    "llava": dict(text_config=dict(_VL_TEXT, model_type="llama", tie_word_embeddings=False),
                  vision_config=dict(_SIGLIP, projection_dim=32), image_token_index=IMAGE,
                  image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False),
    # Llama 4: a pixel-shuffled vision tower (ratio 0.5: 16 patches -> 4 tokens), the llama4_text MoE decoder.
    "llama4": dict(text_config=dict(_VL_TEXT, intermediate_size=32, intermediate_size_mlp=128, num_local_experts=4,
                                    num_experts_per_tok=2, interleave_moe_layer_step=2,
                                    attention_chunk_size=WINDOW, tie_word_embeddings=False),
                   vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH,
                                      vision_output_dim=64, projector_input_dim=64, projector_output_dim=64),
                   image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI, tie_word_embeddings=False),
    # Aya Vision: siglip, pixel shuffle by 2 (16 patches -> 4 tokens), a cohere2 decoder. Tied like cohere2.
    "aya_vision": dict(text_config=dict(_VL_TEXT, sliding_window=WINDOW, sliding_window_pattern=2,
                                        tie_word_embeddings=True),
                       vision_config=_SIGLIP, image_token_index=IMAGE, tie_word_embeddings=True),
    # Qwen3.5 VL: the hybrid linear-attention decoder of qwen3_5_text behind a Qwen3-VL-style tower. Its rope is
    # partial (0.25 of head_dim 32 = 8 dims), so the mrope sections sum to 4.
    "qwen3_5": dict(text_config=dict(_VL_TEXT, head_dim=32, full_attention_interval=2, linear_num_key_heads=2,
                                     linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                     tie_word_embeddings=False,
                                     rope_parameters=dict(rope_type="default", rope_theta=1e7,
                                                          partial_rotary_factor=0.25, mrope_section=[2, 1, 1],
                                                          mrope_interleaved=True)),
                    vision_config=dict(_QWEN_VISION, num_position_embeddings=16),
                    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START,
                    vision_end_token_id=V_END, tie_word_embeddings=False),
})

VL: frozenset[str] = frozenset({"gemma3", "mistral3", "qwen2_5_vl", "qwen3_vl", "llava", "llama4", "aya_vision",
                                "qwen3_5"})

# Config values that follow the layer count without being a per-layer list the class derives itself.
_SIZED = {
    "ernie4_5_moe": lambda n: {"moe_layer_end_index": n - 1},  # MoE up to the last layer, as in the real model
    # Gemma 4's own derivation (every 6th layer full), with the last layer full up front: the class would force it
    # and warn on every build.
    "gemma4_text": lambda n: {"layer_types": ["sliding_attention" if (i + 1) % 6 and i < n - 1 else "full_attention"
                                              for i in range(n)]},
}


def config(model_type: str, layers: int | None = None):
    """The tiny transformers config of `model_type`; `layers` sets the (text) decoder's depth."""
    from transformers import AutoConfig

    kw = copy.deepcopy(CASES[model_type])
    text = kw["text_config"] if model_type in VL else kw
    if layers is not None:
        text["num_hidden_layers"] = layers
    text.update(_SIZED.get(model_type, lambda n: {})(text["num_hidden_layers"]))
    return AutoConfig.for_model(model_type, **kw)


def model_class(model_type: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if model_type in VL else AutoModelForCausalLM


def save(folder, model_type: str, seed: int = 0, layers: int | None = None) -> Path:
    """A random float32 checkpoint of `model_type`, written by save_pretrained into `folder`."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = model_class(model_type).from_config(config(model_type, layers), dtype=torch.float32)
    with torch.no_grad():  # init leaves biases at 0 and norms at 1: nudge everything so a misread shows
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def _special_ids(cfg) -> set[int]:
    """Every token id a config names (pad/bos/eos, image/video/boi/eoi ...), nested configs included."""
    found: set[int] = set()

    def walk(d: dict):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            elif isinstance(k, str) and k.endswith(("token_id", "token_index", "token_ids")):
                found.update(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int))

    walk(cfg.to_dict())
    return found


def text_inputs(model_type: str, seed: int = 0) -> dict:
    """Two sequences of 12 ordinary text ids: none is a special or placeholder token of the config."""
    cfg = config(model_type)
    vocab = cfg.get_text_config().vocab_size
    allowed = torch.tensor(sorted(set(range(3, vocab)) - _special_ids(cfg)))
    pick = torch.randint(0, len(allowed), (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": allowed[pick]}


def _image_tokens(model_type: str, cfg) -> int:
    """How many placeholder tokens one IMAGE_SIZE x IMAGE_SIZE image takes in the text."""
    patches = (IMAGE_SIZE // PATCH) ** 2
    if model_type == "gemma3":
        return cfg.mm_tokens_per_image
    if model_type == "llava":
        return patches
    return patches // 4  # 2x2 merge (qwen, pixtral), pixel shuffle by 2 (aya) or by ratio 0.5 (llama4)


def image_inputs(model_type: str, seed: int = 0) -> dict:
    """Forward kwargs for one image in one sequence: text ids around the image's placeholders, the pixels,
    and whatever else the class asks for (grids, sizes, token types), built without a processor."""
    cfg = config(model_type)
    g = torch.Generator().manual_seed(seed)
    words = text_inputs(model_type, seed)["input_ids"][0]
    image = [IMAGE] * _image_tokens(model_type, cfg)
    if model_type in ("qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        image = [V_START, *image, V_END]  # mrope finds an image by its vision-start token
    elif model_type in ("gemma3", "llama4"):
        image = [BOI, *image, EOI]
    ids = torch.tensor([[BOS, *words[:4].tolist(), *image, *words[4:].tolist()]])
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model_type in ("qwen2_5_vl", "qwen3_vl", "qwen3_5"):
        grid = IMAGE_SIZE // PATCH
        v = cfg.vision_config
        # Patches flattened as the Qwen processors do: one row of C * T * P * P values per patch.
        out["pixel_values"] = torch.randn(grid * grid, 3 * v.temporal_patch_size * PATCH * PATCH, generator=g)
        out["image_grid_thw"] = torch.tensor([[1, grid, grid]])
        out["mm_token_type_ids"] = (ids == IMAGE).int()  # 1 marks image tokens; without it mrope is not used
    else:
        out["pixel_values"] = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    if model_type == "mistral3":
        out["image_sizes"] = torch.tensor([[IMAGE_SIZE, IMAGE_SIZE]])
    if model_type == "gemma3":
        out["token_type_ids"] = (ids == IMAGE).long()  # images attend bidirectionally within themselves
    return out
