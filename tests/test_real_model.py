"""--model takes a hub id or a GGUF file as well as a directory (models.resolve), and a chat model's
prompts can carry a system message (--system-prompt).

No test downloads anything: the hub tests lay out a tiny Llama in a temporary Hugging Face cache and
run with HF_HUB_OFFLINE=1 (in a subprocess: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it
is imported), and the GGUF tests write a tiny GGUF file with the `gguf` package, as llama.cpp's
converter lays one out.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM

import evaluation
import models
import rollout
import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["--max-new-tokens", "6", "--prompts-per-step", "2", "--n", "2", "--eval-problems", "2",
        "--val-problems", "2", "--eval-samples", "1", "--boundary-problems", "0",
        "--eval-every", "0", "--tasks", "sort"]
# ids 0, 1, 2: pad, bos, eos (end of turn)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A byte-level BPE vocabulary: the 256 byte symbols and one merge, as GPT-2-style GGUF files carry
# theirs.
TOKENS = SPECIAL + sorted(ByteLevel.alphabet()) + ["Ġt"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random Llama with grouped-query attention (4 heads, 2 key/value heads) over TOKENS."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf stores q/k rows with each head's two rotary halves
    interleaved."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(path: Path, model: LlamaForCausalLM) -> Path:
    """`model` as an F32 GGUF file under llama.cpp's tensor names and metadata keys, with a
    tokenizer and chat template."""
    c, weights = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    # 3: control, 1: normal
    writer.add_token_types([3] * len(SPECIAL) + [1] * (len(TOKENS) - len(SPECIAL)))
    writer.add_token_merges(["Ġ t"])
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    # tied: no output.weight
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}."
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", weights[f"{layer}{hf_name}.weight"])
        q, k = (weights[f"{layer}self_attn.q_proj.weight"],
                weights[f"{layer}self_attn.k_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(q, c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(k, c.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf", tiny_llama())


def test_a_gguf_file_converts_once_to_the_same_model_tokenizer_and_chat_template(
        tmp_path, gguf_file):
    said = []
    model_dir = models.resolve(str(gguf_file), cache=str(tmp_path), log=said.append)
    # reused
    assert models.resolve(str(gguf_file), cache=str(tmp_path), log=said.append) == model_dir
    # one conversion: its start and its end
    assert len(said) == 2 and said[0].startswith("converting")
    model, tokenizer = models.load(model_dir)
    ids = torch.tensor([[1, 40, 70, 100, 130, 160, 2, 5]])
    # the weights, q/k un-permuted, are the original model's: so are its logits
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=1e-5)
    assert tokenizer.decode(tokenizer("3 1 2=")["input_ids"]) == "3 1 2="
    assert tokenizer.decode(models.encode_prompt(tokenizer, "hi")) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert models.stop_ids(model, tokenizer) == (2,)  # <|im_end|> ends a completion


def test_a_gguf_model_trains_a_step_and_resumes_without_converting_again(
        tmp_path, monkeypatch, capsys, gguf_file):
    monkeypatch.chdir(tmp_path)
    train.main(["--model", str(gguf_file), "--run", "g", "--steps", "1", *FAST])
    train.main(["--resume", "runs/g", "--steps", "2"])
    metrics = [json.loads(line) for line in Path("runs/g/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # as the user named it
    assert json.loads(Path("runs/g/config.json").read_text())["model"] == str(gguf_file)
    assert capsys.readouterr().out.count("converting") == 1
    converted = list(Path("runs/base").iterdir())  # one directory, reused by the resumed run
    assert len(converted) == 1 and converted[0].name.startswith("tiny-chat-")
    # final/ is a model directory
    assert models.load("runs/g/final")[0].config.vocab_size == len(TOKENS)


def test_a_missing_gguf_package_is_one_line(monkeypatch, gguf_file):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ValueError) as error:
        train.checked_config(["--model", str(gguf_file)])
    assert str(error.value) == (f"--model {gguf_file} needs the gguf package, which is not "
                                "installed: pip install gguf")


def test_a_model_that_is_no_directory_gguf_file_or_hub_id_is_one_line(tmp_path):
    for spec, said in [(str(tmp_path / "nothing.gguf"), "no such GGUF file"),
                       ("./no/such/dir",
                        "no such model directory, .gguf file or hub id (org/name)"),
                       (str(tmp_path), "no such model directory (expected a config.json inside)")]:
        with pytest.raises(ValueError, match=f"--model {spec}: {said}".replace("(", r"\(")
                           .replace(")", r"\)")):
            train.checked_config(["--model", spec])


def lay_out_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> None:
    """The hub cache layout huggingface_hub reads offline: hub/models--org--name/{refs/main,
    snapshots/<rev>/}."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def offline(hf_home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


HUB_RUN = """
import sys, torch, models, train
model, _ = models.load(models.resolve("tiny-org/tiny-chat"))
with torch.no_grad():
    torch.save(model(torch.tensor([[1, 40, 70, 100, 2]])).logits, "logits.pt")
train.main(["--model", "tiny-org/tiny-chat", "--run", "h", "--steps", "1", *sys.argv[1:]])
train.main(["--resume", "runs/h", "--steps", "2"])
"""


def test_a_hub_id_loads_offline_from_the_local_cache_trains_and_resumes(tmp_path, gguf_file):
    model_dir = tmp_path / "saved"
    tiny_llama().save_pretrained(model_dir)  # the weights and config a hub repository holds ...
    # + tokenizer
    models.load(models.convert_gguf(str(gguf_file), str(tmp_path / "c")))[1].save_pretrained(
        model_dir)
    lay_out_hub_cache(tmp_path / "hf", "tiny-org/tiny-chat", model_dir)
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run([sys.executable, "-c", HUB_RUN, *FAST], cwd=work, env=offline(tmp_path / "hf"),
                   check=True, capture_output=True, text=True)
    with torch.no_grad():
        expected = tiny_llama()(torch.tensor([[1, 40, 70, 100, 2]])).logits
    torch.testing.assert_close(torch.load(work / "logits.pt"), expected, rtol=0, atol=0)
    metrics = [json.loads(line)
               for line in (work / "runs/h/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and (work / "runs/h/final/config.json").is_file()
    assert not (work / "runs/base").exists()  # a hub model is read from the cache, not copied


def test_an_uncached_hub_id_offline_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--model",
                           "tiny-org/not-cached"],
                          cwd=tmp_path, env=offline(tmp_path / "hf"), capture_output=True,
                          text=True, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("error: --model tiny-org/not-cached: no such local directory, and as "
                           f"a hub id it is neither cached in {tmp_path / 'hf' / 'hub'} nor "
                           "reachable (HF_HUB_OFFLINE is set)\n")
    assert not (tmp_path / "runs").exists()


def test_the_system_prompt_comes_first_in_every_chat_prompt_unless_the_messages_bring_one(
        tmp_path, gguf_file):
    _, tokenizer = models.load(models.convert_gguf(str(gguf_file), str(tmp_path)))
    models.set_system_prompt(tokenizer, "Reply with a number.")
    assert tokenizer.decode(models.encode_prompt(tokenizer, "2+3?")) == (
        "<|im_start|>system\nReply with a number.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n"
        "<|im_start|>assistant\n")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    assert tokenizer.decode(models.encode_prompt(tokenizer, own)).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>")


def test_pass1_gain_is_the_paired_mean_difference_with_its_normal_interval():
    # c of n=4 right per problem: base [0, 2, 1], trained [2, 2, 3] → differences [0.5, 0, 0.5],
    # mean 1/3, sd √(1/12) = 0.2887, half-width 1.96 · 0.2887 / √3 = 0.3267 → +0.007 to +0.660;
    # pass@1 3/12 → 7/12
    assert evaluation.pass1_gain([0, 2, 1], [2, 2, 3], 4) == (
        "pass@1 at T=0.6, top-p 0.95 (3 held-out problems × 4 samples): base 0.250 → trained "
        "0.583, gain +0.333 (95% interval over problems +0.007 to +0.660)")


def test_bench_rollout_on_a_model_file_checks_greedy_agreement_and_times_both_samplers(
        tmp_path, gguf_file):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "rollout.py"), "--model",
                           str(gguf_file), "--sizes", "2x2,3x4", "--max-new-tokens", "5"],
                          cwd=tmp_path, capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "rollout.generate == model.generate on 8 of 8 prompts" in done.stdout
    assert "batch 4 = 2 prompts x N=2" in done.stdout \
        and "batch 12 = 3 prompts x N=4" in done.stdout
    assert done.stdout.count("ratio") == 2


def test_preset_chat_cpu_puts_its_system_prompt_in_every_prompt_trained_and_evaluated(
        tmp_path, monkeypatch, gguf_file):
    monkeypatch.chdir(tmp_path)
    real_generate, seen = rollout.generate, []

    def recording_generate(model, prompts, *args, **kwargs):
        seen.extend(prompts)
        return real_generate(model, prompts, *args, **kwargs)

    monkeypatch.setattr(rollout, "generate", recording_generate)
    train.main(["--preset", "chat-cpu", "--model", str(gguf_file), "--run", "c", "--steps", "1",
                "--n", "2", "--prompts-per-step", "2", "--max-new-tokens", "4",
                "--eval-problems", "2", "--boundary-problems", "2", "--boundary-n", "2",
                "--tasks", str(REPO / "data" / "small-arithmetic.jsonl")])
    config = json.loads(Path("runs/c/config.json").read_text())
    assert config["system_prompt"] == "Answer with only the number." and config["kl_coef"] == 0
    # the converted model's tokenizer
    _, tokenizer = models.load(str(next(Path("runs/base").iterdir())))
    texts = tokenizer.batch_decode(seen)
    # base evaluation, boundary, the step's sampling, then the trained model's evaluation and
    # boundary
    assert len(texts) >= 2 + 2 + 2 + 2 + 2
    assert all(t.startswith("<|im_start|>system\nAnswer with only the number.<|im_end|>\n"
                            "<|im_start|>user\nWhat is ")
               for t in texts)


def test_a_directory_saved_from_the_gguf_loader_saves_its_final_model(tmp_path, gguf_file):
    # What the user made by hand: a de-quantized model saved with the GGUF marker still in
    # config.json.
    model_dir = Path(models.convert_gguf(str(gguf_file), str(tmp_path / "c")))
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf", "gguf_file": gguf_file.name,
                                     "dequantize": False}
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = models.load(str(model_dir))
    # refused ("quantized with gguf") before models.load dropped it
    model.save_pretrained(tmp_path / "final")
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_an_uncached_hub_id_with_the_hub_unreachable_is_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    # refused
    env = {**offline(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "--model",
                           "tiny-org/not-cached"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                          timeout=120)
    assert done.returncode == 1 and done.stderr.endswith(
        f"neither cached in {tmp_path / 'hf' / 'hub'} nor reachable (the hub did not answer)\n")
    assert done.stderr.count("\n") == 1
