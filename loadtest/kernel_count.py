"""Kernels one frame step launches, at CSM-1B's layer and codebook counts, counted on the CPU.

Method: the engine's FrameStep._compute (what a CUDA graph captures per bucket) runs once
eagerly under a TorchDispatchMode that records every ATen operator it reaches. An
operator counts as one kernel unless it only allocates (empty*) or only makes a view
(its schema may alias its input: view, slice, transpose, expand...; such an operator
that copied after all, `.to(another dtype)` or a reshape of a strided view, counts). A
GEMM is one operator whatever its library; SDPA is one (its CPU decomposition, if any,
is below the dispatcher and not counted). The model has CSM-1B's structure (16 backbone
layers, 4 depth-decoder layers, 32 codebooks, 32:8 and 8:2 attention heads) with narrow
widths: the count does not depend on widths, and the narrow model builds in a second.
Weights are plain F.linear (cpu_kernels="mkl") in bf16, as on the GPU.

The step runs the GPU's code path: the fused operators (engine/fused.py) call their Triton
kernels (engine/triton_kernels.py), registered as `torch.ops.csm.*` (Triton imported in its
CPU interpreter mode, TRITON_INTERPRET=1, set below). Each `csm::` operator is one Triton
kernel launch and counts as one; its result here comes from its eager form (fused.EAGER_FORMS:
the interpreter would take many minutes at these sizes; tests/model/test_triton_kernels.py
holds the kernels equal to those forms). The ATen operators around them count as above.

    python -m loadtest.kernel_count                       # prints the table
    python -m loadtest.kernel_count --write before        # loadtest/results/kernels_per_frame_before.json
    python -m loadtest.kernel_count --write fused --compare before unfused   # + the markdown table
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the GPU path's Triton kernels, run by the CPU interpreter

import argparse
import collections
import json
import platform
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from csm_triton.engine import fused
from csm_triton.engine.capacity import EngineConfig
from csm_triton.engine.engine import GenerationEngine
from csm_triton.engine.frame_step import FrameStep
from csm_triton.engine.lm import CsmLM
from loadtest.workload import cpu_model, git_commit

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 64)
ATTEND_LEN = 256
GEMMS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_mkl_linear", "mkldnn_linear", "_linear_pointwise"}
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


class KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "csm":  # ours: one Triton kernel each
            self.ops[f"csm::{name}"] += 1
            return fused.EAGER_FORMS[name](*args, **(kwargs or {}))
        result = func(*args, **(kwargs or {}))
        if func.is_view:  # may alias: a kernel only when it copied (`.to(other dtype)`, reshape of a strided view)
            if _copied(args[0], result):
                self.ops[name] += 1
        elif name not in ALLOCATIONS and name not in ("detach", "lift_fresh", "alias"):
            self.ops[name] += 1
        return result


def _copied(source, result) -> bool:
    if not isinstance(source, torch.Tensor) or not isinstance(result, torch.Tensor):
        return False
    return result.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()


def csm_1b_structure(seed: int = 0):
    """A random CSM with CSM-1B's layer, head and codebook counts and narrow widths (the
    tiny checkpoint's config, its layer and head counts raised to CSM-1B's)."""
    from transformers import CsmForConditionalGeneration

    from export.tiny_checkpoint import build_tokenizer, tiny_config

    config = tiny_config(build_tokenizer())
    config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads = 16, 32, 8
    config.head_dim = config.hidden_size // config.num_attention_heads
    depth = config.depth_decoder_config
    depth.num_hidden_layers, depth.num_attention_heads, depth.num_key_value_heads = 4, 8, 2
    depth.head_dim = depth.hidden_size // depth.num_attention_heads
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(config).eval()
    model.codec_model = None
    return model


def count(batch: int, lm: CsmLM) -> dict:
    engine = GenerationEngine(lm, EngineConfig(max_slots=max(BATCHES), max_context=ATTEND_LEN, warm_up=False))
    step = FrameStep(
        lm, engine.cache, engine.depth_cache, engine.hidden, batch=batch, attend_len=ATTEND_LEN, top_k_bound=64
    )
    step.positions.fill_(ATTEND_LEN - 1)
    counter = KernelCounter()
    with torch.inference_mode(), fused.kernels_on_cpu(), counter:
        step._compute()
    ops = counter.ops
    return {
        "batch": batch,
        "kernels": sum(ops.values()),
        "gemms": sum(n for name, n in ops.items() if name in GEMMS),
        "attention": sum(n for name, n in ops.items() if "attention" in name),
        "fused": sum(n for name, n in ops.items() if "::" in name),
        "by_op": dict(ops.most_common()),
    }


def measure() -> dict:
    model = csm_1b_structure()
    # bf16, as served on a GPU: its casts (fp32 norms and heads) are kernels too.
    lm = CsmLM(model, device=torch.device("cpu"), dtype=torch.bfloat16, max_batch=max(BATCHES), cpu_kernels="mkl")
    layers = len(lm.backbone.layers) + (lm.num_codebooks - 1) * len(lm.depth.layers)
    rows = [count(batch, lm) for batch in BATCHES]
    return {
        "commit": git_commit(),
        "machine": f"{cpu_model()} ({platform.machine()})",
        "torch": torch.__version__,
        "layer_calls_per_frame": layers,
        "codebooks": lm.num_codebooks,
        "attend_len": ATTEND_LEN,
        "rows": rows,
    }


def markdown(after: dict, earlier: list[dict], command: str) -> str:
    lines = [
        "# Kernels per frame step (CSM-1B's structure, counted on the CPU)",
        "",
        f"Method: `loadtest/kernel_count.py` (its docstring): ATen operators that are not views or "
        f"allocations, and one per fused Triton kernel (`csm::`, from the commit that has them), reached by "
        f"one `FrameStep._compute` on the GPU's code path (what the CUDA graph captures), "
        f"{after['layer_calls_per_frame']} transformer layer calls and {after['codebooks']} codebooks per "
        f"frame, attention over {after['attend_len']} positions. Counted on {after['machine']}, "
        f"torch {after['torch']}; command `{command}`.",
        "",
        "| commit | batch | kernels / frame | per layer call | GEMMs | attention | fused Triton kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in [*earlier, after]:
        for row in report["rows"]:
            lines.append(
                f"| {report['commit']} | {row['batch']} | {row['kernels']:,} | "
                f"{row['kernels'] / report['layer_calls_per_frame']:.1f} | {row['gemms']} | "
                f"{row['attention']} | {row.get('fused', 0)} |"
            )
    lines += ["", f"Operators at batch 1 ({after['commit']}):", "", "| operator | count |", "|---|---|"]
    lines += [f"| `{name}` | {n} |" for name, n in after["rows"][0]["by_op"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", metavar="LABEL", help="save as results/kernels_per_frame_<LABEL>.json")
    parser.add_argument("--compare", metavar="LABEL", nargs="+", help="saved counts to put before this one (markdown)")
    args = parser.parse_args(argv)
    report = measure()
    for row in report["rows"]:
        print(
            f"batch {row['batch']}: {row['kernels']:,} kernels per frame "
            f"({row['gemms']} GEMMs, {row['attention']} attention)"
        )
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"kernels_per_frame_{args.write}.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.compare:
        earlier = [json.loads((RESULTS / f"kernels_per_frame_{label}.json").read_text()) for label in args.compare]
        command = f"python -m loadtest.kernel_count --write {args.write} --compare {' '.join(args.compare)}"
        (RESULTS / "kernels_per_frame.md").write_text(markdown(report, earlier, command))
        print((RESULTS / "kernels_per_frame.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
