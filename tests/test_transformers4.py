"""compose's outputs as transformers 4.x reads them (Optimum, vLLM and many users still pin it).

transformers 5 reads `rope_parameters`; 4.x reads `rope_theta` and `rope_scaling` (Gemma 3: also
`rope_local_base_freq`) and falls back to its own defaults without them: Mixtral's theta is then 1e6
instead of the model's 1e4, and the logits are off by up to 1.0. compose writes both styles, so each
output here is loaded by transformers 4.x itself, in a process of its own (tests/transformers4_worker.py),
and must compute transformers 5's logits of the same folder (and, for the sources made by transformers,
the source's logits).

transformers 4.x is installed once into a cache folder (`pip install --target`, torch reused from this
venv, see `transformers4` below); without a package registry the test skips, saying why.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from compose import build, calm, depth_upscale, expand_blocks, load, merge, moe, visual_expert
from conftest import load_hf, save_hf_model

HERE = Path(__file__).parent
REQUIREMENTS = ("transformers>=4.46,<5", "huggingface_hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0",
                "requests", "urllib3", "certifi", "charset-normalizer", "idna")
"""transformers 4.x and what it needs that this venv (transformers 5) has in another version or not at
all; the rest (torch, numpy, safetensors, regex, pyyaml, tqdm, filelock, packaging) comes from the venv."""
INSTALL_TIMEOUT = 300
ORIGINAL = 32
SEQ = 64
"""Past ORIGINAL: the scaled ropes switch (longrope's long factors, dynamic's grown theta) inside the batch."""


@pytest.fixture(scope="session")
def transformers4() -> Path:
    """A folder holding transformers 4.x (cached under ~/.cache/compose-test, or $COMPOSE_TEST_CACHE)."""
    key = hashlib.sha256(" ".join(REQUIREMENTS).encode()).hexdigest()[:12]
    root = Path(os.environ.get("COMPOSE_TEST_CACHE", "~/.cache/compose-test")).expanduser()
    folder = root / f"transformers4-{key}"
    if not (folder / ".complete").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".transformers4-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.monotonic()
        try:
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                                *REQUIREMENTS], capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except subprocess.TimeoutExpired:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"installing transformers 4.x took over {INSTALL_TIMEOUT} s")
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("WARNING: Location")]
            pytest.skip("cannot install transformers 4.x (no package registry?): " + " | ".join(lines[-3:]))
        (tmp / ".complete").write_text(f"{' '.join(REQUIREMENTS)}\ninstalled in {time.monotonic() - start:.1f} s\n")
        try:
            tmp.rename(folder)  # atomic: a concurrent run that got there first wins, and this copy goes
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def run_transformers4(folder: Path, cases: dict, tmp: Path, generate: dict | None = None) -> dict:
    """The worker's result for `cases` (name -> {"folder", "ids"}) and `generate` (name -> {"folder", "ids",
    "mask", "runs"}), computed under transformers 4.x."""
    job, out = tmp / "job.json", tmp / "result.pt"
    job.write_text(json.dumps({"cases": cases, "generate": generate or {}, "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, str(HERE / "transformers4_worker.py"), str(job)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


ROPES = {
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 20000.0, "factor": 2.0},
                    max_position_embeddings=ORIGINAL),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": ORIGINAL},
                   max_position_embeddings=8 * ORIGINAL),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0,
                                  "original_max_position_embeddings": ORIGINAL},
                 max_position_embeddings=4 * ORIGINAL),
    "longrope": dict(rope_parameters={"rope_type": "longrope", "rope_theta": 20000.0,
                                      "original_max_position_embeddings": ORIGINAL,
                                      "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                      "long_factor": [1.0 + 0.7 * i for i in range(8)]},
                     max_position_embeddings=4 * ORIGINAL),
    # A factor of its own (2, not max_position_embeddings / original = 4): 4.x derives its attention factor
    # from 4, so compose writes the one transformers 5 derives from 2.
    "longrope_factor": dict(rope_parameters={"rope_type": "longrope", "rope_theta": 20000.0, "factor": 2.0,
                                             "original_max_position_embeddings": ORIGINAL,
                                             "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                             "long_factor": [1.0 + 0.7 * i for i in range(8)]},
                            max_position_embeddings=4 * ORIGINAL),
}


def _sources(root: Path) -> dict[str, Path]:
    """Models of transformers' own classes with ropes 4.x's defaults would get wrong, saved by transformers 5."""
    out = {f"llama_{name}": save_hf_model(root / f"llama_{name}", "llama", seed=40 + i, layers=2, perturb_all=True,
                                          **rope)
           for i, (name, rope) in enumerate(ROPES.items())}
    out["qwen2_yarn"] = save_hf_model(root / "qwen2_yarn", "qwen2", seed=50, layers=2, tie=True, perturb_all=True,
                                      **ROPES["yarn"])
    # Phi-3.5's long context: longrope, its original context at the top level as Phi3Config keeps it.
    out["phi3_longrope"] = save_hf_model(root / "phi3_longrope", "phi3", seed=51, layers=2, perturb_all=True,
                                         rope_parameters={k: v for k, v in ROPES["longrope"]["rope_parameters"].items()
                                                          if k != "original_max_position_embeddings"},
                                         original_max_position_embeddings=ORIGINAL,
                                         max_position_embeddings=4 * ORIGINAL)
    # Phi-4-mini's attention: 3/4 of each head rotates (6 pairs of head_dim 16), longrope, a tied head.
    out["phi4_mini"] = save_hf_model(root / "phi4_mini", "phi3", seed=53, layers=2, perturb_all=True, tie=True,
                                     partial_rotary_factor=0.75, original_max_position_embeddings=ORIGINAL,
                                     max_position_embeddings=4 * ORIGINAL,
                                     rope_parameters={"rope_type": "longrope", "rope_theta": 20000.0,
                                                      "short_factor": [1.0 + 0.3 * i for i in range(6)],
                                                      "long_factor": [1.0 + 1.2 * i for i in range(6)]})
    # Gemma 3: a scaled global rope and a local theta, neither of them 4.x's defaults (1e6 unscaled, 1e4).
    out["gemma3"] = save_hf_model(root / "gemma3", "gemma3", seed=52, layers=3, perturb_all=True,
                                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                      "rope_theta": 250000.0},
                                                   "sliding_attention": {"rope_type": "default",
                                                                         "rope_theta": 20000.0}})
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """name -> (compose's output folder, the transformers source it was built from or None)."""
    root = tmp_path_factory.mktemp("transformers4")
    sources = _sources(root / "src")
    specs = {
        "llama_llama3_pro": (expand_blocks(load(str(sources["llama_llama3"])), groups=1), "llama_llama3"),
        **{name: (load(str(src)), name) for name, src in sources.items() if name not in ("llama_llama3", "gemma3")},
        "gemma3_solar": (depth_upscale(load(str(sources["gemma3"])), drop=1), None),
        # The case: a Mixtral of a theta-1e4 Llama, which 4.x read with its default 1e6.
        "mixtral": (moe.upcycle(load("tiny:llama?layers=2"), num_experts=4, top_k=2, noise=0.02, seed=1), None),
        "qwen2_moe": (moe.fine_grained(load("tiny:llama?layers=3"), segments=4, routed=8, shared=2, top_k=2,
                                       noise=0.02, first_k_dense=1), None),
        "qwen3_moe": (moe.upcycle(load("tiny:qwen3?layers=2"), num_experts=4, top_k=2, noise=0.02, seed=2), None),
        "mistral": (load("tiny:mistral?layers=2"), None),
        "qwen2": (load("tiny:qwen2?layers=2"), None),
        "qwen3": (load("tiny:qwen3?layers=2"), None),
        "gemma2": (load("tiny:gemma2?layers=2"), None),
        "phi3": (load("tiny:phi3?layers=2"), None),
        # No transformers class holds a Gemma 2 MoE: compose's generated code, loaded through auto_map.
        "gemma2_moe": (moe.fine_grained(load("tiny:gemma2?layers=2"), segments=4, routed=8, shared=2, top_k=2,
                                        noise=0.02), None),
        "slerp": (merge.slerp(load("tiny:llama?layers=2&seed=1"), load("tiny:llama?layers=2&seed=2"), t=0.3), None),
        # Composites: generated code in several files behind the auto_map (text-only input for CogVLM).
        "calm": (calm(anchor=load("tiny:llama?layers=4"), augment=load("tiny:qwen2?layers=2"), every=2, heads=4),
                 None),
        "cogvlm": (visual_expert(load("tiny:llama?layers=2"), vision_width=32), None),
    }
    return {name: (build(spec, root / "out" / name, progress=False), sources.get(src) if src else None)
            for name, (spec, src) in specs.items()}


def _ids(folder: Path, seed: int) -> torch.Tensor:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


GENERATED = ("calm", "cogvlm", "gemma2_moe")
"""The outputs whose `generate` is compose's generated wrapper on transformers' GenerationMixin (the others are
transformers' own classes)."""
PAD = 0
RUNS = [dict(do_sample=False, max_new_tokens=8, eos_token_id=3, pad_token_id=PAD, num_beams=1),
        dict(do_sample=False, max_new_tokens=6, num_beams=3, num_return_sequences=2, pad_token_id=PAD)]
"""Greedy with an eos (rows stop at different steps, and are padded after), and beams (the cache reordered)."""


def _perturbed(out: Path, dest: Path) -> Path:
    """A copy of `out` whose weights are all moved off their init (seeded by name), so that CALM's
    cross-attention and CogVLM's visual expert reach the logits: at init both compute their source exactly."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(out, dest)
    tensors = load_file(dest / "model.safetensors")
    for k, v in tensors.items():
        g = torch.Generator().manual_seed(sum(map(ord, k)))
        scale = 0.5 if k.startswith("cross.") and k.endswith("o_proj.weight") else 0.05
        tensors[k] = v + scale * torch.randn(v.shape, generator=g)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _padded_rows(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    rows = [torch.randint(4, vocab, (n,), generator=g) for n in (21, 14, 9)]
    ids = torch.full((3, 21), PAD)
    mask = torch.zeros(3, 21, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 21 - len(r):], mask[b, 21 - len(r):] = r, 1
    return ids, mask


@pytest.fixture(scope="module")
def logits4(transformers4, outputs, tmp_path_factory):
    cases = {name: {"folder": str(out), "ids": _ids(out, i).tolist()} for i, (name, (out, _)) in
             enumerate(sorted(outputs.items()))}
    root = tmp_path_factory.mktemp("t4gen")
    generate = {}
    for name in GENERATED:
        folder = _perturbed(outputs[name][0], root / name)
        ids, mask = _padded_rows(json.loads((folder / "config.json").read_text())["vocab_size"])
        generate[name] = {"folder": str(folder), "ids": ids.tolist(), "mask": mask.tolist(), "runs": RUNS}
    result = run_transformers4(transformers4, cases, tmp_path_factory.mktemp("t4job"), generate)
    assert result["version"].startswith("4."), result["version"]
    result["generate_cases"] = generate
    return result


@pytest.mark.parametrize("name", GENERATED)
def test_transformers4_generate_is_transformers5s(outputs, logits4, name):
    """The generated wrapper's generate() under transformers 4.x's GenerationMixin gives the tokens transformers
    5's gives on the same (perturbed) folder: a left-padded batch, greedy with eos and with beams."""
    assert f"generate:{name}" not in logits4["errors"], logits4["errors"][f"generate:{name}"]
    case = logits4["generate_cases"][name]
    model = AutoModelForCausalLM.from_pretrained(case["folder"], dtype=torch.float32, trust_remote_code=True).eval()
    ids, mask = torch.tensor(case["ids"]), torch.tensor(case["mask"])
    for run, got in zip(RUNS, logits4["generated"][name], strict=True):
        want = model.generate(ids, attention_mask=mask, **run)
        assert torch.equal(got, want), run
    # the perturbation reaches the tokens: the model differs from its unperturbed build
    plain = AutoModelForCausalLM.from_pretrained(outputs[name][0], dtype=torch.float32, trust_remote_code=True)
    assert not torch.equal(plain.eval().generate(ids, attention_mask=mask, **RUNS[0]), logits4["generated"][name][0])


NAMES = ["llama_llama3_pro", "llama_linear", "llama_dynamic", "llama_yarn", "llama_longrope", "llama_longrope_factor",
         "qwen2_yarn", "phi3_longrope", "phi4_mini", "gemma3_solar", "mixtral", "qwen2_moe", "qwen3_moe", "mistral",
         "qwen2", "qwen3", "gemma2", "phi3", "gemma2_moe", "slerp", "calm", "cogvlm"]


COMPOSITES = {"calm", "cogvlm"}
"""Their config.json is compose's own (the generated code takes its rope from the module it wrote, not from
rope keys), and they are outputs only: compose does not read them back as sources."""


def test_every_case_is_listed(outputs):
    assert sorted(NAMES) == sorted(outputs)


@pytest.mark.parametrize("name", NAMES)
def test_transformers4_computes_transformers5s_logits(outputs, logits4, name):
    """transformers 4.x's logits of compose's output equal transformers 5's of the same folder (fp32), and
    those equal the source's where transformers made the source."""
    out, src = outputs[name]
    assert name not in logits4["errors"], logits4["errors"][name]
    ids = _ids(out, sorted(outputs).index(name))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()(ids).logits
        if src is not None:
            torch.testing.assert_close(want, load_hf(src)(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits4["logits"][name], want, atol=1e-5, rtol=0)


def test_mixtral_rope_theta_is_the_models_not_4x_default(outputs, logits4):
    """The issue's symptom, named: 4.x reads the Llama's theta (1e4), not MixtralConfig's default (1e6)."""
    assert logits4["configs"]["mixtral"]["class"] == "MixtralForCausalLM"
    assert logits4["configs"]["mixtral"]["rope_theta"] == 10000.0


def test_config_json_has_both_styles_and_the_version(outputs):
    import transformers

    for name, (out, _) in outputs.items():
        c = json.loads((out / "config.json").read_text())
        assert c["transformers_version"] == transformers.__version__, name
        assert c["torch_dtype"] == c["dtype"] == "float32", name
        if name not in COMPOSITES:
            assert "rope_theta" in c and "rope_parameters" in c, name
    gemma = json.loads((outputs["gemma3_solar"][0] / "config.json").read_text())
    assert (gemma["rope_theta"], gemma["rope_local_base_freq"]) == (250000.0, 20000.0)
    assert gemma["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_compose_reads_both_styles_back_to_the_same_config(outputs, tmp_path):
    """compose's own reader takes each output (both rope styles in it) back to the same model: a build of
    the output writes the same config.json and the same tensors."""
    for name, (out, _) in outputs.items():
        if name in COMPOSITES:
            continue
        again = build(load(str(out)), tmp_path / name, progress=False)
        assert json.loads((again / "config.json").read_text()) == json.loads((out / "config.json").read_text()), name
        assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes(), name
