"""The GRPO loop: log-probs of packed rollouts, loss normalization across micro-batches and ranks, the
`rl:` config, and `launch/grpo.py` on 2 ranks over gloo (metrics, exact resume across torchrun and
`accelerate launch`, DeepSpeed ZeRO-2 under DeepSpeed's launcher and ZeRO-3)."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from rl.grpo import policy_loss
from rl.update import Packed, _share, pack, response_logprobs
from training.config import RLCfg, rl_config

from tests.training.helpers import compose, launch, metrics

# From scratch nothing answers math or counting, so the OCR source is in the mixture: its edit
# similarity is continuous, random completions already differ in reward and updates happen.
SMOKE = ["+recipe=grpo", "+scale=mini", "wandb.mode=disabled", "data.num_workers=0",
         "+data.stages.grpo.ocr=0.5", "train.steps=3", "train.micro_batch_size=8", "train.lr=1e-3",
         "rl.group_size=4", "rl.train_prompts_per_step=4", "rl.rollout_prompts_per_batch=4", "rl.max_gen_batches=2",
         "rl.max_new_tokens=12", "rl.update_epochs=2", "rl.kl_coef=0.05", "rl.entropy_coef=0.01",
         "rl.eval_prompts_per_source=2", "checkpoint.every=100"]
EXACT = ["loss", "grad_norm", "reward_mean", "reward_std", "accuracy", "entropy", "clip_fraction", "kl", "approx_kl",
         "response_length_mean", "frac_zero_std_groups", "num_gen_batches", "tokens", "eval/reward", "eval/accuracy",
         "eval/accuracy_greedy"]


def _prompts(demo_corpus, demo_tokenizer, n=4):
    from data.mixture import DataConfig
    from rl.rollout import heldout_prompts

    cfg = DataConfig(root=str(demo_corpus), mixture={"math": 1.0, "counting": 1.0})
    prompts = heldout_prompts(cfg, demo_tokenizer, n // 2)
    assert any(p.pixel_values is not None for p in prompts) and any(p.pixel_values is None for p in prompts)
    return prompts


def test_packed_logprobs_equal_the_sampling_logprobs(demo_corpus, demo_tokenizer):
    """Text and image prompts packed into one row score their completions exactly as generate sampled them."""
    from model.config import preset
    from model.generate import generate
    from model.vlm import build_model
    from rl.grpo import entropy_from_logits
    from training.decoding import prompt_images

    torch.manual_seed(0)
    model = build_model(preset("tiny"))
    model.cfg.loss_chunk_size = 7  # several chunks of the LM head, not one
    prompts = _prompts(demo_corpus, demo_tokenizer)
    pixels, grid = prompt_images(prompts, torch.float32)
    for temperature in (1.0, 0.7):
        out = generate(model, [p.input_ids for p in prompts], pixel_values=pixels, image_grid_thw=grid, max_new_tokens=12,
                       temperature=temperature, generator=torch.Generator().manual_seed(0))
        packed = pack([(p, t, 1.0) for p, t in zip(prompts, out.tokens)], "cpu")
        with torch.no_grad():
            logp, entropy = response_logprobs(model, packed, temperature, entropy=True)
            full = model(packed.input_ids, packed.pixel_values, packed.image_grid_thw, cu_seqlens=packed.cu_seqlens,
                         return_logits=True).logits[0].float() / temperature  # every position: the reference
        expected = torch.tensor([x for row in out.logprobs for x in row])
        torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)
        positions = (packed.labels[0] != -100).nonzero().flatten() - 1  # the logits predicting each response token
        torch.testing.assert_close(entropy, entropy_from_logits(full[positions]), rtol=0, atol=1e-5)
        assert packed.mask.sum() == len(expected) and packed.padded(logp)[packed.mask].equal(logp)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batch_shares_add_up_to_the_whole_batch_loss(mode):
    """Split over 2 ranks x 2 micro-batches, the shared-weighted losses sum to the one-batch loss."""
    g = torch.Generator().manual_seed(0)
    n, T = 8, 6
    lengths = torch.tensor([6, 1, 3, 5, 2, 6, 4, 1])
    mask = torch.arange(T)[None] < lengths[:, None]
    logp, old = -torch.rand(n, T, generator=g), -torch.rand(n, T, generator=g)
    adv = torch.randn(n, generator=g)
    grpo = RLCfg(loss_agg=mode, group_size=2)
    whole, _ = policy_loss(logp, old, adv, mask, grpo)

    def part(rows):
        idx = torch.tensor(rows)
        m = mask[idx]
        rr, cc = m.nonzero(as_tuple=True)
        return Packed(None, None, None, None, None, rr, cc, m, adv[idx]), idx

    totals = {"tokens": int(mask.sum()), "sequences": n}
    total = 0.0
    for rows in ([0, 1], [2, 3], [4, 5, 6], [7]):  # rank 0: two micro-batches, rank 1: two
        p, idx = part(rows)
        loss, _ = policy_loss(logp[idx], old[idx], p.advantages, p.mask, grpo)
        total += loss * _share(p, mode, totals)
    torch.testing.assert_close(total, whole)


def test_rl_config_is_one_checked_object_and_names_bad_keys():
    cfg = compose(["+recipe=grpo", "+scale=mini", "rl.group_size=4", "rl.eval_samples=3"], config_name="grpo")
    rl = rl_config(cfg.rl)
    raw = OmegaConf.to_container(cfg.rl)
    assert rl.group_size == 4 and rl.eval_samples == 3 and rl.reward_weights["math"]["math_boxed"] == 1.0
    assert rl.rollout_engine == "native" and rl.max_new_tokens == 64  # the miniature's, not the 33B recipe's
    assert cfg.data.mixture == {"math": 0.6, "counting": 0.4}
    with pytest.raises(ValueError, match="rl.group_sise"):
        rl_config({**raw, "group_sise": 4})
    with pytest.raises(ValueError, match="loss_agg"):
        rl_config({**raw, "loss_agg": "sum"})


def test_vision_tokens_end_a_completion(demo_corpus, demo_tokenizer):
    """A sampled image placeholder has no image behind it: the completion is cut before it, unfinished."""
    from model.config import preset
    from model.vlm import build_model
    from training.decoding import Sampling, sample

    class ImageTokenHead(torch.nn.Module):  # every next-token distribution peaks at the image placeholder
        def forward(self, h):
            logits = torch.zeros(*h.shape[:-1], model.cfg.text_config.vocab_size)
            logits[..., model.cfg.image_token_id] = 10.0
            return logits

    model = build_model(preset("tiny"))
    model.lm_head = ImageTokenHead()
    prompts = _prompts(demo_corpus, demo_tokenizer)
    tokens, _, finished = sample(model, prompts, Sampling(max_new_tokens=4), stop_id=53, pad_id=0, batch_size=8)
    assert all(t == [] for t in tokens) and not any(finished)


def _check_row(row, grpo):
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "skipped_samples", "reward_mean", "reward_std",
                "accuracy", "accuracy/ocr", "frac_zero_std_groups", "num_gen_batches", "entropy", "clip_fraction",
                "clip_fraction_lower", "kl", "response_length_mean", "response_length_max", "response_clipped_ratio",
                "gen_tokens_per_s", "train_tokens_per_s", "reward/ocr", "reward_task/ocr", "reward_task/math",
                "train_groups/math", "train_groups/ocr"):
        assert key in row and math.isfinite(row[key]), (key, row)
    assert 0 <= row["reward_mean"] <= 1 and 0 <= row["reward_std"] <= 0.5
    assert 0 <= row["frac_zero_std_groups"] <= 1 and 1 <= row["num_gen_batches"] <= grpo["max_gen_batches"]
    assert 1 <= row["response_length_mean"] <= row["response_length_max"] <= grpo["max_new_tokens"]
    assert 0 <= row["response_clipped_ratio"] <= 1 and 0 <= row["clip_fraction"] <= 1
    assert row["kl"] >= 0 and row["entropy"] > 0 and row["gen_tokens_per_s"] > 0
    # the native decoder's sampling log-probs against the update's recomputed ones (fp32)
    assert row["rollout/logprob_diff_max"] <= 1e-4 and row["rollout/sync_s"] == row["rollout/sync_gb"] == 0


def test_grpo_launcher_two_ranks_metrics_and_exact_resume(tmp_path, demo_corpus):
    common = SMOKE + [f"data.root={demo_corpus}"]
    launch("grpo.py", common + [f"run_dir={tmp_path / 'straight'}"], nproc=2)
    # stopped under `accelerate launch`, resumed under torchrun: the same run as the straight one, exactly
    launch("grpo.py", common + [f"run_dir={tmp_path / 'resumed'}", "train.stop_after=2"], nproc=2, launcher="accelerate")
    assert (tmp_path / "resumed" / "checkpoints" / "step_2").is_dir()
    launch("grpo.py", common + [f"run_dir={tmp_path / 'resumed'}"], nproc=2)

    grpo = compose(SMOKE, config_name="grpo").rl
    straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [0, 1, 2, 3] == [r["step"] for r in resumed]
    for row in (straight[0], straight[-1]):  # held-out evaluation at the start and the end
        assert {"eval/reward", "eval/accuracy", "eval/accuracy_greedy", "eval/accuracy/ocr"} <= set(row)
    for row in straight[1:]:
        _check_row(row, grpo)
    updated = [r for r in straight[1:] if r["num_train_groups"] > 0]
    assert updated and all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in updated)
    assert any(r["clip_fraction"] > 0 for r in updated)  # the second epoch moves away from the old policy
    for a, b in zip(straight, resumed):
        for key in EXACT:
            assert a.get(key) == b.get(key), (a["step"], key, a.get(key), b.get(key))


@pytest.mark.parametrize("stage,launcher", [(2, "deepspeed"), (3, "torchrun")])
def test_grpo_runs_under_deepspeed(tmp_path, demo_corpus, stage, launcher):
    """ZeRO-2 under DeepSpeed's launcher (`deepspeed --num_gpus 2 launch/grpo.py`: rollouts decode on the
    module itself, whole on every rank) and ZeRO-3 under torchrun (partitioned weights, gathered once per
    rollout phase and per evaluation). DeepSpeed builds no C++ op on CPU (its shared-memory all-reduce
    took 40 s to compile at the first run on a machine)."""
    extensions = tmp_path / "torch_extensions"
    run_dir = tmp_path / "run"
    launch("grpo.py", SMOKE + [f"data.root={demo_corpus}", f"run_dir={run_dir}", "train.steps=2",
                               "parallel.engine=deepspeed", f"parallel.zero_stage={stage}"], nproc=2,
           env={"TORCH_EXTENSIONS_DIR": str(extensions)}, launcher=launcher)
    assert not extensions.exists() or not any(extensions.iterdir()), list(extensions.rglob("*"))
    assert OmegaConf.load(run_dir / "config.yaml").parallel.zero_stage == stage
    assert (run_dir / "checkpoints" / "step_2" / "ds").is_dir()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(math.isfinite(r["loss"]) for r in rows[1:])
    assert "eval/reward" in rows[0] and "eval/reward" in rows[-1]
    assert any(r["num_train_groups"] > 0 and r["grad_norm"] > 0 for r in rows[1:])


@pytest.mark.parametrize("epochs", [1, 2])
def test_update_reads_the_old_logprobs_from_its_first_epoch(tmp_path, demo_corpus, demo_tokenizer, epochs):
    """One forward per micro-batch and epoch, no separate old-policy pass (plus one per micro-batch of
    the frozen reference when kl_coef > 0): the first epoch runs the weights the rollouts came from,
    so its policy ratio is exactly 1 (nothing clipped, approx. KL 0) and it makes the logged entropy."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from rl.grpo import RolloutGroups
    from rl.train import prompt_loader
    from rl.update import update
    from training.trainer import setup

    cfg = compose(SMOKE + [f"data.root={demo_corpus}", f"run_dir={tmp_path}", f"rl.update_epochs={epochs}",
                           "train.micro_batch_size=3"], config_name="grpo")
    rl = rl_config(cfg.rl)
    try:
        run = setup(cfg, prompt_loader(rl))
        calls = []
        run.module.register_forward_pre_hook(lambda m, args: calls.append(torch.is_grad_enabled()))
        g = torch.Generator().manual_seed(0)
        prompts = _prompts(demo_corpus, demo_tokenizer)
        items = [SimpleNamespace(prompt=p, completions=[torch.randint(100, 4000, (n,), generator=g).tolist() for n in (3, 5)],
                                 logprobs=[]) for p in prompts]
        groups = RolloutGroups(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]), items)
        row = update(run, groups, rl, reference=None)
        micro_batches = math.ceil(2 * len(prompts) / 3)
        assert calls == [True] * (micro_batches * epochs)  # every pass trains: none is a no-grad old-policy pass
        assert row["finite"] and row["grad_norm"] > 0 and row["entropy"] > 0
        if epochs == 1:
            assert row["clip_fraction"] == row["clip_fraction_lower"] == row["approx_kl"] == 0.0
        else:  # the second epoch runs the stepped weights
            assert row["approx_kl"] > 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
