"""One real training step of train.py on a randomly initialised model, with its time split and peak
memory.

    python bench/step.py                # CPU: a scaled-down Qwen2 (2 layers, full 152k vocabulary)
    python bench/step.py --shape 1.5b   # GPU: Qwen2.5-1.5B's shape in bf16, the prorl-v2 preset

It writes the random model (and the built-in character tokenizer: ids past its vocabulary decode to
nothing, so rewards are 0 and dynamic sampling is off) to runs/bench-step/<shape>/model, runs
`train.main` for one step of `--preset prorl-v2` on the built-in countdown task, and prints the
step's line of metrics.jsonl: generation (gen_s), reference log-probs (ref_s), the update (update_s;
with the preset's 4 mini-batches it includes recomputing the old log-probs), the whole step, and on
CUDA the peak GPU memory. Weights are random (no download): speed does not depend on their values.
"""

import argparse
import json
import os
import shutil
import sys
import time

# the repository, not bench/
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import models
import train

# Qwen2 configs; "small" keeps the real vocabulary so the logits are as wide as a real run's
SHAPES = {
    "small": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2},
}
# (prompts per step, samples per prompt, new tokens, rows per forward/backward) by shape
# 1.5b: ~1k-token rows, 4 fit beside fp32 Adam state
SIZES = {"small": (4, 4, 32, 8), "1.5b": (64, 16, 1024, 4)}


def build(shape: str, directory: str, dtype: torch.dtype) -> None:
    tokenizer = models.build_tokenizer()
    config = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **SHAPES[shape])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES,
                        default="1.5b" if torch.cuda.is_available() else "small")
    parser.add_argument("--sizes", type=int, nargs=4,
                        metavar=("PROMPTS", "N", "NEW_TOKENS", "MICRO_ROWS"),
                        help="override the shape's default batch")
    args = parser.parse_args()
    prompts, n, new_tokens, micro_rows = args.sizes or SIZES[args.shape]
    cuda = torch.cuda.is_available()
    run = f"bench-step/{args.shape}"
    model_dir = os.path.join("runs", run, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build(args.shape, model_dir, torch.bfloat16 if cuda else torch.float32)
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{time.strftime('%Y-%m-%d')}  {device}, torch {torch.__version__}: one prorl-v2 step, "
          f"random Qwen2 '{args.shape}', {prompts} prompts x N={n}, {new_tokens} new tokens, "
          f"{micro_rows} rows per micro-batch")
    # a rerun replaces the last one
    shutil.rmtree(os.path.join("runs", run, "train"), ignore_errors=True)
    # the step is what is timed; at 1.5B a checkpoint is 25 GB
    train.checkpoint.save = lambda *args, **kwargs: None
    train.main(["--preset", "prorl-v2", "--model", model_dir, "--run", f"{run}/train",
                "--tasks", "countdown", "--steps", "1", "--prompts-per-step", str(prompts),
                "--n", str(n), "--max-new-tokens", str(new_tokens),
                "--micro-batch-rows", str(micro_rows), "--dynamic-sampling", "false",
                "--eval-every", "0", "--eval-problems", "1", "--val-problems", "1",
                "--eval-samples", "1", "--boundary-problems", "0"])
    with open(os.path.join("runs", run, "train", "metrics.jsonl")) as f:
        step = json.loads(f.readlines()[-1])
    print("  " + "  ".join(f"{key} {step[key]:.2f}"
                           for key in ("gen_s", "ref_s", "update_s", "step_s") if key in step)
          + f"  trained tokens/s {step['tokens_per_s']:.0f}")
    if "peak_gb" in step:
        print(f"  peak GPU memory {step['peak_gb']:.1f} GB")


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad input, as train.py reports it: one line
        sys.exit(f"error: {error}")
