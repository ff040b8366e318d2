"""GRPO learns to answer correctly: from a tiny model fine-tuned for half a minute on dot-counting chats,
20 GRPO steps (2 ranks over gloo, image prompts) raise the correctness of its answers (the counting
reward alone, format excluded; the zero-variance filter on correctness) on the prompts it trains on,
sampled like the policy and greedy.

The prompts are a fixed set of 8 counting images, the training and the evaluation split alike: at
this scale (a 1.5M-parameter model and half a minute of SFT) counting itself is barely learned (~10%
right, chance is 11%), and what 20 steps of RL can show for certain is the algorithm doing its job,
turning the rare right answers the policy samples into the ones it gives. Whether that generalizes
to held-out prompts is measured on the demo pipeline, whose SFT start can count (README, GRPO).

Both phases run in the same two spawned processes (one start-up instead of two): the pretraining
loop on the counting chats (loss on assistant turns only: supervised fine-tuning) writes a
checkpoint that the GRPO run starts from (`init_from`), as `launch/grpo.py ... init_from=<run>`
does. Reasoning off (answers are `\\boxed{k}`), on-policy sampling at temperature 1.

Measured on an Intel Xeon (AMX), train.seed 0, 1, 2, after 80 SFT steps (2026-12-02): held-out
(= training-set) accuracy sampled at T=1, 8 answers to each of the 8 prompts, 0.109 -> 0.484,
0.094 -> 0.453, 0.109 -> 0.375 (gains +0.38, +0.36, +0.27; the standard error of one measurement is
about 0.05); greedy 0.125 -> 0.500, 0.250 -> 0.500, 0.250 -> 0.500 (`GRPO_TEST_SEED=1` runs another
seed). With 150 SFT steps (until 2026-12-01) the gains were +0.25, +0.47, +0.30: the shorter start
learns as well and saves ~30 s of the suite.
"""

import os
import random
import time

import pytest
import torch

from tests.training.helpers import compose, free_port, metrics

SFT = ["+scale=mini", "wandb.mode=disabled", "data.num_workers=0", "stage=sft_counting",
       "+data.stages.sft_counting={counting: 1.0}", "data.seq_len=128", "train.micro_batch_size=8", "train.steps=80",
       "train.warmup_steps=3", "train.lr=5e-3", "model.mtp_loss_weight=0", "checkpoint.every=1000", "eval.batches=0"]
GRPO = ["+recipe=grpo", "+scale=mini", "wandb.mode=disabled", "data.num_workers=0",
        "data.stages.grpo.math=0", "data.stages.grpo.counting=0", "+data.stages.grpo.fixed=1.0",
        "train.steps=20", "train.lr=1e-3", "rl.update_epochs=2", "checkpoint.every=1000",
        "rl.enable_thinking=false", "rl.max_new_tokens=12",
        "rl.group_size=8", "rl.train_prompts_per_step=8", "rl.rollout_prompts_per_batch=8", "rl.max_gen_batches=3",
        "rl.eval_prompts_per_source=8", "rl.eval_samples=8", "rl.eval_temperature=1.0"]
FIXED = 8
MARGIN = 0.1  # the smallest measured gain of sampled accuracy is +0.27 (seed 2; seed 0, the one tested: +0.38)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Dot-counting chats to fine-tune on, and a source `fixed` of 8 others whose training and held-out
    splits are the same 8 prompts."""
    from data.demo.build import build_demo
    from data.demo.corpus import gen_counting
    from data.shards import write_shards

    root = tmp_path_factory.mktemp("grpo_corpus")
    build_demo(root, heldout=16, workers=1, counts={"counting": 900}, train_shards=2, heldout_shards=1)
    rng = random.Random("fixed")
    fixed = [gen_counting(rng, f"fixed-{i:04d}", "train", index=i) for i in range(FIXED)]
    for split in ("train", "heldout"):
        write_shards(fixed, root / split / "fixed", maxcount=1000)
    return root


def _worker(rank: int, world: int, port: int, root: str, out: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    from launch.common import loader_factory
    from rl.train import prompt_loader, train as grpo_train
    from training.config import rl_config
    from training.distributed import init_distributed, shutdown
    from training.trainer import setup, train

    d = init_distributed()
    seed = [f"train.seed={os.environ.get('GRPO_TEST_SEED', 0)}"]
    sft = compose(SFT + seed + [f"data.root={root}", f"run_dir={out}/sft"])
    train(setup(sft, loader_factory("train"), d))
    cfg = compose(GRPO + seed + [f"data.root={root}", f"run_dir={out}/grpo", f"init_from={out}/sft"], config_name="grpo")
    rl = rl_config(cfg.rl)
    grpo_train(setup(cfg, prompt_loader(rl), d), rl)
    shutdown()


def test_grpo_raises_the_correctness_of_its_answers(tmp_path, corpus):
    import torch.multiprocessing as mp

    start = time.perf_counter()
    mp.start_processes(_worker, args=(2, free_port(), str(corpus), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    rows = metrics(tmp_path / "grpo")
    before, after = rows[0], rows[-1]
    steps = [r for r in rows[1:] if "num_train_groups" in r]
    print(f"\nSFT + GRPO in {time.perf_counter() - start:.0f} s; accuracy (format excluded) sampled "
          f"{before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}, greedy {before['eval/accuracy_greedy']:.3f} "
          f"-> {after['eval/accuracy_greedy']:.3f}; reward {before['eval/reward']:.3f} -> {after['eval/reward']:.3f}; "
          f"rollout accuracy {steps[0]['accuracy']:.3f} .. {steps[-1]['accuracy']:.3f}")
    assert before["step"] == 0 and after["step"] == 20 and len(steps) == 20
    assert before["eval/prompts"] == after["eval/prompts"] == FIXED
    assert all("train_groups/fixed" not in r for r in steps)  # tasks, not sources: the prompts are counting
    assert sum(r["train_groups/counting"] for r in steps) > 0 and all(r["num_train_groups"] <= 8 for r in steps)
    assert after["eval/accuracy"] >= before["eval/accuracy"] + MARGIN
    assert after["eval/accuracy_greedy"] > before["eval/accuracy_greedy"]
    assert sum(r["accuracy"] for r in steps[-5:]) > sum(r["accuracy"] for r in steps[:5])  # the rollouts too
