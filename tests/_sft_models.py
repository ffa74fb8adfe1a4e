"""A character-level tokenizer with a ChatML chat template and a tiny random Llama, for the causal-LM tests.

Both are built here from scratch (no model files), so the instruction-data and CLI tests are cheap and
hermetic: one token per character, so expected token counts can be computed by hand.
"""

from __future__ import annotations

from pathlib import Path

CHARS = " \n0123456789+-*=.,#?!'\"():;/<>_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPECIALS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def char_tokenizer(chat_template: bool = True):
    """A fast tokenizer: the specials (ids 0-3: pad, im_start, im_end = EOS, unk), then one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    if chat_template:
        fast.chat_template = CHATML
    return fast


def vocab_size() -> int:
    return len(SPECIALS) + len(CHARS)


def write_tiny_llama(out: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A random tiny ``LlamaForCausalLM`` checkpoint (safetensors + config) with :func:`char_tokenizer` files."""
    from flax import nnx
    from transformers import LlamaConfig

    from lorapro_jax.models import LlamaForCausalLM, save_hf_checkpoint

    cfg = LlamaConfig(vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0,
                      eos_token_id=2, architectures=["LlamaForCausalLM"])
    save_hf_checkpoint(LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed)), out, config=cfg)
    char_tokenizer().save_pretrained(str(out))
    return Path(out)
