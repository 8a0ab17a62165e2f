"""URAE adapter training on a quantized FLUX base: cache → train → resume (`urae-lite cache`, `urae-lite train`).

data.py (dataset folder, buckets, captions) → cache.py (T5/CLIP/VAE caches) → samples.py + flow.py (deterministic
flow-matching samples) → model.py (quantized base + trainable adapter) → loop.py (steps, checkpoints, validation),
configured by config.py recipes (recipes/train_2k_lora.yaml, recipes/train_4k_minor.yaml). Nothing is imported
here: `urae-lite --help` loads this package to register its subcommands and must stay fast.
"""
