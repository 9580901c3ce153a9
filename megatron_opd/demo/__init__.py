"""The CPU demo's assets (docs/demo.md): a character-level tokenizer, a carry-addition task in verl parquet,
a teacher that solves it and a student that mostly forgets the carry, built deterministically by
:func:`megatron_opd.demo.build.build_demo_assets`; plus held-out accuracy and a reference ExOPD check.
"""
