"""LoRA fine-tuning of CSM on a speech dataset.

    python -m finetune.train --data DATA --out OUT [--checkpoint DIR] [--steps N] [--merge]

Leaves under OUT: `adapter/` (peft format), `metrics.jsonl` and `loss.png`,
`checkpoints/step-*.pt` (for --resume), `manifest.json`, and with --merge `merged/`:
a full checkpoint in the Hugging Face layout that export.build_repository takes.
docs/fine-tuning.md has the data formats and what to expect.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from csm_triton.core.adapter_base import base_model_sha256
from csm_triton.core.files import atomic_write
from finetune.batches import Example, Turn, build_batch
from finetune.codes import CodeCache
from finetune.data import DEFAULT_MAX_SECONDS, DatasetError, dataset_sha256, load_dataset

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoRA goes into the backbone and the depth decoder only: Mimi's transformer has
# q/k/v/o projections of the same names, and the codec must stay the one the
# codes were made with (and the one the served mimi_encoder/decoder export).
LM_PREFIX = r"^(backbone_model|depth_decoder\.model)\..*\."
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MERGED = "merged"
METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"
RECORDED_PACKAGES = ("torch", "transformers", "peft", "datasets", "numpy")
# What must match for --resume to continue the same run.
RUN_DEFINING = (
    "data",
    "checkpoint",
    "steps",
    "seed",
    "rank",
    "alpha",
    "dropout",
    "target_modules",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "batch_size",
    "grad_accum",
    "max_grad_norm",
    "depth_decoder_labels_ratio",
    "context",
    "eval_fraction",
    "max_seconds",
)


class FinetuneError(Exception):
    """A run that cannot start or continue; the message is one line."""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_checkpoint() -> Path:
    """The tiny random CSM (built once under build/), when no checkpoint is named."""
    from export.tiny_checkpoint import build_tiny_checkpoint

    folder = Path(__file__).resolve().parent.parent / "build" / "tiny-csm"
    if not (folder / "config.json").is_file():
        build_tiny_checkpoint(folder)
    return folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        type=Path,
        help="a folder of audio + .txt, a .jsonl/.csv manifest, or a datasets folder / parquet",
    )
    data.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS, help="longer clips are skipped")
    data.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share of the clips (at least 1)")
    data.add_argument(
        "--context",
        action="store_true",
        help="prepend the speaker's previous utterance as a context turn (not in the loss)",
    )
    data.add_argument(
        "--cache-dir",
        type=Path,
        default=Path("~/.cache/csm-finetune/codes"),
        help="Mimi codes, keyed by clip and codec hash",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="a CSM checkpoint folder (Hugging Face layout); the tiny random CSM if omitted",
    )
    model.add_argument("--rank", type=int, default=32, help="LoRA rank r")
    model.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scale = alpha / r)")
    model.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    model.add_argument(
        "--target-modules",
        default=",".join(DEFAULT_TARGET_MODULES),
        help="comma-separated projections of the backbone and depth decoder",
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=500, help="optimizer steps")
    optim.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    optim.add_argument("--weight-decay", type=float, default=0.01)
    optim.add_argument("--warmup-ratio", type=float, default=0.05, help="linear warm-up share, then cosine to 0")
    optim.add_argument("--batch-size", type=int, default=1, help="clips per micro-batch")
    optim.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    optim.add_argument(
        "--depth-decoder-labels-ratio",
        type=float,
        default=1.0,
        help="share of frames the depth decoder trains on (Sesame: 1/16 to amortise compute)",
    )
    optim.add_argument("--seed", type=int, default=0, help="data order, split, dropout, frame sampling")
    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, type=Path, help="output folder")
    run.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (and at the end)")
    run.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT")
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after N steps in this run (a time-boxed job; --resume continues it)",
    )
    run.add_argument("--merge", action="store_true", help="also write OUT/merged, a full checkpoint")
    run.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.target_modules = tuple(m.strip() for m in args.target_modules.split(",") if m.strip())
    return args


def _run_definition(args: argparse.Namespace) -> dict:
    values = vars(args)
    return {
        key: (
            str(values[key])
            if isinstance(values[key], Path)
            else list(values[key])
            if isinstance(values[key], tuple)
            else values[key]
        )
        for key in RUN_DEFINING
    }


def _lora_model(model, args):
    from peft import LoraConfig, get_peft_model

    pattern = LM_PREFIX + "(" + "|".join(args.target_modules) + ")$"
    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=pattern, bias="none"
    )
    return get_peft_model(model, config)


def _examples(clips, codes, indices, context: bool) -> list[Example]:
    """The split's clips as examples; the context turn is the same speaker's previous clip
    in dataset order (from either split: it is input, never a target)."""
    previous: dict[int, int] = {}
    before: dict[int, int | None] = {}
    for index, clip in enumerate(clips):
        before[index] = previous.get(clip.speaker)
        previous[clip.speaker] = index
    examples = []
    for index in indices:
        clip = clips[index]
        turn = Turn(clip.speaker, clip.text, codes[index])
        prior = before[index] if context else None
        examples.append(
            Example(turn, Turn(clips[prior].speaker, clips[prior].text, codes[prior]) if prior is not None else None)
        )
    return examples


class MicroBatches:
    """Micro-batch m of the run is a pure function of (seed, m): each epoch is a
    permutation seeded by seed + epoch, so --resume picks up exactly where a run stopped."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.RandomState(self.seed + epoch).permutation(self.count)}
        return self._orders[epoch]

    def __getitem__(self, micro: int) -> list[int]:
        positions = range(micro * self.batch_size, (micro + 1) * self.batch_size)
        return [int(self._order(p // self.count)[p % self.count]) for p in positions]


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)  # fp32 on CPU


@torch.no_grad()
def evaluate(peft_model, processor, examples, *, batch_size: int, seed: int, device) -> float:
    """Mean loss over the held-out examples, dropout off, every frame in the depth decoder's loss."""
    was_training = peft_model.training
    peft_model.eval()
    base = peft_model.get_base_model()
    torch.manual_seed(seed)
    losses, weights = [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        with _autocast(device):
            batch = build_batch(processor, base, chunk, depth_decoder_labels_ratio=1.0)
            losses.append(float(peft_model(**batch).loss))
        weights.append(len(chunk))
    peft_model.train(was_training)
    return float(np.average(losses, weights=weights))


def _checkpoint_path(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:07d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("step-*.pt")) if (out / CHECKPOINTS).is_dir() else []
    return found[-1] if found else None


def _save_checkpoint(out: Path, step: int, peft_model, optimizer, scheduler, definition: dict) -> None:
    from peft import get_peft_model_state_dict

    path = _checkpoint_path(out, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "definition": definition,
        "adapter": get_peft_model_state_dict(peft_model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    with atomic_write(path) as handle:
        torch.save(state, handle)


def _save_adapter(out: Path, peft_model) -> Path:
    """peft's own format, published with one rename (a reader never sees half an adapter)."""
    target = out / ADAPTER
    staging = out / f".{ADAPTER}.writing"
    shutil.rmtree(staging, ignore_errors=True)
    peft_model.save_pretrained(staging)
    old = out / f".{ADAPTER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_json(path: Path, value: dict) -> None:
    with atomic_write(path) as handle:
        handle.write((json.dumps(value, indent=2) + "\n").encode())


def _plot(metrics_path: Path, target: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a dev dependency; the JSONL has the same numbers
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    held = [(r["step"], r["loss"]) for r in rows if r["kind"] == "eval"]
    figure, axes = plt.subplots(figsize=(7, 4))
    if train:
        axes.plot(*zip(*train), label="train", linewidth=0.8)
    if held:
        axes.plot(*zip(*held), "o-", label="held-out")
    axes.set_xlabel("step")
    axes.set_ylabel("CSM loss (backbone + depth decoder)")
    axes.legend()
    figure.tight_layout()
    with atomic_write(target, durable=False) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


@dataclasses.dataclass
class RunResult:
    out: Path
    steps_done: int
    train_loss: float | None
    eval_losses: list[tuple[int, float]]
    seconds: float
    steps_per_second: float


def train(args: argparse.Namespace) -> RunResult:
    from transformers import CsmForConditionalGeneration, CsmProcessor, get_cosine_schedule_with_warmup

    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda message: None) if getattr(args, "quiet", False) else (lambda message: print(message, file=sys.stderr))
    # The data first: a dataset with nothing usable is refused before any model loads.
    clips, report = load_dataset(args.data, max_seconds=args.max_seconds)
    for line in report.lines():
        log(line)
    if len(clips) < 2:
        raise FinetuneError(f"{len(clips)} usable clip in {args.data}: need at least 2 (one held out)")

    checkpoint = (args.checkpoint or default_checkpoint()).expanduser().resolve()
    from export.checkpoint import CheckpointError, validate_checkpoint

    try:
        validate_checkpoint(checkpoint)
    except CheckpointError as error:
        raise FinetuneError(str(error)) from None
    args.checkpoint = checkpoint
    definition = _run_definition(args)
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )

    torch.manual_seed(args.seed)
    model = CsmForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    processor = CsmProcessor.from_pretrained(checkpoint)
    model.to(device)
    started = time.perf_counter()
    cache = CodeCache(args.cache_dir, model.codec_model)
    codes = cache.codes_for(clips)
    log(f"codes: {cache.hits} cached, {cache.misses} encoded in {time.perf_counter() - started:.1f} s")

    order = np.random.RandomState(args.seed).permutation(len(clips))
    held_out = max(1, int(round(args.eval_fraction * len(clips))))
    eval_indices, train_indices = sorted(order[:held_out].tolist()), sorted(order[held_out:].tolist())
    train_examples = _examples(clips, codes, train_indices, args.context)
    eval_examples = _examples(clips, codes, eval_indices, args.context)

    peft_model = _lora_model(model, args)
    base = peft_model.get_base_model()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(math.ceil(args.warmup_ratio * args.steps)), args.steps)

    start_step = 0
    metrics_path = out / METRICS
    if args.resume:
        found = latest_checkpoint(out)
        if found is None:
            raise FinetuneError(f"--resume: no checkpoint under {out / CHECKPOINTS}")
        state = torch.load(found, map_location=device, weights_only=False)
        changed = sorted(k for k in RUN_DEFINING if state["definition"].get(k) != definition[k])
        if changed:
            raise FinetuneError(f"--resume: {found.name} was made with other options ({', '.join(changed)})")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(peft_model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        log(f"resumed from {found.name} at step {start_step}")
        kept = [
            line
            for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
            if line.strip() and json.loads(line)["step"] <= start_step
        ]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    else:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
        metrics_path.write_text("")

    batches = MicroBatches(len(train_examples), args.batch_size, args.seed)
    end_step = args.steps if args.stop_after is None else min(args.steps, start_step + args.stop_after)
    from tqdm import tqdm

    progress = tqdm(total=args.steps, initial=start_step, disable=args.no_progress, unit="step", dynamic_ncols=True)
    eval_losses: list[tuple[int, float]] = []
    train_loss = None
    run_started = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") as metrics:
        if start_step == 0:  # the base model's held-out loss: what training is measured against
            held = evaluate(
                peft_model, processor, eval_examples, batch_size=args.batch_size, seed=args.seed, device=device
            )
            eval_losses.append((0, held))
            metrics.write(json.dumps({"kind": "eval", "step": 0, "loss": held}) + "\n")
        peft_model.train()
        for step in range(start_step, end_step):
            torch.manual_seed(_step_seed(args.seed, step))  # dropout and frame sampling
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for micro in range(args.grad_accum):
                chunk = [train_examples[i] for i in batches[step * args.grad_accum + micro]]
                with _autocast(device):
                    batch = build_batch(
                        processor, base, chunk, depth_decoder_labels_ratio=args.depth_decoder_labels_ratio
                    )
                    loss = peft_model(**batch).loss / args.grad_accum
                loss.backward()
                total += float(loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            done = step + 1
            train_loss = total
            metrics.write(
                json.dumps(
                    {
                        "kind": "train",
                        "step": done,
                        "loss": total,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "elapsed_s": round(time.perf_counter() - run_started, 4),
                    }
                )
                + "\n"
            )
            progress.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            progress.update(1)
            if done % args.eval_every == 0 or done == args.steps:
                held = evaluate(
                    peft_model, processor, eval_examples, batch_size=args.batch_size, seed=args.seed, device=device
                )
                eval_losses.append((done, held))
                metrics.write(json.dumps({"kind": "eval", "step": done, "loss": held}) + "\n")
                progress.write(f"step {done}: held-out loss {held:.4f}")
            metrics.flush()
            if done % args.save_every == 0 or done == end_step:
                _save_checkpoint(out, done, peft_model, optimizer, scheduler, definition)
    progress.close()
    seconds = time.perf_counter() - run_started
    steps_done = end_step - start_step
    result = RunResult(out, end_step, train_loss, eval_losses, seconds, steps_done / seconds if seconds else 0.0)
    if end_step < args.steps:
        log(f"stopped at step {end_step} of {args.steps}; continue with --resume")
        return result

    _save_adapter(out, peft_model)
    _plot(metrics_path, out / "loss.png")
    all_evals = [
        json.loads(line)
        for line in metrics_path.read_text().splitlines()
        if line.strip() and json.loads(line)["kind"] == "eval"
    ]
    manifest = {
        "base_checkpoint": str(checkpoint),
        "base_checkpoint_sha256": _checkpoint_sha256(checkpoint),
        # What the server compares when the adapter registers as a voice (core/adapter_base.py).
        "base_model_sha256": base_model_sha256(checkpoint),
        "data": str(args.data),
        "data_sha256": dataset_sha256(clips),
        "data_report": report.as_dict(),
        "train_clips": len(train_examples),
        "eval_clips": len(eval_examples),
        "codec_sha256": cache.codec_sha256,
        "hyperparameters": definition,
        "final_train_loss": train_loss,
        "eval_losses": [[row["step"], row["loss"]] for row in all_evals],
        "final_eval_loss": all_evals[-1]["loss"] if all_evals else None,
        "packages": {package: _version(package) for package in RECORDED_PACKAGES},
        "device": str(device),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(out / MANIFEST, manifest)
    if args.merge:
        from finetune.merge import merge_adapter

        merged = merge_adapter(checkpoint, out / ADAPTER, out / MERGED, manifest=manifest)
        log(f"merged checkpoint: {merged}")
    return result


def _checkpoint_sha256(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = train(args)
    except (DatasetError, FinetuneError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result.eval_losses:
        first, last = result.eval_losses[0], result.eval_losses[-1]
        print(
            f"held-out loss {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]}); "
            f"{result.steps_per_second:.2f} steps/s; output in {result.out}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
