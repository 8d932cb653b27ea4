"""A tiny random Qwen2-VL with a locally trained tokenizer, saved as a normal model folder.

No model hub is reachable here, so the MLLM path is exercised end to end on this: the same
classes, processor, chat template and special tokens as Qwen2-VL, a few hundred thousand
random weights. `python -m umr.retrieval.encoders.tiny_qwen2vl OUT` writes one; `hf-mllm:OUT` loads it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# The Qwen2-VL chat template, reduced to what embedding and re-ranking render: system, user
# turns with images and text, and the assistant prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<instruction_start>", "<instruction_end>"]

# Text for the byte-level BPE: enough words for captions and prompts to tokenise into
# sub-words, with "Yes" and "No" as whole tokens (the re-ranker reads their logits).
_CORPUS = """
A dog runs across the grass. Two children play on the beach. A man rides a bicycle down the street.
A woman in a red dress walks past a shop. A black and white dog jumps over a fence. People sit at a
table in a restaurant. A boy climbs a rock wall. A girl swims in a blue pool. The cat sleeps on the sofa.
Retrieve an image that matches the caption. Find a caption that describes the image. Query Candidate
Does the candidate match the query? Answer Yes or No. Yes No Yes No yes no a photo of a picture of
red green blue yellow white black brown orange pink purple water snow mountain city road field park
running jumping sitting standing walking playing holding looking wearing smiling riding climbing
"""


def build(out: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2, image_size: int = 56,
          markers: bool = True, vocab_padding: int = 0) -> Path:
    """`markers=False` leaves the instruction markers out of the tokenizer and `vocab_padding`
    pads the embedding matrix past the vocabulary, as real Qwen2-VL checkpoints are."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = SPECIAL_TOKENS if markers else [t for t in SPECIAL_TOKENS if "instruction" not in t]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=special[1:], padding_side="right")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    heads = 4
    head_dim = hidden // heads
    quarter = head_dim // 4
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer) + vocab_padding, "hidden_size": hidden, "intermediate_size": hidden * 2,
                     "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 2,
                     "max_position_embeddings": 2048, "bos_token_id": ids["<|endoftext|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     # mrope sections (temporal, height, width) must sum to head_dim / 2
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "README.md").write_text(f"Tiny random Qwen2-VL for tests (seed {seed}); not a trained model.\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps({"model": str(build(args.out, args.seed))}))


if __name__ == "__main__":
    main()
