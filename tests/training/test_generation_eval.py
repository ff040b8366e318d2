"""Held-out generation metrics: prompt selection and sharding, scoring, and an FSDP2-wrapped model on
two ranks decoding exactly what the plain model decodes."""

import json
import os

import pytest
import torch

from model.config import preset
from model.vlm import build_model
from training import generation_eval as ge

from .helpers import compose, free_port

DATA = {"mixture": {"math": 1.0}}


def _data(root):
    return {**DATA, "root": str(root)}


def test_prompts_are_the_first_qualifying_samples_split_over_ranks(demo_corpus):
    data = _data(demo_corpus)
    digits = ge.heldout_prompts(data, "digits", limit=100)
    assert digits and all(s.is_chat and s.task == "chat" and "label" in s.meta for s in digits)
    math = ge.heldout_prompts(data, "math", limit=5)
    assert [s.id for s in math] == [s.id for s in ge.heldout_prompts(data, "math", limit=100)[:5]]
    shards = [ge.heldout_prompts(data, "math", limit=5, rank=r, world=2) for r in range(2)]
    assert [s.id for s in shards[0]] == [s.id for s in math[0::2]] and [s.id for s in shards[1]] == [s.id for s in math[1::2]]
    with pytest.raises(ValueError, match="generation eval task"):
        ge.heldout_prompts(data, "nosuch", limit=1)


def test_scores_reach_the_task_metrics(demo_corpus, demo_tokenizer, monkeypatch):
    """Gold completions score 1 on every task, wrong ones 0; counts are the prompts scored."""
    gold = {
        "math": lambda s: f"<think>\nok\n</think>\n\nThe answer is \\boxed{{{s.meta['answer']}}}.",
        "digits": lambda s: f"\n</think>\n\n\\boxed{{{s.meta['label']}}}",
        "counting": lambda s: f"\\boxed{{{s.meta['answer']}}}",
        "grounding": lambda s: s.meta["answer"],
        "ocr": lambda s: s.meta["text"].lower(),
    }
    for answer, expected in ((gold, 1.0), ({t: (lambda s: "") for t in gold}, 0.0)):
        def fake_complete(model, tokenizer, samples, data_cfg, **kw):
            return [answer[s.task if s.task in answer else "digits"](s) for s in samples]

        monkeypatch.setattr(ge, "complete", fake_complete)
        row = ge.evaluate_generation(build_model(preset("tiny")), demo_tokenizer, _data(demo_corpus), tasks=tuple(gold),
                                     limit_per_task=6)
        for task in gold:
            assert row[f"gen/{task}"] == expected, (task, row)
            assert row[f"gen/{task}/count"] > 0


def _fsdp_worker(rank: int, world: int, port: int, root: str, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from data.text import load_tokenizer
    from training.decoding import decoding
    from training.distributed import init_distributed, shutdown
    from training.engine import build_engine
    from training.parallelize import build_module

    d = init_distributed(1)
    cfg = compose(["+scale=mini", f"data.root={root}"])
    engine = build_engine(cfg, d, build_module(cfg, d))  # FSDP2 over the two ranks, the seeded initialization
    tok, data = load_tokenizer(None), _data(root)
    samples = ge.heldout_prompts(data, "digits", 8, rank, world) + ge.heldout_prompts(data, "math", 8, rank, world)
    with decoding(engine) as plain:
        texts = ge.complete(plain, tok, samples, data, max_new_tokens=12 + 4 * rank)  # ranks decode unequal lengths
    row = ge.evaluate_generation(engine, tok, data, tasks=("digits", "math"), limit_per_task=8, max_new_tokens=12,
                                 rank=rank, world=world)
    ids = torch.randint(80, 4000, (1, 32), generator=torch.Generator().manual_seed(1))
    loss = engine.model(ids, labels=ids).loss  # still trains: sharded again, resharding after forward restored
    loss.backward()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"texts": texts, "row": row, "loss": loss.item()}, f)
    shutdown()


def test_fsdp2_two_ranks_decode_what_the_plain_model_decodes(tmp_path, demo_corpus, demo_tokenizer):
    import torch.multiprocessing as mp

    from model.vlm import Exaone45

    mp.start_processes(_fsdp_worker, args=(2, free_port(), str(demo_corpus), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    torch.manual_seed(0)  # the seeded initialization (train.seed=0), made whole in this process
    plain = Exaone45(preset("tiny"))
    plain.init_weights()
    data = _data(demo_corpus)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, got in enumerate(results):
        samples = ge.heldout_prompts(data, "digits", 8, rank, 2) + ge.heldout_prompts(data, "math", 8, rank, 2)
        assert got["texts"] == ge.complete(plain, demo_tokenizer, samples, data, max_new_tokens=12 + 4 * rank)
    assert results[0]["row"] == results[1]["row"]
    assert results[0]["row"] == ge.evaluate_generation(plain, demo_tokenizer, data, tasks=("digits", "math"),
                                                       limit_per_task=8, max_new_tokens=12)
    ids = torch.randint(80, 4000, (1, 32), generator=torch.Generator().manual_seed(1))
    assert abs(results[0]["loss"] - plain(ids, labels=ids).loss.item()) < 1e-5
