"""The bundled demo corpus: small, learnable tasks built from data that ships offline.

Every source is generated from a seeded RNG, so a build is reproducible. Images are small (28 to
168 pixels a side: 1 to 16 image tokens) so a CPU step of the tiny model stays fast.

| source      | task        | what                                                                   | meta           |
|-------------|-------------|------------------------------------------------------------------------|----------------|
| caption     | caption     | a scikit-learn handwritten digit or a coloured shape, then a caption   | label          |
| interleaved | interleaved | two or three digits, each followed by its name, then their sum         | answer         |
| ocr         | ocr         | chat: read 3-5 rendered characters                                     | text           |
| document    | document    | chat: a rendered 3-line key/value page, asked for one value            | answer         |
| grounding   | grounding   | chat: two shapes on the token grid, box of the named one in [0, 1000]  | boxes, answer  |
| counting    | counting    | chat: 1-9 dots, one per token cell at most (counts balanced), \\boxed{} | answer         |
| text        | text        | paragraphs of the standard library's documentation (pydoc_data)        |                |
| math        | math        | chat: mostly one-digit arithmetic and word problems, \\boxed{} answer   | answer         |
| stem        | stem        | chat: an arithmetic problem rendered as an image, answer in \\boxed{}   | answer         |
| chat        | chat        | chat: digit recognition, two-turn arithmetic, small talk                | answer, label  |

Chats come in reasoning form (an assistant `reasoning`) and non-reasoning form, about half each.
The held-out split uses other digit images (the last 297 of 1,797), other documentation topics and
arithmetic problems that do not occur in the training split (split by a hash of the problem).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import math
import random
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..schema import Message, Sample, image, text

SOURCES = {
    "caption": "caption",
    "interleaved": "interleaved",
    "ocr": "ocr",
    "document": "document",
    "grounding": "grounding",
    "counting": "counting",
    "text": "text",
    "math": "math",
    "stem": "stem",
    "chat": "chat",
}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 190, 20)}
SHAPES = ("circle", "square", "triangle")
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are EXAONE, a helpful vision-language assistant."]
HELDOUT_DIGITS = 1500  # digit images [0, 1500) train, [1500, 1797) held out


# ------------------------------------------------------------------------------------------ assets


@lru_cache(maxsize=None)
def _digits():
    """scikit-learn's 1,797 handwritten digits (8x8, values 0-16) and labels, read from the file
    it ships (importing scikit-learn itself takes seconds)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.exists():
        with gzip.open(path) as f:
            table = np.loadtxt(f, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8).astype(np.float32), table[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(int)


@lru_cache(maxsize=None)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _digit_image(index: int) -> tuple[bytes, int]:
    images, labels = _digits()
    pixels = (255 - images[index] * (255 / 16)).round().astype(np.uint8)  # dark ink on white
    im = Image.fromarray(pixels, "L").resize((56, 56), Image.NEAREST)
    return _png(im), int(labels[index])


def _digit_index(rng: random.Random, split: str, label: int | None = None) -> int:
    lo, hi = (0, HELDOUT_DIGITS) if split == "train" else (HELDOUT_DIGITS, len(_digits()[1]))
    if label is None:
        return rng.randrange(lo, hi)
    candidates = [i for i in range(lo, hi) if _digits()[1][i] == label]
    return rng.choice(candidates)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=color)


def _place(rng: random.Random, size: int, sizes: list[int], gap: int = 2) -> list[tuple[int, int, int, int]]:
    """Non-overlapping square boxes of the given side lengths inside a size x size canvas."""
    for _ in range(1000):
        boxes = []
        for s in sizes:
            for _ in range(100):
                x, y = rng.randrange(0, size - s + 1), rng.randrange(0, size - s + 1)
                b = (x, y, x + s, y + s)
                if all(b[2] + gap <= o[0] or o[2] + gap <= b[0] or b[3] + gap <= o[1] or o[3] + gap <= b[1] for o in boxes):
                    boxes.append(b)
                    break
            else:
                break
        if len(boxes) == len(sizes):
            return boxes
    raise RuntimeError("could not place shapes")


def _text_image(s: str, width: int, height: int = 28, size: int = 20) -> bytes:
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    font = _font(size)
    x1, y1, x2, y2 = font.getbbox(s)
    draw.text(((width - (x2 - x1)) / 2 - x1, (height - (y2 - y1)) / 2 - y1), s, font=font, fill="black")
    return _png(im)


def _chat(sid, task, system, turns, meta, images=None) -> Sample:
    """turns: [(role, content, reasoning)]; content a string or a list of segments."""
    msgs = [Message("system", [text(system)])] if system else []
    for role, content, reasoning in turns:
        segs = [text(content)] if isinstance(content, str) else content
        msgs.append(Message(role, segs, reasoning))
    return Sample(sid, task, task, [], msgs, meta, images or {})


def _reasoning_mode(rng: random.Random) -> bool:
    return rng.random() < 0.5


def _system(rng: random.Random):
    return rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.3 else None


# ----------------------------------------------------------------------------------------- sources


def gen_caption(rng: random.Random, sid: str, split: str) -> Sample:
    if rng.random() < 0.6:
        png, label = _digit_image(_digit_index(rng, split))
        caption = rng.choice([
            f" A handwritten digit {label}.",
            f" This is a handwritten {DIGIT_NAMES[label]}.",
            f" The digit {label} ({DIGIT_NAMES[label]}), written by hand.",
        ])
        return Sample(sid, "caption", "caption", [image("img0.png"), text(caption)], None, {"label": str(label)}, {"img0.png": png})
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    s = rng.randrange(24, 64)
    (box,) = _place(rng, 56, [min(s, 52)])
    im = Image.new("RGB", (56, 56), "white")
    _draw_shape(ImageDraw.Draw(im), shape, box, COLORS[color])
    caption = rng.choice([f" A {color} {shape} on a white background.", f" A picture of a {color} {shape}."])
    return Sample(sid, "caption", "caption", [image("img0.png"), text(caption)], None, {"label": f"{color} {shape}"}, {"img0.png": _png(im)})


def gen_interleaved(rng: random.Random, sid: str, split: str) -> Sample:
    n = rng.choice([2, 3])
    segs, images, labels = [text("Some handwritten digits.")], {}, []
    for k in range(n):
        png, label = _digit_image(_digit_index(rng, split))
        name = f"img{k}.png"
        images[name] = png
        labels.append(label)
        segs += [image(name), text(f" This one is a {label}.")]
    total = sum(labels)
    segs.append(text(f" Together: {' + '.join(map(str, labels))} = {total}."))
    return Sample(sid, "interleaved", "interleaved", segs, None, {"answer": str(total), "labels": labels}, images)


OCR_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"


def gen_ocr(rng: random.Random, sid: str, split: str) -> Sample:
    n = rng.randrange(3, 6)
    s = "".join(rng.choice(OCR_CHARS) for _ in range(n))
    png = _text_image(s, 112)
    question = rng.choice(["Read the text in the image.", "What does the image say?", "Transcribe the image."])
    turns = [("user", [image("img0.png"), text(question)], None), ("assistant", s, None)]
    return _chat(sid, "ocr", _system(rng), turns, {"text": s}, {"img0.png": png})


def gen_document(rng: random.Random, sid: str, split: str) -> Sample:
    keys = rng.sample("ABCDEFGHKMNPRSTXYZ", 3)
    values = [rng.randrange(0, 100) for _ in keys]
    im = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, 111, 111), outline=(160, 160, 160))
    for row, (k, v) in enumerate(zip(keys, values)):
        draw.text((14, 12 + row * 32), f"{k}: {v}", font=_font(20), fill="black")
    q = rng.randrange(3)
    question = f"What is the value of {keys[q]}?"
    reasoning = f"The line for {keys[q]} reads {keys[q]}: {values[q]}." if _reasoning_mode(rng) else None
    turns = [("user", [image("img0.png"), text(question)], None), ("assistant", f"\\boxed{{{values[q]}}}", reasoning)]
    meta = {"answer": str(values[q]), "fields": dict(zip(keys, values))}
    return _chat(sid, "document", _system(rng), turns, meta, {"img0.png": _png(im)})


CELL = 28  # one image token covers 28 x 28 pixels (patch 14, merge 2); scenes are laid out on this grid


def _cells(rng: random.Random, n: int, grid: int = 4) -> list[tuple[int, int]]:
    return [divmod(c, grid) for c in rng.sample(range(grid * grid), n)]


def gen_grounding(rng: random.Random, sid: str, split: str) -> Sample:
    """Two shapes, each filling a 1x1 or 2x2 block of token cells: boxes take few distinct values,
    which a tiny model can learn to read off its image tokens."""
    kinds = rng.sample([(c, s) for c in sorted(COLORS) for s in SHAPES], 2)
    while True:
        sizes = [rng.choice([1, 2]) for _ in kinds]
        corners = [(rng.randrange(5 - k), rng.randrange(5 - k)) for k in sizes]
        blocks = [{(r + i, c + j) for i in range(k) for j in range(k)} for (r, c), k in zip(corners, sizes)]
        if not blocks[0] & blocks[1]:
            break
    im = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(im)
    boxes = []
    for (color, shape), (r, c), k in zip(kinds, corners, sizes):
        box = (c * CELL + 3, r * CELL + 3, (c + k) * CELL - 3, (r + k) * CELL - 3)
        _draw_shape(draw, shape, box, COLORS[color])
        boxes.append(box)
    t = rng.randrange(2)
    norm = [round(v * 1000 / 112) for v in boxes[t]]
    answer = f"[{norm[0]}, {norm[1]}, {norm[2]}, {norm[3]}]"
    question = f"Where is the {kinds[t][0]} {kinds[t][1]}? Answer with its box [x1, y1, x2, y2]."
    turns = [("user", [image("img0.png"), text(question)], None), ("assistant", answer, None)]
    meta = {"boxes": [norm], "answer": answer, "target": f"{kinds[t][0]} {kinds[t][1]}"}
    return _chat(sid, "grounding", _system(rng), turns, meta, {"img0.png": _png(im)})


def gen_counting(rng: random.Random, sid: str, split: str, index: int = 0) -> Sample:
    """1-9 dots (balanced), at most one per token cell, jittered inside it: counting is then a sum
    over image tokens."""
    count = index % 9 + 1
    color = rng.choice(sorted(COLORS))
    im = Image.new("RGB", (112, 112), "white")
    draw = ImageDraw.Draw(im)
    for r, c in _cells(rng, count):
        d = rng.randrange(12, 19)
        x, y = c * CELL + rng.randrange(1, CELL - d), r * CELL + rng.randrange(1, CELL - d)
        draw.ellipse((x, y, x + d, y + d), fill=COLORS[color])
    question = rng.choice(["How many dots are in the image?", f"Count the {color} dots."])
    reasoning = None
    if _reasoning_mode(rng):
        reasoning = "Counting the dots one by one: " + ", ".join(str(k) for k in range(1, count + 1)) + "."
    turns = [("user", [image("img0.png"), text(question)], None), ("assistant", f"\\boxed{{{count}}}", reasoning)]
    return _chat(sid, "counting", _system(rng), turns, {"answer": str(count)}, {"img0.png": _png(im)})


@lru_cache(maxsize=None)
def _doc_chunks(split: str) -> tuple[str, ...]:
    """Paragraph chunks (<= ~1,200 characters) of the stdlib docs; every 10th topic is held out."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 10 == 9) == (split == "heldout")]
    chunks = []
    for name in chosen:
        current = ""
        for para in topics[name].split("\n\n"):
            para = para.strip("\n")
            if not para.strip():
                continue
            if current and len(current) + len(para) > 1200:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{para}" if current else para
        if current:
            chunks.append(current)
    return tuple(chunks)


def gen_text(rng: random.Random, sid: str, split: str, index: int = 0) -> Sample:
    chunks = _doc_chunks(split)
    return Sample(sid, "text", "text", [text(chunks[index % len(chunks)])], None, {})


NAMES = ["Tom", "Ana", "Min", "Sara", "Jun", "Lee", "Mia", "Ravi"]
ITEMS = ["apples", "books", "coins", "stamps", "pencils", "cards"]


def split_of(question: str) -> str:
    """Problems are split by a hash of their text: held-out problems never occur in training."""
    return "heldout" if zlib.crc32(question.encode()) % 10 == 0 else "train"


MATH_LEVELS = (0.30, 0.20, 0.15, 0.15, 0.20)  # mostly one-digit operands: learnable in a few hundred steps


def math_problem(rng: random.Random, split: str) -> tuple[str, str, int]:
    """(question, worked step, answer) of the split, at one of five difficulty levels."""
    level = rng.choices(range(len(MATH_LEVELS)), MATH_LEVELS)[0]
    while True:
        question, step, answer = _math_at_level(rng, level)
        if split_of(question) == split:
            return question, step, answer


def _math_at_level(rng: random.Random, level: int) -> tuple[str, str, int]:
    if level == 0:  # one-digit sums
        a, b = rng.randrange(10), rng.randrange(10)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b
    if level == 1:  # one-digit differences, never negative
        a = rng.randrange(10)
        b = rng.randrange(a + 1)
        return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b
    if level == 2:  # the multiplication table
        a, b = rng.randrange(2, 10), rng.randrange(2, 10)
        return f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", a * b
    if level == 3:  # two digits plus one
        a, b = rng.randrange(10, 50), rng.randrange(1, 10)
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b
    name, item = rng.choice(NAMES), rng.choice(ITEMS)  # word problems over one-digit numbers
    a, b = rng.randrange(1, 10), rng.randrange(1, 10)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, f"{name} has {a} + {b} = {a + b} {item}.", a + b
    a, b = max(a, b), min(a, b)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    return q, f"{a} - {b} = {a - b} {item} are left.", a - b


def gen_math(rng: random.Random, sid: str, split: str) -> Sample:
    question, step, answer = math_problem(rng, split)
    if _reasoning_mode(rng):
        turn = ("assistant", f"The answer is \\boxed{{{answer}}}.", step)
    else:
        turn = ("assistant", f"{step} The answer is \\boxed{{{answer}}}.", None)
    return _chat(sid, "math", _system(rng), [("user", question, None), turn], {"answer": str(answer), "question": question})


def gen_stem(rng: random.Random, sid: str, split: str) -> Sample:
    while True:
        a, b = rng.randrange(1, 20), rng.randrange(1, 10)
        op = rng.choice("+-")
        if op == "-":
            a, b = max(a, b), min(a, b)
        if split_of(f"{a} {op} {b}") == split:
            break
    answer = a + b if op == "+" else a - b
    png = _text_image(f"{a} {op} {b} = ?", 168)
    reasoning = f"The image shows {a} {op} {b}. {a} {op} {b} = {answer}." if _reasoning_mode(rng) else None
    turns = [("user", [image("img0.png"), text("Solve the problem in the image.")], None), ("assistant", f"\\boxed{{{answer}}}", reasoning)]
    return _chat(sid, "stem", _system(rng), turns, {"answer": str(answer), "question": f"{a} {op} {b}"}, {"img0.png": png})


SMALL_TALK = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Who are you?", "I am a small demo assistant that reads digits, counts dots and does arithmetic."),
    ("Thank you!", "You are welcome."),
    ("What can you do?", "I can read short texts in images, count objects, find shapes and solve small math problems."),
]


def gen_chat(rng: random.Random, sid: str, split: str) -> Sample:
    kind = rng.randrange(3)
    if kind == 0:
        png, label = _digit_image(_digit_index(rng, split))
        reasoning = f"The image shows a handwritten {DIGIT_NAMES[label]}." if _reasoning_mode(rng) else None
        turns = [("user", [image("img0.png"), text("What digit is this?")], None), ("assistant", f"\\boxed{{{label}}}", reasoning)]
        return _chat(sid, "chat", _system(rng), turns, {"answer": str(label), "label": str(label)}, {"img0.png": png})
    if kind == 1:
        a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(1, 10)
        first, second = a + b, a + b + c
        reasoning = f"The previous result was {first}. {first} + {c} = {second}." if _reasoning_mode(rng) else None
        turns = [
            ("user", f"What is {a} + {b}?", None),
            ("assistant", f"\\boxed{{{first}}}", None),
            ("user", f"Now add {c} to that.", None),
            ("assistant", f"\\boxed{{{second}}}", reasoning),
        ]
        return _chat(sid, "chat", _system(rng), turns, {"answer": str(second)})
    q, a = rng.choice(SMALL_TALK)
    return _chat(sid, "chat", _system(rng), [("user", q, None), ("assistant", a, None)], {})


GENERATORS = {
    "caption": gen_caption,
    "interleaved": gen_interleaved,
    "ocr": gen_ocr,
    "document": gen_document,
    "grounding": gen_grounding,
    "counting": gen_counting,
    "text": gen_text,
    "math": gen_math,
    "stem": gen_stem,
    "chat": gen_chat,
}


def generate(source: str, split: str, count: int, seed: int):
    """Yield `count` samples of one source and split, reproducibly for a seed."""
    rng = random.Random(f"{seed}/{source}/{split}")
    gen = GENERATORS[source]
    for i in range(count):
        sid = f"{source}-{split}-{i:06d}"
        if source in ("counting", "text"):
            yield gen(rng, sid, split, index=i)
        else:
            yield gen(rng, sid, split)


def default_counts(scale: float = 1.0) -> dict[str, int]:
    base = {
        "caption": 4000, "interleaved": 3000, "ocr": 4000, "document": 3000, "grounding": 4000,
        "counting": 4500, "text": len(_doc_chunks("train")), "math": 6000, "stem": 3000, "chat": 4000,
    }
    return {k: max(1, math.ceil(v * scale)) for k, v in base.items()}


VERSION = 2  # bump when generated content changes: a corpus built on first use is then rebuilt


def manifest_json(counts: dict, heldout: dict, seed: int) -> str:
    return json.dumps({"name": "demo", "version": VERSION, "seed": seed, "train": counts, "heldout": heldout}, indent=1)
