"""Benchmark rollout.generate against Hugging Face `model.generate`, side by side in one run.

    python bench/rollout.py            # CPU: the tiny model; on a CUDA machine also the 1.5B-shaped one

Prints, for the same model, batch and lengths: tokens/s of our sampler and of `model.generate` with
sampling, their ratio, and the time to the first sampled token (prefill) for N=1 vs N=64 rows sharing a
prompt. On CUDA it also prints the fraction of the HBM-bandwidth roofline reached per decode step.
Weights are random (no download): speed does not depend on their values.
"""

import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rollout

# Peak HBM bandwidth by GPU name, bytes/s (vendor datasheets), for the roofline fraction.
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100": 2.0e12}


def tiny_llama() -> LlamaForCausalLM:
    """The project's tiny base model's shape (model.TINY_CONFIG): 3 layers of width 128, character vocabulary."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def qwen25_1p5b_shaped() -> Qwen2ForCausalLM:
    """Qwen2.5-1.5B's shape with random weights, bf16 on CUDA."""
    config = Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def random_prompts(batch: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=gen)
    return [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in lengths]


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
    """model.generate with sampling on the same left-padded batch; no eos, so every row runs to the end."""
    device = model.device
    prompt_len = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (prompt_len - len(p)) + p for p in prompts], device=device)
    attention_mask = (input_ids != 0) | (torch.arange(prompt_len, device=device) >= prompt_len - torch.tensor(
        [len(p) for p in prompts], device=device)[:, None])
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask.long(), do_sample=True, temperature=1.0, top_p=1.0,
        top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
    )


def compare(model, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> tuple[float, float]:
    device = model.device
    ours = lambda: rollout.generate(model, prompts, 1, max_new_tokens, temperature=1.0, seed=0)
    theirs = lambda: hf_generate(model, prompts, max_new_tokens)
    ours(), theirs()  # warm-up (allocator, kernels, CUDA graph capture paths)
    new_tokens = len(prompts) * max_new_tokens
    ours_tps = new_tokens / timed(ours, device, repeats)
    theirs_tps = new_tokens / timed(theirs, device, repeats)
    return ours_tps, theirs_tps


def prefill_sharing(model, prompt: list[int], repeats: int) -> tuple[float, float]:
    """Time to the first sampled token for 1 row and for 64 rows sharing one prompt."""
    device = model.device
    one = lambda: rollout.generate(model, [prompt], 1, 1)
    many = lambda: rollout.generate(model, [prompt], 64, 1)
    one(), many()
    return timed(one, device, repeats), timed(many, device, repeats)


def report(name: str, batch: int, prompt_lens: str, max_new_tokens: int, ours: float, theirs: float,
           prefill_one: float, prefill_many: float) -> None:
    print(f"{name}: batch {batch}, prompts {prompt_lens} tokens, {max_new_tokens} new tokens, sampling T=1")
    print(f"  rollout.generate   {ours:10.0f} tokens/s")
    print(f"  model.generate     {theirs:10.0f} tokens/s")
    print(f"  ratio              {ours / theirs:10.2f}x")
    print(f"  prefill N=1        {prefill_one * 1e3:10.2f} ms")
    print(f"  prefill N=64       {prefill_many * 1e3:10.2f} ms   ({prefill_many / prefill_one:.2f}x N=1)")


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {time.strftime('%Y-%m-%d')}")
    model = tiny_llama()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama ({n_params / 1e6:.2f}M params, fp32) on CPU")
    prompts = random_prompts(64, 15, 30, model.config.vocab_size)
    ours, theirs = compare(model, prompts, 24, repeats=3)
    prefill_one, prefill_many = prefill_sharing(model, prompts[0], repeats=5)
    report("CPU tiny", 64, "15-30", 24, ours, theirs, prefill_one, prefill_many)

    if not torch.cuda.is_available():
        print("GPU: not run (no CUDA device)")
        return
    gpu()


def gpu() -> None:
    name = torch.cuda.get_device_name()
    model = qwen25_1p5b_shaped()
    print(f"GPU {name}: random Qwen2.5-1.5B-shaped model, bf16")
    batch, prompt_len, max_new_tokens = 256, 512, 1024
    prompts = random_prompts(batch, prompt_len, prompt_len, model.config.vocab_size)
    ours, theirs = compare(model, prompts, max_new_tokens, repeats=1)
    prefill_one, prefill_many = prefill_sharing(model, prompts[0], repeats=3)
    report("GPU 1.5B", batch, str(prompt_len), max_new_tokens, ours, theirs, prefill_one, prefill_many)

    # Roofline: each decode step must read every weight once and every row's KV cache so far.
    step_s = batch / ours
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        weight_bytes -= model.model.embed_tokens.weight.numel() * 2  # the embedding is gathered, not streamed
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    mean_context = prompt_len + max_new_tokens / 2
    step_bytes = weight_bytes + batch * mean_context * kv_bytes_per_token
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if all(w in name for w in key.split())), None)
    print(f"  decode step        {step_s * 1e3:10.2f} ms (mean over the run, prefill included)")
    print(f"  bytes per step     {step_bytes / 1e9:10.2f} GB (weights + mean KV cache)")
    if peak:
        print(f"  roofline fraction  {step_bytes / step_s / peak:10.2f} of {peak / 1e12:.2f} TB/s")
    else:
        print(f"  achieved bandwidth {step_bytes / step_s / 1e12:10.2f} TB/s (peak for {name!r} unknown)")


if __name__ == "__main__":
    main()
