"""Tokenizer loading, the EXAONE chat template, image placeholder expansion and loss masks.

Chat template (reasoning mode on by default):

    [|system|]\\n{system}[|endofturn|]\\n
    [|user|]\\n{user}[|endofturn|]\\n
    [|assistant|]\\n<think>\\n{reasoning}\\n</think>\\n\\n{answer}[|endofturn|]\\n

The non-reasoning form (no `reasoning`, or `enable_thinking=False`) has an empty think block
`<think>\\n\\n</think>\\n\\n`. As in EXAONE's own template, only assistant turns after the last user
turn carry a think block; earlier assistant turns are rendered without one. The generation prompt is
`[|assistant|]\\n<think>\\n` (reasoning) or `[|assistant|]\\n<think>\\n\\n</think>\\n\\n`.

Images become `<vision>` + N x image token + `</vision>` with N = t*h*w / merge^2 from the image
grid. Loss masks (labels, unshifted, -100 = no loss): in chats, what an assistant turn generates
after its generation prompt, up to and including its `[|endofturn|]` (a reasoning turn: the
reasoning, `</think>` and the answer; a non-reasoning turn: the answer after the empty think block);
in plain documents every text token plus the closing end-of-turn (EOS) token. Image tokens and
vision start/end tokens never carry loss.

Text is tokenized piece by piece, prompt pieces apart from answer pieces, and a turn's prompt piece
is exactly the generation prompt of its mode: a prompt rendered for generation (render_grpo_prompt)
tokenizes to the same ids as the training sequence up to that point. (Tokenizing the whole text at
once would merge whitespace across the boundary, e.g. `<think>\\n\\n</think>`, and the model would be
trained on token sequences that generation never produces.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from .images import ImageSettings, decode_image, process_image
from .schema import Message, Sample, Segment, _segments

IGNORE = -100
IMAGE_PLACEHOLDER = "<vision><|image_pad|></vision>"

SYSTEM, USER, ASSISTANT, END_OF_TURN = "[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ROLE_TAGS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


@dataclass
class SpecialTokens:
    """Token ids the data path writes directly; defaults are EXAONE 4.5's released ids."""

    image_token_id: int = 67
    video_token_id: int = 68
    vision_start_token_id: int = 73
    vision_end_token_id: int = 74
    end_of_turn_token_id: int = 53  # also the EOS of plain documents
    pad_token_id: int = 0


class ProcessedImage(NamedTuple):
    pixel_values: np.ndarray  # float32 [t*h*w, 3*T*p*p]
    grid_thw: tuple[int, int, int]


class Tokenized(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    images: list[ProcessedImage]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(path: Optional[str] = None):
    """A Hugging Face tokenizer from a local directory; None -> the bundled demo tokenizer
    (data/demo/tokenizer.json, trained on first use if missing). Never downloads."""
    if path is None:
        from .demo.tokenizer import ensure_demo_tokenizer

        path = str(ensure_demo_tokenizer())
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"data.tokenizer={path!r}: not a directory holding a Hugging Face tokenizer")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def check_special_tokens(tokenizer, special: SpecialTokens) -> None:
    """Fail early when the tokenizer's ids for the template's tokens are not the configured ones."""
    expected = {
        "[|endofturn|]": special.end_of_turn_token_id,
        "<vision>": special.vision_start_token_id,
        "</vision>": special.vision_end_token_id,
    }
    to_id = getattr(tokenizer, "convert_tokens_to_ids", None) or tokenizer.token_to_id
    for token, want in expected.items():
        got = to_id(token)
        if got != want:
            raise ValueError(
                f"tokenizer maps {token!r} to id {got}, but the model config expects {want}: the tokenizer "
                "(data.tokenizer) does not belong to this model"
            )
    for token in (SYSTEM, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE):
        ids = _encode(tokenizer, token)
        if len(ids) != 1:
            raise ValueError(f"tokenizer splits the template token {token!r} into {len(ids)} tokens")


def _encode(tokenizer, text: str) -> list[int]:
    cache = getattr(tokenizer, "__dict__", {}).setdefault("_piece_cache", {}) if len(text) <= 64 else None
    if cache is not None and text in cache:  # template pieces repeat; their tokens are cached
        return cache[text]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "encode_batch"):
        backend = tokenizer  # a bare `tokenizers.Tokenizer`
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if cache is not None:
        if len(cache) > 100_000:
            cache.clear()
        cache[text] = ids
    return ids


# ---------------------------------------------------------------------------------------------
# Chat template


def _as_messages(messages: Sequence[Any]) -> list[Message]:
    out = []
    for m in messages:
        if isinstance(m, Message):
            out.append(m)
            continue
        content = m.get("content", "")
        if isinstance(content, list):  # Hugging Face style parts: {"type": "image"} may omit the name
            content = [
                {"type": "image", "image": p.get("image") or p.get("url") or "image"} if p.get("type") == "image" else p
                for p in content
            ]
        reasoning = m.get("reasoning", m.get("reasoning_content"))
        out.append(Message(m["role"], _segments(content, "content"), reasoning))
    return out


def chat_parts(messages, enable_thinking: bool = True, add_generation_prompt: bool = False) -> list[tuple]:
    """The template as ordered parts: ("text", str, carries_loss) and ("image", name, False)."""
    msgs = _as_messages(messages)
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=-1)
    parts: list[tuple] = []
    for i, m in enumerate(msgs):
        if m.role != "assistant":
            parts.append(("text", ROLE_TAGS[m.role] + "\n", False))
            parts.extend(_content_parts(m.content, loss=False))
            parts.append(("text", END_OF_TURN + "\n", False))
            continue
        if i > last_user and enable_thinking and m.reasoning:
            parts.append(("text", ASSISTANT + "\n" + THINK_OPEN + "\n", False))  # the reasoning generation prompt
            parts.append(("text", m.reasoning + "\n" + THINK_CLOSE + "\n\n", True))
        elif i > last_user:  # the non-reasoning generation prompt holds the empty think block
            parts.append(("text", ASSISTANT + "\n" + THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n", False))
        else:
            parts.append(("text", ASSISTANT + "\n", False))
        parts.extend(_content_parts(m.content, loss=True))
        parts.append(("text", END_OF_TURN, True))
        parts.append(("text", "\n", False))
    if add_generation_prompt:
        think = THINK_OPEN + "\n" if enable_thinking else THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n"
        parts.append(("text", ASSISTANT + "\n" + think, False))
    return parts


def _content_parts(content: list[Segment], loss: bool) -> list[tuple]:
    return [("text", s.text, loss) if s.type == "text" else ("image", s.image, False) for s in content]


def render_chat(messages, enable_thinking: bool = True, add_generation_prompt: bool = False) -> str:
    """EXAONE-style chat text; images appear as `<vision><|image_pad|></vision>` (one pad token,
    expanded to the image's token count at tokenization)."""
    parts = chat_parts(messages, enable_thinking, add_generation_prompt)
    return "".join(p[1] if p[0] == "text" else IMAGE_PLACEHOLDER for p in parts)


def document_parts(segments: list[Segment]) -> list[tuple]:
    return _content_parts(segments, loss=True)


# ---------------------------------------------------------------------------------------------
# Sample -> tokens


def sample_images(sample: Sample, settings: ImageSettings) -> dict[str, ProcessedImage]:
    """Decode and process every referenced image once (KeyError when a referenced member is missing)."""
    out = {}
    for name in dict.fromkeys(sample.image_names()):
        if name not in sample.images:
            raise KeyError(name)
        pixels, grid = process_image(decode_image(sample.images[name]), settings)
        out[name] = ProcessedImage(pixels, grid)
    return out


def tokenize_parts(
    parts: list[tuple],
    tokenizer,
    images: dict[str, ProcessedImage],
    settings: ImageSettings = ImageSettings(),
    special: SpecialTokens = SpecialTokens(),
) -> Tokenized:
    """Parts -> (input_ids, labels, images in order of appearance), image placeholders expanded."""
    merged: list[list] = []  # adjacent text parts with the same loss flag tokenize as one piece
    for kind, value, loss in parts:
        if kind == "text" and merged and merged[-1][0] == "text" and merged[-1][2] == loss:
            merged[-1][1] += value
        elif kind != "text" or value:
            merged.append([kind, value, loss])
    ids: list[int] = []
    labels: list[int] = []
    used: list[ProcessedImage] = []
    merge = settings.merge_size**2
    for kind, value, loss in merged:
        if kind == "text":
            piece = _encode(tokenizer, value)
            ids.extend(piece)
            labels.extend(piece if loss else [IGNORE] * len(piece))
        else:
            image = images[value]
            t, h, w = image.grid_thw
            n = t * h * w // merge
            ids.extend([special.vision_start_token_id] + [special.image_token_id] * n + [special.vision_end_token_id])
            labels.extend([IGNORE] * (n + 2))
            used.append(image)
    return Tokenized(ids, labels, used)


def tokenize_sample(
    sample: Sample,
    tokenizer,
    settings: ImageSettings = ImageSettings(),
    special: SpecialTokens = SpecialTokens(),
    enable_thinking: bool = True,
) -> Tokenized:
    """A Sample -> (input_ids, labels, images). Chats use the chat template (only assistant tokens
    carry labels); documents are their segments followed by the EOS (end-of-turn) token."""
    images = sample_images(sample, settings)
    if sample.is_chat:
        return tokenize_parts(chat_parts(sample.messages, enable_thinking), tokenizer, images, settings, special)
    out = tokenize_parts(document_parts(sample.segments), tokenizer, images, settings, special)
    out.input_ids.append(special.end_of_turn_token_id)
    out.labels.append(special.end_of_turn_token_id)
    return out


@dataclass
class Prompt:
    """A generation prompt: what GRPO rollouts and evaluation feed to `generate`."""

    text: str
    input_ids: list[int]
    pixel_values: Any  # torch.FloatTensor [P, 3*T*p*p] or None
    image_grid_thw: Any  # torch.LongTensor [N, 3] or None
    messages: list[Message]
    sample: Sample


def prompt_messages(sample: Sample) -> list[Message]:
    """The messages up to and including the last user turn (a document becomes one user turn)."""
    if not sample.is_chat:
        return [Message("user", list(sample.segments))]
    msgs = list(sample.messages)
    last_user = max((i for i, m in enumerate(msgs) if m.role == "user"), default=None)
    if last_user is None:
        raise ValueError(f"sample {sample.id}: no user turn to prompt with")
    return msgs[: last_user + 1]


def render_grpo_prompt(
    sample: Sample,
    tokenizer,
    settings: ImageSettings = ImageSettings(),
    special: SpecialTokens = SpecialTokens(),
    enable_thinking: bool = True,
) -> Prompt:
    """Messages up to the last user turn + the generation prompt, tokenized, with its images."""
    import torch

    msgs = prompt_messages(sample)
    parts = chat_parts(msgs, enable_thinking, add_generation_prompt=True)
    tok = tokenize_parts(parts, tokenizer, sample_images(sample, settings), settings, special)
    pixel_values = grid = None
    if tok.images:
        pixel_values = torch.from_numpy(np.concatenate([im.pixel_values for im in tok.images]))
        grid = torch.tensor([im.grid_thw for im in tok.images], dtype=torch.long)
    text = "".join(p[1] if p[0] == "text" else IMAGE_PLACEHOLDER for p in parts)
    return Prompt(text, tok.input_ids, pixel_values, grid, msgs, sample)
