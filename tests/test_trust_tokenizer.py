"""Hostile tokenizer files: refused where they enter, whatever the format (compose.families.tokenizer_files).

A source folder with a valid model and a small byte-level BPE tokenizer, damaged one way at a time: `compose
build` (hf, gguf), a `tokenizer_source: union` merge and `compose generate` each exit 2 with one line naming
the file and the token or id, and leave no output. The undamaged tokenizer still builds and is copied.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_hf_model

from compose.cli import main
from compose.families.tokenizer_files import MAX_FILE_BYTES


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """transformers' own tiny Llama with a byte-level BPE tokenizer llama.cpp reads (GPT-2's split): the
    256 byte tokens, `ab` and `abc` by two merges, and <s> and </s> as added special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = save_hf_model(tmp_path_factory.mktemp("valid") / "m", "llama", layers=2)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", *alphabet, "ab", "abc"])}
    tok = Tokenizer(models.BPE(vocab, [("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    return folder


def damaged(source: Path, dest: Path, damage) -> Path:
    """A copy of the source, damaged by `damage(tokenizer_json, tokenizer_config, folder)`: the two files
    parsed (written back when it changed them), and the folder for damage of other kinds."""
    folder = Path(shutil.copytree(source, dest))
    names = ("tokenizer.json", "tokenizer_config.json")
    files = {n: json.loads((folder / n).read_text()) for n in names}
    before = {n: json.dumps(d) for n, d in files.items()}
    damage(*files.values(), folder)
    for n, d in files.items():
        if json.dumps(d) != before[n]:
            (folder / n).write_text(json.dumps(d))
    return folder


def added(tj: dict, content: str) -> dict:
    return next(a for a in tj["added_tokens"] if a["content"] == content)


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def merges_as_strings(tj: dict, *more: str) -> None:
    tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]] + list(more)


def sparse(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)  # a hole: no disk, no time


CASES = {
    # name: (damage(tokenizer.json, tokenizer_config.json, folder), file, what the line says)
    "added id 10^9": (lambda tj, tc, f: added(tj, "<s>").update(id=10**9), "tokenizer.json",
                      "added token '<s>' has id 1000000000, past the 260 vocabulary tokens and 2 added tokens"),
    "negative added id": (lambda tj, tc, f: added(tj, "</s>").update(id=-1), "tokenizer.json",
                          "added token '</s>' has id -1, not a non-negative integer"),
    "duplicate added id": (lambda tj, tc, f: added(tj, "</s>").update(id=0), "tokenizer.json",
                           "added tokens '<s>' and '</s>' share id 0"),
    "string id": (lambda tj, tc, f: added(tj, "<s>").update(id="0"), "tokenizer.json",
                  "added token '<s>' has id '0', not a non-negative integer"),
    "bool id": (lambda tj, tc, f: added(tj, "</s>").update(id=True), "tokenizer.json",
                "added token '</s>' has id True"),
    "vocabulary id 10^9": (lambda tj, tc, f: tj["model"]["vocab"].update(abc=10**9), "tokenizer.json",
                           "vocabulary token 'abc' has id 1000000000"),
    "merge of unknown tokens": (lambda tj, tc, f: tj["model"]["merges"].append(["zz", "qq"]), "tokenizer.json",
                                "BPE merge ['zz', 'qq'] names 'zz', which is not in the vocabulary"),
    "merge of unknown tokens, string form": (lambda tj, tc, f: merges_as_strings(tj, "a zz"), "tokenizer.json",
                                             "BPE merge 'a zz' names 'zz'"),
    "single-part merge": (lambda tj, tc, f: merges_as_strings(tj, "abc"), "tokenizer.json",
                          "BPE merge 'abc' is not a pair of tokens"),
    "single-part merge, list form": (lambda tj, tc, f: tj["model"]["merges"].append(["ab"]), "tokenizer.json",
                                     "BPE merge ['ab'] is not a pair of tokens"),
    "three-part merge": (lambda tj, tc, f: tj["model"]["merges"].append(["a", "b", "c"]), "tokenizer.json",
                         "BPE merge ['a', 'b', 'c'] is not a pair of tokens"),
    "model the tokenizers library refuses": (lambda tj, tc, f: tj["model"].update(type="Nonsense"), "tokenizer.json",
                                             "the tokenizers library cannot load it"),
    "tokenizer.json too large": (lambda tj, tc, f: sparse(f / "tokenizer.json", MAX_FILE_BYTES + 1), "tokenizer.json",
                                 "more than a tokenizer file may be"),
    "tokenizer_config not JSON": (lambda tj, tc, f: write(f, "tokenizer_config.json", "{not json"),
                                  "tokenizer_config.json", "not valid JSON"),
    "tokenizer_config a list": (lambda tj, tc, f: write(f, "tokenizer_config.json", "[]"), "tokenizer_config.json",
                                "a JSON list, not an object"),
    "eos not in the vocabulary": (lambda tj, tc, f: tc.update(eos_token="<nope>"), "tokenizer_config.json",
                                  "eos_token '<nope>' is in neither the vocabulary nor the added tokens"),
    "eos an AddedToken not in the vocabulary": (
        lambda tj, tc, f: tc.update(eos_token={"__type": "AddedToken", "content": "<nope>", "special": True}),
        "tokenizer_config.json", "eos_token '<nope>' is in neither"),
    "pad of the wrong kind": (lambda tj, tc, f: tc.update(pad_token=7), "tokenizer_config.json",
                              "pad_token is 7, not a token"),
}


def cli(*args: str) -> tuple[int, str]:
    """Exit code and stderr of `compose ...`, run in this process."""
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        rc = main(list(args))
    return rc, err.getvalue()


def spec_loading(tmp_path: Path, body: str) -> Path:
    spec = tmp_path / "s.py"
    spec.write_text(f"from compose import load, merge\nmodel = {body}\n")
    return spec


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.stat().st_size < 1 << 20}


def assert_refused(tmp_path: Path, args: list[str], out: Path, folder: Path, file: str, needle: str) -> str:
    """Exit 2, one line naming `folder/file` and `needle`, no output, the source untouched."""
    before = snapshot(folder)
    rc, err = cli(*args)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("compose: error: "), err
    assert str(folder / file) in lines[0] and needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "compose-tmp" in p.name]
    assert snapshot(folder) == before
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_hostile_tokenizer_is_refused_by_an_hf_build(source, tmp_path, case):
    damage, file, needle = CASES[case]
    folder = damaged(source, tmp_path / "m", damage)
    out = tmp_path / "out"
    spec = spec_loading(tmp_path, f"load({str(folder)!r})")
    assert_refused(tmp_path, ["build", str(spec), "-o", str(out)], out, folder, file, needle)


@pytest.mark.parametrize("case", ["duplicate added id", "merge of unknown tokens", "eos not in the vocabulary"])
def test_hostile_tokenizer_is_refused_by_a_gguf_build(source, tmp_path, case):
    damage, file, needle = CASES[case]
    folder = damaged(source, tmp_path / "m", damage)
    out = tmp_path / "out"
    spec = spec_loading(tmp_path, f"load({str(folder)!r})")
    assert_refused(tmp_path, ["build", str(spec), "-o", str(out), "--format", "hf,gguf"], out, folder, file, needle)


def test_hostile_tokenizer_is_refused_by_a_union_merge(source, tmp_path):
    """tokenizer_source union reads every model's tokenizer: the damaged one is named under the field."""
    damage, file, needle = CASES["single-part merge"]
    good = Path(shutil.copytree(source, tmp_path / "good"))
    folder = damaged(source, tmp_path / "m", damage)
    out = tmp_path / "out"
    spec = spec_loading(tmp_path, f"merge.linear([load({str(good)!r}), load({str(folder)!r})], weights=[0.5, 0.5], "
                                  "tokenizer_source='union')")
    line = assert_refused(tmp_path, ["build", str(spec), "-o", str(out)], out, folder, file, needle)
    assert "model.tokenizer_source: " in line


def test_a_fifo_tokenizer_config_is_refused_without_hanging(source, tmp_path):
    """A FIFO where tokenizer_config.json should be would block transformers' read forever."""
    folder = Path(shutil.copytree(source, tmp_path / "m"))
    (folder / "tokenizer_config.json").unlink()
    os.mkfifo(folder / "tokenizer_config.json")
    spec = spec_loading(tmp_path, f"load({str(folder)!r})")
    r = subprocess.run([sys.executable, "-m", "compose", "build", str(spec), "-o", str(tmp_path / "out")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"{folder / 'tokenizer_config.json'}: not a regular file" in r.stderr
    assert not (tmp_path / "out").exists()


# A build whose memory is capped (data segment 4 GiB, far above what it needs), printing its peak RSS: the
# unchecked id 10^9 made the GGUF vocabulary list every id below it (24 GB, then the OOM killer).
CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))
from compose.cli import main
try:
    rc = main(sys.argv[1:])
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


def test_an_added_id_of_a_billion_fails_fast_in_little_memory(source, tmp_path):
    damage, file, needle = CASES["added id 10^9"]
    folder = damaged(source, tmp_path / "m", damage)
    out = tmp_path / "out"
    spec = spec_loading(tmp_path, f"load({str(folder)!r})")
    r = subprocess.run([sys.executable, "-c", CAPPED, "build", str(spec), "-o", str(out), "--format", "hf,gguf"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and str(folder / file) in r.stderr
    peak_kib = int(r.stdout.split()[-1])
    assert peak_kib < 2 << 20, f"peak RSS {peak_kib} KiB"  # an import of torch and transformers is well below
    assert not out.exists()


@pytest.fixture(scope="module")
def built(source, tmp_path_factory) -> Path:
    """The valid source, built as hf, gguf and torch (the generated module `compose generate` runs)."""
    root = tmp_path_factory.mktemp("built")
    out = root / "out"
    rc, err = cli("build", str(spec_loading(root, f"load({str(source)!r})")), "-o", str(out),
                  "--format", "hf,gguf,torch")
    assert rc == 0, err
    return out


def test_a_valid_tokenizer_builds_and_is_copied(source, built):
    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (built / name).read_bytes() == (source / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(built)
    assert tok.convert_ids_to_tokens(tok.encode("abc", add_special_tokens=False)) == ["abc"]
    assert (built / "model.gguf").is_file()


def test_generate_refuses_a_hostile_tokenizer_in_the_build(built, tmp_path):
    """`compose generate` reads the build's tokenizer: one whose hashes were rewritten to match a damaged
    tokenizer.json (a build handed over by someone else) is refused by the same check."""
    from compose.integrity import sha256_file

    folder = Path(shutil.copytree(built, tmp_path / "out"))
    tj = json.loads((folder / "tokenizer.json").read_text())
    added(tj, "<s>").update(id=10**9)
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    record = json.loads((folder / "compose.json").read_text())
    record["sha256"]["tokenizer.json"] = sha256_file(folder / "tokenizer.json")
    (folder / "compose.json").write_text(json.dumps(record, indent=2) + "\n")
    rc, err = cli("generate", str(folder), "--prompt", "ab", "--max-new-tokens", "1")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert f"{folder / 'tokenizer.json'}: added token '<s>' has id 1000000000" in lines[0]
