"""Tiny random Hugging Face models saved to disk, so teacher tests run the real ``from_pretrained`` path offline.

``make_tiny_clip`` / ``make_tiny_llava`` build seeded random models from configs plus processors that load
from the same folder; the session-scoped fixtures ``tiny_clip_dir`` / ``tiny_llava_dir`` build them once.
Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: LLaVA-1.5 conversation format ("USER: <image>\n<text> ASSISTANT:"), as a Jinja chat template.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{%- else -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for item in message['content'] if item['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
    "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{{ ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_IMAGE_SIZE = 32
_PATCH = 8


def _tiny_vision_config(**extra: object):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=_IMAGE_SIZE,
        patch_size=_PATCH,
        projection_dim=16,
        **extra,
    )


def _image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": _IMAGE_SIZE},
        crop_size={"height": _IMAGE_SIZE, "width": _IMAGE_SIZE},
    )


def make_tiny_clip(dirpath: str | Path) -> Path:
    """Save a seeded 2-layer CLIP (32-px images, 8-px patches, 16-d projection) + image processor."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=_tiny_vision_config().to_dict(), projection_dim=16
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(dirpath)
    _image_processor().save_pretrained(dirpath)
    return dirpath


def _byte_tokenizer():
    """Byte-level tokenizer (256 byte tokens, no merges) so every string, class name included, is covered."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",  # the teacher must switch to left padding itself
    ), len(vocab)


def make_tiny_llava(dirpath: str | Path) -> Path:
    """Save a seeded tiny LLaVA (2-layer CLIP tower + 2-layer 32-wide Llama) with tokenizer and processor.

    The vision tower sees 32-px images in 8-px patches: 16 patches (+ CLS, dropped by the "default"
    feature strategy), so the processor expands ``<image>`` into 16 image tokens.
    """
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _byte_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
    )
    config = LlavaConfig(
        vision_config=_tiny_vision_config().to_dict(),
        text_config=text.to_dict(),
        image_token_index=ids["<image>"],
        image_seq_length=(_IMAGE_SIZE // _PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = ids["<pad>"]
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]
    )
    model.save_pretrained(dirpath)
    processor = LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(dirpath)
    return dirpath


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP model folder, built once per test session."""
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA model folder, built once per test session."""
    return make_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
