"""GRPO pieces against numbers worked out by hand in the comments."""

import math

import pytest
import torch

from rl.grpo import (KL_CLAMP, RolloutGroups, UnderfilledBatchWarning, agg_loss, entropy_from_logits,
                     fill_train_batch, group_advantages, kl_k3, masked_mean, policy_loss, zero_variance_mask)
from training.config import RLCfg, rl_config


def close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv, std = group_advantages(rewards, eps=1e-9, norm_by_std=True)
    # row 0: mean 0.5, population std 0.5 -> +-1
    # row 1: constant -> std 0 -> advantages 0 (eps keeps it finite)
    # row 2: mean 0.75, var (3 * 0.75^2 + 2.25^2) / 4 = 1.6875, std = 3 sqrt(3) / 4
    #        -> -0.75 / std = -1 / sqrt(3), 2.25 / std = sqrt(3)
    s3 = math.sqrt(3)
    close(std, [0.5, 0.0, 3 * s3 / 4])
    close(adv, [[1, -1, 1, -1], [0, 0, 0, 0], [-1 / s3, -1 / s3, -1 / s3, s3]])


def test_group_advantages_eps_and_no_std_normalization():
    rewards = torch.tensor([[0.0, 2.0]])  # mean 1, std 1
    adv, std = group_advantages(rewards, eps=1.0, norm_by_std=True)
    close(adv, [[-0.5, 0.5]])  # (r - 1) / (1 + 1)
    adv, std = group_advantages(rewards, eps=1.0, norm_by_std=False)
    close(adv, [[-1.0, 1.0]])
    close(std, [1.0])


def test_zero_variance_mask_uses_a_tolerance():
    rewards = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5 + 1e-7], [0.0, 1.0, 0.0], [0.2, 0.3, 0.2]],
                           dtype=torch.float64)
    assert zero_variance_mask(rewards, tol=1e-6).tolist() == [False, False, True, True]
    # [0.2, 0.3, 0.2]: std = sqrt(2/9) * 0.05 ~= 0.0236 -> dropped at tol 0.05
    assert zero_variance_mask(rewards, tol=0.05).tolist() == [False, False, True, False]


# ----------------------------------------------------------------------------- filtering and refill


def cfg(**overrides):
    base = dict(group_size=2, train_prompts_per_step=4, rollout_prompts_per_batch=4, max_gen_batches=3)
    return RLCfg(**{**base, **overrides})


class Generator:
    """Returns the scripted rollout batches in order and records which indices were asked for."""

    def __init__(self, *batches):
        self.batches, self.calls = batches, []

    def __call__(self, i):
        self.calls.append(i)
        names, rewards = self.batches[i]
        return RolloutGroups(torch.tensor(rewards, dtype=torch.float32), list(names))


def test_half_zero_variance_groups_are_dropped_and_refilled():
    generate = Generator(
        ("abcd", [[0, 1], [1, 1], [0, 0], [1, 0]]),  # b, c have zero variance
        ("efgh", [[1, 1], [0, 1], [0.5, 0.5], [1, 0]]),  # e, g have zero variance
        ("ijkl", [[0, 1]] * 4),  # never needed
    )
    groups, metrics = fill_train_batch(generate, cfg())
    assert generate.calls == [0, 1]
    assert groups.items == ["a", "d", "f", "h"]
    close(groups.rewards, [[0, 1], [1, 0], [0, 1], [1, 0]])
    assert metrics == {"frac_zero_std_groups": 0.5, "num_gen_batches": 2, "num_train_groups": 4}


def test_extra_groups_are_truncated_keeping_the_earliest():
    generate = Generator(
        ("abcd", [[0, 1], [1, 1], [0, 0], [1, 0]]),
        ("efgh", [[0, 1], [1, 0], [0, 1], [0, 0]]),  # 3 usable, only 2 needed
    )
    groups, metrics = fill_train_batch(generate, cfg())
    assert groups.items == ["a", "d", "e", "f"]
    assert metrics == {"frac_zero_std_groups": 3 / 8, "num_gen_batches": 2, "num_train_groups": 4}


def test_a_full_first_batch_needs_no_refill():
    generate = Generator(("abcd", [[0, 1]] * 4), ("efgh", [[0, 1]] * 4))
    groups, metrics = fill_train_batch(generate, cfg())
    assert generate.calls == [0] and len(groups) == 4
    assert metrics == {"frac_zero_std_groups": 0.0, "num_gen_batches": 1, "num_train_groups": 4}


HALF_EMPTY = ("abcd", [[0, 1], [1, 1], [0, 0], [1, 0]])


def test_underfilled_batch_warns_and_trains_on_what_there_is():
    generate = Generator(HALF_EMPTY, HALF_EMPTY)
    with pytest.warns(UnderfilledBatchWarning, match="only 2/4 groups"):
        groups, metrics = fill_train_batch(generate, cfg(max_gen_batches=1))
    assert generate.calls == [0] and groups.items == ["a", "d"]
    assert metrics == {"frac_zero_std_groups": 0.5, "num_gen_batches": 1, "num_train_groups": 2}


def test_underfilled_batch_can_be_empty():
    generate = Generator(("ab", [[1, 1], [0, 0]]), ("cd", [[0.3, 0.3], [1, 1]]))
    with pytest.warns(UnderfilledBatchWarning, match="only 0/4 groups"):
        groups, metrics = fill_train_batch(generate, cfg(max_gen_batches=2))
    assert len(groups) == 0 and groups.rewards.shape == (0, 2)
    assert metrics == {"frac_zero_std_groups": 1.0, "num_gen_batches": 2, "num_train_groups": 0}


def test_underfilled_batch_fails_when_asked_to():
    generate = Generator(HALF_EMPTY, HALF_EMPTY, HALF_EMPTY)
    message = r"only 2/4 groups with reward variance after 1 rollout batches \(2/4 had zero std\)"
    with pytest.raises(RuntimeError, match=message):
        fill_train_batch(generate, cfg(max_gen_batches=1, on_underfilled="fail"))


def test_rollout_groups_keep_items_in_step_with_rewards():
    a = RolloutGroups(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), ["a", "b"])
    b = RolloutGroups(torch.tensor([[2.0, 3.0]]), ["c"])
    both = RolloutGroups.cat([a, b])
    assert both.items == ["a", "b", "c"] and both.rewards.shape == (3, 2)
    picked = both.select(torch.tensor([True, False, True]))
    assert picked.items == ["a", "c"]
    close(picked.rewards, [[0, 1], [2, 3]])
    with pytest.raises(ValueError):
        RolloutGroups(torch.zeros(2, 3), ["only one"])
    with pytest.raises(TypeError):
        both.select(torch.tensor([0, 2]))


@pytest.mark.parametrize("bad, key", [
    (dict(loss_agg="sum"), "rl.loss_agg"), (dict(on_underfilled="ignore"), "rl.on_underfilled"),
    (dict(group_size=1), "rl.group_size"), (dict(max_gen_batches=0), "rl.max_gen_batches"),
    (dict(clip_eps_low=1.0), "rl.clip_eps_low"), (dict(clip_ratio_c=0.5), "rl.clip_ratio_c"),
    (dict(filter_on=["nosuch"]), "rl.filter_on"), (dict(group_sise=4), "rl.group_sise"),
    (dict(reward_weights={"math": {"nosuch": 1.0}}), "rl.reward_weights.math"),
])
def test_config_rejects_bad_knobs_naming_the_key(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        rl_config(bad)


def test_config_defaults():
    c = RLCfg()
    assert (c.clip_eps_low, c.clip_eps_high, c.clip_ratio_c, c.loss_agg, c.temperature, c.top_p, c.presence_penalty,
            c.filter_on) == (0.2, 0.28, 3.0, "token-mean", 1.0, 1.0, 0.0, None)  # on-policy sampling, filter on correctness
    assert c.reward_weights["math"] == {"math_boxed": 1.0, "format": 0.1}
    c.reward_weights["math"]["format"] = 0.0
    assert RLCfg().reward_weights["math"]["format"] == 0.1  # each config owns its copy


# ----------------------------------------------------------------------------- clipped loss

# One token per sequence, old log-prob 0, so the ratio r is exp(logp). eps_low 0.2, eps_high 0.28:
# the ratio is clipped to [0.8, 1.28]. Per-token loss = max(-A r, -A clip(r)).
CASES = [  # (A, r, per-token loss, clipping active, d loss / d logp before aggregation)
    (+1.0, 1.1, -1.1, False, -1.1),  # inside the range: -A r, gradient -A r
    (+1.0, 1.5, -1.28, True, 0.0),  # positive advantage above 1 + eps_high: capped, no gradient
    (+1.0, 0.5, -0.5, False, -0.5),  # positive advantage below 1 - eps_low: not clipped (min picks r)
    (-1.0, 0.5, +0.8, True, 0.0),  # negative advantage below 1 - eps_low: floored, no gradient
    (-1.0, 1.5, +1.5, False, 1.5),  # negative advantage above 1 + eps_high: not clipped
    (-2.0, 0.9, +1.8, False, 1.8),  # inside the range
]


def clip_case_tensors():
    adv = torch.tensor([c[0] for c in CASES])
    logp = torch.tensor([[math.log(c[1])] for c in CASES], requires_grad=True)
    return adv, logp, torch.zeros_like(logp), torch.ones_like(logp)


def test_clipped_loss_inside_and_outside_the_range():
    adv, logp, old_logp, mask = clip_case_tensors()
    loss, metrics = policy_loss(logp, old_logp, adv, mask, cfg())
    expected = sum(c[2] for c in CASES) / len(CASES)  # (-1.1 - 1.28 - 0.5 + 0.8 + 1.5 + 1.8) / 6
    close(loss, expected)
    close(expected, 1.22 / 6)
    loss.backward()
    close(logp.grad.flatten(), [c[4] / len(CASES) for c in CASES])
    close(metrics["clip_fraction"], 2 / 6)
    # k3 of KL(old || new) with r = new / old: r - 1 - log r, averaged
    close(metrics["approx_kl"], sum(r - 1 - math.log(r) for _, r, *_ in CASES) / 6)
    close(metrics["ratio_mean"], sum(c[1] for c in CASES) / 6)
    assert not any(m.requires_grad for m in metrics.values())


def test_each_clip_case_alone():
    for a, r, token_loss, clipped, _ in CASES:
        logp = torch.tensor([[math.log(r)]])
        loss, metrics = policy_loss(logp, torch.zeros(1, 1), torch.tensor([a]), torch.ones(1, 1), cfg())
        close(loss, token_loss)
        close(metrics["clip_fraction"], float(clipped))


def test_dual_clip_caps_negative_advantages_by_hand():
    """With A < 0 the per-token loss max(-A r, -A clip(r)) grows without bound in r; the dual clip
    caps it at -c A (c = 3): A = -1, r = 4 gives 4 -> 3 with no gradient, r = 2 stays 2 (below the
    cap), and positive advantages never see the cap."""
    logp = torch.tensor([[math.log(4.0)], [math.log(2.0)], [math.log(4.0)]], requires_grad=True)
    adv = torch.tensor([-1.0, -1.0, 2.0])
    loss, metrics = policy_loss(logp, torch.zeros(3, 1), adv, torch.ones(3, 1), cfg(loss_agg="token-mean"))
    # per token: min(max(4, 0.8), 3) = 3; min(max(2, 0.8), 3) = 2; A = 2: max(-8, -2.56) = -2.56
    close(loss, (3 + 2 - 2.56) / 3)
    loss.backward()
    close(logp.grad.flatten(), [0.0, 2.0 / 3, 0.0])  # d(-A r)/dlogp = -A r = 2 for the second; the others are flat
    close(metrics["clip_fraction_lower"], 1 / 3)
    off, _ = policy_loss(logp.detach(), torch.zeros(3, 1), adv, torch.ones(3, 1), cfg(clip_ratio_c=None))
    close(off, (4 + 2 - 2.56) / 3)


def test_kl_is_clamped_per_token():
    # delta = ref - logp = 15: k3 = e^15 - 15 - 1 ~ 3.3e6 -> KL_CLAMP; delta = 1: e - 2 stays
    close(kl_k3(torch.tensor([0.0, 0.0]), torch.tensor([15.0, 1.0])), [KL_CLAMP, math.e - 2])
    assert KL_CLAMP == 10.0


def test_a_group_that_differs_only_in_format_is_filtered():
    """Every answer wrong, half of them formatted: rewards [0.091, 0, 0.091, 0] vary, correctness [0, 0,
    0, 0] does not: the group carries no correctness signal and is dropped (DAPO's 0 < correct < G);
    a group with one right answer is kept."""
    rewards = torch.tensor([[1 / 11, 0.0, 1 / 11, 0.0], [1.0, 0.0, 1 / 11, 0.0]])
    correct = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert zero_variance_mask(rewards, 1e-6).tolist() == [True, True]  # the total reward would keep both
    groups = RolloutGroups(rewards, ["format only", "one right"], correct)
    kept, metrics = fill_train_batch(lambda i: groups, cfg(group_size=4, train_prompts_per_step=1, max_gen_batches=1))
    assert kept.items == ["one right"] and metrics["frac_zero_std_groups"] == 0.5
    close(kept.rewards, rewards[1:])  # the advantages still come from the rewards


def test_eps_low_and_high_are_separate():
    logp = torch.tensor([[math.log(1.25)], [math.log(0.85)]])
    adv = torch.tensor([1.0, -1.0])
    # eps_high 0.28: 1.25 is inside; eps_low 0.2: 0.85 is inside -> nothing clipped
    _, metrics = policy_loss(logp, torch.zeros(2, 1), adv, torch.ones(2, 1), cfg())
    close(metrics["clip_fraction"], 0.0)
    # symmetric 0.1: both clipped; loss = (-1.1 + 0.9) / 2
    loss, metrics = policy_loss(logp, torch.zeros(2, 1), adv, torch.ones(2, 1),
                                cfg(clip_eps_low=0.1, clip_eps_high=0.1))
    close(metrics["clip_fraction"], 1.0)
    close(loss, (-1.1 + 0.9) / 2)


# ----------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),  # 2.5: the long sequence dominates
    ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),  # 3.0: each sequence weighs the same
    ("seq-mean-token-sum", (6 + 4) / 2),  # 5.0
])
def test_agg_loss_modes(mode, expected):
    close(agg_loss(PER_TOKEN, MASK, mode), expected)


def test_agg_loss_skips_sequences_without_tokens():
    per_token = torch.tensor([[1.0, 3.0], [7.0, 7.0]])
    mask = torch.tensor([[1, 1], [0, 0]])
    close(agg_loss(per_token, mask, "token-mean"), 2.0)
    close(agg_loss(per_token, mask, "seq-mean-token-mean"), 2.0)
    close(agg_loss(per_token, mask, "seq-mean-token-sum"), 4.0)
    with pytest.raises(ValueError):
        agg_loss(per_token, mask, "sum")


@pytest.mark.parametrize("mode, expected", [
    # ratio 1 everywhere, so the per-token loss is -A: [[1, 1, 1], [-2]] on response tokens
    ("token-mean", (3 - 2) / 4),
    ("seq-mean-token-mean", (1 - 2) / 2),
    ("seq-mean-token-sum", (3 - 2) / 2),
])
def test_policy_loss_aggregation_with_per_sequence_advantages(mode, expected):
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -float("inf"), -float("inf")]], requires_grad=True)
    old_logp = logp.detach().clone()
    old_logp[1, 1:] = float("nan")  # padding may hold anything
    loss, metrics = policy_loss(logp, old_logp, torch.tensor([-1.0, 2.0]), MASK, cfg(loss_agg=mode))
    close(loss, expected)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[1, 1:] == 0).all()
    close(metrics["approx_kl"], 0.0)
    close(metrics["clip_fraction"], 0.0)


def test_policy_loss_accepts_per_token_advantages():
    adv = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 9.0, 9.0]])
    logp = torch.zeros(2, 3)
    loss, _ = policy_loss(logp, logp, adv, MASK, cfg(loss_agg="token-mean"))
    close(loss, 2.5)  # -A on response tokens is PER_TOKEN's masked values
    loss, _ = policy_loss(logp, logp, adv, MASK, cfg(loss_agg="seq-mean-token-mean"))
    close(loss, 3.0)


def test_empty_mask_gives_zero_loss_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, metrics = policy_loss(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3), cfg())
    close(loss, 0.0)
    close(metrics["clip_fraction"], 0.0)


# ----------------------------------------------------------------------------- helpers


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, float("nan"), 7.0, float("inf")]])
    mask = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0]])
    close(masked_mean(x, mask), (1 + 3 + 5 + 7) / 4)
    close(masked_mean(x, mask, dim=-1), [2.0, 6.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_kl_k3_by_hand():
    log2 = math.log(2.0)
    logp = torch.tensor([0.0, log2, -1.0])
    ref = torch.tensor([log2, 0.0, -1.0])
    # delta = ref - logp: log 2 -> 2 - log 2 - 1; -log 2 -> 1/2 + log 2 - 1; 0 -> 0
    close(kl_k3(logp, ref), [1 - log2, log2 - 0.5, 0.0])
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_entropy_from_logits_by_hand():
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0],  # uniform over 4: log 4
        [math.log(3.0), 0.0, -1e9, -1e9],  # p = (3/4, 1/4): -(3/4 ln 3/4 + 1/4 ln 1/4)
        [1000.0, 1000.0, 0.0, 0.0],  # large logits stay stable: ln 2
        [50.0, 0.0, 0.0, 0.0],  # nearly one-hot: ~0
    ])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    close(entropy_from_logits(logits), [math.log(4.0), h, math.log(2.0), 0.0])
    assert entropy_from_logits(torch.zeros(2, 5, 7)).shape == (2, 5)
