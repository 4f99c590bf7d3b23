"""What tests/test_transformers4.py runs under transformers 4.x: a process of its own, with the folder
transformers 4 was installed into first on PYTHONPATH (the venv's transformers 5 behind it, torch from
the venv). It imports nothing of compose: it is a user of the output, as Optimum or vLLM would be.

    python transformers4_worker.py job.json
job.json: {"cases": {name: {"folder": ..., "ids": [[...]]}}, "generate": {name: {"folder": ..., "ids": [[...]],
"mask": [[...]], "runs": [generate's keyword arguments, ...]}}, "out": path}. Writes `out` (torch.save):
{"version": transformers.__version__, "logits": {name: tensor}, "errors": {name: traceback},
 "configs": {name: {rope_theta, rope_scaling, class}}, "generated": {name: [tensor per run]}}.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch


def main(job_path: str) -> None:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    job = json.loads(Path(job_path).read_text())
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    result = {"version": transformers.__version__, "logits": {}, "errors": {}, "configs": {}}
    for name, case in job["cases"].items():
        try:
            config = AutoConfig.from_pretrained(case["folder"], trust_remote_code=True)
            # Eager attention, as transformers 5 runs Gemma 2 (4.x's default sdpa drops its attention
            # soft-cap); for the other models eager and sdpa agree to 1e-7.
            dtype = {"dtype" if version >= (4, 56) else "torch_dtype": torch.float32}  # renamed in 4.56
            model = AutoModelForCausalLM.from_pretrained(case["folder"], attn_implementation="eager",
                                                         trust_remote_code=True, **dtype).eval()
            with torch.no_grad():
                logits = model(torch.tensor(case["ids"])).logits
            result["logits"][name] = logits.float().contiguous()
            result["configs"][name] = {"class": type(model).__name__,
                                       "rope_theta": getattr(config, "rope_theta", None),
                                       "rope_scaling": json.dumps(getattr(config, "rope_scaling", None))}
        except Exception:  # noqa: BLE001 -- each case's failure is reported by the test that reads it
            result["errors"][name] = traceback.format_exc(limit=6)
    # transformers 4.x's own GenerationMixin.generate on the model the folder's auto_map names
    result["generated"] = {}
    for name, case in job.get("generate", {}).items():
        try:
            dtype = {"dtype" if version >= (4, 56) else "torch_dtype": torch.float32}
            model = AutoModelForCausalLM.from_pretrained(case["folder"], trust_remote_code=True, **dtype).eval()
            ids, mask = torch.tensor(case["ids"]), torch.tensor(case["mask"])
            result["generated"][name] = [model.generate(ids, attention_mask=mask, **run) for run in case["runs"]]
        except Exception:  # noqa: BLE001
            result["errors"][f"generate:{name}"] = traceback.format_exc(limit=8)
    torch.save(result, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
