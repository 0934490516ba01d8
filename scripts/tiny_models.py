"""Tiny models and tokenizers built offline, for tests, demos and smoke benchmarks.

Nothing here downloads anything: each builder makes a config with small dims, or a word-level tokenizer
trained on the words it is given, and can save it to a directory so that the real `from_pretrained`
loading paths are exercised.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from transformers import BertConfig, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, T5Config

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<s>"]  # T5's ids: pad 0, eos 1, unk 2


def build_word_tokenizer(texts: Iterable[str], save_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer whose vocabulary is every word in `texts`.

    It appends `</s>` to each sequence, as T5's tokenizer does, and pads with id 0.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # The vocabulary is split exactly as the tokenizer will split text, so no word of `texts` becomes <unk>.
    words = sorted({word for text in texts
                    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=512,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tiny_t5_config(vocab_size: int, d_model: int = 32, **overrides) -> T5Config:
    kwargs = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=d_model * 2,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def tiny_llama_config(vocab_size: int, hidden_size: int = 32, **overrides) -> LlamaConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_gpt2_config(vocab_size: int, hidden_size: int = 32, **overrides) -> GPT2Config:
    """GPT-2's architecture (learned absolute positions) at tiny dims, without dropout."""
    kwargs = dict(
        vocab_size=vocab_size,
        n_embd=hidden_size,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_bert_config(vocab_size: int, hidden_size: int = 32, num_labels: int = 2, **overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        num_labels=num_labels,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def save_tiny_model(task_type: str, save_dir: str | Path, texts: Iterable[str], seed: int = 0, **config_overrides) -> Path:
    """Build a tiny model of a task type ("seq2seq", "causal", "cls") with a word tokenizer over `texts`, and save
    both to `save_dir`, so `from_pretrained(save_dir)` loads them as it would a hub checkpoint."""
    import torch
    from transformers import BertForSequenceClassification, LlamaForCausalLM, T5ForConditionalGeneration

    save_dir = Path(save_dir)
    # Label words and the decoder-only separator must be in the vocabulary, not <unk>.
    tokenizer = build_word_tokenizer(list(texts) + ["answer : 0 1 2 3 4 5 6 7 8 9 . true false yes no"], save_dir)
    builders = {
        "seq2seq": lambda: T5ForConditionalGeneration(tiny_t5_config(len(tokenizer), **config_overrides)),
        "causal": lambda: LlamaForCausalLM(tiny_llama_config(len(tokenizer), **config_overrides)),
        "cls": lambda: BertForSequenceClassification(tiny_bert_config(len(tokenizer), **config_overrides)),
    }
    torch.manual_seed(seed)
    builders[task_type]().save_pretrained(save_dir)
    return save_dir
