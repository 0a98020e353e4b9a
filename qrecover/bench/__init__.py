"""The comparison harness: qrecover against the baselines users know (GPTQModel's GPTQ and AWQ, LoRA),
over the public API (compare.py), with the peers' own code (peers.py), the real bits per weight of
any checkpoint (footprint.py) and paired zero-shot differences (paired.py). Nothing in the package
below imports it."""
