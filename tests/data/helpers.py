"""Small builders shared by the data tests."""

import io
import os

import webdataset as wds
from PIL import Image

from data.schema import Message, Sample, image, text
from data.shards import write_shards


def png(w=56, h=56, color=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def caption(i: int, source: str = "web") -> Sample:
    return Sample(f"{source}-{i:05d}", "caption", source, [image("img0.png"), text(f" picture {i}")], None,
                  {"label": str(i)}, {"img0.png": png(color=(i % 256, 0, 0))})


def qa(i: int, source: str = "qa") -> Sample:
    return Sample(f"{source}-{i:05d}", "math", source, [], [Message("user", [text(f"What is {i} + 1?")]),
                  Message("assistant", [text(f"\\boxed{{{i + 1}}}")])], {"answer": str(i + 1)})


def make_bad_shards(directory) -> dict:
    """Two shards with one of each defect; returns what a reader must find."""
    os.makedirs(directory, exist_ok=True)
    good = [caption(i, "bad") for i in range(6)]
    with wds.TarWriter(os.path.join(directory, "shard-000000.tar")) as w:
        for s in good[:3]:
            w.write({"__key__": s.id, "json": s.dumps(), "img0.png": s.images["img0.png"]})
        broken_image = caption(100, "bad")
        w.write({"__key__": broken_image.id, "json": broken_image.dumps(), "img0.png": b"\x89PNG not really"})
        w.write({"__key__": "bad-00101", "json": b'{"id": "bad-00101", "task": "capt'})
        missing = Sample("bad-00102", "caption", "bad", [image("img0.png"), image("img1.png")], None, {},
                         {"img0.png": png()})
        w.write({"__key__": missing.id, "json": missing.dumps(), "img0.png": png()})
        long_chat = Sample("bad-00103", "chat", "bad", [], [Message("user", [text("word " * 400)]),
                           Message("assistant", [text("ok")])], {})
        w.write({"__key__": long_chat.id, "json": long_chat.dumps()})
    path = os.path.join(directory, "shard-000001.tar")
    with wds.TarWriter(path) as w:
        for s in good[3:]:
            w.write({"__key__": s.id, "json": s.dumps(), "img0.png": s.images["img0.png"]})
        w.write({"__key__": "bad-00104", "json": caption(104, "bad").dumps(), "img0.png": png(90, 90)})
    data = open(path, "rb").read()
    cut = data.rindex(b"bad-00104.img0.png") + 520  # inside the last image's data
    open(path, "wb").write(data[:cut])
    return {
        "good": sorted(f"bad/{s.id}" for s in good),
        "skipped": {"bad_image": 1, "bad_json": 1, "missing_image": 1, "too_long": 1, "truncated_shard": 1},
    }


__all__ = ["png", "caption", "qa", "make_bad_shards", "write_shards"]
