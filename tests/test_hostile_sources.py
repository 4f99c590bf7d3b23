"""Damaged and hostile model folders: each is refused with one SourceError naming the file and what is
wrong (never a traceback, never a hang), by the same rules the safetensors library applies."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import save_hf_model
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from test_errors import assert_clean_failure

from compose import build, families, load
from compose.errors import ComposeError, SourceError
from compose.sources import TINY_BOUNDS, TINY_DEFAULTS, clear_cache, open_source


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A valid 2-layer Llama folder, saved whole and sharded with an index (copied before damage)."""
    root = tmp_path_factory.mktemp("valid")
    return {"single": save_hf_model(root / "single", "llama", layers=2),
            "sharded": save_hf_model(root / "sharded", "llama", layers=2, shard="60KB")}


def copy_of(models, kind: str, dest: Path) -> Path:
    return Path(shutil.copytree(models[kind], dest))


def refused(folder: Path, *needles: str) -> str:
    clear_cache()
    with pytest.raises(SourceError) as e:
        open_source(str(folder))
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# -- safetensors headers, written by hand -----------------------------------------------------------------

def st_file(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: the 8-byte header length (the true one unless `length`), header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(shape, begin: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * math.prod(shape)]}


VALID = {"__metadata__": {"format": "pt"}, "a": f32([2], 0), "b": f32([2, 2], 8)}
DATA = bytes(24)


def changed(name: str, value=None, **fields) -> dict:
    """VALID with entry `name` replaced by `value`, or with `fields` of it changed."""
    h = copy.deepcopy(VALID)
    h[name] = {**h[name], **fields} if fields else value
    return h


HEADERS = {
    "short file": (b"\x01\x02\x03", "shorter than the 8-byte header length"),
    "header too long": (st_file(VALID, DATA, length=1 << 40), "over safetensors' limit"),
    "header past the end": (st_file(VALID, DATA, length=500), "header length 500 runs past the end"),
    "not utf-8": (st_file(b'{"\xff": 1}'), "header is not UTF-8"),
    "not json": (st_file(b"{not json"), "header is not JSON"),
    "nested too deeply": (st_file(b"[" * 100_000), "nested too deeply"),
    "a list": (st_file(b"[]"), "header is a JSON list, not an object"),
    "metadata not strings": (st_file(changed("__metadata__", {"format": 1}), DATA), "__metadata__ value of 'format'"),
    "metadata a list": (st_file(changed("__metadata__", []), DATA), "__metadata__ is a JSON list"),
    "entry not an object": (st_file(changed("b", 3), DATA), "entry is a JSON int, not an object: tensor b"),
    "no dtype": (st_file({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "no dtype: tensor a"),
    "unknown dtype": (st_file(changed("b", dtype="F12"), DATA), "unknown dtype 'F12'"),
    "bool in shape": (st_file(changed("b", shape=[True, 4]), DATA), "shape [True, 4] is not a list"),
    "negative shape": (st_file(changed("b", shape=[-2, -2]), DATA), "non-negative integers: tensor b"),
    "float shape": (st_file(changed("b", shape=[2.0, 2]), DATA), "shape [2.0, 2]"),
    "three offsets": (st_file(changed("b", data_offsets=[8, 24, 24]), DATA), "is not two non-negative"),
    "reversed offsets": (st_file(changed("b", data_offsets=[24, 8]), DATA), "end before they begin: tensor b"),
    "size not shape": (st_file(changed("b", shape=[2, 3]), DATA), "hold 16 bytes, but shape [2, 3] of F32 is 24"),
    "overlap": (st_file(changed("b", data_offsets=[4, 20]), bytes(20)), "overlap those of tensor a"),
    "hole": (st_file(changed("b", data_offsets=[12, 28]), bytes(28)), "4 bytes of the buffer after tensor a"),
    "not from 0": (st_file({"a": f32([2], 8)}, bytes(16)), "starts at byte 8, not 0: tensor a"),
    "trailing bytes": (st_file(VALID, DATA + b"\0"), "1 bytes after the last tensor's data"),
    "truncated data": (st_file(VALID, DATA[:20]), "tensor data runs past the end of the file"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_damaged_header_is_refused_as_safetensors_refuses_it(models, tmp_path, case):
    content, reason = HEADERS[case]
    folder = copy_of(models, "single", tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(content)
    refused(folder, f"{weights}: not a valid safetensors file", reason)
    # The rule is the library's own, not one compose made up: safetensors refuses the file too.
    with pytest.raises(SafetensorError), safe_open(str(weights), framework="pt"):
        pass


@pytest.mark.parametrize("header", [
    {"__metadata__": None, "a": f32([2], 0), "b": f32([2, 2], 8)},       # null metadata: as if absent
    {"a": {**f32([2], 0), "note": "extra"}, "b": f32([2, 2], 8)},         # unknown fields are ignored
    {"z": f32([0], 0), "a": f32([2], 0), "b": f32([2, 2], 8), "e": f32([0, 3], 24)},  # empty tensors
    {"s": f32([], 0), "a": f32([2], 4), "b": f32([2, 2], 12)},            # a scalar
], ids=["null metadata", "extra field", "empty tensors", "scalar"])
def test_unusual_but_valid_headers_are_read(models, tmp_path, header):
    folder = copy_of(models, "single", tmp_path / "m")
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    raw = json.dumps(header).encode() + b"   "  # whitespace padding, as safetensors writes it
    (folder / "model.safetensors").write_bytes(st_file(raw, bytes(end)))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        expected = set(f.keys())
    clear_cache()
    src = open_source(str(folder))
    assert set(src.keys()) == expected
    assert all(src.tensor(k).shape == tuple(header[k]["shape"]) for k in expected)


def test_dtypes_beyond_floats_are_validated_with_their_sizes(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    tensors = {"u16": torch.arange(6, dtype=torch.int16).reshape(2, 3).view(torch.uint16),
               "b": torch.tensor([True, False]), "f8": torch.linspace(-1, 1, 5).to(torch.float8_e4m3fn),
               "u64": torch.arange(3, dtype=torch.int64).view(torch.uint64)}
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"))
    clear_cache()
    src = open_source(str(folder))
    for k, t in tensors.items():
        assert src.meta(k) == (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        assert torch.equal(src.tensor(k).view(torch.uint8), t.view(torch.uint8))


# -- weight files that are not regular files -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_weights_that_are_not_regular_files_are_refused(models, tmp_path, kind):
    folder = copy_of(models, "single", tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.unlink()
    {"fifo": os.mkfifo, "directory": os.mkdir, "device": lambda p: os.symlink("/dev/zero", p)}[kind](weights)
    refused(folder, f"{weights}: not a regular file")


def test_config_json_fifo_is_refused(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    refused(folder, f"{folder / 'config.json'}: not a regular file")


def test_symlinked_weights_inside_the_folder_are_read(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    (folder / "blobs").mkdir()
    (folder / "model.safetensors").rename(folder / "blobs" / "weights")
    (folder / "model.safetensors").symlink_to("blobs/weights")
    clear_cache()
    src = open_source(str(folder))
    expected = load_file(folder / "blobs" / "weights")
    assert set(src.keys()) == set(expected)
    assert torch.equal(src.tensor("model.norm.weight"), expected["model.norm.weight"])


# -- model.safetensors.index.json ------------------------------------------------------------------------

def rewrite_index(folder: Path, edit) -> Path:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    index.write_text(json.dumps(edit(data)))
    return index


def first_shard(data: dict) -> str:
    return min(data["weight_map"].values())


@pytest.mark.parametrize("edit, reason", [
    (lambda d: [d], "invalid index (expected a JSON object whose weight_map"),
    (lambda d: {"metadata": d["metadata"]}, "invalid index (expected a JSON object whose weight_map"),
    (lambda d: {"weight_map": list(d["weight_map"])}, "invalid index (expected a JSON object whose weight_map"),
    (lambda d: {"weight_map": {**d["weight_map"], "model.norm.weight": 3}},
     "weight_map entry 'model.norm.weight' is 3, not a file name"),
    (lambda d: {"weight_map": {**d["weight_map"], "model.norm.weight": "/etc/passwd"}},
     "weight_map entry 'model.norm.weight' names '/etc/passwd', not a file in the model folder"),
    (lambda d: {"weight_map": {**d["weight_map"], "model.norm.weight": f"../m/{first_shard(d)}"}},
     "names '../m/model-00001-of-"),
    (lambda d: {"weight_map": {**d["weight_map"], "model.norm.weight": ""}}, "names '', not a file"),
], ids=["a list", "no weight_map", "weight_map a list", "shard not a string", "absolute shard", "dot-dot shard",
        "empty shard name"])
def test_malformed_index_is_refused_naming_the_entry(models, tmp_path, edit, reason):
    folder = copy_of(models, "sharded", tmp_path / "m")
    index = rewrite_index(folder, edit)
    refused(folder, f"{index}: ", reason)


def test_index_shard_that_links_outside_the_folder_is_refused(models, tmp_path):
    folder = copy_of(models, "sharded", tmp_path / "m")
    outside = copy_of(models, "sharded", tmp_path / "elsewhere")
    data = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = first_shard(data)
    (folder / shard).unlink()
    (folder / shard).symlink_to(outside / shard)
    refused(folder, "model.safetensors.index.json: weight_map entry", f"names {shard!r}, a link to",
            "outside the model folder")


def test_index_must_agree_with_the_shards(models, tmp_path):
    folder = copy_of(models, "sharded", tmp_path / "m")
    data = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(data["weight_map"].values()))
    listed = list(data["weight_map"].values())
    # A tensor of a shard that others keep listed, so the shard is still read.
    wrong = next(k for k, s in data["weight_map"].items() if s != shards[0] and listed.count(s) > 1)
    index = rewrite_index(folder, lambda d: {"weight_map": {**d["weight_map"], wrong: shards[0]}})
    refused(folder, f"{index}: tensor {wrong} is listed in {shards[0]}, but it is in {data['weight_map'][wrong]}")
    index = rewrite_index(folder, lambda d: {"weight_map": {**data["weight_map"], "model.ghost.weight": shards[0]}})
    refused(folder, f"{index}: tensor model.ghost.weight is listed in {shards[0]}, which does not hold it")


def test_tensor_in_two_shards_is_refused_naming_both(models, tmp_path):
    folder = copy_of(models, "sharded", tmp_path / "m")
    data = json.loads((folder / "model.safetensors.index.json").read_text())
    a, b = sorted(set(data["weight_map"].values()))[:2]
    key = next(k for k, s in data["weight_map"].items() if s == a)
    extra = load_file(folder / b)
    extra[key] = load_file(folder / a)[key]
    save_file(extra, str(folder / b))
    refused(folder, f"tensor {key} is in both {a} and {b}")


def test_hub_snapshot_whose_files_link_into_the_cache_is_read(models, tmp_path, monkeypatch):
    """The Hugging Face cache links each snapshot file to ../../blobs: outside the snapshot, inside the
    repository's cache folder, which is what a snapshot's shards must stay within."""
    repo = tmp_path / "models--acme--tiny"
    snapshot = repo / "snapshots" / "0123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in models["sharded"].iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", f.name))
    monkeypatch.setattr("compose.sources._hub_folder", lambda repo_id: snapshot)
    clear_cache()
    src = open_source("acme/tiny")
    assert set(src.keys()) == set(json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"])
    clear_cache()
    assert set(open_source(str(snapshot)).keys()) == set(src.keys())  # the snapshot as a local folder
    (repo / "snapshots").rename(repo / "copies")
    refused(repo / "copies" / "0123", "outside the model folder")  # out of the cache's layout, they leave it


# -- several .safetensors files without an index ---------------------------------------------------------

def split_weights(folder: Path, overlap: bool) -> tuple[str, str]:
    tensors = load_file(folder / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    first, second = keys[:half + overlap], keys[half:]
    (folder / "model.safetensors").unlink()
    save_file({k: tensors[k] for k in first}, str(folder / "part-a.safetensors"))
    save_file({k: tensors[k] for k in second}, str(folder / "part-b.safetensors"))
    return keys, keys[half]


def test_unindexed_files_with_disjoint_tensors_are_merged(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    keys, _ = split_weights(folder, overlap=False)
    clear_cache()
    assert sorted(open_source(str(folder)).keys()) == keys


def test_unindexed_files_sharing_a_tensor_are_refused(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    _, shared = split_weights(folder, overlap=True)
    refused(folder, f"tensor {shared} is in both part-a.safetensors and part-b.safetensors")


# -- config.json -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, reason", [
    (lambda c: [c], "config.json is a JSON list, not an object"),
    (lambda c: "llama", "config.json is a JSON str, not an object"),
    (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "config.json has no model_type"),
    (lambda c: {**c, "model_type": ["llama"]}, "config.json model_type ['llama'] is not supported"),
], ids=["a list", "a string", "no model_type", "model_type a list"])
def test_config_json_that_is_not_a_model_config_is_refused(models, tmp_path, edit, reason):
    folder = copy_of(models, "single", tmp_path / "m")
    (folder / "config.json").write_text(json.dumps(edit(json.loads((folder / "config.json").read_text()))))
    refused(folder, reason)


@pytest.mark.parametrize("field, value, reason", [
    ("num_attention_heads", 0, "must be an integer >= 1, got 0"),
    ("num_attention_heads", -4, "must be an integer >= 1, got -4"),
    ("num_key_value_heads", "2", "must be an integer >= 1, got '2'"),
    ("hidden_size", None, "lacks hidden_size"),
    ("intermediate_size", 128.0, "must be an integer >= 1, got 128.0"),
    ("vocab_size", True, "must be an integer >= 1, got True"),
    ("num_hidden_layers", 0, "must be a positive integer, got 0"),
    ("num_hidden_layers", "2", "must be a positive integer, got '2'"),
    ("rms_norm_eps", float("nan"), "must be a number in (0, 1), got nan"),
    ("head_dim", "16", "must be a positive integer, got '16'"),
])
def test_config_json_field_of_the_wrong_kind_is_named(models, tmp_path, field, value, reason):
    folder = copy_of(models, "single", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    clear_cache()
    with pytest.raises(SourceError) as e:
        build(load(str(folder)), tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "config.json" in msg and field in msg and reason in msg, msg
    assert not (tmp_path / "out").exists()


BAD_VALUES = [None, -1, 0, "8", 8.5, float("nan"), float("inf"), True, [], {}, [1], ["x"], {"a": 1}]
MOE_FIELDS = {"mixtral": ("mistral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
              "qwen2_moe": ("qwen2", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                      "shared_expert_intermediate_size": 16, "use_sliding_window": True,
                                      "sliding_window": 8}),
              # compose's own MoE output of a Gemma 2 (generated code): Gemma's fields and the MoE ones.
              "compose_moe": ("gemma2", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                         "shared_expert_intermediate_size": 16, "mlp_only_layers": [0],
                                         "norm_topk_prob": True, "compose": {"kind": "moe", "family": "gemma2"}})}


def family_config(model_type: str) -> dict:
    """A valid 2-layer config.json of `model_type`: a tiny one, with experts for the MoE families."""
    dense, extra = MOE_FIELDS.get(model_type, (model_type, {}))
    fam = families.get(dense)
    return {**fam.tiny_config(dict(TINY_DEFAULTS, **fam.tiny_options, layers=2)), **extra, "model_type": model_type}


def read_config(config: dict) -> None:
    """What reading a checkpoint does with config.json, without the checkpoint: every field it reads."""
    fam = families.for_source(config, "src")
    fam.arch_config(config, "src", "float32")
    fam.checkpoint_shapes(config, "src")


@pytest.mark.parametrize("model_type", families.SOURCES)
def test_config_fuzz_never_escapes_as_a_python_error(model_type):
    base = family_config(model_type)
    read_config(base)
    fields = sorted(set(families.base.COMMON_KEYS) | set(families.get(model_type).keys) | set(base) | {"num_hidden_layers"})
    escapes = []
    for field in fields:
        for value in BAD_VALUES:
            try:
                read_config({**base, field: value})
            except ComposeError:
                pass
            except Exception as e:  # noqa: BLE001 -- collecting every escape is the point
                escapes.append(f"{field}={value!r}: {type(e).__name__}: {e}")
    assert not escapes, "\n".join(escapes)


def test_qwen2_moe_mlp_only_layers_of_the_wrong_kind():
    with pytest.raises(SourceError, match="mlp_only_layers"):
        read_config({**family_config("qwen2_moe"), "mlp_only_layers": 3})


# -- tiny:<family> options -------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, reason", [
    ("tiny:llama?layers=0", "option layers must be between 1 and 1024, got 0"),
    ("tiny:llama?hidden=-64", "option hidden must be between 1 and 65536, got -64"),
    ("tiny:llama?heads=0", "option heads must be between 1 and 1024, got 0"),
    ("tiny:llama?kv_heads=-1", "option kv_heads must be between 1 and 1024"),
    ("tiny:llama?vocab=0", "option vocab must be between 1"),
    ("tiny:llama?intermediate=0", "option intermediate must be between 1"),
    ("tiny:llama?seed=-1", "option seed must be between 0 and 9223372036854775807"),
    ("tiny:llama?seed=" + "9" * 5000, "option seed must be an integer"),
    ("tiny:llama?tie=2", "option tie must be 0 or 1, got 2"),
    ("tiny:mistral?window=-1", "option window must be between 0"),
    ("tiny:llama?layers=100000&hidden=4096", "option layers must be between 1 and 1024, got 100000"),
    ("tiny:llama?vocab=3000000", "option vocab must be between 1 and 2097152"),
    ("tiny:llama?layers=2_000", "option layers must be an integer of at most 20 digits, got '2_000'"),
    ("tiny:llama?layers=", "option layers must be an integer of at most 20 digits, got ''"),
    ("tiny:llama?hidden=66", "hidden 66 is not a multiple of heads 4"),
    ("tiny:llama?kv_heads=3", "heads 4 is not a multiple of kv_heads 3"),
    ("tiny:llama?layers=1024&hidden=16384&heads=128&kv_heads=8", "parameters, more than a tiny model's"),
])
def test_tiny_options_out_of_range_are_named(ref, reason):
    clear_cache()
    with pytest.raises(SourceError) as e:
        open_source(ref)
    assert str(e.value).startswith(f"{ref}: ") and reason in str(e.value), e.value


def test_every_family_tiny_option_has_bounds():
    for t in families.TINY:
        assert set(TINY_DEFAULTS) | set(families.get(families.TINY[t]).tiny_options) <= set(TINY_BOUNDS), t


# -- as a user hits it: the CLI ----------------------------------------------------------------------------

def spec_loading(tmp_path: Path, ref: str) -> Path:
    spec = tmp_path / "s.py"
    spec.write_text(f"from compose import load\nmodel = load({ref!r})\n")
    return spec


def test_cli_fifo_weights_fail_cleanly_without_hanging(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    assert_clean_failure(tmp_path, spec_loading(tmp_path, str(folder)), str(folder / "model.safetensors"),
                         "not a regular file")


def test_cli_overlapping_tensors_fail_cleanly(models, tmp_path):
    folder = copy_of(models, "single", tmp_path / "m")
    (folder / "model.safetensors").write_bytes(HEADERS["overlap"][0])
    assert_clean_failure(tmp_path, spec_loading(tmp_path, str(folder)), str(folder / "model.safetensors"),
                         "not a valid safetensors file", "overlap", "tensor b")


def test_cli_huge_tiny_model_fails_cleanly(tmp_path):
    assert_clean_failure(tmp_path, spec_loading(tmp_path, "tiny:llama?layers=100000&hidden=4096"),
                         "option layers must be between 1 and 1024")
