"""A LoRA adapter merged into a full CSM checkpoint in the Hugging Face layout.

    python -m finetune.merge --checkpoint BASE --adapter OUT/adapter --out MERGED

The result has what `sesame/csm-1b` has (weights, config, generation config, tokenizer,
processor, chat template) so `export.build_repository --checkpoint MERGED` takes it
unchanged, plus `finetune_manifest.json`. Written beside the target and moved into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

FINETUNE_MANIFEST = "finetune_manifest.json"
# Written by save_pretrained from the merged model; everything else comes from the base.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


def merge_adapter(base: Path, adapter: Path, out: Path, *, manifest: dict | None = None) -> Path:
    from peft import PeftModel
    from transformers import CsmForConditionalGeneration

    base, adapter, out = Path(base).resolve(), Path(adapter).resolve(), Path(out).resolve()
    model = CsmForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    for config in (merged.generation_config, merged.depth_decoder.generation_config):
        # Left True, reload drops every depth_decoder_* key (docs: csm-facts).
        config._from_model_config = False
    staging = out.with_name(f".{out.name}.merging")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # Same dtype and shard size as the base, so a 1B merge looks like the original.
        merged.save_pretrained(staging, max_shard_size="5GB")
        for path in sorted(base.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith("model")
                and path.name not in MODEL_FILES
                and not (staging / path.name).exists()
            ):
                shutil.copy2(path, staging / path.name)
        (staging / FINETUNE_MANIFEST).write_text(
            json.dumps({"base_checkpoint": str(base), "adapter": str(adapter), **(manifest or {})}, indent=2) + "\n"
        )
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="the base checkpoint the adapter was trained on")
    parser.add_argument("--adapter", required=True, type=Path, help="OUT/adapter of a finetune.train run")
    parser.add_argument("--out", required=True, type=Path, help="folder for the merged checkpoint")
    args = parser.parse_args(argv)
    print(merge_adapter(args.checkpoint, args.adapter, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
