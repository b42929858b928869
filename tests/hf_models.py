"""Tiny random transformers models, saved as their save_pretrained writes them, for tests and bench/ (no hub):
a RoBERTa encoder with a byte-level BPE tokenizer, and a whole ClapModel (HTSAT + RoBERTa) with its
ClapProcessor. Needs transformers and tokenizers (mmcl[hf])."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# HTSAT at its real spec_size (the time axis is resized to it) but 16 channels and one block a stage.
TINY_HTSAT = {
    "spec_size": 256,
    "num_mel_bins": 64,
    "patch_embeds_hidden_size": 16,
    "hidden_size": 128,  # = 16 * 2 ** 3, the width after the last stage
    "depths": [1, 1, 1, 1],
    "num_attention_heads": [1, 1, 1, 1],
    "window_size": 8,
}
TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 37}
TINY_ROBERTA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def bpe_tokenizer(folder: Path, sentences: list[str], vocab_size: int) -> Any:
    """A byte-level BPE trained on `sentences` in a second, saved in `folder` (vocab.json + merges.txt) and
    loaded as RobertaTokenizerFast: any text tokenizes, unseen words into smaller pieces."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        sentences,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=ROBERTA_SPECIALS, initial_alphabet=alphabet
        ),
    )
    folder.mkdir(parents=True)
    bpe.model.save(str(folder))
    return transformers.RobertaTokenizerFast.from_pretrained(folder)


def tiny_roberta(folder: Path, sentences: list[str], context: int, sizes: dict | None = None) -> None:
    """A random RobertaModel taking `context` tokens and its tokenizer (`bpe_tokenizer`), saved."""
    import transformers

    tokenizer = bpe_tokenizer(folder, sentences, vocab_size=320)
    config = transformers.RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=context + 2,
        pad_token_id=tokenizer.pad_token_id,
        **(sizes or TINY_ROBERTA),
    )
    transformers.RobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def tiny_clap(
    folder: Path,
    sentences: list[str],
    *,
    seed: int = 0,
    fusion: bool = False,
    extractor: dict[str, Any] | None = None,
    htsat: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    projection_dim: int = 16,
    vocab_size: int = 300,
    logit_scales: tuple[float, float] | None = None,
) -> Path:
    """A random ClapModel (`htsat` / `text` sizes, default TINY_HTSAT / TINY_TEXT) and its ClapProcessor:
    the tokenizer from `bpe_tokenizer`, a ClapFeatureExtractor with `extractor`'s settings (default:
    transformers' own, 48 kHz and 10 s, HTSAT's), saved in `folder` as the hub's CLAP folders are.
    `logit_scales`: (logit_scale_a, logit_scale_t) instead of the initial ones."""
    import transformers

    tokenizer = bpe_tokenizer(folder, sentences, vocab_size)
    config = transformers.ClapConfig(
        audio_config={**(htsat or TINY_HTSAT), "enable_fusion": fusion},
        text_config={**(text or TINY_TEXT), "vocab_size": len(tokenizer), "max_position_embeddings": 80},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = transformers.ClapModel(config)
    if logit_scales is not None:
        with torch.no_grad():
            model.logit_scale_a.fill_(logit_scales[0])
            model.logit_scale_t.fill_(logit_scales[1])
    features = transformers.ClapFeatureExtractor(
        **(extractor or {}), truncation="fusion" if fusion else "rand_trunc"
    )
    model.save_pretrained(folder)
    transformers.ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    return folder
