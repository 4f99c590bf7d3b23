"""The model card and the DOT graph keep user strings data. A source and a LoRA adapter whose folder names
are Markdown and YAML (a heading, a `javascript:` link, `<script>` and `<img>` tags, backticks, `---`,
`key: value`, a newline, `|`, quotes, backslashes) show in README.md as their names, in code spans, and in
`compose inspect --dot` as quoted strings: the card's front matter parses (by huggingface_hub's own
ModelCard.load) to the names as they are, its body holds only the headings, links and HTML compose
writes (none), and the DOT file is the one graph compose writes, every label the node's own."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from conftest import manifest, save_hf_model
from huggingface_hub import ModelCard
from test_hub_files import spec_block
from test_lora import make_adapter

from compose.cli import main

SOURCE = ("m``` `x` ## <script>alert(1)<\\script> [a](javascript:alert(1)) | \"q\\\" #: ---\n---\n"
          "tags: [evil]\n## Injected")
ADAPTER = "ad ``x`` <img src=x onerror=alert(1)> [b](javascript:alert(2)) \\\\ |\n# Adapter"
HEADINGS = ["# LlamaForCausalLM built with compose", "## Method", "## Sources", "## Output",
            "## Trainable parameters", "## Layers", "## Spec"]


def folder(root: Path, name: str) -> Path:
    """root/name, made; with spaces for its newlines on a filesystem that refuses them."""
    try:
        (root / name).mkdir()
    except OSError:
        name = name.replace("\n", " ")
        (root / name).mkdir()
    return root / name


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[str, Path, Path]:
    """The ref `source+adapter` of two hostile folders, the build of a spec on it and its spec file."""
    root = tmp_path_factory.mktemp("hostile")
    base = save_hf_model(folder(root, SOURCE), "llama", seed=1, layers=2)
    adapter = make_adapter(base, folder(root, ADAPTER), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref = f"{base}+{adapter}"
    spec = root / "spec.json"
    spec.write_text(json.dumps({"model": {"op": "expand_blocks", "groups": 2, "model": {"op": "load", "ref": ref}}}))
    assert main(["build", str(spec), "-o", str(root / "out"), "--no-progress"]) == 0
    return ref, root / "out", spec


# -- README.md -----------------------------------------------------------------------------------------

def prose(text: str) -> list[str]:
    """The lines of a card outside its fenced code blocks, with the code spans cut out (CommonMark: a
    run of backticks opens a span that the next run of the same length closes)."""
    lines, fence = [], None
    for line in text.split("\n"):
        if fence:
            fence = None if re.fullmatch(rf"{fence}`* *", line) else fence
        elif m := re.match(r"(`{3,})", line):
            fence = m[1]
        else:
            runs, kept, at, i = list(re.finditer(r"`+", line)), [], 0, 0
            while i < len(runs):
                close = next((j for j in range(i + 1, len(runs)) if len(runs[j][0]) == len(runs[i][0])), None)
                if close is None:
                    i += 1
                    continue
                kept.append(line[at:runs[i].start()])
                at, i = runs[close].end(), close + 1
            lines.append("".join(kept) + line[at:])
    return lines


def test_front_matter_is_the_names_as_they_are(hostile):
    """yaml quotes them: `---` and `tags: [evil]` on lines of their own neither end the block nor add keys."""
    ref, out, _ = hostile
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == [Path(ref.split("+")[0]).name]
    assert card.data.tags == ["compose", "merge", "llama-pro", "lora"]
    assert set(card.data.to_dict()) == {"base_model", "library_name", "pipeline_tag", "tags"}


def test_body_holds_the_names_as_code_and_nothing_from_them(hostile):
    ref, out, _ = hostile
    text = ModelCard.load(out / "README.md").text
    lines = prose(text)
    assert [line for line in lines if re.match(r" {0,3}#", line)] == HEADINGS
    outside = "\n".join(lines)
    assert "<" not in outside and "javascript:" not in outside
    assert all(link.startswith("https://") for link in re.findall(r"\]\(([^)]*)\)", outside))
    # Each name is there, on one line, its newlines shown as `\n`, fenced by more backticks than it holds.
    source, adapter = (part.replace("\n", "\\n") for part in ref.split("+"))
    assert f"- ````{source}````: a local folder" in text and f"- ```{adapter}```: a LoRA adapter" in text
    # Each layer row has its three cells: a `|` in a name is escaped, in its code span too.
    rows = [line for line in text.split("\n") if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and all(len(re.split(r"(?<!\\)(?:\\\\)*\|", row)) == 5 for row in rows)
    assert spec_block((out / "README.md").read_text()) == manifest(out)["spec"]


def test_body_renders_to_no_html_of_its_own(hostile):
    """As a CommonMark renderer with GitHub's tables renders it (markdown-it-py, raw HTML on as on the Hub)."""
    markdown_it = pytest.importorskip("markdown_it")
    _, out, _ = hostile
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(ModelCard.load(out / "README.md").text)
    assert "<script" not in html and "<img" not in html  # in code, they are `&lt;script&gt;` and `&lt;img`
    assert re.findall(r"<h(\d)>", html) == ["1"] + ["2"] * 6
    assert re.findall(r'href="([^"]*)"', html) == ["https://arxiv.org/abs/2401.02415",
                                                   "https://arxiv.org/abs/2106.09685"]
    assert html.count("<tr>") == 5 and html.count("<td>") == 12


@pytest.mark.parametrize("name", ["`x", "x`", "`` `x` ``", " x ", " x", "a\\`b", "<b>|</b>", "x\n# y\r\x1b"])
def test_code_span_holds_any_name(name):
    """The edges a folder path does not reach: backticks and spaces at either end, control characters."""
    markdown_it = pytest.importorskip("markdown_it")
    from compose.model_card import _code

    shown = name.replace("\n", "\\n").replace("\r", "\\r").replace("\x1b", "\\x1b")
    assert markdown_it.MarkdownIt("commonmark").render(f"- {_code(name)}: a source") == \
        f"<ul>\n<li><code>{html.escape(shown, quote=True)}</code>: a source</li>\n</ul>\n"


# -- compose inspect --dot -----------------------------------------------------------------------------

# Graphviz's lexer (lib/cgraph/scan.l): in a quoted string `\"` is a quote and `\\` a backslash pair;
# a lone backslash is itself, and the first unescaped quote ends the string.
DOT_TOKEN = re.compile(r'\s+|"((?:\\["\\]|\\(?!["\\])|[^"\\])*)"|([A-Za-z_][\w.]*)|(->|[{}\[\];,=])')


def parse_dot(text: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """The nodes (id -> attributes) and edges of the DOT compose writes: `digraph compose { ... }` of
    defaults (`rankdir=TB;`, `node [...];`), nodes `"id" [k=v, ...];` and edges `"a" -> "b" [k=v, ...];`.
    Quoted strings come back as a label shows them (`\\n` a newline, `\\\\` a backslash)."""
    tokens, at = [], 0
    while at < len(text):
        m = DOT_TOKEN.match(text, at)
        assert m, f"not DOT at {text[at:at + 40]!r}"
        if m[1] is not None:
            tokens.append(("q", re.sub(r'\\(["\\n])', lambda e: {"n": "\n"}.get(e[1], e[1]), m[1])))
        elif m[2] or m[3]:
            tokens.append(("a", m[2]) if m[2] else (m[3], m[3]))
        at = m.end()
    assert [v for _, v in tokens[:3]] == ["digraph", "compose", "{"] and tokens[-1] == ("}", "}")
    statements, current = [], []
    for token in tokens[3:-1]:
        if token[0] == ";":
            statements.append(current)
            current = []
        else:
            current.append(token)
    assert not current, "a statement without its ;"
    nodes, edges = {}, []
    for s in statements:
        if s[0][0] == "a":  # the defaults
            assert s[0][1] in ("rankdir", "node"), s
            continue
        ids, rest = (s[:3], s[3:]) if s[1:2] == [("->", "->")] else (s[:1], s[1:])
        assert all(kind == "q" for kind, _ in ids[::2]), s
        attrs = {}
        if rest:
            assert rest[0][0] == "[" and rest[-1][0] == "]", s
            body = rest[1:-1]
            for i in range(0, len(body), 4):
                key, eq, value, *sep = body[i:i + 4]
                assert key[0] == "a" and eq[0] == "=" and value[0] in "qa" and sep in ([], [(",", ",")]), s
                attrs[key[1]] = value[1]
            assert body[-1][0] != ",", s
        assert set(attrs) <= {"label", "style", "fillcolor", "color"}, s
        if len(ids) == 1:
            nodes[ids[0][1]] = attrs
        else:
            edges.append((ids[0][1], ids[2][1]))
    return nodes, edges


def test_dot_labels_are_strings_graphviz_reads_back(hostile, tmp_path):
    """Quotes, backslashes and newlines in a source's name stay inside its label's string."""
    ref, _, spec = hostile
    dot = tmp_path / "g.dot"
    assert main(["inspect", str(spec), "--dot", str(dot)]) == 0
    nodes, edges = parse_dot(dot.read_text())
    source = ref.split("+")[0]  # a layer's origin names the model, not the adapter folded in
    assert list(nodes) == ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "lm_head"]
    assert len(edges) == 6 and {n for e in edges for n in e} == set(nodes)
    assert nodes["layers.0"] == {"label": f"layers.0\n{source} layer 0", "style": "filled", "fillcolor": "lightgrey"}
    assert nodes["layers.1"]["label"] == f"layers.1\nnew copy of {source} layer 0\nidentity at init"
