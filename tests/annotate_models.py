"""Tiny random-weight captioning models for the annotate tests, built in memory (nothing is downloaded).

``tiny_blip2(path)`` saves a BLIP-2 (ViT vision tower, Q-Former, OPT language model) of a few hundred
thousand parameters with a word-level tokenizer whose vocabulary is real words, so its captions decode to
words. ``tiny_vision_encoder_decoder(path)`` saves a ViT + GPT-2 captioner the same way. Both are
deterministic (fixed seed) and caption a few dozen 32 px crops in well under a second on a CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

SEED = 0
IMAGE_SIZE = 32
NUM_QUERY_TOKENS = 4
FIRST_WORDS = ("describe", "this", "image", "in", "one", "sentence", "question", "what", "is", "answer", ".",
               ",", ":", "?", "a", "an", "the", "of", "on", "with", "and", "photo", "cup", "coffee", "cat")


def vocabulary(size: int = 300) -> list[str]:
    """``size`` distinct lower-case words: prompt and caption words, then ImageNet class names' words."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    words = list(FIRST_WORDS)
    for name in IMAGENET_CLASSNAMES:
        for word in re.findall("[a-z]+", name.lower()):
            if word not in words:
                words.append(word)
    return words[:size]


def word_tokenizer(special: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>"), size: int = 300):
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`: lower-cased, split on spaces and punctuation,
    ``<s>`` put before every text (as OPT's tokenizer puts its bos), left padding (for decoder-only
    generation); ids 0-3 are ``special`` (pad, bos, eos, unk)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pad, bos, eos, unk = special
    vocab = {token: i for i, token in enumerate([*special, *vocabulary(size)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                           special_tokens=[(bos, vocab[bos])])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no space before punctuation
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad,
                                   unk_token=unk, padding_side="left")


def blip2_processor(tokenizer, num_query_tokens: int = NUM_QUERY_TOKENS, image_size: int = IMAGE_SIZE):
    """A ``Blip2Processor`` from an in-memory tokenizer: it adds the ``<image>`` token to the tokenizer and
    puts ``num_query_tokens`` of them before each text (the model's config must name that token's id)."""
    from transformers import Blip2Processor, BlipImageProcessor

    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)


def tiny_blip2(path: str | Path, seed: int = SEED) -> Path:
    """Save a tiny random BLIP-2 (vision width 32, one layer each, 4 query tokens, a one-layer OPT of width
    32; 50k parameters) and its processor (32 px images) into ``path``; returns ``path``."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )

    processor = blip2_processor(word_tokenizer())
    tokenizer = processor.tokenizer
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8,
                                        initializer_range=0.2),
        qformer_config=Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, encoder_hidden_size=32, vocab_size=64,
                                          initializer_range=0.2),
        text_config=OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, init_std=0.5),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        initializer_range=0.2)  # larger than BLIP-2's 0.02, so that captions depend on the image
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_vision_encoder_decoder(path: str | Path, seed: int = SEED) -> Path:
    """Save a tiny random ``VisionEncoderDecoderModel`` (a one-layer ViT of width 32 and a one-layer GPT-2)
    with a ``ViTImageProcessor`` (32 px) and the word tokenizer, but no processor, into ``path``."""
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
    )

    tokenizer = word_tokenizer()
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8, initializer_range=0.2),
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                   initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    path = Path(path)
    VisionEncoderDecoderModel(config).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
