import json
import logging
import multiprocessing
import os
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data.mixture import DataConfig, SlotStream, _spec, build_loader, build_sample_stream, iter_heldout
from data.shards import iter_tar, list_shards

from .helpers import make_bad_shards
from .test_packing import check_batch


def _all_keys(root: Path, split: str) -> list[str]:
    return sorted(f"{d.name}/{r.key}" for d in (root / split).iterdir() for p in list_shards(d) for r in iter_tar(p))


def _cfg(root, **kw):
    return DataConfig(root=str(root), **kw)


def _rank_main(root, rank, queue):
    from data.text import load_tokenizer

    loader = build_loader(_cfg(root, num_workers=2, epochs=1, shuffle_buffer=16), tokenizer=load_tokenizer(None),
                          rank=rank, world_size=2, seed=7, micro_batch_size=2, seq_len=512)
    ids = []
    for batch in loader:
        ids += batch.sample_ids
    queue.put((rank, ids, loader.skipped))


def test_exactly_once_over_2_ranks_x_2_workers(demo_corpus):
    """Two real rank processes, each with two real data-loader worker processes, one epoch."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(str(demo_corpus), r, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (ids, skipped)) for r, ids, skipped in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    seen = results[0][0] + results[1][0]
    expected = _all_keys(demo_corpus, "train")
    assert len(expected) == 480
    assert Counter(seen) == Counter(expected)  # every sample once: none lost, none repeated
    assert set(results[0][0]).isdisjoint(results[1][0])
    assert results[0][1] == results[1][1] == {}


@pytest.mark.parametrize("num_workers", [2, 0])
def test_resume_yields_exactly_the_next_batches(demo_corpus, demo_tokenizer, num_workers):
    def make():
        return build_loader(_cfg(demo_corpus, num_workers=num_workers, shuffle_buffer=32, lookahead=16,
                                 mixture={"text": 0.5, "caption": 0.3, "counting": 0.2}),
                            tokenizer=demo_tokenizer, rank=1, world_size=2, seed=3, micro_batch_size=2, seq_len=256)

    def interesting(state):  # a split text document waits in the packer and a shuffled block is half read
        slots = [s for s in state["slots"] if s]
        return any(p["offset"] > 0 for s in slots for p in s["pending"]) and \
            any(r["taken"] > 0 for s in slots for r in s["sources"].values())

    loader = make()
    it = iter(loader)
    for n in range(1, 40):
        next(it)
        if n >= 3 and interesting(loader.state_dict()):
            break
    assert interesting(loader.state_dict())
    state = json.loads(json.dumps(loader.state_dict()))  # survives a JSON checkpoint
    M = 6
    expected = [next(it) for _ in range(M)]
    it.close()
    resumed = make()
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(M), resumed)]
    for a, b in zip(expected, got):
        assert a.sample_ids == b.sample_ids
        for name in ("input_ids", "labels", "position_ids", "cu_seqlens", "task_ids", "pixel_values", "image_grid_thw"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
    # the resumed loader's state equals the uninterrupted one's after the same batches
    assert resumed.state_dict()["slots"] == loader.state_dict()["slots"]


def test_changed_world_size_restarts_the_epoch_and_says_so(demo_corpus, demo_tokenizer, caplog):
    def make(world):
        return build_loader(_cfg(demo_corpus, num_workers=0), tokenizer=demo_tokenizer, rank=0, world_size=world,
                            seed=0, micro_batch_size=1, seq_len=256)

    loader = make(2)
    next(iter(loader))
    other = make(1)
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        other.load_state_dict(loader.state_dict())
    assert "data epoch restarts" in caplog.text
    assert next(iter(other)).sample_ids == next(iter(make(1))).sample_ids


def test_mixture_proportions_within_2_percent_over_10k_samples(demo_corpus, demo_tokenizer):
    weights = {"caption": 0.5, "math": 0.3, "text": 0.15, "counting": 0.05}
    spec = _spec(_cfg(demo_corpus, mixture=weights), demo_tokenizer, 1, 0, "train", 1024, 1)
    stream = SlotStream(spec, 0, 1)
    counts = Counter(stream.next_raw()[0] for _ in range(10_000))
    for name, w in weights.items():
        assert abs(counts[name] / 10_000 - w) <= 0.02, (name, counts[name])
    a, b = SlotStream(spec, 0, 1), SlotStream(spec, 0, 1)
    assert [a.next_raw()[1].key for _ in range(200)] == [b.next_raw()[1].key for _ in range(200)]


def test_deterministic_for_a_seed(demo_corpus, demo_tokenizer):
    def first_batches(seed, n=3):
        loader = build_loader(_cfg(demo_corpus, num_workers=0), tokenizer=demo_tokenizer, rank=0, world_size=1,
                              seed=seed, micro_batch_size=2, seq_len=256)
        return [b.sample_ids for _, b in zip(range(n), loader)]

    assert first_batches(1) == first_batches(1)
    assert first_batches(1) != first_batches(2)


def test_bad_data_is_skipped_counted_and_warned_once(tmp_path, demo_tokenizer, caplog):
    expect = make_bad_shards(tmp_path / "train" / "bad")
    cfg = _cfg(tmp_path, name="custom", mixture={"bad": 1.0}, epochs=1, num_workers=0, lookahead=4)
    loader = build_loader(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=1, seq_len=128)
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        ids = [i for b in loader for i in b.sample_ids]
    assert sorted(ids) == expect["good"]  # the run went on past every defect
    assert loader.skipped == expect["skipped"]
    assert loader.state_dict()["slots"][0]["skipped"] == expect["skipped"]
    warnings = [r.getMessage() for r in caplog.records if "skipping samples" in r.getMessage()]
    assert sorted(w.split("(")[1].split(")")[0] for w in warnings) == sorted(expect["skipped"])


def test_missing_empty_or_unreadable_source_fails_at_start_naming_it(tmp_path, demo_corpus, demo_tokenizer):
    def build(root, mixture):
        return build_loader(_cfg(root, name="custom", mixture=mixture), tokenizer=demo_tokenizer, rank=0,
                            world_size=1, seed=0, micro_batch_size=1, seq_len=64)

    with pytest.raises(FileNotFoundError, match="'nowhere'"):
        build(demo_corpus, {"math": 1.0, "nowhere": 0.5})
    (tmp_path / "train" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="'empty'.*no .tar shards"):
        build(tmp_path, {"empty": 1.0})
    (tmp_path / "train" / "junk").mkdir(parents=True)
    (tmp_path / "train" / "junk" / "shard-000000.tar").write_bytes(b"this is not a tar file" * 50)
    with pytest.raises(ValueError, match="'junk'.*empty or unreadable"):
        build(tmp_path, {"junk": 1.0})
    build(demo_corpus, {"math": 1.0, "nowhere": 0.0})  # weight 0: not opened


def test_heldout_split_is_deterministic_and_complete(demo_corpus, demo_tokenizer):
    def read():
        loader = build_loader(_cfg(demo_corpus, num_workers=2), tokenizer=demo_tokenizer, rank=0, world_size=1,
                              seed=0, micro_batch_size=2, seq_len=512, split="heldout")
        return [b for b in loader]

    a, b = read(), read()
    assert [x.sample_ids for x in a] == [y.sample_ids for y in b]
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    assert sorted(i for x in a for i in x.sample_ids) == _all_keys(demo_corpus, "heldout")
    for batch in a:
        check_batch(batch)
    # mixed, not source after source: the first batches (what evaluation reads) cover most tasks
    first = {t for x in a[:4] for t in x.task_ids.unique().tolist() if t >= 0}
    assert len(first) >= 7, first


def test_first_replays_from_spawned_workers_kept_between_calls_that_survive_an_early_sigterm(demo_corpus,
                                                                                           demo_tokenizer):
    """Evaluation reads loader.first(n): the same batches at every call, from workers started once
    and kept. They are spawned, not forked: a fork of a rank that already runs threads (wandb's,
    gloo's) once hung the demo's held-out evaluation inside fork itself. A SIGTERM reaching them while
    they still start (scancel signals every process of the job) is held until they ignore it."""
    loader = build_loader(_cfg(demo_corpus, num_workers=2), tokenizer=demo_tokenizer, rank=0, world_size=1,
                          seed=0, micro_batch_size=2, seq_len=512, split="heldout")
    before = {p.pid for p in multiprocessing.active_children()}
    first = loader.first(3)  # the workers start here, before a batch is asked for
    workers = [p for p in multiprocessing.active_children() if p.pid not in before]
    assert sorted(type(p).__name__ for p in workers) == ["SpawnProcess"] * 2
    for p in workers:
        os.kill(p.pid, signal.SIGTERM)
    a = list(first)
    assert all(p.is_alive() for p in workers)
    b = list(loader.first(3))
    assert {p.pid for p in multiprocessing.active_children()} - before == {p.pid for p in workers}  # the same ones
    c = list(loader.first(5))  # another n: new workers (each makes only its share of the n batches)
    assert not any(p.is_alive() for p in workers)
    assert len(a) == 3 and len(c) == 5
    for x, y, z in zip(a, b, c):
        assert x.sample_ids == y.sample_ids == z.sample_ids and torch.equal(x.input_ids, z.input_ids)
    assert [x.sample_ids for x in c] == [x.sample_ids for _, x in zip(range(5), loader)]  # iterating: the same start
    now = [p for p in multiprocessing.active_children() if p.pid not in before]
    loader.close()
    for p in now:
        p.join(timeout=30)
        assert not p.is_alive()


def test_a_hung_worker_fails_the_run_naming_the_timeout_key(tmp_path, demo_corpus, demo_tokenizer):
    """A worker blocked for good (here on a shard that is a FIFO nobody writes, as on a dead network
    mount) raises after data.worker_timeout_s instead of hanging the job."""
    source = tmp_path / "heldout" / "math"
    source.mkdir(parents=True)
    shutil.copy(list_shards(demo_corpus / "heldout" / "math")[0], source / "a.tar")
    os.mkfifo(source / "b.tar")
    loader = build_loader(_cfg(tmp_path, num_workers=1, worker_timeout_s=3, mixture={"math": 1.0}, build_demo=False),
                          tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=2, seq_len=512,
                          split="heldout")
    with pytest.raises(RuntimeError, match=r"data.worker_timeout_s=3"):
        list(loader)
    fd = os.open(source / "b.tar", os.O_WRONLY | os.O_NONBLOCK)  # let the worker go (it reads an empty shard)
    os.close(fd)
    with pytest.raises(ValueError, match="data.worker_start_method='forkserver'"):
        build_loader(_cfg(demo_corpus, worker_start_method="forkserver"), tokenizer=demo_tokenizer, rank=0,
                     world_size=1, seed=0, micro_batch_size=2)


def test_iter_heldout_by_task(demo_corpus):
    cfg = _cfg(demo_corpus)
    math = list(iter_heldout(cfg, "math"))
    assert len(math) == 12 and all(s.task == "math" and s.meta["answer"].lstrip("-").isdigit() for s in math)
    grounding = list(iter_heldout(cfg, "grounding", limit=5))
    assert len(grounding) == 5 and all(0 <= v <= 1000 for s in grounding for v in s.meta["boxes"][0])
    assert grounding[0].load_image("img0.png").size == (112, 112)
    shares = [list(iter_heldout(cfg, "counting", rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) + len(shares[1]) == 12 and not {s.id for s in shares[0]} & {s.id for s in shares[1]}
    assert len(list(iter_heldout(cfg))) == len(_all_keys(demo_corpus, "heldout"))


def test_sample_stream_for_prompts_resumes(demo_corpus, demo_tokenizer):
    cfg = _cfg(demo_corpus, mixture={"math": 0.5, "counting": 0.5})
    stream = build_sample_stream(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=5)
    it = iter(stream)
    for _ in range(7):
        next(it)
    state = stream.state_dict()
    expected = [next(it).id for _ in range(5)]
    again = build_sample_stream(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=5)
    again.load_state_dict(state)
    assert [s.id for _, s in zip(range(5), again)] == expected


def test_demo_corpus_is_built_on_first_use(tmp_path, demo_tokenizer, caplog):
    root = tmp_path / "corpus"
    cfg = _cfg(root, demo_scale=0.002, num_workers=0)
    loader = build_loader(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=1, seq_len=256)
    assert (root / "manifest.json").exists() and (root / "tokenizer" / "tokenizer.json").exists()
    assert next(iter(loader)).num_tokens > 0
    # an explicit root built by an older generator is left alone, with a warning
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 0}))
    with caplog.at_level(logging.WARNING, logger="data.mixture"):
        build_loader(cfg, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=1, seq_len=256)
    assert "older version" in caplog.text and json.loads((root / "manifest.json").read_text())["version"] == 0
    # a non-empty directory that is not a demo corpus is never overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        build_loader(_cfg(tmp_path / "mine"), tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0,
                     micro_batch_size=1, seq_len=256)
