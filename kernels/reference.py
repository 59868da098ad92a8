"""Plain PyTorch references that the Triton kernels are tested against."""

import torch


def token_logprobs_ref(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[label], in float32. logits [..., V], labels [...] -> [...]."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
