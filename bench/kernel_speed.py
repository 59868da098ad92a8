"""Benchmark the log-prob and fused policy-loss kernels at a 152k vocabulary (Qwen), bf16, in one
run.

    python bench/kernel_speed.py

For tokens ∈ {4096, 16384} it times forward and forward+backward of eager PyTorch (the references in
kernels/reference.py), `torch.compile` of the same code, Liger-Kernel where installed, and ours, and
prints one table: milliseconds, achieved bandwidth against the bytes a one-read kernel must move
(forward reads the logits once; backward reads them once and writes the gradient), the % of the
device's peak HBM bandwidth, speed-ups, and peak memory beyond the inputs. The logits are a
[B, T+1, V] model output and the ops get `logits[:, :-1]`, as in train.py; the gradient is taken
w.r.t. that slice.

Without a GPU it runs the reference only, on fewer tokens, and says so: it never prints GPU figures
it did not measure.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository's modules, not bench/'s

import torch

import grpo
import prorl_kernels
from prorl_kernels.reference import policy_loss_ref, token_logprobs_ref

VOCAB_SIZE = 151936
SEQ_LEN = 512
TEMPERATURE = 0.7
SPEC = grpo.LossSpec(clip_low=0.2, clip_high=0.28, kl_coef=0.001, kl_kind="k3",
                     temperature=TEMPERATURE)
GPU_TOKENS = (4096, 16384)
CPU_TOKENS = (512, 1024)
# Peak HBM bandwidth in GB/s (vendor datasheets), matched against torch.cuda.get_device_name in
# order.
PEAK_GBPS = (
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),  # SXM5, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2039),
    ("A100 80GB PCIe", 1935),
    ("A100", 1555),  # 40 GB, SXM4 and PCIe
)
TARGETS = ("targets (H100): ours fwd ≥ 80% of peak; fwd+bwd ≥ 2.5× eager, ≥ 1.1× compile; "
           "extra ≤ 1× logits")


def make_batch(tokens: int, device: str) -> dict:
    """A [B, T+1, V] bf16 logits tensor and the [B, T] tensors the loss needs (10% padding)."""
    gen = torch.Generator(device=device).manual_seed(0)
    batch = tokens // SEQ_LEN
    logits = (2 * torch.randn(batch, SEQ_LEN + 1, VOCAB_SIZE, device=device,
                              generator=gen)).to(torch.bfloat16)
    labels = torch.randint(0, VOCAB_SIZE, (batch, SEQ_LEN), device=device, generator=gen)
    with torch.no_grad():
        logp = prorl_kernels.token_logprobs(logits[:, :-1], labels, TEMPERATURE)
    noise = torch.randn(2, batch, SEQ_LEN, device=device, generator=gen)
    return {
        "logits": logits.requires_grad_(),
        "labels": labels,
        "old_logp": logp + 0.1 * noise[0],
        "ref_logp": logp + 0.1 * noise[1],
        "adv": torch.randn(batch, device=device, generator=gen),
        "mask": torch.rand(batch, SEQ_LEN, device=device, generator=gen) > 0.1,
        "grad_logp": torch.randn(batch, SEQ_LEN, device=device, generator=gen),
    }


# ----------------------------------------------------------------------------- the contenders
# Each returns (forward, forward_backward): forward() → the op's output, forward_backward() → d/d
# logits.


def logprobs_op(fn):
    def forward(b):
        return fn(b["logits"][:, :-1], b["labels"])

    def forward_backward(b):
        logits = b["logits"][:, :-1]
        return torch.autograd.grad(fn(logits, b["labels"]), logits, b["grad_logp"])[0]

    return forward, forward_backward


def loss_op(fn):
    def forward(b):
        return fn(b["logits"][:, :-1], b["labels"], b["old_logp"], b["ref_logp"],
                  b["adv"], b["mask"])

    def forward_backward(b):
        logits = b["logits"][:, :-1]
        loss = fn(logits, b["labels"], b["old_logp"], b["ref_logp"], b["adv"], b["mask"])
        return torch.autograd.grad(loss, logits)[0]

    return forward, forward_backward


def eager_logprobs(logits, labels):
    return token_logprobs_ref(logits, labels, TEMPERATURE)


def ours_logprobs(logits, labels):
    return prorl_kernels.token_logprobs(logits, labels, TEMPERATURE)


def token_mean_weights(mask):  # what learner.update passes for a token-mean loss over this batch
    return grpo.loss_weights(mask, "token-mean", grpo.loss_count(mask, "token-mean"))


def eager_loss(logits, labels, old_logp, ref_logp, adv, mask):
    terms = grpo.LossTerms(old_logp, ref_logp, adv, mask, token_mean_weights(mask))
    return policy_loss_ref(logits, labels, terms, SPEC)[0]


def ours_loss(logits, labels, old_logp, ref_logp, adv, mask):
    terms = grpo.LossTerms(old_logp, ref_logp, adv, mask, token_mean_weights(mask))
    return prorl_kernels.fused_policy_loss(logits, labels, terms, SPEC)[0]


def liger_ops() -> dict:
    """Liger-Kernel's GRPO loss (and its forward-only selective log-softmax), if installed. It takes
    the whole [B, T+1, V] logits and drops the last position itself."""
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError:
        return {}

    def logprobs_forward(b):
        return fused_selective_log_softmax(b["logits"], b["labels"], TEMPERATURE)

    def loss(b, logits):
        mask = b["mask"].int().contiguous()
        out = triton_grpo_loss(
            logits, b["old_logp"], b["ref_logp"], b["labels"], b["adv"], mask,
            temperature=TEMPERATURE,
            beta=SPEC.kl_coef, eps_low=SPEC.clip_low, eps_high=SPEC.clip_high,
            inplace=False,
        )
        out = out[0] if isinstance(out, tuple) else out  # the API changed across versions
        return out if out.dim() == 0 else (out * mask).sum() / mask.sum().clamp(min=1)

    def loss_forward_backward(b):
        return torch.autograd.grad(loss(b, b["logits"]), b["logits"])[0]

    return {"logprobs": (logprobs_forward, None),
            "loss": (lambda b: loss(b, b["logits"]), loss_forward_backward)}


def contenders(device: str) -> dict[str, dict[str, tuple]]:
    """{op: {implementation: (forward, forward_backward)}}; on CPU the reference alone."""
    if device == "cpu":
        return {"logprobs": {"eager": logprobs_op(eager_logprobs)},
                "loss": {"eager": loss_op(eager_loss)}}
    compile_ = torch.compile(dynamic=False)
    ops = {
        "logprobs": {
            "eager": logprobs_op(eager_logprobs),
            "torch.compile": logprobs_op(compile_(eager_logprobs)),
            "ours": logprobs_op(ours_logprobs),
        },
        "loss": {
            "eager": loss_op(eager_loss),
            "torch.compile": loss_op(compile_(eager_loss)),
            "ours": loss_op(ours_loss),
        },
    }
    for op, pair in liger_ops().items():
        ops[op] = {**{k: v for k, v in ops[op].items() if k != "ours"}, "liger": pair,
                   "ours": ops[op]["ours"]}
    return ops


# ----------------------------------------------------------------------------- measuring


def time_ms(fn, device: str, warmup: int = 3, iters: int = 10) -> float:
    """Median wall time of fn() in ms: CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start_s))
    return statistics.median(times)


def peak_extra_bytes(fn) -> int:
    """Peak CUDA memory allocated while fn() runs (its result included), beyond what was allocated
    before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def peak_bandwidth_gbps(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def check_ours(op: str, batch: dict) -> None:
    """Never time a wrong answer: our forward must match the eager reference on this very batch."""
    args = (batch["logits"][:, :-1], batch["labels"])
    if op == "loss":
        args += (batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"])
    ours, reference = ((ours_logprobs, eager_logprobs) if op == "logprobs"
                       else (ours_loss, eager_loss))
    with torch.no_grad():
        torch.testing.assert_close(ours(*args), reference(*args), rtol=1e-4, atol=1e-4)


def measure(op: str, impl: str, pair: tuple, batch: dict, device: str) -> dict:
    forward, forward_backward = pair
    iters = {"warmup": 3, "iters": 10} if device == "cuda" else {"warmup": 1, "iters": 3}
    row = {"op": op, "impl": impl}
    try:
        if impl == "ours":
            check_ours(op, batch)
        row["fwd_ms"] = time_ms(lambda: forward(batch), device, **iters)
        if forward_backward is not None:
            row["fwd_bwd_ms"] = time_ms(lambda: forward_backward(batch), device, **iters)
            if device == "cuda":
                row["extra_bytes"] = peak_extra_bytes(lambda: forward_backward(batch))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    # reported, not fatal (an old Liger)
    except (RuntimeError, AssertionError, TypeError, ValueError) as error:
        row["error"] = f"{type(error).__name__}: {error}"[:60]
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


# ----------------------------------------------------------------------------- the table


def fmt(value, spec: str) -> str:
    if value is None:
        return "—"
    return (format(value, ".2f") if spec == "gbps" and value < 10
            else format(value, ".0f" if spec == "gbps" else spec))


def print_table(rows: list[dict], peak_gbps: float | None) -> None:
    header = ("op", "tokens", "impl", "fwd ms", "fwd GB/s", "fwd %peak", "f+b ms", "f+b GB/s",
              "f+b %peak", "vs eager", "vs compile", "extra GB", "× logits")
    lines = [header]
    for row in rows:
        if "error" in row:
            lines.append((row["op"], str(row["tokens"]), row["impl"], row["error"]) + ("",) * 9)
            continue
        logits_bytes = row["tokens"] * VOCAB_SIZE * 2  # bf16
        fwd_gbps = logits_bytes / row["fwd_ms"] / 1e6
        fwd_bwd_ms = row.get("fwd_bwd_ms")
        fwd_bwd_gbps = 3 * logits_bytes / fwd_bwd_ms / 1e6 if fwd_bwd_ms else None
        same = [r for r in rows if r["op"] == row["op"] and r["tokens"] == row["tokens"]
                and "fwd_bwd_ms" in r]
        base = {r["impl"]: r["fwd_bwd_ms"] for r in same}
        extra = row.get("extra_bytes")
        lines.append((
            row["op"], str(row["tokens"]), row["impl"],
            fmt(row["fwd_ms"], ".2f"), fmt(fwd_gbps, "gbps"),
            fmt(peak_gbps and 100 * fwd_gbps / peak_gbps, ".0f"),
            fmt(fwd_bwd_ms, ".2f"), fmt(fwd_bwd_gbps, "gbps"),
            fmt(peak_gbps and fwd_bwd_gbps and 100 * fwd_bwd_gbps / peak_gbps, ".0f"),
            fmt(fwd_bwd_ms and base.get("eager") and base["eager"] / fwd_bwd_ms, ".2f"),
            fmt(fwd_bwd_ms and base.get("torch.compile")
                and base["torch.compile"] / fwd_bwd_ms, ".2f"),
            fmt(extra and extra / 1e9, ".2f"), fmt(extra and extra / logits_bytes, ".2f"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(cell.rjust(width) if j >= 3 else cell.ljust(width) for j, (cell, width) in
                        enumerate(zip(line, widths))).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 2 * len(widths)))


def print_verdict(rows: list[dict], peak_gbps: float | None) -> None:
    """Check the issue's targets against this run's numbers (GPU only)."""
    for op in ("logprobs", "loss"):
        for tokens in sorted({r["tokens"] for r in rows}):
            by_impl = {r["impl"]: r for r in rows if (r["op"], r["tokens"]) == (op, tokens)
                       and "error" not in r}
            ours, eager, compiled = (by_impl.get("ours"), by_impl.get("eager"),
                                     by_impl.get("torch.compile"))
            if not ours:
                print(f"{op}, {tokens} tokens: ours did not run")
                continue
            logits_bytes = tokens * VOCAB_SIZE * 2
            checks = []
            if peak_gbps:
                checks.append(("fwd ≥ 80% peak",
                               logits_bytes / ours["fwd_ms"] / 1e6 >= 0.8 * peak_gbps))
            if eager:
                checks.append(("f+b ≥ 2.5× eager", eager["fwd_bwd_ms"] >= 2.5 * ours["fwd_bwd_ms"]))
            if compiled:
                checks.append(("f+b ≥ 1.1× compile",
                               compiled["fwd_bwd_ms"] >= 1.1 * ours["fwd_bwd_ms"]))
            checks.append(("extra ≤ 1× logits", ours["extra_bytes"] <= 1.01 * logits_bytes))
            verdicts = ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks)
            print(f"{op}, {tokens} tokens: {verdicts}")


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_gbps = peak_bandwidth_gbps(device)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = (f"peak HBM {peak_gbps} GB/s" if peak_gbps
                else "peak HBM unknown for this device (add it to PEAK_GBPS)")
        print(f"{name}, {peak}; torch {torch.__version__}; V = {VOCAB_SIZE}, bf16, temperature "
              f"{TEMPERATURE}")
        token_counts = GPU_TOKENS
    else:
        print(f"No CUDA device: running the PyTorch reference only, on CPU, at {CPU_TOKENS} tokens "
              f"instead of {GPU_TOKENS}. These are not GPU figures. V = {VOCAB_SIZE}, bf16.")
        token_counts = CPU_TOKENS
    print("GB/s = bytes a one-read kernel must move / time: forward 1× the bf16 logits, "
          "forward+backward 3×.")
    print("extra = peak memory allocated during forward+backward beyond the inputs, gradient "
          "included.\n")

    rows = []
    for tokens in token_counts:
        batch = make_batch(tokens, device)
        for op, impls in contenders(device).items():
            for impl, pair in impls.items():
                rows.append({"tokens": tokens, **measure(op, impl, pair, batch, device)})
        del batch
    print_table(rows, peak_gbps)
    if device == "cuda":
        print(f"\n{TARGETS}")
        print_verdict(rows, peak_gbps)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
