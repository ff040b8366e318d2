"""Sample: one training document, an ordered list of text and image segments, or a chat.

JSON encoding (the `<key>.json` member of a WebDataset sample; images are separate members
`<key>.<name>`, e.g. `000042.img0.png`, and are referred to by `<name>`):

    {
      "id": "math-000042",                       # the sample key; no dots, no slashes
      "task": "math",                            # one of TASKS
      "source": "math",                          # the source (data set) it came from
      "segments": [                              # the document, in order (may be [] for chats)
        {"type": "text", "text": "A handwritten "},
        {"type": "image", "image": "img0.png"}
      ],
      "messages": [                              # chats only, else null / absent
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                     {"type": "text", "text": "What digit is this?"}]},
        {"role": "assistant", "content": "\\boxed{7}", "reasoning": "It has a loop at the top."}
      ],
      "meta": {"answer": "7"}                    # ground truth for rewards and evaluation
    }

A message's `content` is a string or a list of segments; images may appear in any turn. `reasoning`
(assistant turns only) is the text inside the think block; absent or null means the non-reasoning form.
`meta` keys by task: `answer` (math, stem, counting, chat, document: the string a `\\boxed{}` answer
must equal), `boxes` (grounding: [[x1, y1, x2, y2], ...] normalized to [0, 1000]), `text` (ocr: the
transcription), `label` (digits). Anything else is free-form and passed through.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

TASKS = ("caption", "interleaved", "ocr", "document", "grounding", "counting", "text", "math", "stem", "chat")
TASK_INDEX = {name: i for i, name in enumerate(TASKS)}
ROLES = ("system", "user", "assistant")
_KEY = re.compile(r"^[A-Za-z0-9_\-]+$")
_IMAGE_NAME = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*\.(png|jpg|jpeg|webp|bmp|gif|tif|tiff)$", re.I)


class SchemaError(ValueError):
    """A sample that does not follow the documented encoding."""


@dataclass
class Segment:
    type: str  # "text" | "image"
    text: Optional[str] = None
    image: Optional[str] = None  # member name of the image, e.g. "img0.png"

    def to_json(self) -> dict:
        return {"type": "text", "text": self.text} if self.type == "text" else {"type": "image", "image": self.image}


@dataclass
class Message:
    role: str
    content: list[Segment]
    reasoning: Optional[str] = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"role": self.role, "content": [s.to_json() for s in self.content]}
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        return out


@dataclass
class Sample:
    id: str
    task: str
    source: str
    segments: list[Segment] = field(default_factory=list)
    messages: Optional[list[Message]] = None
    meta: dict = field(default_factory=dict)
    # Encoded image bytes by member name (what the shard stores); filled when read from a shard.
    images: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def image_names(self) -> list[str]:
        """Image references in order of appearance (segments, then messages)."""
        parts = list(self.segments)
        for m in self.messages or ():
            parts.extend(m.content)
        return [s.image for s in parts if s.type == "image"]

    def load_image(self, name: str):
        """The referenced image as a PIL image (decoded and fully loaded)."""
        from PIL import Image

        im = Image.open(io.BytesIO(self.images[name]))
        im.load()
        return im

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "task": self.task,
            "source": self.source,
            "segments": [s.to_json() for s in self.segments],
            "messages": None if self.messages is None else [m.to_json() for m in self.messages],
            "meta": self.meta,
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, obj: Any, images: Optional[dict[str, bytes]] = None) -> "Sample":
        """Parse and validate the JSON encoding; raises SchemaError naming what is wrong."""
        if not isinstance(obj, dict):
            raise SchemaError("sample is not a JSON object")
        sid = obj.get("id")
        if not isinstance(sid, str) or not _KEY.match(sid):
            raise SchemaError(f"id {sid!r}: expected letters, digits, '_' or '-'")
        task = obj.get("task")
        if task not in TASK_INDEX:
            raise SchemaError(f"task {task!r}: expected one of {TASKS}")
        source = obj.get("source")
        if not isinstance(source, str) or not source:
            raise SchemaError("source: expected a non-empty string")
        segments = _segments(obj.get("segments") or [], "segments")
        messages = None
        if obj.get("messages") is not None:
            if not isinstance(obj["messages"], list) or not obj["messages"]:
                raise SchemaError("messages: expected a non-empty list")
            messages = []
            for i, m in enumerate(obj["messages"]):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise SchemaError(f"messages[{i}].role: expected one of {ROLES}")
                reasoning = m.get("reasoning")
                if reasoning is not None and (m["role"] != "assistant" or not isinstance(reasoning, str)):
                    raise SchemaError(f"messages[{i}].reasoning: only assistant turns carry a reasoning string")
                messages.append(Message(m["role"], _segments(m.get("content", ""), f"messages[{i}].content"), reasoning))
            if not any(m.role == "assistant" for m in messages) and not any(m.role == "user" for m in messages):
                raise SchemaError("messages: a chat needs a user or an assistant turn")
        if not segments and messages is None:
            raise SchemaError("sample has neither segments nor messages")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise SchemaError("meta: expected an object")
        sample = cls(sid, task, source, segments, messages, meta, dict(images or {}))
        for name in sample.image_names():
            if not _IMAGE_NAME.match(name):
                raise SchemaError(f"image reference {name!r}: expected a member name like 'img0.png'")
        return sample

    @classmethod
    def loads(cls, data: bytes | str, images: Optional[dict[str, bytes]] = None) -> "Sample":
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SchemaError(f"broken JSON: {e}") from None
        return cls.from_json(obj, images)


def _segments(value: Any, where: str) -> list[Segment]:
    if isinstance(value, str):
        return [Segment("text", text=value)]
    if not isinstance(value, list):
        raise SchemaError(f"{where}: expected a string or a list of segments")
    out = []
    for i, s in enumerate(value):
        kind = s.get("type") if isinstance(s, dict) else None
        if kind == "text" and isinstance(s.get("text"), str):
            out.append(Segment("text", text=s["text"]))
        elif kind == "image" and isinstance(s.get("image"), str):
            out.append(Segment("image", image=s["image"]))
        else:
            raise SchemaError(f"{where}[{i}]: expected {{'type': 'text', 'text': str}} or {{'type': 'image', 'image': name}}")
    return out


def text(t: str) -> Segment:
    return Segment("text", text=t)


def image(name: str) -> Segment:
    return Segment("image", image=name)
