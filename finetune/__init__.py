"""LoRA fine-tuning of CSM on a speech dataset, into a checkpoint export.build_repository takes.

    python -m finetune.train --data DATA --out OUT [--checkpoint DIR] [--steps N] [--merge]

Layers: `data` (three input layouts, one checked list of clips), `codes` (each clip
encoded once by the checkpoint's own Mimi, cached on disk), `train` (the loop, its
checkpoints and the CLI), `merge` (adapter -> full Hugging Face checkpoint). Runs from
the checkout like export/; not installed.
"""
