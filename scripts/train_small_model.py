#!/usr/bin/env python
"""Train a small Llama-architecture long-context model offline, for accuracy checks of sparse attention.

Nothing here downloads anything: the tokenizer (byte-level BPE, ``tokenizers``) is trained on text found
on this machine (Python sources and docs of the standard library and installed packages), and the data
mix is that text plus synthetic long-context tasks (passkey, key-value retrieval, multi-needle, variable
tracking; :mod:`sglang_psa.longctx_tasks`) whose haystack is the same text, with a length curriculum
(short sequences first, up to 16k tokens).

The result is a HuggingFace folder (config.json, model.safetensors in bf16, tokenizer.json,
tokenizer_config.json with a chat template, generation_config.json, TRAINING.md) that SGLang loads with
``--model-path`` and no network.

GPU run (about 8 minutes of training on one H100)::

    python scripts/train_small_model.py --out models/psa-llama-2m --minutes 8

CPU smoke run::

    python scripts/train_small_model.py --device cpu --tiny --steps 3 --out /tmp/tiny

Passkey (and other task) accuracy of a saved folder, greedy decoding with the HF model::

    python scripts/train_small_model.py --eval models/psa-llama-2m --eval-length 8192 --eval-samples 50
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_psa.longctx_tasks import (  # noqa: E402
    TASK_KINDS,
    FillerCorpus,
    as_encoders,
    find_local_text,
    make_task,
    make_tasks,
    score_answer,
)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MAX_SAFETENSORS_BYTES = 5_000_000
TASK_WEIGHTS = {"passkey": 0.4, "kv_retrieval": 0.2, "multi_needle": 0.2, "variable_tracking": 0.2}


def parse_task_weights(text: str) -> dict[str, float]:
    """``kind=w,...`` over TASK_WEIGHTS: unnamed kinds keep their default weight; a kind at 0 is never
    sampled."""
    weights = dict(TASK_WEIGHTS)
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, value = item.partition("=")
        if not sep or kind not in weights:
            expected = f"expected kind=weight, kind in {list(weights)}"
            raise argparse.ArgumentTypeError(f"task weight {item!r}: {expected}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"task weight {item!r}: {value!r} is not a number") from None
        if weights[kind] < 0:
            raise argparse.ArgumentTypeError(f"task weight {item!r} must be >= 0")
    if sum(weights.values()) <= 0:
        raise argparse.ArgumentTypeError("task weights must not all be 0")
    return weights


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``.

    Newlines are isolated and digits split one by one before byte-level pre-tokenization, so a text cut
    after a newline tokenizes as the concatenation of its parts (exact needle positions) and numbers are
    copied digit by digit. The post-processor prepends BOS (as Llama tokenizers do).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def wrap_hf_tokenizer(tok: Any, max_len: int) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with special tokens and chat
    template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=max_len,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def make_config(args: argparse.Namespace, vocab_size: int, ids: dict[str, int]) -> Any:
    """The ``LlamaConfig`` of the model (tied embeddings, RoPE, GQA, SwiGLU)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=args.rope_theta,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        initializer_range=0.02,
    )


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A training batch: ``input_ids`` (B, L), next-token ``labels`` (-100 = ignored) and a mask of the
    labels that are task answers."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_mask: torch.Tensor


class DataMix:
    """Samples sequences of a given length: plain corpus text or a synthetic task (plain or chat format)."""

    def __init__(
        self,
        corpus: FillerCorpus,
        ids: dict[str, int],
        encode: Any,
        seed: int,
        text_frac: float,
        task_weights: dict[str, float] | None = None,
    ):
        self.corpus = corpus
        self.ids = ids
        self.rng = random.Random(seed)
        self.text_frac = text_frac
        weights = task_weights or TASK_WEIGHTS
        self.kinds = list(weights)
        self.weights = [weights[k] for k in self.kinds]
        self.user_prefix = np.asarray(encode("<|user|>\n"), dtype=np.int32)
        self.asst_prefix = np.asarray(encode("\n<|assistant|>\n"), dtype=np.int32)
        self.encode = encode

    def sample(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """One sequence of at most ``length`` tokens (starting with BOS) and the mask of its answer
        tokens."""
        bos, eos = self.ids[BOS], self.ids[EOS]
        if self.rng.random() < self.text_frac:
            seq = np.concatenate([[bos], self.corpus.sample_ids(self.rng, length - 1)]).astype(np.int32)
            return seq, np.zeros(len(seq), dtype=bool)
        kind = self.rng.choices(self.kinds, self.weights)[0]
        chat = self.rng.random() < 0.1
        task = make_task(kind, self.corpus, max(64, length - 24), rng=self.rng)
        if chat:
            ans = np.asarray(self.encode(task.answer), dtype=np.int32)
            parts = [[bos], self.user_prefix, task.input_ids, self.asst_prefix]
        else:
            ans = task.completion_ids
            parts = [[bos], task.input_ids]
        prompt = np.concatenate(parts).astype(np.int32)
        seq = np.concatenate([prompt, ans, [eos]]).astype(np.int32)[:length]
        mask = np.zeros(len(seq), dtype=bool)
        mask[len(prompt) :] = True
        return seq, mask

    def batch(self, length: int, batch_size: int) -> Batch:
        """``batch_size`` sequences right-padded to ``length``."""
        x = np.full((batch_size, length), self.ids[PAD], dtype=np.int64)
        y = np.full((batch_size, length), -100, dtype=np.int64)
        a = np.zeros((batch_size, length), dtype=bool)
        for i in range(batch_size):
            seq, mask = self.sample(length)
            n = len(seq)
            x[i, :n] = seq
            y[i, : n - 1] = seq[1:]
            a[i, : n - 1] = mask[1:]
        return Batch(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(a))


def curriculum_length(progress: float, stages: list[int], rng: random.Random) -> int:
    """Sequence length at ``progress`` in [0, 1]: stage ``i`` of ``n`` starts at ``i / n`` of the run
    (the longest stage gets the remainder); a quarter of the batches revisit a shorter stage."""
    n = len(stages)
    i = min(n - 1, int(progress * n))
    if i > 0 and rng.random() < 0.25:
        return stages[rng.randrange(i)]
    return stages[i]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: Any,
    hf_tok: Any,
    corpus: FillerCorpus,
    kinds: list[str],
    lengths: list[int],
    n_samples: int,
    device: str,
    seed: int = 100_000,
) -> dict[str, dict[int, float]]:
    """Exact-match accuracy of greedy decoding per task kind and prompt length (tokens).

    Each prompt is tokenized from its text with the HF tokenizer (as a server would), not taken from the
    generator's ids; a mismatch between the two is reported.
    """
    model.eval()
    results: dict[str, dict[int, float]] = {}
    mismatches = 0
    for kind in kinds:
        results[kind] = {}
        for length in lengths:
            tasks = make_tasks(kind, corpus, length, n_samples, seed=seed)
            correct = 0.0
            for task in tasks:
                ids = hf_tok(task.prompt, add_special_tokens=True)["input_ids"]
                if task.input_ids is not None and list(ids[1:]) != task.input_ids.tolist():
                    mismatches += 1
                x = torch.tensor([ids], device=device)
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=len(task.completion_ids if task.completion_ids is not None else []) + 4,
                    do_sample=False,
                    pad_token_id=hf_tok.pad_token_id,
                    eos_token_id=hf_tok.eos_token_id,
                )
                pred = hf_tok.decode(out[0, len(ids) :], skip_special_tokens=True)
                correct += score_answer(pred, task.answer)
            results[kind][length] = correct / max(1, len(tasks))
            print(f"eval {kind:18s} len={length:6d} acc={results[kind][length]:.3f}", flush=True)
    if mismatches:
        print(f"warning: {mismatches} prompts tokenized differently from the generator's ids", flush=True)
    return results


def load_for_eval(path: str, device: str) -> tuple[Any, Any]:
    """Load a saved folder with ``transformers`` (bf16 on CUDA, fp32 on CPU)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(path)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, tok


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def save_folder(model: Any, hf_tok: Any, out: Path, args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Save the HF folder (bf16 safetensors, tokenizer, chat template, generation config, TRAINING.md);
    return the safetensors size in bytes."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)
    GenerationConfig(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    ).save_pretrained(out)
    # Keep the folder readable by older loaders: top-level rope_theta/torch_dtype, explicit tokenizer
    # class, chat template inside tokenizer_config.json.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("rope_theta", float(args.rope_theta))
    cfg["torch_dtype"] = "bfloat16"
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    (out / "TRAINING.md").write_text(training_md(args, report))
    size = (out / "model.safetensors").stat().st_size
    return size


def training_md(args: argparse.Namespace, r: dict[str, Any]) -> str:
    """The recipe and results, as Markdown."""
    lines = [
        "# Training recipe",
        "",
        "Llama-architecture model trained from scratch by `scripts/train_small_model.py`, offline:",
        "byte-level BPE tokenizer trained on Python sources and docs found on the machine (standard",
        "library and installed packages), data mix of that text and synthetic long-context tasks",
        "(`sglang_psa/longctx_tasks.py`: passkey, key-value retrieval, multi-needle, variable tracking)",
        "with that text as haystack, and a length curriculum (short first).",
        "",
        f"- Command: `{r['command']}`",
        f"- Parameters: {r['params']:,} (tied embeddings); bf16 safetensors"
        f" {r.get('safetensors_bytes', 0):,} bytes",
        f"- Architecture: {args.layers} layers, hidden {args.hidden}, {args.heads} q /"
        f" {args.kv_heads} kv heads, head_dim {args.head_dim}, SwiGLU intermediate {args.intermediate},"
        f" vocab {r['vocab_size']},"
        f" RoPE theta {args.rope_theta:g}, max_position_embeddings {args.max_positions}",
        f"- Corpus: {r['corpus_files']} files, {r['corpus_bytes']:,} bytes, {r['corpus_tokens']:,} tokens",
        f"- Curriculum lengths: {r['stages']}; tokens per step {args.tokens_per_step:,}; text fraction"
        f" {args.text_frac}; task weights {args.task_weights}; 10% of tasks in chat format",
        f"- Optimizer: AdamW lr {args.lr:g} (warmup {args.warmup} steps, cosine to 10%), betas (0.9, 0.95),"
        f" weight decay 0.1, grad clip 1.0, answer-loss weight {args.answer_weight}",
        f"- Device: {r['device']}; precision: {r['precision']}; seed {args.seed}",
        f"- Steps: {r['steps']}; tokens seen: {r['tokens_seen']:,}; training time {r['train_seconds']:.0f} s"
        f" (setup {r['setup_seconds']:.0f} s)",
        f"- Final loss (EMA): LM {r['final_lm_loss']:.4f}, answer {r['final_answer_loss']:.4f}",
        "",
        "## Loss by step",
        "",
        "| step | seq len | LM loss (EMA) | answer loss (EMA) | elapsed s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["log"]:
        lines.append(
            f"| {row['step']} | {row['len']} | {row['lm']:.4f} | {row['ans']:.4f} | {row['elapsed']:.0f} |"
        )
    if r.get("eval"):
        lens = sorted({n for d in r["eval"].values() for n in d})
        lines += [
            "",
            f"## Accuracy (exact match, greedy, HF transformers, {r['eval_samples']} prompts each)",
            "",
            "| task | " + " | ".join(str(n) for n in lens) + " |",
            "|---|" + "---:|" * len(lens),
        ]
        for kind, d in r["eval"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{d.get(n, float('nan')):.2f}" for n in lens) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--tiny`` overrides sizes for a CPU smoke run."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/psa-llama-2m", help="output HF folder")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the training loop")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: time only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--tiny", action="store_true", help="tiny model, seq 256, small corpus (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rope-theta", type=float, default=500_000.0)
    p.add_argument("--max-positions", type=int, default=32768, help="config max_position_embeddings")
    p.add_argument("--stages", default="512,2048,4096,8192,16384", help="curriculum sequence lengths")
    p.add_argument("--tokens-per-step", type=int, default=65536)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--answer-weight", type=float, default=1.0, help="weight of the mean answer-token loss")
    p.add_argument("--text-frac", type=float, default=0.3, help="fraction of plain-text sequences")
    p.add_argument(
        "--task-weights",
        type=parse_task_weights,
        default=dict(TASK_WEIGHTS),
        help="sampling weights of the task kinds, e.g. passkey=0.2,multi_needle=0.4 (others keep theirs)",
    )
    p.add_argument("--corpus-mb", type=float, default=16.0, help="text collected from the machine")
    p.add_argument("--tokenizer-mb", type=float, default=6.0, help="part of it used to train the BPE")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--final-eval-lengths", default="2048,8192,16384", help="'' to skip")
    p.add_argument("--final-eval-samples", type=int, default=10)
    p.add_argument("--eval", default=None, metavar="FOLDER", help="only evaluate a saved folder")
    p.add_argument("--eval-length", default="8192", help="comma-separated prompt lengths for --eval")
    p.add_argument("--eval-samples", type=int, default=20)
    p.add_argument("--eval-tasks", default="passkey", help="comma-separated kinds, or 'all'")
    args = p.parse_args(argv)
    if args.tiny:
        args.vocab, args.hidden, args.intermediate = 512, 64, 128
        args.layers, args.heads, args.kv_heads, args.head_dim = 2, 2, 1, 32
        args.stages, args.tokens_per_step, args.warmup = "128,256", 512, 2
        args.corpus_mb, args.tokenizer_mb, args.log_every = 0.3, 0.3, 1
        if args.final_eval_lengths == "2048,8192,16384":
            args.final_eval_lengths = "256"
        args.final_eval_samples = min(args.final_eval_samples, 2)
    return args


def pick_device(name: str) -> str:
    """Resolve ``auto`` to cuda when available."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_corpus(args: argparse.Namespace) -> tuple[list[str], Any, Any, FillerCorpus]:
    """Collect local text, train the tokenizer, pre-tokenize the corpus."""
    texts = find_local_text(max_bytes=int(args.corpus_mb * 1e6))
    if not texts:
        raise SystemExit("no text found on this machine")
    rng = random.Random(args.seed)
    rng.shuffle(texts)
    tok_texts, total = [], 0
    for t in texts:
        tok_texts.append(t)
        total += len(t)
        if total >= args.tokenizer_mb * 1e6:
            break
    tok = train_tokenizer(tok_texts, args.vocab)
    hf_tok = wrap_hf_tokenizer(tok, args.max_positions)
    encode, encode_batch = as_encoders(tok)
    corpus = FillerCorpus(texts, encode=encode, encode_batch=encode_batch)
    return texts, tok, hf_tok, corpus


def run_eval(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """``--eval``: accuracy of a saved folder."""
    device = pick_device(args.device)
    model, hf_tok = load_for_eval(args.eval, device)
    texts = find_local_text(max_bytes=int(args.corpus_mb * 1e6))
    encode, encode_batch = as_encoders(hf_tok)
    corpus = FillerCorpus(texts, encode=encode, encode_batch=encode_batch)
    kinds = list(TASK_KINDS) if args.eval_tasks == "all" else args.eval_tasks.split(",")
    lengths = [int(x) for x in args.eval_length.split(",")]
    res = evaluate(model, hf_tok, corpus, kinds, lengths, args.eval_samples, device)
    print(json.dumps({"model": args.eval, "samples": args.eval_samples, "accuracy": res}))
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train (or, with ``--eval``, evaluate); return the report."""
    args = parse_args(argv)
    if args.eval:
        return {"eval": run_eval(args)}
    from transformers import LlamaForCausalLM

    t0 = time.time()
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    texts, tok, hf_tok, corpus = build_corpus(args)
    vocab_size = tok.get_vocab_size()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = make_config(args, vocab_size, ids)
    model = LlamaForCausalLM(config).to(device)
    model.config.use_cache = False
    n_params = count_params(model)
    print(
        f"params {n_params:,} (~{2 * n_params / 1e6:.2f} MB bf16); vocab {vocab_size}; corpus {len(texts)}"
        f" files, {corpus.n_tokens:,} tokens; device {device}",
        flush=True,
    )

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=cuda,
    )
    encode, _ = as_encoders(tok)
    data = DataMix(
        corpus, ids, encode, seed=args.seed + 1, text_frac=args.text_frac, task_weights=args.task_weights
    )
    stages = sorted({int(s) for s in args.stages.split(",")})
    len_rng = random.Random(args.seed + 2)
    budget = args.minutes * 60.0
    setup_s = time.time() - t0
    print(f"setup {setup_s:.1f} s; stages {stages}", flush=True)

    step, tokens_seen = 0, 0
    ema_lm = ema_ans = None
    log: list[dict[str, Any]] = []
    t_train = time.time()
    length = stages[0]
    while True:
        elapsed = time.time() - t_train
        progress = elapsed / budget if budget > 0 else 1.0
        if args.steps is not None:
            progress = max(progress, step / max(1, args.steps))
        if progress >= 1.0 or (args.steps is not None and step >= args.steps):
            break
        length = curriculum_length(progress, stages, len_rng)
        bsz = max(1, args.tokens_per_step // length)
        b = data.batch(length, bsz)
        x = b.input_ids.to(device, non_blocking=True)
        y = b.labels.to(device, non_blocking=True)
        am = b.answer_mask.to(device, non_blocking=True)

        lr_scale = min(1.0, (step + 1) / max(1, args.warmup))
        lr_scale *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_scale

        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(input_ids=x).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        valid = (y.reshape(-1) != -100).float()
        ans = am.reshape(-1).float()
        lm_loss = (ce * valid).sum() / valid.sum().clamp(min=1)
        ans_loss = (ce * ans).sum() / ans.sum().clamp(min=1)
        loss = lm_loss + args.answer_weight * ans_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += int(valid.sum().item())
        lm_v, ans_v = lm_loss.item(), ans_loss.item()
        has_ans = bool(ans.sum().item() > 0)
        ema_lm = lm_v if ema_lm is None else 0.95 * ema_lm + 0.05 * lm_v
        if has_ans:
            ema_ans = ans_v if ema_ans is None else 0.95 * ema_ans + 0.05 * ans_v
        if step % args.log_every == 0 or step == 1:
            row = {
                "step": step,
                "len": length,
                "lm": ema_lm,
                "ans": ema_ans if ema_ans is not None else float("nan"),
                "elapsed": time.time() - t_train,
            }
            log.append(row)
            print(
                f"step {step} len {length} bsz {bsz} lm {ema_lm:.4f} ans {row['ans']:.4f} "
                f"lr {args.lr * lr_scale:.2e} {row['elapsed']:.0f}s",
                flush=True,
            )
    train_s = time.time() - t_train
    if not log or log[-1]["step"] != step:
        log.append(
            {
                "step": step,
                "len": length,
                "lm": ema_lm if ema_lm is not None else float("nan"),
                "ans": ema_ans if ema_ans is not None else float("nan"),
                "elapsed": train_s,
            }
        )
    stride = max(1, len(log) // 24)
    log_rows = log[::stride] + ([log[-1]] if (len(log) - 1) % stride else [])

    report: dict[str, Any] = {
        "command": " ".join(
            ["python", "scripts/train_small_model.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "params": n_params,
        "vocab_size": vocab_size,
        "corpus_files": len(texts),
        "corpus_bytes": sum(len(t) for t in texts),
        "corpus_tokens": corpus.n_tokens,
        "stages": stages,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": "bf16 autocast, fp32 master weights" if cuda else "fp32",
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_seconds": train_s,
        "setup_seconds": setup_s,
        "final_lm_loss": ema_lm if ema_lm is not None else float("nan"),
        "final_answer_loss": ema_ans if ema_ans is not None else float("nan"),
        "log": log_rows,
    }
    # Save before the final evaluation, so that a run cut short there still leaves the model.
    out = Path(args.out)
    size = save_folder(model, hf_tok, out, args, report)
    report["safetensors_bytes"] = size
    (out / "TRAINING.md").write_text(training_md(args, report))
    print(
        f"saved {out} ({size:,} bytes safetensors); final LM loss {report['final_lm_loss']:.4f}", flush=True
    )
    eval_lengths = [int(x) for x in args.final_eval_lengths.split(",") if x.strip()]
    if eval_lengths and args.final_eval_samples > 0:
        model.config.use_cache = True
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            report["eval"] = evaluate(
                model, hf_tok, corpus, list(TASK_KINDS), eval_lengths, args.final_eval_samples, device
            )
        report["eval_samples"] = args.final_eval_samples
        (out / "TRAINING.md").write_text(training_md(args, report))
    assert size < MAX_SAFETENSORS_BYTES, f"model.safetensors is {size} bytes, over {MAX_SAFETENSORS_BYTES}"
    return report


if __name__ == "__main__":
    main()
