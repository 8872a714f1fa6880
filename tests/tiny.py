"""Tiny random-weight models for engine tests: a few layers, a small vocabulary, float32."""

from __future__ import annotations

from pathlib import Path

VOCAB = 100
SPECIALS = ["<pad>", "<eos>", "<bos>"]


def make_tokenizer(vocab_size: int = VOCAB):
    """A byte-level, one-character-per-token tokenizer over printable ASCII (ids 3..97), the
    shape transformers rebuilds for a qwen2 config, so prompts like "hello world" encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\u0120"] + [chr(c) for c in range(0x21, 0x7F)]  # byte-level: space is "Ġ"
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    vocab.update({f"<u{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>")


def make_model(path: Path, seed: int, layers: int = 2, noise_from: Path | None = None,
               noise: float = 0.0) -> Path:
    """A Qwen2-shaped model with random weights; or, with `noise_from`, a copy of that model
    with gaussian noise added (a draft that mostly agrees with its target)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    torch.manual_seed(seed)
    if noise_from is not None:
        model = AutoModelForCausalLM.from_pretrained(noise_from, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p) * p.std())
    else:
        config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=8192, tie_word_embeddings=False,
                             bos_token_id=2, eos_token_id=1, pad_token_id=0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # sharper logits: fewer exact ties, more varied text
            model.lm_head.weight.mul_(8.0)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=2)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
