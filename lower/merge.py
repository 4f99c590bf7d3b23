"""Lowering of `merge`: every output tensor becomes a `Merge` expression over the inputs' tensors, with
the method's parameters resolved for that tensor (merge_params), as mergekit plans a merge:

- inputs are the models in order; a base that is not among them is appended after them;
- t for gradients is a block's position in the merge, i / (n - 1) (1 for a single layer), and 0 for the
  embeddings, the final norm and the head;
- a model's own parameters win over the merge's; shared parameters are matched against the output
  tensor's name, per-model ones against that model's own tensor name (its source layer);
- with a tokenizer_source, every input's embedding and head are first remapped onto the output
  vocabulary (lower/tokenizer.py).
"""
from __future__ import annotations

import dataclasses

from compose.errors import SourceError, SpecError
from compose.ir.graph import Graph
from compose.ir.nodes import Block, LMHead, Origin
from compose.ir.state import State
from compose.ir.weights import Expr, Merge, derive_seed
from compose.lower.limits import check_merge_inputs
from compose.lower.merge_params import Layer, check_filters, check_known, resolve
from compose.merges.api import Method
from compose.merges.registry import get


def lower(spec, path: str, ctx) -> Graph:
    method = get(spec.method, f"{path}.method")
    inputs: list[tuple[str, object, dict]] = [(f"{path}.models[{i}]", m.model, m.parameters)
                                              for i, m in enumerate(spec.models)]
    base = None
    if spec.base is not None:
        base = next((i for i, m in enumerate(spec.models) if m.model == spec.base), None)
        if base is None:
            inputs.append((f"{path}.base", spec.base, {}))
            base = len(inputs) - 1
    _check_contract(method, len(inputs), base, path)
    check_merge_inputs(len(inputs), f"{path}.models")
    graphs = [ctx.input(m, p if p == f"{path}.base" else f"{p}.model") for p, m, _ in inputs]
    _check_structure(graphs, inputs)

    common: list[Layer] = ([(f"{path}.parameters", spec.parameters)] if isinstance(spec.parameters, dict)
                           else [(f"{path}.parameters[{j}]", d) for j, d in enumerate(spec.parameters)])
    own: list[list[Layer]] = [[(f"{p}.parameters", params)] + common for p, _, params in inputs]
    check_known(method, [layer for layers in own for layer in layers])
    blocks = [[b for _, b in g.blocks()] for g in graphs]
    n = len(blocks[0])
    names: set[str] = set()

    def merged(out: str, exprs: list[Expr], in_names: list[str], t: float) -> Expr:
        names.update([out, *in_names])
        for i, e in enumerate(exprs[1:], 1):
            if e.shape != exprs[0].shape:
                raise SpecError(f"{inputs[i][0]}: {out} has shape {list(e.shape)} there but {list(exprs[0].shape)} "
                                f"in {inputs[0][0]} (models of one architecture and size are needed)")
        params: dict[str, object] = {}
        for p in method.params:
            if p.scope == "shared":
                params[p.name] = resolve(p, common, out, t, n, method.name)
            else:
                idx = [i for i in range(len(exprs)) if p.scope == "input" or i != base]
                params[p.name] = tuple(resolve(p, own[i], in_names[i], t, n, method.name) for i in idx)
        seed = derive_seed(spec.seed, out) if method.random else None
        return Merge(method.name, tuple(exprs), base, tuple(params.items()), seed, out, spec.dtype)

    if graphs[0].derived and spec.tokenizer_source is not None:
        raise SpecError(f"{path}.tokenizer_source: a vocabulary of its own needs a hand-written family module, and "
                        f"{graphs[0].config.family} is derived from transformers' class")
    tokenizer, vocab = _tokenizer(spec, inputs, graphs, base, path, ctx)
    prefix = _stack_prefix(graphs[0])

    def on_vocab(exprs: list[Expr]) -> list[Expr]:
        # With a tokenizer_source, every model's rows are remapped onto the output vocabulary first.
        return [vocab.remap(i, exprs, spec.dtype) for i in range(len(exprs))] if vocab else exprs

    def blocks_merged() -> list:
        out_blocks = []
        for i in range(n):
            bs = [b[i] for b in blocks]
            t = i / (n - 1) if n > 1 else 1.0
            upd = {}
            for k in bs[0].params():
                out = f"{prefix}.{i}.{k}"
                in_names = [_input_name(b, k, out, prefix) for b in bs]
                upd[k] = merged(out, [b.params()[k] for b in bs], in_names, t)
            # A merge of one model (mergekit's passthrough slices) keeps that layer's origin; the weights
            # still say what was done to it.
            origin = bs[0].origin if len(bs) == 1 else Origin.merged(method.name, tuple(b.origin for b in bs))
            out_blocks.append(dataclasses.replace(bs[0].with_weights(**upd), origin=origin))
        return out_blocks

    donor = graphs[base] if base is not None else graphs[0]
    out_dtype = spec.out_dtype or spec.dtype or donor.config.dtype
    if donor.derived:  # every tensor outside the stack by its own name; a vision tower's layers at their own t
        from compose.families.derived import of

        d = of(donor)

        def outside(ops):
            return ops[0].with_weights(**{k: merged(k, [o.params()[k] for o in ops], [k] * len(ops), d.position(k))
                                          for k in ops[0].params()})

        stem, layers = outside([g.embedding for g in graphs]), blocks_merged()
        tail = outside([g.tail for g in graphs])
        check_filters([layer for layers in own for layer in layers], names)
        return Graph.layered(dataclasses.replace(donor.config, dtype=out_dtype), stem, layers, tail,
                             state=State(train="all", tokenizer=tokenizer))

    emb_name = "model.embed_tokens.weight"
    embed_w = merged(emb_name, on_vocab([g.embedding.params()["weight"] for g in graphs]), [emb_name] * len(graphs),
                     0.0)
    out_blocks = blocks_merged()
    norm_name = "model.norm.weight"
    norm_w = merged(norm_name, [g.final_norm.params()["weight"] for g in graphs], [norm_name] * len(graphs), 0.0)
    # With a built tokenizer, mergekit's vocab_size is its length.
    cfg = dataclasses.replace(donor.config, vocab=vocab.size) if vocab else donor.config
    if cfg.tie_embeddings:
        head_w = embed_w
    else:
        head_w = merged("lm_head.weight", on_vocab([g.head.params()["weight"] for g in graphs]),
                        ["lm_head.weight"] * len(graphs), 0.0)
    check_filters([layer for layers in own for layer in layers], names)

    return Graph.decoder(
        dataclasses.replace(cfg, dtype=out_dtype),
        dataclasses.replace(donor.embedding.with_weights(weight=embed_w), vocab=cfg.vocab), out_blocks,
        donor.final_norm.with_weights(weight=norm_w),
        LMHead(weights=(("weight", head_w),), vocab=cfg.vocab, hidden=cfg.hidden, tied=cfg.tie_embeddings),
        state=State(train="all", tokenizer=tokenizer),
    )


def _check_contract(method: Method, n: int, base: int | None, path: str) -> None:
    if method.base == "required" and base is None:
        raise SpecError(f"{path}.base: merge method {method.name!r} needs a base model")
    if method.base == "forbidden" and base is not None:
        raise SpecError(f"{path}.base: merge method {method.name!r} takes no base model")
    if n < method.min_inputs:
        raise SpecError(f"{path}.models: {method.name} needs at least {method.min_inputs} models, got {n}")
    if method.max_inputs is not None and n > method.max_inputs:
        raise SpecError(f"{path}.models: {method.name} takes at most {method.max_inputs} models"
                        f"{' (the base included)' if base is not None else ''}, got {n}")


def _check_structure(graphs: list[Graph], inputs) -> None:
    first = graphs[0]
    for (p, _, _), g in zip(inputs[1:], graphs[1:]):
        if g.config.family != first.config.family:
            raise SpecError(f"{p}: a {g.config.family} model cannot merge with {inputs[0][0]}'s {first.config.family}")
        if len(g.blocks()) != len(first.blocks()):
            raise SpecError(f"{p}: {len(g.blocks())} layers, but {inputs[0][0]} has {len(first.blocks())} "
                            "(merged models need the same depth; slice them with layers() first)")
        if first.derived:
            for part in ("embedding", "tail"):
                a, b = getattr(first, part).params(), getattr(g, part).params()
                if set(a) != set(b):
                    raise SpecError(f"{p}: it has tensors {sorted(set(a) ^ set(b))[:3]} that {inputs[0][0]}'s do not")
        for (_, a), (_, b) in zip(first.blocks(), g.blocks()):
            if set(a.params()) != set(b.params()):
                raise SpecError(f"{p}: its blocks have weights {sorted(set(b.params()) ^ set(a.params()))} "
                                f"that {inputs[0][0]}'s do not")


def _input_name(block: Block, k: str, out: str, prefix: str) -> str:
    """The name the input model itself gives this tensor (its source layer), for per-model filters."""
    o = block.origin
    return out if (o.new or o.method) else f"{prefix}.{o.layer}.{k}"


def _stack_prefix(g: Graph) -> str:
    """Where the layers sit in the checkpoint: `model.layers`, or what a derived family's class says."""
    if not g.derived:
        return "model.layers"
    from compose.families.derived import of

    return of(g).saved_stack


def _tokenizer(spec, inputs, graphs: list[Graph], base: int | None, path: str, ctx):
    """The tokenizer to write (graph state) and, with a tokenizer_source, the vocabulary plan. Without one
    the tokenizer is mergekit's donor's (the base model, else the first) and the rows stay as they are."""
    from compose.lower.tokenizer import plan_vocab

    ts = spec.tokenizer_source
    donor = (graphs[base] if base is not None else graphs[0]).state.tokenizer
    if ts is None:
        return donor, None
    if ts == "base" and base is None:
        raise SpecError(f"{path}.tokenizer_source: `base` needs a base model")
    if ts not in ("base", "union"):
        try:
            ts = ctx.open(ts).ref
        except SourceError as e:
            raise SpecError(f"{path}.tokenizer_source: {e}") from None
    vocab = plan_vocab(ts, [p for p, _, _ in inputs], [g.state.tokenizer for g in graphs],
                       [g.config.vocab for g in graphs], base, path, donor, ctx.open)
    return vocab.tokenizer, vocab
