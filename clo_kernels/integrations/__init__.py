"""Adapters of the fused CLO loss to other libraries' models and trainers.

``hf``: the parts of a Hugging Face causal LM the loss needs (needs transformers' models, not
the package itself). ``trl``: drop-in TRL trainers (needs ``pip install clo-kernels[trl]``).
Nothing here is imported by ``import clo_kernels``.
"""
