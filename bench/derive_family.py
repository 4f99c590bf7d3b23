"""What a derived family costs a build: deriving it from transformers' class for real models' config.json
shapes (no weights read or allocated), the identity check expand_blocks runs, and `compose --help`'s start-up
against mergekit's, all measured in this run.

    python bench/derive_family.py

Targets (issue 25): deriving adds at most 0.5 s to a build; `compose --help` stays under 1 s.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # SmolLM3-3B's shape (HuggingFaceTB/SmolLM3-3B config.json): 36 layers, NoPE every 4th layer.
    "smollm3 (3B)": {"model_type": "smollm3", "architectures": ["SmolLM3ForCausalLM"], "vocab_size": 128256,
                     "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                     "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 65536,
                     "tie_word_embeddings": True, "pad_token_id": 128004},
    # Qwen2.5-VL-3B-Instruct's shape: a 36-layer language model and a 32-block vision tower.
    "qwen2_5_vl (3B)": {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
                        "text_config": {"model_type": "qwen2_5_vl_text", "vocab_size": 151936, "hidden_size": 2048,
                                        "intermediate_size": 11008, "num_hidden_layers": 36,
                                        "num_attention_heads": 16, "num_key_value_heads": 2,
                                        "max_position_embeddings": 128000, "tie_word_embeddings": True,
                                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [16, 24, 24]}},
                        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                                          "out_hidden_size": 2048, "num_heads": 16},
                        "tie_word_embeddings": True},
    # GLM-4.5-Air's shape, cut to 3B-sized experts: dense first layer, then MoE layers with a shared expert.
    "glm4_moe (46 layers)": {"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "vocab_size": 151552,
                             "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
                             "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8,
                             "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1,
                             "num_experts_per_tok": 8, "first_k_dense_replace": 1},
}


def timed(fn, repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def startup(cmd: list[str]) -> float:
    return timed(lambda: subprocess.run(cmd, capture_output=True, check=True), repeats=3)


def main() -> None:
    t = time.perf_counter()
    from compose.families import derived  # noqa: F401 (the first derivation's imports are a build's anyway)
    import transformers  # noqa: F401

    print(f"import compose.families + transformers: {time.perf_counter() - t:.2f} s (once per process)")
    t = time.perf_counter()
    import transformers.modeling_utils  # noqa: F401

    print(f"import transformers.modeling_utils: {time.perf_counter() - t:.2f} s (once per process: a derived "
          "build's own start-up cost; a hand-written family's build does not import it)")
    print(f"{'config':<22}{'first':>8}{'again':>8}{'params':>16}{'identity check':>16}")
    for name, config in CONFIGS.items():
        text = json.dumps(config, sort_keys=True)
        t = time.perf_counter()
        d = derived.derivation(config, name)
        first = time.perf_counter() - t

        def again():
            derived._derive.cache_clear()
            derived._derive(text)

        params = sum(int.__mul__(*s[:2]) if len(s) > 1 else s[0] for s in d.names().values())
        t = time.perf_counter()
        derived.check_identity(config, 1, name)
        ident = time.perf_counter() - t
        print(f"{name:<22}{first:>7.3f}s{timed(again):>7.3f}s{params:>16,}{ident:>15.2f}s")
    print("target: deriving <= 0.5 s a source (the 'again' column: transformers' modules already imported)")
    exe = Path(sys.executable).parent
    ours = startup([str(exe / "compose"), "--help"])
    theirs = startup([str(exe / "mergekit-yaml"), "--help"]) if (exe / "mergekit-yaml").exists() else None
    line = f"compose --help: {ours:.2f} s (target < 1 s)"
    if theirs:
        line += f"; mergekit-yaml --help: {theirs:.2f} s; ratio {ours / theirs:.2f}x"
    print(line)


if __name__ == "__main__":
    main()
