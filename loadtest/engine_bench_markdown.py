"""engine_bench's report as a markdown table: the rows per dtype and batch, the floor, and
bf16's token agreement with fp32 (loadtest/engine_bench.py writes it beside its JSON)."""

from __future__ import annotations

import torch


def _table(rows: list[dict], dtype: str) -> list[str]:
    lines = []
    for row in rows:
        if "tokens_identical_to_generate" in row:
            tokens = f"{row['tokens_identical_to_generate']} ({row['requests_compared']} compared)"
        else:
            tokens = f"{row['speedup_vs_fp32_engine']}x the fp32 engine; tokens: agreement below"
        lines.append(
            f"| {dtype} | {row['batch']} | {row['engine_ms_per_step']} | {row['floor_ms_per_step']} | "
            f"{row['percent_of_floor']} % | {row['engine_x_real_time_aggregate']} | "
            f"{row['generate_ms_per_frame_batch1']} | {row['speedup_vs_generate']}x | {tokens} |"
        )
    return lines


def markdown(report: dict) -> str:
    gib = 2**30
    lines = [
        f"# Engine vs transformers `generate` ({report['model']})",
        "",
        f"- device: {report['device']} (`{report['torch_device']}`, {report['dtype']})",
        f"- commit: `{report['commit']}`, torch {report['torch']}; 1-minute load average "
        f"{report['load_average_1min_at_start']} at the start, {report['load_average_1min_at_end']} at the end "
        f"(this run's own load is about {torch.get_num_threads()})",
        f"- command: `{report['command']}`",
        f"- greedy, {report['frames_per_request']} frames per request, prompts of "
        f"{report['prompt_tokens']}+ tokens; steady-state medians (prefill excluded)",
        f"- floor: the weight bytes one frame step reads ({report['weight_bytes_per_frame'] / gib:.2f} GiB in "
        f"{report['dtype']}: backbone and head once, depth decoder and projector x31, each depth head once) / "
        f"the read bandwidth measured in this run ({report['memory_bandwidth_gb_s']} GB/s: the sum of a 1 GiB "
        f"tensor, best of 5, same threads). % of floor = floor / measured (100 % = at the limit)",
        "",
        "| dtype | batch | engine ms/step | floor ms/step | % of floor | engine x real time (aggregate) | "
        f"generate ms/frame (b=1, {report['dtype']}) | speed-up vs generate one at a time | tokens identical |",
        "|---|---|---|---|---|---|---|---|---|",
        *_table(report["rows"], report["dtype"]),
    ]
    bf16 = report.get("bf16")
    if bf16:
        lines += _table(bf16["rows"], "bfloat16")
        agreement = bf16.get("agreement")
        if agreement:
            lines += [
                "",
                f"bf16 vs fp32 greedy tokens, {agreement['requests']} requests x {agreement['frames']} frames x 32 "
                f"codebooks (random weights, so a rough figure: a trained model's sharper distributions "
                f"usually agree more): **{agreement['identical_fraction']:.1%} identical**; first differing frame "
                f"per request {agreement['first_divergent_frame']}, with "
                f"{agreement['codebooks_equal_before_it']} of its 32 codebooks equal before the first "
                f"different code (after it the two are different continuations, so later frames differ too).",
            ]
    lines += ["", "Kernels chosen at load (engine/kernels.py), per weight shape [out x in]:", ""]
    lines += [f"- {report['dtype']}: {line}" for line in report["kernels"]]
    if bf16:
        lines += [f"- bfloat16: {line}" for line in bf16["kernels"]]
    if report.get("fused_kernels"):  # the frame step's Triton kernels (engine/fused.py), on a GPU
        overlapped = {row.get("overlap_steps") for row in report["rows"]}
        overlap = "" if None in overlapped else "; steps overlapped" if True in overlapped else "; one step at a time"
        lines += ["", f"Frame step: {report['fused_kernels']}{overlap}."]
    return "\n".join(lines) + "\n"
