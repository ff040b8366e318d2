"""Token streams -> fixed-length packed batches with document boundaries.

Each of the B rows of a batch is filled with whole documents, first-fit over a small look-ahead
buffer (documents in arrival order; the oldest that fits goes first, so none waits forever). When
no buffered document fits the space left, the oldest splittable document (plain text, no images, no
chat) is split there and its rest stays buffered as a new document; otherwise the row is padded.
Images are never split: a document with images (or a chat) longer than seq_len is skipped as
`too_long`. Padding at the end of a row is its own document in `cu_seqlens`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import numpy as np
import torch

from .text import IGNORE, ProcessedImage


@dataclass
class Batch:
    """A packed micro-batch. `labels` are unshifted (HF style): labels[b, t] = input_ids[b, t] where
    that token carries loss, else -100; the model shifts inside each document of `cu_seqlens`."""

    input_ids: torch.Tensor  # long [B, L]
    labels: torch.Tensor  # long [B, L]
    position_ids: torch.Tensor  # long [B, L], restarting at 0 for every document (padding included)
    cu_seqlens: torch.Tensor  # int32 [D + 1], document boundaries over the flattened B * L tokens
    pixel_values: Optional[torch.Tensor]  # float32 [P, 3 * T * p * p], images in order of appearance
    image_grid_thw: Optional[torch.Tensor]  # long [N, 3]
    task_ids: torch.Tensor  # long [B, L], index into data.schema.TASKS; -1 on padding
    num_tokens: int  # real (non-padding) tokens
    sample_ids: list[str] = field(default_factory=list)  # "source/id" of the samples that start here

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def max_seqlen(self) -> int:
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def _map(self, fn) -> "Batch":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = fn(value) if isinstance(value, torch.Tensor) else value
        return Batch(**out)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


@dataclass
class Doc:
    """One tokenized sample on its way into a batch."""

    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    task_id: int
    images: list[ProcessedImage]
    splittable: bool
    key: str  # "source/id"
    offset: int = 0  # tokens already placed in earlier rows (a split document)
    raw: Any = None  # what the loader needs to rebuild this document after a restore

    def __len__(self) -> int:
        return len(self.input_ids) - self.offset


class Packer:
    """Fills rows of `seq_len` from documents pulled one at a time; keeps up to `lookahead`
    documents buffered between batches (they are part of the loader's resumable state)."""

    def __init__(self, seq_len: int, batch_size: int, lookahead: int = 64, pad_token_id: int = 0,
                 skip: Callable[[str, str], None] = lambda reason, message: None):
        self.seq_len, self.batch_size, self.lookahead, self.pad_token_id = seq_len, batch_size, max(1, lookahead), pad_token_id
        self.skip = skip
        self.pending: list[Doc] = []
        self.exhausted = False

    def _pull(self, pull: Callable[[], Optional[Doc]]) -> bool:
        while not self.exhausted:
            doc = pull()
            if doc is None:
                self.exhausted = True
                return False
            if len(doc) > self.seq_len and not doc.splittable:
                kind = "with images" if doc.images else "a chat"
                self.skip("too_long", f"{doc.key}: {len(doc)} tokens > seq_len {self.seq_len} and {kind} cannot be split")
                continue
            self.pending.append(doc)
            return True
        return False

    def _fill_row(self, pull) -> list[tuple[Doc, int, int]]:
        """(doc, start, end) pieces of one row."""
        pieces, room = [], self.seq_len
        while room > 0:
            pick = next((i for i, d in enumerate(self.pending) if len(d) <= room), None)
            if pick is None and len(self.pending) < self.lookahead and self._pull(pull):
                continue
            if pick is not None:
                doc = self.pending.pop(pick)
                pieces.append((doc, doc.offset, len(doc.input_ids)))
                room -= len(doc)
                continue
            split = next((i for i, d in enumerate(self.pending) if d.splittable), None)
            if split is None:
                break
            doc = self.pending[split]
            pieces.append((doc, doc.offset, doc.offset + room))
            doc.offset += room
            room = 0
        return pieces

    def next_batch(self, pull: Callable[[], Optional[Doc]]) -> Optional[Batch]:
        rows = [self._fill_row(pull) for _ in range(self.batch_size)]
        if not any(rows):
            return None
        return self._assemble(rows)

    def _assemble(self, rows: list[list[tuple[Doc, int, int]]]) -> Batch:
        B, L = self.batch_size, self.seq_len
        ids = np.full((B, L), self.pad_token_id, dtype=np.int64)
        labels = np.full((B, L), IGNORE, dtype=np.int64)
        positions = np.zeros((B, L), dtype=np.int64)
        tasks = np.full((B, L), -1, dtype=np.int64)
        bounds, images, sample_ids, real = [0], [], [], 0
        for b, pieces in enumerate(rows):
            t = 0
            for doc, start, end in pieces:
                n = end - start
                ids[b, t:t + n] = doc.input_ids[start:end]
                labels[b, t:t + n] = doc.labels[start:end]
                positions[b, t:t + n] = np.arange(n)
                tasks[b, t:t + n] = doc.task_id
                t += n
                bounds.append(b * L + t)
                if start == 0:
                    sample_ids.append(doc.key)
                    images.extend(doc.images)  # whole documents only carry images
            real += t
            if t < L:
                positions[b, t:] = np.arange(L - t)
                bounds.append((b + 1) * L)
        pixel_values = grid = None
        if images:
            pixel_values = torch.from_numpy(np.concatenate([im.pixel_values for im in images]))
            grid = torch.tensor([im.grid_thw for im in images], dtype=torch.long)
        return Batch(
            input_ids=torch.from_numpy(ids),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(positions),
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            task_ids=torch.from_numpy(tasks),
            num_tokens=real,
            sample_ids=sample_ids,
        )
