"""WebDataset shards: writing, resumable reading with rank/worker splitting, and the shard command.

A sample is the tar members sharing a key (WebDataset convention): `<key>.json` (the Sample
encoding, data/schema.py) and one member per image, `<key>.<name>` (e.g. `<key>.img0.png`).

Commands:

    python -m data.shards build --jsonl samples.jsonl --images DIR --out OUT [--maxcount 1000]
    python -m data.shards build --hf PATH --out OUT [--split train] [--task caption] [--source NAME]
    python -m data.shards inspect DIR        # counts per task and source
    python -m data.shards verify DIR         # decodes everything; lists bad members; exit 1 if any

`build --jsonl`: one Sample JSON per line whose image references are paths under --images.
`build --hf`: a local Hugging Face dataset (a `save_to_disk` directory, or parquet / json / jsonl
files); columns `messages` (chat; `<image>` in a string or {"type": "image"} parts place the
images), `image` / `images`, `text` / `caption`, `task`, `source`, `id`, `meta`, `answer`, `boxes`.

Reading (`ShardStream`): the shards of one source are split over reader slots (rank x worker):
whole shards when there are at least as many shards as slots, else every `num_slots`-th sample. Per
epoch the shard order is shuffled with a seed shared by all slots, so the slots partition the
source exactly. Samples are shuffled in blocks of `block_size`: the permutation of a block is a
pure function of (seed, source, epoch, slot, block), so the resumable state is a cursor (where the
block starts, how many of it were taken), not buffer contents.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .schema import SchemaError, Sample

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class ShardError(Exception):
    """A shard that cannot be read to its end; `reason` is truncated_shard or unreadable_shard."""

    def __init__(self, reason: str, message: str, member: Optional[str] = None):
        super().__init__(message)
        self.reason, self.member = reason, member  # member: name of a member cut short, if known


@dataclass
class RawSample:
    shard: str
    index: int  # position of the sample in its shard
    key: str
    members: dict[str, bytes]  # extension -> bytes ("json", "img0.png", ...)


# ------------------------------------------------------------------------------------------- write


def sample_to_wds(sample: Sample) -> dict:
    out = {"__key__": sample.id, "json": sample.dumps()}
    for name in sample.image_names():
        out[name] = sample.images[name]
    return out


def write_shards(samples: Iterable[Sample], out_dir: str | os.PathLike, prefix: str = "shard",
                 maxcount: int = 1000, maxsize: float = 256e6) -> list[str]:
    """Write samples with webdataset.ShardWriter; returns the shard paths."""
    import webdataset as wds

    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(str(out_dir), f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0) as writer:
        for sample in samples:
            missing = [n for n in sample.image_names() if n not in sample.images]
            if missing:
                raise ValueError(f"sample {sample.id}: referenced images {missing} have no bytes")
            writer.write(sample_to_wds(sample))
        count = writer.shard
    return [pattern % i for i in range(count)]


# -------------------------------------------------------------------------------------------- read


def list_shards(directory: str | os.PathLike) -> list[str]:
    return sorted(str(p) for p in Path(directory).glob("*.tar"))


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ").lstrip(b" ")
    return int(field, 8) if field else 0


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def _tar_members(f, path: str) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of a tar, checking every header.

    A small reader of ustar/pax/GNU headers: unlike tarfile, it tells a truncated archive (a short
    header or member, a missing end-of-archive block) from a complete one."""
    size = os.fstat(f.fileno()).st_size
    pos, long_name, pax = 0, None, {}
    while True:
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512:
            raise ShardError("truncated_shard", f"{path}: truncated at byte {pos} (no end-of-archive block)")
        if header == b"\0" * 512:
            return
        checksum = _octal(header[148:156]) if header[148:156].strip(b"\0 ") else -1
        if checksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError("truncated_shard" if pos else "unreadable_shard", f"{path}: bad tar header at byte {pos}")
        kind, length = header[156:157], _octal(header[124:136])
        name = header[0:100].rstrip(b"\0").decode("utf-8", "replace")
        prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
        name = pax.get("path") or long_name or (f"{prefix}/{name}" if prefix else name)
        length = int(pax.get("size", length))
        data = pos + 512
        if data + length > size:
            raise ShardError("truncated_shard", f"{path}: member {name} runs past the end of the file", name)
        pos = data + (length + 511) // 512 * 512
        if kind in (b"x", b"L", b"g"):
            f.seek(data)
            payload = f.read(length)
            if kind == b"x":
                pax = _pax_records(payload)
            elif kind == b"L":
                long_name = payload.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0", b"7"):
            yield name, data, length
        pax, long_name = {}, None


def iter_tar(path: str, start: int = 0) -> Iterator[RawSample]:
    """Samples of one tar in order, from sample `start` on (earlier samples' data is not read).

    Raises ShardError after the last complete sample when the tar is truncated (a short header or
    member, no end-of-archive block; the incomplete last sample is dropped) or cannot be read."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ShardError("unreadable_shard", f"{path}: {e}") from None
    with f:
        key, members, index = None, {}, -1
        try:
            for name, offset, length in _tar_members(f, path):
                match = _KEY_EXT.match(name)
                if match is None:
                    continue  # names without an extension belong to no sample
                k, ext = match.groups()
                if k != key:
                    if key is not None and index >= start:
                        yield RawSample(path, index, key, members)
                    key, members, index = k, {}, index + 1
                if index >= start:
                    f.seek(offset)
                    members[ext] = f.read(length)
        except ShardError as e:
            # A member of the next sample was cut short: the current sample is complete.
            match = _KEY_EXT.match(e.member or "")
            if match and match.group(1) != key and key is not None and index >= start:
                yield RawSample(path, index, key, members)
            raise
        except (OSError, ValueError) as e:
            raise ShardError("truncated_shard", f"{path}: {e}") from None
        if key is not None and index >= start:
            yield RawSample(path, index, key, members)


def first_image_member(paths: Iterable[str]) -> Optional[str]:
    """`<shard>:<member>` of the first image in the shards (a member other than a sample's .json),
    or None: whether a source holds any image at all, read from the tar headers alone (no member
    data). Shards that cannot be read are passed over (the reader counts them)."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                for name, _, _ in _tar_members(f, path):
                    match = _KEY_EXT.match(name)
                    if match and match.group(2) != "json":
                        return f"{path}:{name}"
        except (OSError, ShardError):
            continue
    return None


def _rng(*parts) -> np.random.Generator:
    words = [p if isinstance(p, int) else zlib.crc32(str(p).encode()) for p in parts]
    return np.random.default_rng(np.random.SeedSequence(words))


class ShardStream:
    """The samples of one source for one reader slot, resumable from `state()`.

    `report(reason, message)` is called for shard-level errors (truncated or unreadable shards);
    errors met again while re-reading a block after a restore are not reported twice."""

    def __init__(self, name: str, shards: list[str], slot: int, num_slots: int, seed: tuple,
                 block_size: int = 256, shuffle: bool = True, epochs: Optional[int] = None,
                 state: Optional[dict] = None, report: Callable[[str, str], None] = lambda r, m: None):
        if not shards:
            raise ValueError(f"source {name!r}: no shards")
        self.name, self.shards, self.slot, self.num_slots = name, sorted(shards), slot, num_slots
        self.seed, self.block_size, self.shuffle, self.epochs, self.report = seed, max(1, block_size), shuffle, epochs, report
        s = state or {}
        self.epoch = s.get("epoch", 0)
        self.cursor = tuple(s.get("cursor", (0, 0, 0)))  # (shard in plan, sample in shard, samples before in epoch)
        self.block_index = s.get("block", 0)
        self.taken = s.get("taken", 0)
        self.exhausted = s.get("exhausted", False) or (epochs is not None and self.epoch >= epochs)
        self._block: Optional[list[RawSample]] = None
        self._block_end = None
        self._replay = self.taken > 0
        self._epoch_had_samples = s.get("epoch_had_samples", False)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": list(self.cursor), "block": self.block_index, "taken": self.taken,
                "exhausted": self.exhausted, "epoch_had_samples": self._epoch_had_samples}

    def _plan(self, epoch: int) -> tuple[list[str], bool]:
        order = list(self.shards)
        if self.shuffle:
            _rng(*self.seed, "shards", self.name, epoch).shuffle(order)
        if len(order) >= self.num_slots:
            return order[self.slot::self.num_slots], False
        return order, True  # fewer shards than slots: every slot reads all, keeps every num_slots-th sample

    def _read_block(self) -> tuple[list[RawSample], tuple]:
        plan, strided = self._plan(self.epoch)
        shard_pos, sample_pos, seen = self.cursor
        block: list[RawSample] = []
        while shard_pos < len(plan) and len(block) < self.block_size:
            path = plan[shard_pos]
            try:
                for raw in iter_tar(path, start=sample_pos):
                    sample_pos, seen = raw.index + 1, seen + 1
                    if not strided or (seen - 1) % self.num_slots == self.slot:
                        block.append(raw)
                        if len(block) == self.block_size:
                            return block, (shard_pos, sample_pos, seen)
            except ShardError as e:
                owner = not strided or self.shards.index(path) % self.num_slots == self.slot
                if owner and not self._replay:
                    self.report(e.reason, str(e))
            shard_pos, sample_pos = shard_pos + 1, 0
        return block, (shard_pos, sample_pos, seen)

    def next(self) -> Optional[RawSample]:
        """The next sample, or None when the epochs are done (or this slot has no samples)."""
        while not self.exhausted:
            if self._block is None:
                self._block, self._block_end = self._read_block()
                self._replay = False
                if self.shuffle:
                    self._perm = _rng(*self.seed, "block", self.name, self.epoch, self.slot, self.block_index).permutation(len(self._block))
                else:
                    self._perm = np.arange(len(self._block))
            if self.taken < len(self._block):
                raw = self._block[self._perm[self.taken]]
                self.taken += 1
                self._epoch_had_samples = True
                if self.taken == len(self._block):
                    self._advance_block()
                return raw
            self._advance_block()
        return None

    def _advance_block(self) -> None:
        plan, _ = self._plan(self.epoch)
        empty = not self._block
        self.cursor, self.block_index, self.taken, self._block = self._block_end, self.block_index + 1, 0, None
        if self.cursor[0] >= len(plan) or empty:  # epoch done
            if not self._epoch_had_samples:
                self.exhausted = True  # nothing for this slot at all: stop rather than spin
            self.epoch, self.cursor, self.block_index, self._epoch_had_samples = self.epoch + 1, (0, 0, 0), 0, False
            if self.epochs is not None and self.epoch >= self.epochs:
                self.exhausted = True


def decode_sample(raw: RawSample) -> Sample:
    """Raw members -> Sample (images as bytes, not checked); raises SchemaError for a missing or
    broken .json member."""
    if "json" not in raw.members:
        raise SchemaError("missing_json")
    sample = Sample.loads(raw.members["json"], {k: v for k, v in raw.members.items() if k != "json"})
    sample.id = raw.key.rsplit("/", 1)[-1]  # the tar key is authoritative
    return sample


# ------------------------------------------------------------------------------------------- build


def samples_from_jsonl(path: str, images_dir: Optional[str]) -> Iterator[Sample]:
    base = Path(images_dir or Path(path).parent)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: broken JSON: {e}")
            refs = {}
            parts = list(obj.get("segments") or [])
            for m in obj.get("messages") or []:
                if isinstance(m.get("content"), list):
                    parts.extend(m["content"])
            for part in parts:
                if isinstance(part, dict) and part.get("type") == "image":
                    ref = part["image"]
                    if ref not in refs:
                        ext = Path(ref).suffix.lower().lstrip(".") or "png"
                        refs[ref] = f"img{len(refs)}.{ext}"
                    part["image"] = refs[ref]
            images = {}
            for ref, name in refs.items():
                try:
                    images[name] = (base / ref).read_bytes()
                except OSError as e:
                    raise SystemExit(f"{path}:{lineno}: image {ref}: {e}")
            try:
                yield Sample.from_json(obj, images)
            except SchemaError as e:
                raise SystemExit(f"{path}:{lineno}: {e}")


def _image_bytes(value) -> tuple[bytes, str]:
    from PIL import Image

    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        data = value.get("bytes") or Path(value["path"]).read_bytes()
    elif isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data = buf.getvalue()
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise ValueError(f"unsupported image value {type(value).__name__}")
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return data, {"jpeg": "jpg"}.get(fmt, fmt)


def hf_row_to_sample(row: dict, index: int, task: Optional[str], source: str) -> Sample:
    raw_images = row.get("images")
    if raw_images is None:
        raw_images = [row["image"]] if row.get("image") is not None else []
    images, names = {}, []
    for k, value in enumerate(raw_images):
        data, ext = _image_bytes(value)
        names.append(f"img{k}.{ext}")
        images[names[-1]] = data
    pending = list(names)
    meta = row.get("meta") or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    for k in ("answer", "boxes"):
        if row.get(k) is not None:
            meta[k] = row[k]
    sid = re.sub(r"[^A-Za-z0-9_\-]", "_", str(row.get("id") or f"{source}-{index:08d}"))
    obj: dict = {"id": sid, "source": row.get("source") or source, "meta": meta}
    if row.get("messages"):
        messages = []
        for m in row["messages"]:
            content = m.get("content") or ""
            segs = []
            if isinstance(content, str):
                for k, piece in enumerate(content.split("<image>")):
                    if k and pending:
                        segs.append({"type": "image", "image": pending.pop(0)})
                    if piece:
                        segs.append({"type": "text", "text": piece})
            else:
                for p in content:
                    if p.get("type") == "image":
                        if pending:
                            segs.append({"type": "image", "image": pending.pop(0)})
                    elif p.get("text"):
                        segs.append({"type": "text", "text": p["text"]})
            msg = {"role": m["role"], "content": segs}
            if m.get("reasoning") or m.get("reasoning_content"):
                msg["reasoning"] = m.get("reasoning") or m.get("reasoning_content")
            messages.append(msg)
        if pending:  # images no placeholder asked for go before the first user text
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = [{"type": "image", "image": n} for n in pending] + first_user["content"]
        obj.update(task=row.get("task") or task or "chat", segments=[], messages=messages)
    else:
        body = row.get("text") if row.get("text") is not None else row.get("caption")
        segs = [{"type": "image", "image": n} for n in names] + ([{"type": "text", "text": body}] if body else [])
        obj.update(task=row.get("task") or task or ("caption" if names else "text"), segments=segs)
    return Sample.from_json(obj, images)


def samples_from_hf(path: str, split: str, task: Optional[str], source: str) -> Iterator[Sample]:
    import datasets

    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        files = sorted(str(f) for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix in (".parquet", ".json", ".jsonl"))
        if not files:
            raise SystemExit(f"{path}: no saved dataset, parquet or json files")
        kind = "parquet" if files[0].endswith(".parquet") else "json"
        ds = datasets.load_dataset(kind, data_files=files, split="train")
    raw_image = datasets.Image(decode=False)  # images as their encoded bytes, not decoded PIL images
    for col, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(col, raw_image)
        elif isinstance(getattr(feature, "feature", None), datasets.Image):  # a list of images
            ds = ds.cast_column(col, type(feature)(raw_image))
        elif isinstance(feature, list) and feature and isinstance(feature[0], datasets.Image):
            ds = ds.cast_column(col, [raw_image])
    for i, row in enumerate(ds):
        yield hf_row_to_sample(row, i, task, source)


# --------------------------------------------------------------------------------- inspect, verify


def inspect(directory: str) -> dict:
    shards = sorted(str(p) for p in Path(directory).rglob("*.tar"))
    tasks, sources, by_dir = Counter(), Counter(), Counter()
    totals = Counter(shards=len(shards))
    for path in shards:
        totals["bytes"] += os.path.getsize(path)
        try:
            for raw in iter_tar(path):
                totals["samples"] += 1
                totals["images"] += sum(1 for k in raw.members if k != "json")
                by_dir[str(Path(path).parent.relative_to(directory))] += 1
                try:
                    obj = json.loads(raw.members.get("json", b"{}"))
                    tasks[obj.get("task", "?")] += 1
                    sources[obj.get("source", "?")] += 1
                except json.JSONDecodeError:
                    tasks["<broken json>"] += 1
        except ShardError as e:
            totals["bad_shards"] += 1
            print(f"warning: {e}", file=sys.stderr)
    return {"totals": dict(totals), "tasks": dict(sorted(tasks.items())), "sources": dict(sorted(sources.items())),
            "directories": dict(sorted(by_dir.items()))}


def verify(directory: str, max_aspect: float = 200.0) -> list[tuple[str, str, str]]:
    """Every problem under `directory` as (shard, member, reason); an empty list means all good."""
    from .images import ImageError, decode_image

    problems = []
    shards = sorted(str(p) for p in Path(directory).rglob("*.tar"))
    if not shards:
        problems.append((directory, "-", "no shards"))
    for path in shards:
        try:
            for raw in iter_tar(path):
                name = raw.key.rsplit("/", 1)[-1]
                try:
                    sample = decode_sample(raw)
                except SchemaError as e:
                    reason = "missing_json" if str(e) == "missing_json" else f"bad_json: {e}"
                    problems.append((path, f"{name}.json", reason))
                    continue
                for ref in dict.fromkeys(sample.image_names()):
                    if ref not in raw.members:
                        problems.append((path, f"{name}.{ref}", "missing_image: referenced but not in the shard"))
                        continue
                    try:
                        im = decode_image(raw.members[ref])
                        if max(im.size) / min(im.size) > max_aspect:
                            raise ImageError(f"aspect ratio over {max_aspect:.0f}")
                    except ImageError as e:
                        problems.append((path, f"{name}.{ref}", f"bad_image: {e}"))
        except ShardError as e:
            problems.append((path, "-", f"{e.reason}: {e}"))
    return problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write shards from a JSONL file + image folder, or a local Hugging Face dataset")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--jsonl", help="one Sample JSON per line; image references are paths under --images")
    src.add_argument("--hf", help="a save_to_disk directory, or parquet / json / jsonl files (a file or a folder)")
    b.add_argument("--images", help="folder the JSONL's image paths are relative to (default: the JSONL's folder)")
    b.add_argument("--out", required=True)
    b.add_argument("--split", default="train", help="split of a saved DatasetDict")
    b.add_argument("--task", help="task of rows without a `task` column")
    b.add_argument("--source", default=None, help="source name (default: the output folder's name)")
    b.add_argument("--prefix", default="shard")
    b.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    b.add_argument("--maxsize", type=float, default=256e6, help="bytes per shard at most")
    i = sub.add_parser("inspect", help="counts per task and source")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true", help="print the counts as JSON")
    v = sub.add_parser("verify", help="decode every sample; list bad members; exit 1 if any")
    v.add_argument("dir")
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.jsonl:
            samples = samples_from_jsonl(args.jsonl, args.images)
        else:
            samples = samples_from_hf(args.hf, args.split, args.task, args.source or Path(args.out).name)
        paths = write_shards(samples, args.out, args.prefix, args.maxcount, args.maxsize)
        print(f"wrote {len(paths)} shards to {args.out}")
        return 0
    if args.command == "inspect":
        report = inspect(args.dir)
        if args.json:
            print(json.dumps(report, indent=1))
            return 0
        t = report["totals"]
        print(f"{args.dir}: {t.get('shards', 0)} shards, {t.get('samples', 0)} samples, {t.get('images', 0)} images, "
              f"{t.get('bytes', 0) / 1e6:.1f} MB" + (f", {t['bad_shards']} bad shards" if t.get("bad_shards") else ""))
        for title in ("tasks", "sources", "directories"):
            print(f"\n{title[:-1] if title != 'directories' else 'directory':<16} samples")
            for name, n in report[title].items():
                print(f"{name:<16} {n}")
        return 0
    problems = verify(args.dir)
    for shard, member, reason in problems:
        print(f"BAD {shard} {member}: {reason}")
    n = sum(1 for _ in Path(args.dir).rglob("*.tar"))
    print(f"{args.dir}: {n} shards, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
