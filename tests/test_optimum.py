"""compose's model.onnx in the consumers that load it as they are: Optimum's ORTModelForCausalLM (by its
default file name) and onnxruntime-genai (through genai_config.json), each compared with transformers 5's
generate on the hf checkpoint of the same build.

Optimum pins transformers 4.x, which this environment's transformers 5 excludes. So a session fixture
installs Optimum, optimum-onnx and the transformers 4.x they accept into a cache folder
(~/.cache/compose-test/, kept between runs), with --no-deps: torch, onnxruntime, numpy and the rest are this
environment's own, never reinstalled. The consumers run in a subprocess with that folder first on
PYTHONPATH; compose is not imported there. Where the install fails (no package registry), the tests skip
and say why.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_onnx import SPECS  # noqa: E402  (the same builds as the ONNX tests: see conftest's onnx_build)

CACHE = Path(os.environ.get("COMPOSE_TEST_CACHE", Path.home() / ".cache" / "compose-test"))
OPTIMUM = ("optimum==2.1.0", "optimum-onnx[onnxruntime]==0.1.0", "transformers==4.57.6", "tokenizers==0.22.2",
           "huggingface_hub==0.36.2")
"""optimum-onnx 0.1.0 wants optimum ~= 2.1 and transformers < 4.58; transformers 4.57 wants tokenizers <= 0.23
and huggingface_hub < 1.0. Every other dependency of theirs is in this environment already."""
GENAI = ("onnxruntime-genai==0.18.0",)  # needs onnxruntime >= 1.31, this environment's
INSTALL_TIMEOUT = 300
FAMILIES = ["expanded", "mixtral"]
"""LLaMA-Pro expansion of a Llama (LlamaForCausalLM) and a Mixtral upcycle (MixtralForCausalLM)."""
OPTIMUM_FAMILIES = [*FAMILIES, "qwen3", "gemma2"]
"""Also: Qwen3, whose head_dim is not hidden_size / heads (the width Optimum's empty past has), and Gemma 2,
with sliding layers (a window of 4) that the prompts and their continuations cross, and soft-caps."""
ROWS = [[5, 17, 99, 3, 250, 7, 44], [300, 12, 8, 61], [77, 400]]
NEW_TOKENS = 8


def _install(name: str, pins: tuple[str, ...]) -> Path:
    """The cache folder holding `pins`, installed once (into a temporary folder renamed into place, so an
    interrupted install is never taken for a finished one); skip the test where pip cannot install them."""
    folder = CACHE / f"{name}-{hashlib.sha256(' '.join(pins).encode()).hexdigest()[:12]}"
    if (folder / ".complete").is_file():
        return folder
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.monotonic()
    try:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet",
                              "--disable-pip-version-check", "--target", str(tmp), *pins],
                             capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pip install {' '.join(pins)} took more than {INSTALL_TIMEOUT} s")
    if run.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"pip install {' '.join(pins)} failed: {(run.stderr or run.stdout).strip()[-500:]}")
    assert not (tmp / "torch").exists(), "the install brought its own torch"
    (tmp / ".complete").write_text(f"{' '.join(pins)}\ninstalled in {time.monotonic() - start:.0f} s\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _importable(path: Path, statement: str) -> Path:
    """`path`, where `statement` runs with it first on PYTHONPATH; else skip, naming what failed (a
    dependency of this environment too old for the consumer, e.g. onnxruntime under genai's minimum)."""
    env = {**os.environ, "PYTHONPATH": str(path)}
    run = subprocess.run([sys.executable, "-c", statement], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    if run.returncode != 0:
        pytest.skip(f"{statement!r} fails with {path} on PYTHONPATH: {run.stderr.strip()[-500:]}")
    return path


@pytest.fixture(scope="session")
def optimum_path():
    return _importable(_install("optimum", OPTIMUM), "from optimum.onnxruntime import ORTModelForCausalLM")


@pytest.fixture(scope="session")
def genai_path():
    return _importable(_install("onnxruntime-genai", GENAI), "import onnxruntime_genai")


def _consumer(path: Path, script: str, request: dict) -> dict:
    """Run `script` with `path` first on PYTHONPATH and `request` as its argument; its last line of output
    is JSON."""
    env = {**os.environ, "PYTHONPATH": str(path), "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script), json.dumps(request)], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _transformers(out: Path, ids: torch.Tensor, mask: torch.Tensor, pad: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=pad, return_dict_in_generate=True, output_logits=True)


OPTIMUM_SCRIPT = """
    import json, sys
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    req = json.loads(sys.argv[1])
    model = ORTModelForCausalLM.from_pretrained(req["folder"])  # no file_name: Optimum's own choice
    out = model.generate(input_ids=torch.tensor(req["input_ids"]), attention_mask=torch.tensor(req["attention_mask"]),
                         max_new_tokens=req["new_tokens"], do_sample=False, pad_token_id=req["pad"],
                         return_dict_in_generate=True, output_logits=True)
    print(json.dumps({"transformers": transformers.__version__, "file": model.path.name,
                      "can_use_cache": model.can_use_cache, "inputs": model.input_names,
                      "tokens": out.sequences.tolist(), "logits": [t.tolist() for t in out.logits]}))
"""


@pytest.mark.parametrize("name", OPTIMUM_FAMILIES)
def test_optimum_decodes_a_left_padded_batch_as_transformers_does(onnx_build, optimum_path, name):
    """ORTModelForCausalLM.from_pretrained(out) picks model.onnx, runs the prompt with an empty past and
    then its cache, and greedily decodes rows of 7, 4 and 2 tokens (left-padded) into the tokens
    transformers 5 decodes from the same batch; every step's logits agree within 1e-4 of their scale."""
    out = onnx_build(name, SPECS[name])
    pad = 0
    ids, mask = _left_padded(ROWS, pad)
    got = _consumer(optimum_path, OPTIMUM_SCRIPT, {"folder": str(out), "input_ids": ids.tolist(),
                                                   "attention_mask": mask.tolist(), "new_tokens": NEW_TOKENS,
                                                   "pad": pad})
    assert got["transformers"].startswith("4.")
    assert got["file"] == "model.onnx" and got["can_use_cache"], got["file"]
    assert {"attention_mask", "position_ids"} <= set(got["inputs"])
    want = _transformers(out, ids, mask, pad)
    assert got["tokens"] == want.sequences.tolist()
    assert len(got["logits"]) == len(want.logits) == NEW_TOKENS
    for step, (g, w) in enumerate(zip(got["logits"], want.logits)):
        diff = (torch.tensor(g) - w).abs().max().item()
        assert diff <= 1e-4 * max(1.0, w.abs().max().item()), (step, diff)


GENAI_SCRIPT = """
    import json, sys
    import numpy as np
    import onnxruntime_genai as og

    req = json.loads(sys.argv[1])
    model = og.Model(req["folder"])  # reads genai_config.json
    ids = np.array(req["input_ids"], dtype=np.int32)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=ids.shape[1] + req["new_tokens"], batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    print(json.dumps({"tokens": [[int(t) for t in generator.get_sequence(i)] for i in range(ids.shape[0])]}))
"""


@pytest.mark.parametrize("name", FAMILIES)
def test_onnxruntime_genai_decodes_as_transformers_does(onnx_build, genai_path, name):
    """onnxruntime-genai's generic decoder, configured by genai_config.json alone, greedily decodes the
    tokens transformers 5 decodes: a batch of rows of equal length through its Generator (genai 0.18's
    append_tokens takes every id of a batch as a real token, pad ids included, so it has no left padding
    to compare), and prompts of different lengths one request at a time through its Engine. (Several
    requests at once in the Engine decode wrong tokens for the shorter ones: it right-pads their prompts,
    and its decode-step attention_mask leaves 0 at the last slot, where the graph appends the new token's
    key, as if the cache were written in place.)"""
    import onnxruntime as ort

    out = onnx_build(name, SPECS[name])
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    # What genai binds by name and allocates by size is what the graph has.
    session = ort.InferenceSession(str(out / decoder["filename"]), providers=["CPUExecutionProvider"])
    ins, outs = {i.name for i in session.get_inputs()}, {o.name: o.shape for o in session.get_outputs()}
    layers = decoder["num_hidden_layers"]
    names = [decoder["inputs"][k] for k in ("input_ids", "attention_mask", "position_ids")]
    assert set(names) | {decoder["inputs"][k] % i for k in ("past_key_names", "past_value_names")
                         for i in range(layers)} == ins
    assert {decoder["outputs"]["logits"]} | {decoder["outputs"][k] % i for k in ("present_key_names",
                                             "present_value_names") for i in range(layers)} == set(outs)
    kv = outs[decoder["outputs"]["present_key_names"] % 0]
    assert (kv[1], kv[3]) == (decoder["num_key_value_heads"], decoder["head_size"])
    assert outs["logits"][2] == config["model"]["vocab_size"]
    hf = json.loads((out / "config.json").read_text())
    assert decoder["num_attention_heads"] == hf["num_attention_heads"] and decoder["hidden_size"] == hf["hidden_size"]
    assert config["model"]["eos_token_id"] == hf["eos_token_id"] and config["model"]["type"] == "decoder"

    rows = [ROWS[0], [300, 12, 8, 61, 9, 140, 33]]
    ids = torch.tensor(rows)
    got = _consumer(genai_path, GENAI_SCRIPT, {"folder": str(out), "input_ids": rows, "new_tokens": NEW_TOKENS})
    want = _transformers(out, ids, torch.ones_like(ids), config["model"]["pad_token_id"]).sequences
    for row, tokens in enumerate(got["tokens"]):  # genai stops a row at eos; transformers pads it after
        assert tokens == want[row, :len(tokens)].tolist(), row
        assert len(tokens) == want.size(1) or tokens[-1] == config["model"]["eos_token_id"]
    # Prompts of different lengths, one request at a time through genai's Engine (each its own sequence):
    # the tokens transformers decodes from each prompt alone.
    got = _consumer(genai_path, GENAI_ENGINE_SCRIPT, {"folder": str(out), "rows": ROWS, "new_tokens": NEW_TOKENS})
    for row, tokens in zip(ROWS, got["tokens"]):
        alone = _transformers(out, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long),
                              config["model"]["pad_token_id"]).sequences[0, len(row):].tolist()
        assert tokens == alone[:len(tokens)] and (len(tokens) == NEW_TOKENS
                                                  or tokens[-1] == config["model"]["eos_token_id"]), row


GENAI_ENGINE_SCRIPT = """
    import json, sys
    import numpy as np
    import onnxruntime_genai as og

    req = json.loads(sys.argv[1])
    model = og.Model(req["folder"])
    out = []
    for row in req["rows"]:
        engine = og.Engine(model)
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_do_sample(False)
        options.set_max_generated_tokens(req["new_tokens"])
        request.begin_turn(np.array(row, dtype=np.int32), options)
        events, tokens = engine.create_event_buffer(64), []
        while engine.has_pending_requests():
            tokens += [int(e.token) for e in engine.run(events)]
        out.append(tokens)
    print(json.dumps({"tokens": out}))
"""
