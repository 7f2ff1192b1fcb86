"""CPU smoke test of scripts/train_small_model.py: train a few steps, load the folder back, generate."""

from __future__ import annotations

import json

import torch
from script_loader import load_script


def test_default_size_fits_budget():
    from transformers import LlamaForCausalLM

    trainer = load_script("train_small_model")
    args = trainer.parse_args([])
    ids = {t: i for i, t in enumerate(trainer.SPECIAL_TOKENS)}
    model = LlamaForCausalLM(trainer.make_config(args, args.vocab, ids))
    n = trainer.count_params(model)
    assert n <= 2_500_000
    assert 2 * n + 100_000 < trainer.MAX_SAFETENSORS_BYTES
    cfg = model.config
    assert cfg.max_position_embeddings >= 16384
    assert cfg.head_dim == 64 and cfg.num_key_value_heads < cfg.num_attention_heads


def test_smoke_train_and_load(tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    trainer = load_script("train_small_model")
    out = tmp_path / "model"
    report = trainer.main(
        ["--device", "cpu", "--tiny", "--steps", "3", "--out", str(out), "--final-eval-samples", "1"]
    )
    assert report["steps"] == 3
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "TRAINING.md",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    assert cfg["max_position_embeddings"] >= 16384 and "rope_theta" in cfg
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    assert "Final loss" in (out / "TRAINING.md").read_text()

    tok = PreTrainedTokenizerFast.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = tok("The pass key is 12345.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    assert tok.decode(ids[0], skip_special_tokens=True) == "The pass key is 12345."
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|assistant|>\n") and chat.startswith(tok.bos_token)
    gen = model.float().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4 or tok.eos_token_id in gen[0, ids.shape[1] :].tolist()
