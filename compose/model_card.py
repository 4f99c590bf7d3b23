"""README.md, the model card of a build: what the Hugging Face Hub shows and indexes (mergekit writes one
too). YAML front matter the Hub reads (`base_model`, `tags`, `library_name`, `pipeline_tag`), then the
methods with their papers, the sources, the class written, what trains, where each layer came from, and
the spec as built (the one compose.json records).

It is rendered from the spec and the compiled graph, the same information compose.json is written from,
and holds nothing about where the build was written (the folder is renamed into place afterwards, and
two builds of one spec are the same bytes wherever they go).

Every string that comes from the spec or the sources (refs, folder and adapter names, tensor names) is
data, not Markdown: the front matter is YAML written by yaml.safe_dump, which quotes what needs quoting;
the body holds such a string only as a code span (`_code`) or in the spec's fenced block, so a source
named like a heading, a link or a `<script>` tag shows as its name and makes none. The only links are
compose's own, to the methods' papers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

FILE = "README.md"


@dataclass(frozen=True)
class Method:
    tag: str
    name: str
    papers: tuple[tuple[str, str], ...]
    """(citation, link)."""
    what: str
    tags: tuple[str, ...] = ()
    """Further Hub tags (`mergekit` for mergekit's merge methods)."""


OPS = {
    "expand_blocks": Method("llama-pro", "LLaMA-Pro block expansion",
                            (("Wu et al., 2024, arXiv:2401.02415", "https://arxiv.org/abs/2401.02415"),),
                            "identity blocks (zero output projections) inserted after groups of layers; the model "
                            "computes exactly what the source does until they train"),
    "depth_upscale": Method("solar", "SOLAR depth up-scaling",
                            (("Kim et al., 2023, arXiv:2312.15166", "https://arxiv.org/abs/2312.15166"),),
                            "two copies of the layers, the last layers of the first and the first of the second "
                            "dropped, stacked"),
    "layers": Method("passthrough", "layer slices (mergekit's passthrough)", (),
                     "layer ranges of the sources stacked in order"),
    "stack": Method("passthrough", "layer slices (mergekit's passthrough)", (),
                    "layer ranges of the sources stacked in order"),
    "calm": Method("calm", "CALM composition",
                   (("Bansal et al., 2024, arXiv:2401.02412", "https://arxiv.org/abs/2401.02412"),),
                   "the anchor model cross-attends to the augmenting model's hidden states; both stay frozen"),
    "visual_expert": Method("cogvlm", "CogVLM visual expert",
                            (("Wang et al., 2023, arXiv:2311.03079", "https://arxiv.org/abs/2311.03079"),),
                            "vision QKV, output projection and FFN in every layer for image tokens, copied from "
                            "the language weights, and an MLP adapter for image features"),
}
MOE = {
    "upcycle": Method("moe", "mixture of experts by sparse upcycling",
                      (("Komatsuzaki et al., 2022, arXiv:2212.05055", "https://arxiv.org/abs/2212.05055"),
                       ("Mixtral, Jiang et al., 2024, arXiv:2401.04088", "https://arxiv.org/abs/2401.04088")),
                      "each FFN copied into the experts of a top-k routed layer"),
    "from_experts": Method("moe", "mixture of experts from dense models (mergekit-moe)",
                           (("Mixtral, Jiang et al., 2024, arXiv:2401.04088", "https://arxiv.org/abs/2401.04088"),),
                           "attention and embeddings from the base model, expert e of each layer from model e's FFN"),
    "fine_grained": Method("moe", "DeepSeekMoE fine-grained experts",
                           (("Dai et al., 2024, arXiv:2401.06066", "https://arxiv.org/abs/2401.06066"),),
                           "each FFN cut into narrow experts, some routed and some always on (shared)"),
}
LORA = Method("lora", "LoRA adapter folded in",
              (("Hu et al., 2021, arXiv:2106.09685", "https://arxiv.org/abs/2106.09685"),),
              "a PEFT adapter's low-rank update added to the weights it adapts (`model+adapter`)")
MERGE_PAPERS = {
    "linear": (("model soups, Wortsman et al., 2022, arXiv:2203.05482", "https://arxiv.org/abs/2203.05482"),
               ("SPHINX's weight mix, Lin et al., 2023, arXiv:2311.07575", "https://arxiv.org/abs/2311.07575")),
    "slerp": (("Shoemake, 1985, Animating rotation with quaternion curves", "https://en.wikipedia.org/wiki/Slerp"),),
}
"""Merge methods whose card cites more than (or other than) the method's own reference."""


def _auto_class(g) -> tuple[str, str]:
    """(the Auto class that loads the output, the Hub's pipeline_tag): a derived family's image-text-to-text
    class (Qwen2.5-VL's) loads as one."""
    if g.derived:
        from compose.families.derived import image_text_to_text, of

        if image_text_to_text(of(g).architecture):
            return "AutoModelForImageTextToText", "image-text-to-text"
    return "AutoModelForCausalLM", "text-generation"


def render(spec: dict, g, trainable: list[str], tensors: dict, version: str) -> str:
    """The card of a build of `spec` (its JSON dump, as compose.json records it) compiled to `g`, with the
    trainable tensor names and every output tensor's expression (name -> Expr)."""
    methods, refs, adapters = _walk(spec.get("model", spec))
    hub = [_hub_name(r) for r in refs]
    tags = ["compose", "merge"] + sorted({t for m in methods for t in (m.tag, *m.tags)} - {"compose", "merge"})
    auto, task = _auto_class(g)
    front = {"base_model": [h for h in dict.fromkeys(hub) if h is not None], "library_name": "transformers",
             "pipeline_tag": task, "tags": tags}
    if not front["base_model"]:
        del front["base_model"]
    target = g.state.target
    lines = ["---", yaml.safe_dump(front, sort_keys=True).rstrip(), "---", "",
             f"# {target.architecture} built with compose", "",
             (f"Built by compose {version}, a compiler for composing language models, from the spec below. "
              "`compose.json` beside this card records the spec, the IR hash, where every tensor came from and "
              "the sha256 of every file."), "", "## Method", ""]
    for m in dict.fromkeys(methods):
        cites = "; ".join(f"[{c}]({link})" for c, link in m.papers)
        lines.append(f"- **{m.name}**" + (f" ({cites})" if cites else "") + f": {m.what}.")
    if not methods:
        lines.append("- a copy of the source, rewritten as the class below.")
    lines += ["", "## Sources", ""]
    lines += [f"- {_code(r)}: {_describe_ref(r)}" for r in dict.fromkeys(refs)]
    lines += [f"- {_code(a)}: a LoRA adapter (PEFT), folded into the weights" for a in dict.fromkeys(adapters)]
    remote = ", trust_remote_code=True" if _generated(target) else ""
    lines += ["", "## Output", "", _output(g, target), "", "```python", f"from transformers import {auto}",
              "", f'model = {auto}.from_pretrained("path/to/this/folder"{remote})', "```", "",
              "## Trainable parameters", "", _trainable(g, trainable, tensors), "", "## Layers", "",
              "| layer | from | trains |", "| --- | --- | --- |"]
    lines += [f"| {i} | {_cell(b.origin.describe(_code))}{' (identity at init)' if b.identity else ''} | "
              f"{'yes' if b.trainable else 'no'} |" for i, (_, b) in enumerate(g.blocks())]
    body = yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=100).rstrip()
    fence = _fence(body, 3)
    lines += ["", "## Spec", "", f"{fence}yaml", body, fence, ""]
    return "\n".join(lines)


def write(folder: Path, spec: dict, g, trainable: list[str], tensors: dict, version: str) -> str:
    (folder / FILE).write_text(render(spec, g, trainable, tensors, version), encoding="utf-8")
    return FILE


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _code(text: str) -> str:
    """`text` as a Markdown code span it cannot leave (CommonMark 6.1), so nothing in it reads as HTML, a
    link or a heading: control characters shown as their escapes (a line break would end the span), a fence
    one backtick longer than any run inside, and a space inside the fence where the text starts or ends with
    a backtick or with a space at both ends (CommonMark strips one space from each side)."""
    text = _CONTROL.sub(lambda m: repr(m[0])[1:-1], text)
    pad = " " if "`" in (text[:1], text[-1:]) or (text[:1] == text[-1:] == " " and text.strip()) else ""
    fence = _fence(text)
    return f"{fence}{pad}{text}{pad}{fence}"


def _fence(text: str, least: int = 1) -> str:
    """A backtick fence that no run of backticks in `text` closes."""
    return "`" * max(least, 1 + max((len(r) for r in re.findall(r"`+", text)), default=0))


def _cell(text: str) -> str:
    """`text` in a table cell: GitHub-flavoured Markdown splits a row at every unescaped `|` before it reads
    code spans, so each `|` is escaped, and backslashes just before one doubled (an odd count escapes it)."""
    return re.sub(r"(\\*)\|", lambda m: 2 * m[1] + "\\|", text)


def _walk(node) -> tuple[list[Method], list[str], list[str]]:
    """The methods of a spec tree, outermost first, its models' refs, and the LoRA adapters folded into
    them (`model+adapter`), in spec order."""
    methods: list[Method] = []
    refs: list[str] = []
    adapters: list[str] = []

    def visit(x):
        if isinstance(x, dict):
            op = x.get("op")
            if op == "load" and isinstance(x.get("ref"), str):
                model, plus, adapter = x["ref"].partition("+")
                refs.append(model)
                if plus:
                    methods.append(LORA)
                    adapters.append(adapter)
            elif op == "merge":
                methods.append(_merge_method(x["method"]))
            elif op == "moe":
                methods.append(MOE[x["kind"]])
            elif op in OPS:
                methods.append(OPS[op])
            for v in x.values():
                visit(v)
        elif isinstance(x, list):
            for v in x:
                visit(v)

    visit(node)
    return methods, refs, adapters


def _merge_method(name: str) -> Method:
    from compose.merges.registry import get

    reference = get(name).reference
    arxiv = re.fullmatch(r"https://arxiv.org/abs/(\S+)", reference)
    papers = MERGE_PAPERS.get(name, ((f"arXiv:{arxiv[1]}" if arxiv else reference, reference),) if reference else ())
    return Method(name.replace("_", "-"), f"{name} merge (as mergekit 0.1.5 computes it)", papers,
                  "the sources merged tensor by tensor", tags=("mergekit",))


def _hub_name(ref: str) -> str | None:
    """`base_model`'s entry for a source: a hub id as it is, a local folder by its name; None for a
    built-in tiny model, which is no model on the Hub."""
    if ref.startswith("tiny:"):
        return None
    path = Path(ref).expanduser()
    return path.resolve().name if path.exists() else ref


def _describe_ref(ref: str) -> str:
    if ref.startswith("tiny:"):
        return "compose's built-in tiny model (random weights from a fixed seed, for tests; not on the Hub)"
    return "a local folder" if Path(ref).expanduser().exists() else "a Hugging Face Hub model"


def _generated(target) -> bool:
    from compose import families

    return families.get(target.family).generated


def _output(g, target) -> str:
    cost = g.state.cost
    size = ""
    if cost is not None:
        size = f"; {cost.params:,} parameters"
        if cost.active_params != cost.params:
            size += f", {cost.active_params:,} active per token"
    how = ("compose's generated modeling code (`auto_map`, load with `trust_remote_code=True`)"
           if _generated(target) else "a native transformers class")
    return (f"{_code(target.architecture)} (model_type {_code(target.family)}), {how}; {len(g.blocks())} layers, "
            f"{g.config.dtype}{size}.")


RULES = {"all": "everything trains (continued pre-training)",
         "new": "only the new blocks train (LLaMA-Pro); the source's layers stay frozen",
         "cross": "only the cross-attention layers train (CALM); both models stay frozen",
         "vision": "only the visual experts and the vision adapter train (CogVLM)"}


def _trainable(g, trainable: list[str], tensors: dict) -> str:
    count = sum(tensors[n].numel for n in trainable)
    total = sum(e.numel for e in tensors.values())
    groups = _groups(trainable)
    listing = ", ".join(_code(x) for x in groups) if groups else "none"
    return f"{count:,} of {total:,} parameters: {RULES[g.state.train]}. Trainable tensors: {listing}."


def _groups(names: list[str]) -> list[str]:
    """Tensor names summarised by module: `model.layers.{2,5,8}.*`, `model.layers.{0-7}.vision_expert.*`,
    `cross.{0-3}.*`, `vision_adapter.*`, `lm_head.*`."""
    indexed: dict[str, list[int]] = {}
    for n in names:
        m = re.match(r"(.*?)\.(\d+)\.(vision_expert\.)?", n)
        if m:
            key = f"{m[1]}.{{}}.{m[3] or ''}*"
        else:
            parts = n.split(".")
            key = ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1]) + ".*"
        indexed.setdefault(key, [])
        if m and int(m[2]) not in indexed[key]:
            indexed[key].append(int(m[2]))
    return [k.format("{" + _ranges(v) + "}") if v else k for k, v in indexed.items()]


def _ranges(xs: list[int]) -> str:
    xs = sorted(xs)
    spans: list[list[int]] = []
    for x in xs:
        if spans and x == spans[-1][1] + 1:
            spans[-1][1] = x
        else:
            spans.append([x, x])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
