import numpy as np
import pytest
import torch

from data.mixture import DataConfig, build_loader
from data.packing import Batch, Doc, Packer
from data.schema import TASK_INDEX
from data.text import IGNORE, ProcessedImage


def _doc(key, n, images=0, splittable=False, task="caption"):
    ids = np.arange(1000, 1000 + n, dtype=np.int64)
    labels = ids.copy()
    ims = []
    for k in range(images):  # 2x2 grid -> one image token; its rows carry the doc key
        ids[k] = 67
        labels[k] = IGNORE
        ims.append(ProcessedImage(np.full((4, 1176), hash(key) % 1000 + k, dtype=np.float32), (1, 2, 2)))
    return Doc(ids, labels, TASK_INDEX[task], ims, splittable, key)


def _feed(docs):
    it = iter(docs)
    return lambda: next(it, None)


def check_batch(batch: Batch, merge: int = 2) -> list[tuple[int, int]]:
    """Invariants every batch must satisfy; returns the (start, end) documents over the flat tokens."""
    B, L = batch.input_ids.shape
    for t in (batch.input_ids, batch.labels, batch.position_ids, batch.task_ids):
        assert t.shape == (B, L) and t.dtype == torch.long
    cu = batch.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == B * L
    assert bool((cu[1:] > cu[:-1]).all())
    docs = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    flat_pos = batch.position_ids.reshape(-1)
    for s, e in docs:
        assert s // L == (e - 1) // L, "a document crosses a row"
        assert torch.equal(flat_pos[s:e], torch.arange(e - s))
    flat_ids, flat_labels, flat_tasks = batch.input_ids.reshape(-1), batch.labels.reshape(-1), batch.task_ids.reshape(-1)
    real = flat_tasks >= 0
    assert int(real.sum()) == batch.num_tokens
    assert bool((flat_labels[~real] == IGNORE).all())
    supervised = flat_labels != IGNORE
    assert torch.equal(flat_labels[supervised], flat_ids[supervised])  # unshifted labels
    assert not bool(supervised[(flat_ids == 67) | (flat_ids == 73) | (flat_ids == 74)].any())
    n_image_tokens = int((flat_ids == 67).sum())
    if batch.image_grid_thw is None:
        assert n_image_tokens == 0 and batch.pixel_values is None
    else:
        grid = batch.image_grid_thw
        assert int(grid.prod(-1).sum()) == batch.pixel_values.shape[0]
        assert int(grid.prod(-1).sum()) // merge**2 == n_image_tokens
        assert batch.pixel_values.dtype == torch.float32 and batch.pixel_values.shape[1] == 1176
    return docs


def test_rows_documents_positions_and_padding():
    docs = [_doc("a", 5), _doc("b", 7, images=1), _doc("c", 4), _doc("d", 9, images=2)]
    packer = Packer(seq_len=12, batch_size=2, lookahead=4)
    batch = packer.next_batch(_feed(docs))
    spans = check_batch(batch)
    # first-fit: row 0 = a(5) + b(7); row 1 = c(4) + pad(8), d(9) no longer fits after c
    assert spans == [(0, 5), (5, 12), (12, 16), (16, 24)]
    assert batch.sample_ids == ["a", "b", "c"]
    assert batch.num_tokens == 16
    assert batch.task_ids[1, 4:].tolist() == [-1] * 8 and batch.input_ids[1, 4:].tolist() == [0] * 8
    assert batch.position_ids[1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]
    assert batch.image_grid_thw.tolist() == [[1, 2, 2]]  # only b's image is in this batch
    assert batch.pixel_values.shape == (4, 1176)
    nxt = packer.next_batch(_feed([]))
    assert nxt.sample_ids == ["d"] and nxt.image_grid_thw.shape == (2, 3) and nxt.pixel_values.shape == (8, 1176)
    assert packer.next_batch(_feed([])) is None


def test_images_follow_token_order_row_major():
    docs = [_doc("x", 10, images=1), _doc("y", 10, images=1), _doc("z", 10, images=1)]
    batch = Packer(seq_len=20, batch_size=2).next_batch(_feed(docs))
    check_batch(batch)
    assert batch.sample_ids == ["x", "y", "z"]
    firsts = batch.pixel_values[::4, 0].tolist()
    assert firsts == [hash(k) % 1000 for k in "xyz"]


def test_long_text_is_split_and_unsplittable_too_long_is_skipped():
    skipped = []
    packer = Packer(seq_len=16, batch_size=3, lookahead=8, skip=lambda r, m: skipped.append(r))
    docs = [_doc("long", 40, splittable=True, task="text"), _doc("huge_chat", 20, task="chat"), _doc("img", 30, images=1)]
    batch = packer.next_batch(_feed(docs))
    check_batch(batch)
    assert skipped == ["too_long", "too_long"]
    assert batch.num_tokens == 40 and batch.sample_ids == ["long"]
    assert batch.input_ids.reshape(-1)[:40].tolist() == list(range(1000, 1040))  # continuation restarts positions
    assert batch.position_ids[1, :3].tolist() == [0, 1, 2]


def test_split_fills_the_gap_a_whole_document_leaves():
    docs = [_doc("a", 10), _doc("t", 30, splittable=True, task="text"), _doc("b", 10)]
    batch = Packer(seq_len=16, batch_size=3, lookahead=3).next_batch(_feed(docs))
    check_batch(batch)
    assert batch.num_tokens == 48 == batch.input_ids.numel()  # no padding at all


def test_batch_to_and_label_count():
    batch = Packer(seq_len=8, batch_size=1).next_batch(_feed([_doc("a", 6, images=1)]))
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.input_ids, batch.input_ids)
    assert batch.num_label_tokens == 5 and batch.max_seqlen == 6


@pytest.mark.parametrize("seq_len,micro_batch", [(4096, 2), (1024, 4)])
def test_packing_efficiency_on_the_demo_corpus(demo_corpus, demo_tokenizer, seq_len, micro_batch):
    cfg = DataConfig(root=str(demo_corpus), num_workers=0)
    loader = build_loader(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0,
                          micro_batch_size=micro_batch, seq_len=seq_len)
    real = slots = 0
    for i, batch in enumerate(loader):
        check_batch(batch)
        real += batch.num_tokens
        slots += batch.input_ids.numel()
        if i == 5:
            break
    assert real / slots >= 0.97
