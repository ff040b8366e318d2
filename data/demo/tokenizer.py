"""The demo tokenizer: byte-level BPE, 4,096 tokens, EXAONE's special-token ids, the chat template.

Trained with the `tokenizers` library on the standard library's documentation plus text from the
demo generators (so chat markup, digits and \\boxed{} are cheap). Digits are split one per token,
which keeps arithmetic learnable for a tiny model. Ids 0-127 are reserved special tokens placed
where the model's config expects them: pad 0, bos 1, end-of-turn (EOS) 53, image 67, video 68,
`<vision>` 73, `</vision>` 74. Saved as data/demo/tokenizer.json + tokenizer_config.json (a Hugging
Face tokenizer directory: `AutoTokenizer.from_pretrained("data/demo")`).

    python -m data.demo tokenizer [--out DIR]     # retrain (the bundled files are committed)
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 4096
NUM_RESERVED = 128
FIXED = {
    0: "[PAD]", 1: "[BOS]", 2: "[EOS]", 3: "[UNK]",
    4: "[|system|]", 5: "[|user|]", 6: "[|assistant|]", 7: "[|tool|]",
    8: "<think>", 9: "</think>", 10: "<tool_call>", 11: "</tool_call>",
    53: "[|endofturn|]", 67: "<|image_pad|>", 68: "<|video_pad|>", 73: "<vision>", 74: "</vision>",
}
# Markup that should survive decoding with skip_special_tokens=True.
NOT_SPECIAL = {"[|system|]", "[|user|]", "[|assistant|]", "[|tool|]", "<think>", "</think>", "<tool_call>", "</tool_call>"}

CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- set thinking = enable_thinking is not defined or enable_thinking -%}"
    "{%- for m in messages -%}"
    "{%- if m.content is string -%}{%- set body = m.content -%}{%- else -%}{%- set body = namespace(s='') -%}"
    "{%- for p in m.content -%}{%- if p.type == 'text' -%}{%- set body.s = body.s + p.text -%}"
    "{%- elif p.type == 'image' -%}{%- set body.s = body.s + '<vision><|image_pad|></vision>' -%}{%- endif -%}{%- endfor -%}"
    "{%- set body = body.s -%}{%- endif -%}"
    "{%- if m.role == 'assistant' -%}"
    "{{- '[|assistant|]\\n' -}}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{%- set r = m.reasoning or m.reasoning_content or '' -%}"
    "{%- if thinking and r -%}{{- '<think>\\n' + r + '\\n</think>\\n\\n' -}}{%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
    "{{- body + '[|endofturn|]\\n' -}}"
    "{%- else -%}"
    "{{- '[|' + m.role + '|]\\n' + body + '[|endofturn|]\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]\\n' -}}"
    "{%- if thinking -%}{{- '<think>\\n' -}}{%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)


def special_tokens() -> list[str]:
    return [FIXED.get(i, f"<|unused_{i}|>") for i in range(NUM_RESERVED)]


def training_texts(per_source: int = 1500, seed: int = 1234):
    """Documentation paragraphs and rendered demo samples (chat markup included)."""
    from pydoc_data.topics import topics

    from ..text import render_chat
    from .corpus import GENERATORS, generate

    for name in sorted(topics):
        yield topics[name]
    for source in GENERATORS:
        if source == "text":
            continue
        for sample in generate(source, "train", per_source, seed):
            if sample.is_chat:
                yield render_chat(sample.messages)
                yield render_chat(sample.messages, enable_thinking=False)
            else:
                yield "".join(s.text for s in sample.segments if s.type == "text")


def train_demo_tokenizer(out_dir: Path | str = HERE) -> Path:
    """Train the tokenizer and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=special_tokens(), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_texts(), trainer=trainer)
    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] not in NOT_SPECIAL
    tok = Tokenizer.from_str(json.dumps(spec))
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"demo tokenizer has {tok.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    for i, token in FIXED.items():
        assert tok.token_to_id(token) == i, (token, tok.token_to_id(token), i)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[|endofturn|]", pad_token="[PAD]", unk_token="[UNK]",
        chat_template=CHAT_TEMPLATE, model_max_length=1 << 20,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), save_jinja_files=False)
    for extra in ("special_tokens_map.json",):
        if (out / extra).exists() and out == HERE:
            (out / extra).unlink()
    return out


def ensure_demo_tokenizer() -> Path:
    """The directory holding the demo tokenizer, training it first if it is missing."""
    if not ((HERE / "tokenizer.json").exists() and (HERE / "tokenizer_config.json").exists()):
        train_demo_tokenizer(HERE)
    return HERE
