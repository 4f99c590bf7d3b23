"""Composite models (CALM, CogVLM): no transformers class holds them, so they are written as the generated
modeling code with a config.json whose auto_map names it, and tensors under the generated module's names
(`augment.layers.0.*`, `cross.0.*`, `vision_adapter.*`, `model.layers.3.vision_expert.*`)."""
from __future__ import annotations

from compose.families.base import Family, Parts, file_fields
from compose.ir.graph import Graph
from compose.ir.nodes import Adapter, CrossAttention, DecoderBlock

AUTO_MAP = {"AutoConfig": "modeling_compose_hf.ComposeConfig",
            "AutoModelForCausalLM": "modeling_compose_hf.ComposeHFForCausalLM"}


class Composite(Family):
    model_type = "compose"
    architecture = "ComposeHFForCausalLM"
    dense = "compose"
    generated = True

    def refuse(self, g: Graph) -> str | None:
        return None if g.composite else "only composite models (CALM, CogVLM) are written as generated code"

    def block_parts(self, prefix: str, b: DecoderBlock) -> Parts:
        # A block's visual expert is a part of its own: it trains while the block around it is frozen.
        named = self.block_names(prefix, b)
        vision = {k: e for k, e in named.items() if k.startswith(prefix + "vision_expert.")}
        out = [(bool(b.trainable), {k: e for k, e in named.items() if k not in vision})]
        if vision:
            out.append((bool(b.trainable or b.vision.trainable), vision))
        return out

    def tensors(self, g: Graph) -> Parts:
        out = super().tensors(g)
        dead = set(g.dead())
        for prefix in g.side_configs:
            embed = g.op(f"{prefix}.embed")
            out.append((bool(embed.trainable), {f"{prefix}.embed_tokens.weight": embed.params()["weight"]}))
            live = [b for n, b in g.side_blocks(prefix) if n not in dead]
            out += [(bool(b.trainable), {f"{prefix}.layers.{j}.{k}": e for k, e in b.params().items()})
                    for j, b in enumerate(live)]
        cross = [op for _, op in g.items() if isinstance(op, CrossAttention)]
        out += [(bool(op.trainable), {f"cross.{k}.{n}": e for n, e in op.params().items()})
                for k, op in enumerate(cross)]
        out += [(bool(op.trainable), {f"{name}.{k}": e for k, e in op.params().items()})
                for name, op in g.items() if isinstance(op, Adapter)]
        return out

    def config_json(self, g: Graph) -> dict:
        """What transformers reads to find the generated code (auto_map) and the basics it asks for; the
        sizes live in the generated code."""
        c = g.config
        about = {"kind": g.composite, "family": c.family, **{p: s.family for p, s in g.side_configs.items()}}
        if g.state.calm is not None:
            about["calm"] = {"pairs": [list(p) for p in g.state.calm.pairs], "augment": g.state.calm.augment,
                             "heads": next(op.heads for _, op in g.items() if isinstance(op, CrossAttention))}
        if g.adapter is not None:
            about["visual_expert"] = {"vision_width": g.adapter.vision_width}
        return {"model_type": self.model_type, "architectures": [self.architecture], "auto_map": AUTO_MAP,
                "vocab_size": c.vocab, "hidden_size": c.hidden, "num_hidden_layers": len(g.blocks()),
                "tie_word_embeddings": g.head.tied, **file_fields(c.dtype), "max_position_embeddings": c.max_positions,
                **c.token_ids(), "compose": about}


FAMILY = Composite()
