"""Weighted multi-source streaming into packed batches, with exactly resumable state.

    loader = build_loader(cfg.data, tokenizer=tok, rank=r, world_size=w, seed=cfg.seed,
                          micro_batch_size=4, seq_len=cfg.data.seq_len)
    for batch in loader: ...                       # data.packing.Batch
    state = loader.state_dict()                    # JSON-serializable; goes into the checkpoint
    loader.load_state_dict(state)                  # continues with exactly the next batches
    loader.skipped                                 # {"bad_image": 2, ...} cumulative

How a batch is made: each reader slot (rank x data-loader worker) owns a disjoint part of every
source (data/shards.py), draws the source of its next sample with its own seeded RNG from the
mixture weights, decodes and tokenizes it (data/text.py, data/images.py) and packs
(data/packing.py). A slot's state after a batch -- per-source cursors, the mixture RNG, the
packing buffer (raw samples, re-tokenized on restore) and the skip counts -- travels with the
batch, so the state of the main process is always that of the batches it has handed out. Workers
are read in strict rotation; on restore the rotation restarts at the slot whose turn it was.

Stages of a curriculum are runs with their own mixture: `data.stages.<stage>` (picked by the launcher
for `stage=<stage>`) or a recipe that sets `data.mixture`.
`split="heldout"` reads every source's held-out shards once, in order, unshuffled, drawing the sources
(those with a positive weight) alike with a seeded draw: the first few held-out batches already cover
every task, and stages whose mixtures share the sources evaluate on the same batches.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch

from .images import ImageError, ImageSettings, PatchGeometry
from .packing import Batch, Doc, Packer
from .schema import TASK_INDEX, SchemaError, Sample
from .shards import RawSample, ShardError, ShardStream, decode_sample, iter_tar, list_shards
from .text import SpecialTokens, check_special_tokens, load_tokenizer, sample_images, tokenize_sample
from .workers import holding_sigterm, leave_sigterm_to_the_rank

log = logging.getLogger(__name__)

REPO_DEMO_ROOT = Path(__file__).resolve().parent / "demo" / "corpus"
DEMO_PRETRAIN_MIXTURE = {  # by samples; text documents are ~5x longer, so text is ~1/3 of the loss tokens
    "caption": 0.14, "interleaved": 0.10, "ocr": 0.12, "document": 0.08, "grounding": 0.10,
    "counting": 0.10, "text": 0.04, "math": 0.12, "stem": 0.08, "chat": 0.12,
}
STATE_VERSION = 1
# Why a sample is skipped (counted in the loaders' `skipped`); a fixed list, so that every rank can
# sum the counts in one collective whichever reasons it met. GRPO adds prompt_too_long.
SKIP_REASONS = ("missing_json", "bad_json", "bad_schema", "missing_image", "bad_image", "bad_sample", "too_long",
                "truncated_shard", "unreadable_shard", "prompt_too_long")


@dataclass
class DataConfig:
    """Hydra schema of the `data` node (recipes/data/*.yaml)."""

    name: str = "demo"
    root: Optional[str] = None  # shard root; None: data/demo/corpus in the repo (built on first use)
    tokenizer: Optional[str] = None  # a local Hugging Face tokenizer directory; None: the demo tokenizer
    seq_len: int = 1024
    num_workers: int = 1
    shuffle_buffer: int = 256  # samples per shuffled block of a source
    mixture: Dict[str, float] = field(default_factory=lambda: dict(DEMO_PRETRAIN_MIXTURE))  # source -> weight
    stages: Dict[str, Any] = field(default_factory=dict)  # stage -> mixture ({source: weight}); a run copies stages[<stage>] into mixture
    sources: Dict[str, str] = field(default_factory=dict)  # source -> shard dir under root ("{split}" is replaced); default "{split}/<source>"
    min_pixels: int = 28 * 28
    max_pixels: int = 112 * 112
    seed: int = 0  # mixed with the run seed passed to build_loader
    lookahead: int = 64  # documents the packer may hold back to fill rows
    epochs: Optional[int] = None  # None: stream forever; N: stop after N passes over every source
    build_demo: bool = True  # name == demo and root has no corpus: build it there first
    demo_scale: float = 1.0  # size of that first-use build (1.0: ~38k training samples, ~45 s)
    enable_thinking: bool = True  # render reasoning where samples have it
    prefetch_factor: int = 4
    # How data-loader workers start. spawn (default): a fresh interpreter per worker, a second or two
    # each, and safe at any time. fork: instant, but forking a process that already runs threads
    # (wandb's, the process group's, OpenMP's) can deadlock the child inside fork itself -- a hung
    # run with no error, as a held-out evaluation once did here.
    worker_start_method: str = "spawn"
    worker_timeout_s: float = 600.0  # a worker that yields no batch for this long fails the run (0: wait forever)
    # Facts of the model, not knobs of the data: a run sets them from its model config
    # (training.config.load_config); the defaults are EXAONE 4.5's, for the data commands on their own.
    special_tokens: SpecialTokens = field(default_factory=SpecialTokens)
    patch: PatchGeometry = field(default_factory=PatchGeometry)

    @property
    def image_settings(self) -> ImageSettings:
        return ImageSettings(self.min_pixels, self.max_pixels, self.patch.patch_size, self.patch.temporal_patch_size,
                             self.patch.merge_size)


def to_data_config(cfg: Any) -> DataConfig:
    """DataConfig from a DataConfig, an OmegaConf node or a dict (unknown keys are an error)."""
    if isinstance(cfg, DataConfig):
        return cfg
    if cfg is None:
        return DataConfig()
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    cfg = dict(cfg)
    known = {f.name for f in fields(DataConfig)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"data config: unknown keys {unknown}; known: {sorted(known)}")
    for key, kind in (("special_tokens", SpecialTokens), ("patch", PatchGeometry)):
        if isinstance(cfg.get(key), dict):
            cfg[key] = kind(**cfg[key])
    return DataConfig(**cfg)


def data_root(cfg: DataConfig) -> Path:
    return Path(cfg.root).expanduser().resolve() if cfg.root else REPO_DEMO_ROOT


def ensure_demo_corpus(cfg: DataConfig) -> Path:
    """Build the demo corpus at the root when it is missing: once, under a file lock, in a staging
    folder inside the root whose parts move into place with manifest.json (the completion mark) last.
    The repo's default root is also rebuilt when its corpus is of an older generator version; an
    explicit root never is (a warning says so), and a non-empty root without a manifest is an error."""
    root = data_root(cfg)
    if cfg.name != "demo" or not cfg.build_demo or _demo_is_current(root):
        return root
    manifest = root / "manifest.json"
    if manifest.exists() and cfg.root:
        log.warning("data: the demo corpus at %s was built by an older version of data/demo; "
                    "rebuild it with python -m data.demo build --out %s", root, root)
        return root
    if not manifest.exists() and root.is_dir() and any(p.name != ".lock" for p in root.iterdir()):
        raise FileExistsError(f"data.root={root} is not empty and holds no demo corpus (no manifest.json); "
                              "use an empty directory, or data.build_demo=false for your own shards")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _demo_is_current(root):
            from .demo.build import build_demo

            log.warning("data: building the demo corpus at %s (%s)", root, "older version" if manifest.exists() else "first use")
            staging = root / ".staging"
            shutil.rmtree(staging, ignore_errors=True)
            build_demo(staging, scale=cfg.demo_scale)
            for part in ("train", "heldout", "tokenizer", "manifest.json"):
                shutil.rmtree(root / part, ignore_errors=True)
                (staging / part).rename(root / part)
            shutil.rmtree(staging)
    return root


def _demo_is_current(root: Path) -> bool:
    """A complete demo corpus of the generator version in this checkout (one built with an explicit
    --out by hand counts as current only if its manifest says so)."""
    from .demo.corpus import VERSION

    try:
        return json.loads((root / "manifest.json").read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def source_shards(cfg: DataConfig, split: str, names: Optional[list[str]] = None) -> dict[str, list[str]]:
    """Shard lists of the named sources (default: the mixture's); fails naming the source that is
    missing, empty or unreadable."""
    root = data_root(cfg)
    names = names if names is not None else [n for n, w in cfg.mixture.items() if w > 0]
    if not names:
        raise ValueError("data.mixture: no source with a positive weight")
    out = {}
    for name in names:
        rel = cfg.sources.get(name, "{split}/" + name).format(split=split, name=name)
        directory = Path(rel) if os.path.isabs(rel) else root / rel
        if not directory.is_dir():
            raise FileNotFoundError(f"data source {name!r}: directory {directory} does not exist")
        shards = list_shards(directory)
        if not shards:
            raise ValueError(f"data source {name!r}: no .tar shards in {directory}")
        for path in shards:
            if not os.access(path, os.R_OK):
                raise PermissionError(f"data source {name!r}: shard {path} is not readable")
        if not _has_a_sample(shards):
            raise ValueError(f"data source {name!r}: its shards in {directory} are empty or unreadable")
        out[name] = shards
    return out


def _has_a_sample(shards: list[str]) -> bool:
    for path in shards:
        try:
            for _ in iter_tar(path):
                return True
        except ShardError:
            continue
    return False


# ------------------------------------------------------------------------------- one reader slot


@dataclass
class _Spec:
    """Everything a reader slot needs (sent to the data-loader workers)."""

    cfg: DataConfig
    shards: dict[str, list[str]]
    weights: dict[str, float]
    tokenizer: Any
    seed: tuple
    split: str
    seq_len: int
    batch_size: int

    @property
    def sequential(self) -> bool:
        return self.split != "train"


class SlotStream:
    """Samples, documents and batches of one reader slot; `state()` after any batch restores it."""

    def __init__(self, spec: _Spec, slot: int, num_slots: int, state: Optional[dict] = None):
        self.spec = spec
        state = state or {}
        self.skipped = Counter(state.get("skipped", {}))
        self.examples: dict[str, str] = dict(state.get("examples", {}))
        reader_states = state.get("sources", {})
        cfg = spec.cfg
        self.readers = {
            name: ShardStream(name, shards, slot, num_slots, spec.seed, cfg.shuffle_buffer,
                              shuffle=not spec.sequential, epochs=1 if spec.sequential else cfg.epochs,
                              state=reader_states.get(name), report=self._skip)
            for name, shards in spec.shards.items()
        }
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*spec.seed, slot, 0x6D6978])))
        if "rng" in state:
            self.rng.bit_generator.state = state["rng"]
        pad = cfg.special_tokens.pad_token_id
        self.packer = Packer(spec.seq_len, spec.batch_size, cfg.lookahead, pad, skip=self._skip)
        self.packer.exhausted = state.get("packer_exhausted", False)
        for entry in state.get("pending", []):
            raw = RawSample(entry["shard"], entry["index"], entry["key"],
                            {k: base64.b64decode(v) for k, v in entry["members"].items()})
            try:
                doc = self._document(entry["source"], raw)
            except _Skip as s:  # only if the tokenizer or settings changed since the state was saved
                self._skip(s.reason, s.message)
                continue
            doc.offset = entry["offset"]
            self.packer.pending.append(doc)

    def _skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, message)

    def next_raw(self) -> Optional[tuple[str, RawSample]]:
        """The mixture: a seeded weighted draw over the sources that still have samples (held-out:
        equal weights)."""
        while True:
            live = [n for n, r in self.readers.items() if not r.exhausted]
            if not live:
                return None
            # held-out: every source alike, so stages whose mixtures share the sources evaluate on the same batches
            w = np.array([1.0 if self.spec.sequential else self.spec.weights[n] for n in live], dtype=np.float64)
            name = live[int(np.searchsorted(np.cumsum(w / w.sum()), self.rng.random(), side="right").clip(0, len(live) - 1))]
            raw = self.readers[name].next()
            if raw is not None:
                return name, raw

    def _decode(self, source: str, raw: RawSample) -> Sample:
        if "json" not in raw.members:
            raise _Skip("missing_json", f"{raw.shard}: {raw.key} has no .json member")
        try:
            obj = json.loads(raw.members["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Skip("bad_json", f"{raw.shard}: {raw.key}.json: {e}") from None
        try:
            sample = Sample.from_json(obj, {k: v for k, v in raw.members.items() if k != "json"})
        except SchemaError as e:
            raise _Skip("bad_schema", f"{raw.shard}: {raw.key}.json: {e}") from None
        sample.id = raw.key.rsplit("/", 1)[-1]
        missing = [n for n in sample.image_names() if n not in sample.images]
        if missing:
            raise _Skip("missing_image", f"{raw.shard}: {raw.key} references {missing[0]}, not in the shard")
        return sample

    def _document(self, source: str, raw: RawSample) -> Doc:
        sample = self._decode(source, raw)
        cfg = self.spec.cfg
        try:
            tok = tokenize_sample(sample, self.spec.tokenizer, cfg.image_settings, cfg.special_tokens, cfg.enable_thinking)
        except ImageError as e:
            raise _Skip("bad_image", f"{raw.shard}: {raw.key}: {e}") from None
        except Exception as e:  # bad data never stops a run
            raise _Skip("bad_sample", f"{raw.shard}: {raw.key}: {type(e).__name__}: {e}") from None
        splittable = not sample.is_chat and not tok.images
        return Doc(np.asarray(tok.input_ids, dtype=np.int64), np.asarray(tok.labels, dtype=np.int64),
                   TASK_INDEX[sample.task], tok.images, splittable, f"{source}/{sample.id}", raw=(source, raw))

    def next_doc(self) -> Optional[Doc]:
        while True:
            item = self.next_raw()
            if item is None:
                return None
            try:
                return self._document(*item)
            except _Skip as s:
                self._skip(s.reason, s.message)

    def next_sample(self) -> Optional[tuple[str, Sample]]:
        """A decoded sample whose images all process (for prompt streams)."""
        cfg = self.spec.cfg
        while True:
            item = self.next_raw()
            if item is None:
                return None
            source, raw = item
            try:
                sample = self._decode(source, raw)
                sample_images(sample, cfg.image_settings)
                return source, sample
            except _Skip as s:
                self._skip(s.reason, s.message)
            except ImageError as e:
                self._skip("bad_image", f"{raw.shard}: {raw.key}: {e}")

    def next_batch(self) -> Optional[Batch]:
        return self.packer.next_batch(self.next_doc)

    def state(self) -> dict:
        pending = []
        for doc in self.packer.pending:
            source, raw = doc.raw
            pending.append({"source": source, "shard": raw.shard, "index": raw.index, "key": raw.key, "offset": doc.offset,
                            "members": {k: base64.b64encode(v).decode("ascii") for k, v in raw.members.items()}})
        return {
            "sources": {n: r.state() for n, r in self.readers.items()},
            "rng": self.rng.bit_generator.state,
            "pending": pending,
            "packer_exhausted": self.packer.exhausted,
            "skipped": dict(self.skipped),
            "examples": dict(self.examples),
        }


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class _SlotDataset(torch.utils.data.IterableDataset):
    """Runs one slot per data-loader worker; worker p plays slot (p + first_slot) % num_workers, and
    makes at most `limit` batches per iteration if one is given."""

    def __init__(self, spec: _Spec, rank: int, world_size: int, num_workers: int, slot_states: list, first_slot: int,
                 limit: Optional[int] = None):
        self.spec, self.rank, self.world_size, self.num_workers = spec, rank, world_size, max(1, num_workers)
        self.slot_states, self.first_slot, self.limit = slot_states, first_slot, limit

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        local = ((info.id if info else 0) + self.first_slot) % self.num_workers
        stream = SlotStream(self.spec, self.rank * self.num_workers + local, self.world_size * self.num_workers,
                            self.slot_states[local])
        made = 0
        while self.limit is None or made < self.limit:
            batch = stream.next_batch()
            if batch is None:
                return
            made += 1
            yield local, batch, stream.state()


# ------------------------------------------------------------------------------------ the loaders


class _Stateful:
    """Rotation bookkeeping shared by the batch loader and the sample stream."""

    def __init__(self, spec: _Spec, rank: int, world_size: int, num_workers: int):
        self.spec, self.rank, self.world_size, self.num_workers = spec, rank, world_size, num_workers
        self._slots = max(1, num_workers)
        self._states: list[Optional[dict]] = [None] * self._slots
        self._next = 0
        self._carried: Counter = Counter()  # skips counted under an earlier rank/worker layout
        self._warned: set[str] = set()

    @property
    def skipped(self) -> dict[str, int]:
        total = Counter(self._carried)
        for s in self._states:
            if s:
                total.update(s["skipped"])
        return dict(total)

    def _record(self, slot: int, state: dict) -> None:
        self._states[slot] = state
        self._next = (slot + 1) % self._slots
        self._warn(state)

    def _warn(self, state: dict) -> None:
        for reason in state["skipped"]:
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("data: skipping samples (%s), e.g. %s; counted in skipped_samples", reason,
                            state["examples"].get(reason, ""))

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "seed": list(self.spec.seed), "split": self.spec.split, "next_slot": self._next,
                "slots": [json.loads(json.dumps(s)) if s else None for s in self._states], "carried_skips": dict(self._carried)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {sd.get('version')} != {STATE_VERSION}")
        saved = Counter(sd.get("carried_skips", {}))
        for s in sd["slots"]:
            if s:
                saved.update(s["skipped"])
        layout = (sd["world_size"], sd["num_workers"], sd["rank"], list(sd["seed"]), sd["split"])
        if layout != (self.world_size, self.num_workers, self.rank, list(self.spec.seed), self.spec.split):
            log.warning(
                "data: the loader state was saved with world_size=%s num_workers=%s rank=%s seed=%s split=%s; now "
                "world_size=%s num_workers=%s rank=%s seed=%s split=%s: the data epoch restarts (samples may repeat)",
                *layout, self.world_size, self.num_workers, self.rank, list(self.spec.seed), self.spec.split)
            self._states, self._next, self._carried = [None] * self._slots, 0, saved
            return
        self._states = [json.loads(json.dumps(s)) if s else None for s in sd["slots"]]
        self._next = sd["next_slot"]
        self._carried = Counter(sd.get("carried_skips", {}))


class Loader(_Stateful):
    """Iterable of packed Batches; iterating again continues where the last batch handed out left off.
    `first(n)` replays the first n batches from the present state instead (held-out evaluation)."""

    def __init__(self, spec: _Spec, rank: int, world_size: int, num_workers: int):
        super().__init__(spec, rank, world_size, num_workers)
        self._replay: Optional[tuple[str, Any]] = None  # (the state it replays, its persistent DataLoader)

    def __iter__(self) -> Iterator[Batch]:
        def start():  # at the first batch asked for, from the state then
            dataset = self._dataset()
            return iter(dataset) if self.num_workers == 0 else self._start(self._data_loader(dataset, persistent=False))

        return self._read(start, record=True)

    def first(self, n: int) -> Iterator[Batch]:
        """The first `n` batches from the loader's present state, the same batches at every call,
        leaving that state as it is. The data workers persist from one call to the next (they
        restart from the same state), so an evaluation starts no process; they are rebuilt only if
        the state or `n` has changed since the last call. Each worker makes only its share of the n
        batches (rotation: worker p makes batches p, p + workers, ...), then idles: nothing is read
        ahead of the next call or held in memory until it."""
        if self.num_workers == 0:
            iterator = iter(self._dataset())
            return self._read(lambda: iterator, record=False, limit=n)
        key = json.dumps([self._states, self._next, n])
        if self._replay is None or self._replay[0] != key:
            self.close()
            self._replay = (key, self._data_loader(self._dataset(limit=-(-n // self.num_workers)), persistent=True))
        iterator = self._start(self._replay[1])  # now: the workers restart from the replayed state
        return self._read(lambda: iterator, record=False, limit=n, shutdown=False)

    def close(self) -> None:
        """Stops the workers `first` keeps (they also end with the process)."""
        if self._replay is not None:
            iterator = getattr(self._replay[1], "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()
            self._replay = None

    def _dataset(self, limit: Optional[int] = None) -> _SlotDataset:
        return _SlotDataset(self.spec, self.rank, self.world_size, self.num_workers, list(self._states), self._next,
                            limit)

    def _data_loader(self, dataset, persistent: bool):
        cfg = self.spec.cfg
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=cfg.prefetch_factor,
            pin_memory=torch.cuda.is_available(), persistent_workers=persistent, worker_init_fn=leave_sigterm_to_the_rank,
            multiprocessing_context=cfg.worker_start_method, timeout=cfg.worker_timeout_s)

    def _start(self, loader):
        with holding_sigterm(self.spec.cfg.worker_start_method), self._naming_the_timeout():  # a persistent
            return iter(loader)  # loader's restart waits on its workers

    @contextlib.contextmanager
    def _naming_the_timeout(self):
        try:
            yield
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise RuntimeError(f"data: no batch from the data-loader workers in data.worker_timeout_s="
                               f"{self.spec.cfg.worker_timeout_s} s ({e}); a worker may be hung") from e

    def _read(self, start, record: bool, limit: Optional[int] = None, shutdown: bool = True) -> Iterator[Batch]:
        count, iterator = 0, start()
        try:
            while limit is None or count < limit:
                with self._naming_the_timeout():
                    item = next(iterator, None)
                if item is None:
                    return
                slot, batch, state = item
                count += 1
                if record:
                    self._record(slot, state)
                else:
                    self._warn(state)
                yield batch
        finally:
            stop = getattr(iterator, "_shutdown_workers", None)
            if shutdown and stop is not None:
                stop()


class SampleStream(_Stateful):
    """Iterable of Samples through the same mixture, for GRPO prompts; resumable like Loader."""

    def __init__(self, spec: _Spec, rank: int, world_size: int):
        super().__init__(spec, rank, world_size, 0)
        self._stream: Optional[SlotStream] = None

    def __iter__(self) -> Iterator[Sample]:
        stream = SlotStream(self.spec, self.rank, self.world_size, self._states[0])
        while True:
            item = stream.next_sample()
            self._record(0, stream.state())
            if item is None:
                return
            yield item[1]


def _spec(cfg, tokenizer, world_size: int, seed: int, split: str, seq_len: int, batch_size: int) -> _Spec:
    cfg = to_data_config(cfg)
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: expected train or heldout")
    if not 0 < world_size:
        raise ValueError("world_size must be positive")
    if cfg.worker_start_method not in ("spawn", "fork"):
        raise ValueError(f"data.worker_start_method={cfg.worker_start_method!r}: expected spawn or fork")
    if not cfg.worker_timeout_s >= 0:
        raise ValueError(f"data.worker_timeout_s={cfg.worker_timeout_s}: expected seconds >= 0 (0: no limit)")
    ensure_demo_corpus(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    check_special_tokens(tokenizer, cfg.special_tokens)
    bad = {n: w for n, w in cfg.mixture.items() if not (isinstance(w, (int, float)) and w >= 0)}
    if bad:
        raise ValueError(f"data.mixture: weights must be non-negative numbers, got {bad}")
    shards = source_shards(cfg, split)
    weights = {n: float(cfg.mixture[n]) for n in shards}
    return _Spec(cfg, shards, weights, tokenizer, (int(cfg.seed), int(seed)), split, seq_len, batch_size)


def build_loader(cfg, *, tokenizer, rank: int, world_size: int, seed: int, micro_batch_size: int,
                 seq_len: Optional[int] = None, split: str = "train") -> Loader:
    """Packed batches of [micro_batch_size, seq_len] for this rank (see the module docstring)."""
    cfg = to_data_config(cfg)
    seq_len = seq_len or cfg.seq_len
    if cfg.num_workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = _spec(cfg, tokenizer, world_size, seed, split, seq_len, micro_batch_size)
    return Loader(spec, rank, world_size, cfg.num_workers)


def build_sample_stream(cfg, *, tokenizer=None, rank: int = 0, world_size: int = 1, seed: int = 0,
                        split: str = "train") -> SampleStream:
    """Decoded Samples through the mixture (no packing), e.g. prompts for GRPO; resumable."""
    cfg = to_data_config(cfg)
    return SampleStream(_spec(cfg, tokenizer, world_size, seed, split, cfg.seq_len, 1), rank, world_size)


def heldout_sources(cfg, names: Optional[list[str]] = None) -> list[str]:
    """Those of `names` (default: the configured sources, else the mixture's) that have a held-out
    split on disk (the demo corpus is built first when it is missing)."""
    cfg = to_data_config(cfg)
    root = ensure_demo_corpus(cfg)
    return [n for n in (names if names is not None else list(cfg.sources or cfg.mixture))
            if (root / cfg.sources.get(n, "{split}/" + n).format(split="heldout", name=n)).is_dir()]


def iter_heldout(cfg=None, task: Optional[str] = None, *, sources: Optional[list[str]] = None,
                 limit: Optional[int] = None, rank: int = 0, world_size: int = 1) -> Iterator[Sample]:
    """Held-out Samples in a fixed order (source by source, shard by shard), optionally one task
    only, at most `limit`, and this rank's share (every world_size-th) for distributed evaluation."""
    cfg = to_data_config(cfg)
    if sources is None:  # every configured source that has a held-out split
        sources = heldout_sources(cfg)
    else:
        ensure_demo_corpus(cfg)
    n = 0
    for name, shards in source_shards(cfg, "heldout", sources).items():
        for path in shards:
            try:
                for raw in iter_tar(path):
                    try:
                        sample = decode_sample(raw)
                    except (SchemaError, KeyError):
                        continue
                    if task is not None and sample.task != task:
                        continue
                    if n % world_size == rank:
                        yield sample
                    n += 1
                    if limit is not None and n >= limit:
                        return
            except ShardError as e:
                log.warning("data: %s", e)
