"""Benchmark rollout.generate against Hugging Face `model.generate`, side by side in one run.

    python bench/rollout.py   # CPU: the tiny model; on a CUDA machine also the 1.5B-shaped one
    # a real chat model on real prompts instead:
    python bench/rollout.py --model DIR|ORG/NAME|FILE.gguf

Prints, for the same model, batch and lengths: tokens/s of our sampler and of `model.generate` with
sampling, their ratio, and the time to the first sampled token (prefill) for N=1 vs N=64 rows
sharing a prompt. Batch 64 is run twice: 64 distinct prompts (then split into the first token and
each decode step, ours vs theirs), and 4 prompts x 16 samples (what train.py asks for: N samples per
prompt; `model.generate` gets num_return_sequences=16); then train.py's tiny preset, 64 prompts x
16. On CUDA it also prints the decode step time and the fraction of the HBM-bandwidth roofline it
reaches. Weights are random (no download): speed does not depend on their values. The two samplers
are timed alternately and the best of several runs is kept, so a busy machine slows both alike.

With --model, a real pretrained chat model (e.g. SmolLM2-135M-Instruct from its GGUF file) on chat
prompts: first whether the sampler's greedy completions equal `model.generate`'s (8 prompts), then P
x N = 8 x 8 and 64 x 16 with 64 new tokens, both samplers on the same prompts (--sizes picks fewer
on a slow machine).
"""

import argparse
import os
import sys
import time

# Run as a script, sys.path[0] is bench/: put the repository root there instead, so our modules
# import and no file in bench/ can stand in for an installed package (tests/test_no_shadowing.py
# keeps bench/ clear anyway).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config

import llama_forward
import models
import rollout

# Peak HBM bandwidth, bytes/s (vendor datasheets), by words in torch.cuda.get_device_name().
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H100 HBM3": 3.35e12, "H100 NVL": 3.9e12,
                  "H100 PCIe": 2.0e12, "H200": 4.8e12, "A100": 2.0e12}


def tiny_llama() -> LlamaForCausalLM:
    """The project's tiny base model's shape (model.TINY_CONFIG): 3 layers of width 128, character
    vocabulary."""
    config = LlamaConfig(
        vocab_size=64, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def qwen25_1p5b_shaped() -> torch.nn.Module:
    """Qwen2.5-1.5B's shape with random weights, bf16 on CUDA."""
    config = Qwen2Config(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1e6, tie_word_embeddings=True,
    )
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def random_prompts(count: int, min_len: int, max_len: int, vocab: int,
                   seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=gen)
    return [torch.randint(1, vocab, (int(length),), generator=gen).tolist() for length in lengths]


def hf_generate(model, prompts: list[list[int]], n: int, max_new_tokens: int) -> torch.Tensor:
    """model.generate with sampling on the same left-padded prompts; no eos, so every row runs to
    the end."""
    prompt_len = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (prompt_len - len(p)) + p for p in prompts],
                             device=model.device)
    attention_mask = torch.tensor([[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts],
                                  device=model.device)
    return model.generate(
        input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
        top_p=1.0, top_k=0, num_return_sequences=n, max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0,
    )


def best_times(functions, repeats: int, device: torch.device, warmup: bool = True) -> list[float]:
    """Best wall time of each function over `repeats` rounds, the functions run alternately."""
    for fn in functions if warmup else []:  # warm-up: allocator, kernel selection
        fn()
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def compare(model, prompts: list[list[int]], n: int, max_new_tokens: int, repeats: int,
            warmup: bool = True) -> None:
    """tokens/s of both samplers on the same prompts, n samples each."""
    ours, theirs = best_times([
        lambda: rollout.generate(model, prompts, n, max_new_tokens, temperature=1.0, seed=0),
        lambda: hf_generate(model, prompts, n, max_new_tokens),
    ], repeats, model.device, warmup)
    new_tokens = len(prompts) * n * max_new_tokens
    lengths = sorted({len(p) for p in prompts})
    print(f"  batch {len(prompts) * n} = {len(prompts)} prompts x N={n}, "
          f"prompts {lengths[0]}-{lengths[-1]} tokens, {max_new_tokens} new tokens, T=1")
    print(f"    rollout.generate  {new_tokens / ours:10.0f} tokens/s")
    print(f"    model.generate    {new_tokens / theirs:10.0f} tokens/s")
    print(f"    ratio             {theirs / ours:10.2f}x")


def time_split(model, prompts: list[list[int]], max_new_tokens: int, repeats: int) -> None:
    """Where the time goes, both samplers: the first token (prefill + one sample), then each decode
    step ((whole generation - first token) / (max_new_tokens - 1))."""
    first_ours, first_theirs, all_ours, all_theirs = best_times([
        lambda: rollout.generate(model, prompts, 1, 1, temperature=1.0, seed=0),
        lambda: hf_generate(model, prompts, 1, 1),
        lambda: rollout.generate(model, prompts, 1, max_new_tokens, temperature=1.0, seed=0),
        lambda: hf_generate(model, prompts, 1, max_new_tokens),
    ], repeats, model.device)
    step_ours = (all_ours - first_ours) / (max_new_tokens - 1)
    step_theirs = (all_theirs - first_theirs) / (max_new_tokens - 1)
    print(f"    first token       {first_ours * 1e3:7.2f} ms vs {first_theirs * 1e3:7.2f} ms  "
          f"({first_theirs / first_ours:.2f}x)")
    print(f"    each decode step  {step_ours * 1e3:7.2f} ms vs {step_theirs * 1e3:7.2f} ms  "
          f"({step_theirs / step_ours:.2f}x)")


def prefill_sharing(model, prompt: list[int], repeats: int) -> None:
    """Time to the first sampled token of 1 row and of 64 rows sharing one prompt."""
    one, many = best_times([
        lambda: rollout.generate(model, [prompt], 1, 1),
        lambda: rollout.generate(model, [prompt], 64, 1),
    ], repeats, model.device)
    print(f"  prefill of a {len(prompt)}-token prompt (time to first token)")
    print(f"    N=1               {one * 1e3:10.2f} ms")
    print(f"    N=64              {many * 1e3:10.2f} ms   ({many / one:.2f}x N=1)")


def main() -> None:
    torch.manual_seed(0)
    # One thread for both samplers: the tiny model's matrices are too small to split, and on a
    # shared 2-core machine a second OpenMP thread mostly waits for a core, which makes timings
    # erratic.
    torch.set_num_threads(1)
    print(f"{time.strftime('%Y-%m-%d')}  torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread")
    model = tiny_llama()
    print(f"CPU: tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, fp32)")
    prompts = random_prompts(64, 15, 30, model.config.vocab_size)
    compare(model, prompts, 1, 24, repeats=5)
    time_split(model, prompts, 24, repeats=5)
    compare(model, prompts[:4], 16, 24, repeats=5)
    compare(model, prompts, 16, 24, repeats=3)  # train.py's tiny preset: 64 prompts x 16 samples
    prefill_sharing(model, prompts[0], repeats=10)
    if torch.cuda.is_available():
        gpu()
    else:
        print("GPU: not run (no CUDA device)")


def gpu() -> None:
    name = torch.cuda.get_device_name()
    model = qwen25_1p5b_shaped()
    print(f"GPU {name}: random Qwen2.5-1.5B-shaped model, bf16")
    batch, prompt_len, max_new_tokens = 256, 512, 1024
    prompts = random_prompts(batch, prompt_len, prompt_len, model.config.vocab_size)
    compare(model, prompts, 1, max_new_tokens, repeats=1)
    prefill_sharing(model, prompts[0], repeats=3)
    # Prefix sharing in decode: 256 rows of one prompt read its keys once per step, 256 prompts 256
    # times.
    distinct, shared = best_times([
        lambda: rollout.generate(model, prompts, 1, 256),
        lambda: rollout.generate(model, prompts[:1], batch, 256),
    ], 1, model.device)
    print(f"  256 new tokens, batch {batch}: "
          f"{batch} distinct prompts {batch * 256 / distinct:.0f} tokens/s, "
          f"1 prompt x N={batch} {batch * 256 / shared:.0f} tokens/s")

    decode_roofline(model, prompts, max_new_tokens, name)


@torch.no_grad()
def decode_roofline(model, prompts: list[list[int]], max_new_tokens: int, name: str) -> None:
    """Time one decode step (a CUDA-graph replay) halfway through the generation and compare the
    bytes it must read, every weight once plus each row's KV cache so far, with the GPU's HBM
    bandwidth."""
    batch, prompt_len = len(prompts), len(prompts[0])
    weights = llama_forward.Weights(model, prompt_len + max_new_tokens)
    cache = llama_forward.KVCache(weights, batch, prompt_len, batch, max_new_tokens)
    decode = llama_forward.make_decoder(weights, cache)
    prompt_ids = torch.tensor(prompts, device=model.device)
    logits = llama_forward.prefill(weights, cache, prompt_ids,
                                   torch.ones_like(prompt_ids, dtype=torch.bool))
    slot = max_new_tokens // 2  # halfway: the mean context of the run
    token = logits.argmax(-1)
    position = torch.full((batch,), prompt_len + slot, device=model.device)
    (step_s,) = best_times([lambda: decode(token, position, slot, batch, 1)], 20, model.device)
    # tied embedding counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * (prompt_len + slot + 1) * weights.kv_bytes_per_token
    print(f"  decode step at {prompt_len + slot + 1} tokens of context, batch {batch}: "
          f"{step_s * 1e3:.2f} ms ({batch / step_s:.0f} tokens/s)")
    print(f"  bytes it must read  {(weight_bytes + kv_bytes) / 1e9:10.3g} GB "
          f"(weights {weight_bytes / 1e9:.3g}, KV cache {kv_bytes / 1e9:.3g})")
    peak = next((bw for key, bw in PEAK_BANDWIDTH.items()
                 if all(word in name for word in key.split())), None)
    achieved = (weight_bytes + kv_bytes) / step_s
    if peak:
        print(f"  roofline fraction   {achieved / peak:10.2f} "
              f"({achieved / 1e12:.2f} of {peak / 1e12:.2f} TB/s)")
    else:
        print(f"  achieved bandwidth  {achieved / 1e12:10.2f} TB/s (peak of {name!r} unknown)")

# ----------------------------------------------------------------------------- a real chat model

QUESTIONS = [f"What is {a} {op} {b}?" for a, op, b in [(7, "+", 5), (9, "-", 4), (3, "*", 6),
                                                       (8, "+", 8), (12, "-", 7), (6, "*", 7),
                                                       (15, "+", 27), (40, "-", 13)]]


def real_model(spec: str, sizes: list[tuple[int, int]], max_new_tokens: int, repeats: int) -> None:
    """The sampler on a real chat model: greedy completions equal to model.generate's, then speed
    side by side."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model, tokenizer = models.load(models.resolve(spec))
    model.eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{time.strftime('%Y-%m-%d')}  torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}")
    print(f"{spec}: {model.config.model_type}, {params:.0f}M params, fp32, chat template, stop ids "
          f"{models.stop_ids(model, tokenizer)}")
    prompts = [models.encode_prompt(tokenizer, question) for question in QUESTIONS]
    same = greedy_agreement(model, tokenizer, prompts, max_new_tokens)
    print(f"  greedy, {max_new_tokens} new tokens: rollout.generate == model.generate on "
          f"{same} of {len(prompts)} prompts (token for token, up to the stop)")
    for p, n in sizes:
        # no warm-up run: a 135M model's first call costs little next to its minutes of decoding
        compare(model, [prompts[i % len(prompts)] for i in range(p)], n, max_new_tokens, repeats,
                warmup=False)


@torch.no_grad()
def greedy_agreement(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> int:
    """How many prompts' greedy completions (to the first stop token) are the same tokens in both
    samplers."""
    stops = models.stop_ids(model, tokenizer)
    ours = rollout.generate(model, prompts, 1, max_new_tokens, temperature=0, stop_ids=stops,
                            pad_id=tokenizer.pad_token_id)
    same = 0
    for i, prompt in enumerate(prompts):
        theirs = model.generate(torch.tensor([prompt]),
                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=max_new_tokens,
                                eos_token_id=list(stops),
                                pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        same += ours.tokens[i][ours.mask[i]].tolist() == theirs
    return same


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in size.split("x")) for size in text.split(",")]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="",
                        help="a real model (directory, hub id or .gguf) instead of the tiny one")
    parser.add_argument("--sizes", default="8x8,64x16",
                        help="with --model: prompts x samples, comma-separated")
    parser.add_argument("--max-new-tokens", type=int, default=64,
                        help="with --model: tokens per completion")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --model: timed runs of each sampler (best kept)")
    args = parser.parse_args()
    if args.model:
        real_model(args.model, parse_sizes(args.sizes), args.max_new_tokens, args.repeats)
    else:
        main()
