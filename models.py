"""Models: load any Hugging Face causal LM (a local directory, a hub id or a GGUF file), or build
the tiny base.

`--model` names a model three ways, and `resolve` turns each into a local model directory, so
everything after it (loading, `final/`, resume) takes one path: a directory is used as it is; a
hub id (org/name) is found in the local Hugging Face cache, or downloaded when online, as TRL,
verl and OpenRLHF do; a `.gguf` file is de-quantized once by transformers' GGUF loader into a
directory under runs/base/, then reused.

The built-in base is a stock `transformers` Llama (under a million parameters) with a
character-level `PreTrainedTokenizerFast`, warm-started by a short supervised pass on the
built-in tasks to partial competence and saved with `save_pretrained`. Everything else loads it
the way it loads a real checkpoint, so `--model DIR` and the default take the same path through
the code.
"""

import hashlib
import importlib
import json
import math
import random
import re
import time
from pathlib import Path

import torch
import transformers
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub import snapshot_download
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import chains
import llama_forward
import tasks

# the loading/saving bars of a 1M-parameter model are noise
transformers.logging.disable_progress_bar()

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# The chains family's operation names come after the other tasks' characters,
# so every older id is unchanged.
CHARACTERS = list("0123456789+-*=<>: ") + sorted(set("".join(chains.OPERATIONS)))

# The tiny base: 3 layers of width 128 (~0.6M parameters); tasks and answers fit in 64 positions.
TINY_CONFIG = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
               "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
               "tie_word_embeddings": True}
WARMSTART = {"task_mix": "sort:2,reverse:1,countdown:3", "level": 1, "steps": 500,
             "batch_size": 128, "lr": 3e-3, "noise": 0.4,
             # chains: see chains.shown_compositions and warm_start
             "chain_coverage": 1.0, "chain_edge_share": 0.0}


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the hub spells repositories
# What a hub download fetches: config, generation config, tokenizer, chat template and safetensors
# weights (not the .bin, .onnx or .gguf copies many repositories also carry).
HUB_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.safetensors"]
# what transformers' GGUF loader needs (requirements.txt lists them)
GGUF_PACKAGES = ("gguf", "accelerate")


def resolve(spec: str, cache: str = "runs/base", log=print) -> str:
    """The local model directory that --model names: a directory, a .gguf file (converted once into
    `cache`) or a Hugging Face hub id (from the local cache, or downloaded when online)."""
    check_model_spec(spec)
    if Path(spec).is_dir():
        return spec
    if spec.endswith(".gguf"):
        return convert_gguf(spec, cache, log)
    return hub_snapshot(spec)


def check_model_spec(spec: str) -> None:
    """The checks --model must pass before any work starts (no download, no conversion)."""
    if Path(spec).is_dir():
        return check_model_dir(spec)
    if spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise ValueError(f"--model {spec}: no such GGUF file")
        return require(GGUF_PACKAGES, f"--model {spec}")
    if not HUB_ID.match(spec):
        raise ValueError(f"--model {spec}: no such model directory, .gguf file or hub id "
                         "(org/name)")


def hub_snapshot(repo_id: str) -> str:
    """The directory of a hub model's files: the cached snapshot, or a download when online."""
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    # offline (HF_HUB_OFFLINE) or unreachable, and not cached
    except hub_errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else "the hub did not answer"
        raise ValueError(f"--model {repo_id}: no such local directory, and as a hub id it is "
                         f"neither cached in {hub_constants.HF_HUB_CACHE} nor "
                         f"reachable ({why})") from None
    # unknown, gated, private
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError) as error:
        raise ValueError(f"--model {repo_id}: the hub refused it: {first_line(error)}") from None


def convert_gguf(file: str, cache: str = "runs/base", log=print) -> str:
    """De-quantize a GGUF file once into a model directory `cache`/<name>-<hash>/ and return it
    (reused after).

    transformers' GGUF loader de-quantizes the weights to fp32 and rebuilds the tokenizer and
    chat template from the file's metadata. The loaded model still says it is quantized, and
    save_pretrained refuses it, so a fresh model built from its config takes its weights and is
    saved as a normal directory."""
    require(GGUF_PACKAGES, f"--model {file}")
    source = Path(file)
    # the content names the directory: a changed file converts anew
    with source.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()[:12]
    out = Path(cache) / f"{source.stem}-{digest}"
    if (out / "converted.json").is_file():
        return str(out)
    start = time.time()
    log(f"converting {file} to a model directory in {out} (once; later runs reuse it)")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                         dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # not GGUF, an unknown architecture
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"--model {file}: transformers cannot load it: "
                         f"{first_line(error)}") from None
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "converted.json").write_text(json.dumps({"source": str(source.resolve()),
                                                    "sha256": digest}))
    log(f"converted {file} ({model.num_parameters() / 1e6:.0f}M parameters, "
        f"{time.time() - start:.0f}s)")
    return str(out)  # converted.json is written last: a half-converted directory is never reused


def require(packages: tuple[str, ...], what: str) -> None:
    """A one-line error naming the optional packages `what` needs, if any of them is missing."""
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"{what} needs the {' and '.join(missing)} "
                         f"package{'s' * (len(missing) > 1)}, which "
                         f"{'are' if len(missing) > 1 else 'is'} not installed: pip install "
                         f"{' '.join(missing)}")


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local Hugging Face directory; a one-line error if it is not one."""
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    # no weights, a broken config.json, ...
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--model {path}: cannot load it: "
                         f"{str(error).strip().splitlines()[0]}") from None
    if getattr(getattr(model.config, "quantization_config", None), "quant_method", None) == "gguf":
        # A directory saved from transformers' GGUF loader holds de-quantized weights but keeps
        # the GGUF marker, which would make save_pretrained refuse final/ ("quantized with gguf
        # and is not serializable").
        model.hf_quantizer = None
        del model.config.quantization_config
    stops = stop_ids(model, tokenizer)
    if not stops:
        raise ValueError(f"--model {path}: its tokenizer and configs name no end-of-sequence token "
                         "(eos_token, eos_token_id), so completions could never stop: set one")
    # many real checkpoints ship without one; any id works, pads are masked
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(stops[0])
    return model, tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(device, choice: str = "auto") -> torch.dtype:
    """What the trainer's forward passes compute in (autocast; weights stay fp32, see train.py):
    --dtype's choice, or for "auto" the sampler's dtype on this kind of device
    (llama_forward.SAMPLE_DTYPE: bf16 on CUDA), fp32 elsewhere. CPUs stay fp32 by default: on the
    AMD EPYC without AVX512-BF16 this was measured on, a bf16 matmul ran ~13x slower (README)."""
    if choice != "auto":
        return DTYPES[choice]
    return llama_forward.SAMPLE_DTYPE.get(torch.device(device).type, torch.float32)


def saved_dtype(path: str) -> torch.dtype:
    """The dtype a model directory's weights were saved in (its config.json's dtype / torch_dtype),
    fp32 if unsaid."""
    config = json.loads((Path(path) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return (getattr(torch, name) if isinstance(getattr(torch, str(name), None), torch.dtype)
            else torch.float32)


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward, not keep them (non-reentrant)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_model_dir(path: str) -> None:
    """A one-line error unless `path` looks like a Hugging Face model directory (a config.json)."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"--model {path}: no such model directory (expected a config.json inside)")


def check_choices(model: str, device: str, dtype: str) -> None:
    """One-line errors for --model, --device and --dtype before any work starts (no download, no
    conversion)."""
    check_device(device)
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"--dtype must be auto, fp32 or bf16, not {dtype!r}")
    if model:
        check_model_spec(model)


def check_device(device: str) -> None:
    """A one-line error for a --device this machine does not have."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or auto, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA device (PyTorch sees none)")


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt, text or chat messages (an example's "messages": verl's and Nemotron's
    prompts, system message included): through the chat template when the tokenizer has one, else
    BOS + the contents joined. The run's system prompt (set_system_prompt) goes first, unless the
    messages bring their own."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    system = getattr(tokenizer, "system_prompt", "")
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer("\n\n".join(m["content"] for m in messages),
                           add_special_tokens=False)["input_ids"]


def set_system_prompt(tokenizer, text: str) -> None:
    """Every prompt encode_prompt makes with this tokenizer, in training and evaluation alike,
    starts with the system message `text` (--system-prompt): how a chat model is told the answer
    format the verifier reads."""
    tokenizer.system_prompt = text


def stop_ids(model, tokenizer) -> tuple[int, ...]:
    """Every id that ends a completion: the tokenizer's EOS, and the EOS id(s) of the model's config
    and of its generation_config.json (where chat models such as Llama-3-Instruct list their
    end-of-turn token)."""
    ids = {tokenizer.eos_token_id}
    for config in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
    return tuple(sorted(i for i in ids if i is not None))


# ---------------------------------------------------------------------- the tiny built-in base

def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: every character of the built-in tasks is one token."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def build_tiny_model(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **TINY_CONFIG)
    return LlamaForCausalLM(config)


def ensure_tiny_base(path: str, seed: int = 0, log=print, **warmstart) -> str:
    """Build and warm-start the tiny base at `path` unless an identical one is already there.

    Keyword arguments override WARMSTART's entries, e.g. task_mix="chains", chain_coverage=1.5
    for a base whose edge of competence is the depth-2 chains it never saw (issue 15)."""
    unknown = set(warmstart) - set(WARMSTART)
    if unknown:
        raise ValueError(f"unknown warm-start setting(s) {', '.join(sorted(unknown))}; known: "
                         f"{', '.join(WARMSTART)}")
    warmstart = {**WARMSTART, **warmstart}
    recipe = {"seed": seed, "config": TINY_CONFIG, "warmstart": warmstart,
              "characters": "".join(CHARACTERS)}
    recipe_file = Path(path) / "recipe.json"
    if recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        return path
    start = time.time()
    log(f"building the tiny base model in {path}: {warmstart['steps']} supervised warm-start steps "
        "(minutes on a CPU; built once, then reused)")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed)
    warm_start(model, tokenizer, warmstart, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    recipe_file.write_text(json.dumps(recipe))  # written last: a half-built base is never reused
    log(f"built the tiny base model in {path} ({model.num_parameters() / 1e6:.2f}M parameters, "
        f"{time.time() - start:.0f}s)")
    return path


def warm_start(model, tokenizer, recipe: dict, seed: int):
    """Supervised next-token training on (prompt, solution) pairs, loss on the solution tokens only;
    `recipe` has WARMSTART's keys (task mix, level, steps, batch size, lr, noise, chains).

    Deliberately short, and with a fraction `noise` of the solutions corrupted (one character
    replaced by a random digit), like a pretrained base that has also seen wrong worked answers:
    the base then puts real probability on wrong answers, so its pass@k is far above its pass@1,
    the regime where RL gains. Chains problems come from the chains `chain_coverage` shows, which
    places the edge of the base's competence (chains.shown_compositions), and a fraction
    `chain_edge_share` from any chain of the edge (chains.edge_compositions): met rarely, not never.
    """
    steps, lr, noise = recipe["steps"], recipe["lr"], recipe["noise"]
    # a stream apart from RL's
    mix = tasks.TaskMix(recipe["task_mix"], level=recipe["level"], seed=seed + 10_000)
    shown = chains.shown_compositions(recipe["chain_coverage"])
    edge, edge_share = (chains.edge_compositions(recipe["chain_coverage"]),
                        recipe.get("chain_edge_share", 0.0))
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warmup, then cosine decay to 10%
            warmup = min(1.0, (step + 1) / 30)
            group["lr"] = lr * warmup * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        examples = [mix.sample() for _ in range(recipe["batch_size"])]
        examples = [shown_chain(rng, edge if edge_share and rng.random() < edge_share else shown)
                    if ex["task"] == "chains" else ex for ex in examples]
        examples = [corrupt(ex, rng) if rng.random() < noise else ex for ex in examples]
        input_ids, labels = supervised_batch(tokenizer, examples)
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def shown_chain(rng: random.Random, shown: list[tuple[str, ...]]) -> dict:
    """A training problem (not in tasks' held-out split) of one of the shown chains, chosen
    uniformly."""
    while True:
        example = chains.make_chain(rng, rng.choice(shown))
        if not tasks.is_heldout(example):
            return example


def corrupt(example: dict, rng: random.Random) -> dict:
    """A copy of the example whose solution has one character replaced by a random digit."""
    solution = example["solution"]
    position = rng.randrange(len(solution))
    return {**example,
            "solution": solution[:position] + rng.choice("0123456789") + solution[position + 1:]}


def supervised_batch(tokenizer, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] right-padded; labels [B, T] with −100 on the prompt and padding (no loss
    there)."""
    rows, label_rows = [], []
    for example in examples:
        prompt = encode_prompt(tokenizer, example["prompt"])
        answer = (tokenizer(example["solution"], add_special_tokens=False)["input_ids"]
                  + [tokenizer.eos_token_id])
        rows.append(prompt + answer)
        label_rows.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return input_ids, labels
