"""GRPO's policy update: rollouts packed into rows, their log-probs under the policy (and the frozen
reference), and `rl.update_epochs` optimizer steps of the clipped loss (rl/grpo.py) on the engine.

Data parallelism: each rank updates on its own groups; the counts are all-reduced so every rank
runs the same number of micro-batches (ranks with fewer sequences run zero-loss ones) and the loss
is normalized by global counts: a token-mean over every response token of the step on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rl.grpo import RolloutGroups, agg_loss, group_advantages, kl_k3, policy_loss
from training.config import RLCfg
from training.distributed import all_reduce_max, all_reduce_sum, reduce_metrics


@dataclass
class Packed:
    """Prompt + completion sequences packed into one row (documents separated by cu_seqlens), their
    response tokens as labels (-100 elsewhere), and where those tokens sit in an [n, T] layout
    (T: the longest completion)."""

    input_ids: torch.Tensor  # [1, total]
    labels: torch.Tensor  # [1, total]: the response tokens, -100 on prompts
    cu_seqlens: torch.Tensor  # int32 [n + 1]
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    rows: torch.Tensor  # [R] sequence of each response token, in packed order
    cols: torch.Tensor  # [R] its position in the completion
    mask: torch.Tensor  # [n, T] bool
    advantages: torch.Tensor  # [n]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_response_tokens(self) -> int:
        return self.rows.numel()

    @property
    def targets(self) -> torch.Tensor:
        """[R] the response tokens, in packed order."""
        return self.labels[self.labels != -100]

    def padded(self, values: torch.Tensor) -> torch.Tensor:
        """[R] -> [n, T], zeros where there is no response token."""
        return values.new_zeros(self.mask.shape).index_put((self.rows, self.cols), values)


def pack(sequences: list[tuple], device) -> Packed:
    """sequences: (Prompt, completion token ids, advantage). An empty list packs a 2-token dummy with
    one label, so that a rank without sequences still runs every module the others run."""
    ids, labels, cu, rows, cols, pixels, grids = [], [], [0], [], [], [], []
    for i, (prompt, completion, _) in enumerate(sequences):
        P, C = len(prompt.input_ids), len(completion)
        ids += list(prompt.input_ids) + list(completion)
        labels += [-100] * P + list(completion)
        rows += [i] * C
        cols += range(C)
        cu.append(cu[-1] + P + C)
        if prompt.pixel_values is not None:
            pixels.append(prompt.pixel_values)
            grids.append(prompt.image_grid_thw)
    if not sequences:
        ids, labels, cu = [0, 0], [-100, 0], [0, 2]
    T = max((len(c) for _, c, _ in sequences), default=0)
    mask = torch.zeros(len(sequences), T, dtype=torch.bool)
    mask[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = True
    long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Packed(long(ids)[None], long(labels)[None], torch.tensor(cu, dtype=torch.int32, device=device),
                  torch.cat(pixels).to(device) if pixels else None, torch.cat(grids).to(device) if grids else None,
                  long(rows), long(cols), mask.to(device),
                  torch.tensor([a for _, _, a in sequences], dtype=torch.float32, device=device))


def response_logprobs(model, packed: Packed, temperature: float, entropy: bool = False):
    """(log-probs [R], entropies [R] or None) of the response tokens under softmax(logits / T): the
    model's chunked LM head runs on the response positions only, never on the prompts."""
    out = model(packed.input_ids, packed.pixel_values, packed.image_grid_thw, labels=packed.labels,
                cu_seqlens=packed.cu_seqlens, token_logprobs=True, token_entropy=entropy,
                temperature=temperature if temperature > 0 else 1.0)
    return out.token_logprobs, out.token_entropy


def _share(packed: Packed, mode: str, totals: dict) -> float:
    """This micro-batch's weight in the step loss: its count over the global count of the mode's unit."""
    if mode == "token-mean":
        return packed.num_response_tokens / max(totals["tokens"], 1)
    return packed.mask.any(-1).sum().item() / max(totals["sequences"], 1)


def _sequences(groups: RolloutGroups, rl: RLCfg) -> list[tuple]:
    advantages, _ = group_advantages(groups.rewards, rl.adv_eps, rl.norm_adv_by_std)
    return [(item.prompt, completion, float(a))
            for item, row in zip(groups.items, advantages) for completion, a in zip(item.completions, row)]


def update(run, groups: RolloutGroups, rl: RLCfg, reference=None) -> dict:
    """`update_epochs` optimizer steps over this rank's sequences, every rank running the same number
    of micro-batches (zero-loss ones where it has none); the old log-probs are the first epoch's
    (detached), the reference's come from one pass before it. Returns the step's metrics over all
    ranks, with `finite` (every update stepped) and `tokens` (packed tokens of one pass).

    `rollout/logprob_diff_max`: the largest |log-prob the rollout engine sampled a token with - the
    old log-prob recomputed here| over the trained tokens of every rank, the check that the engine
    serves the policy being trained (a stale weight shows as a jump). Both are log_softmax(logits /
    rl.temperature) when sampling is on-policy (top_p 1, top_k 0, presence_penalty 0, the defaults);
    otherwise the engine's are of the filtered distribution and the difference includes the filter."""
    d, engine, mbs = run.d, run.engine, run.cfg.train.micro_batch_size
    sequences = _sequences(groups, rl)
    sampled = [lp for item in groups.items for lp in item.logprobs]  # in the order of `sequences`
    chunks = [pack(sequences[i : i + mbs], d.device) for i in range(0, len(sequences), mbs)]
    n_micro = int(all_reduce_max([len(chunks)], d.device)[0])
    counts = all_reduce_sum([sum(c.num_response_tokens for c in chunks), sum(len(s[1]) > 0 for s in sequences),
                             sum(c.num_tokens for c in chunks)], d.device)
    totals = {"tokens": counts[0], "sequences": counts[1]}
    row = {"finite": True, "tokens": int(counts[2]), "loss": 0.0, "grad_norm": 0.0, "clip_fraction": 0.0,
           "clip_fraction_lower": 0.0, "approx_kl": 0.0, "kl": 0.0, "entropy": 0.0,
           "update_tokens": int(counts[2]) * rl.update_epochs, "rollout/logprob_diff_max": 0.0}
    if n_micro == 0:  # no rank has a group with signal: nothing to learn from this step
        return row
    micro = [chunks[k] if k < len(chunks) else None for k in range(n_micro)]
    dummy = pack([], d.device)
    ref = []
    if reference is not None:
        with torch.no_grad():
            for c in micro:
                logp, _ = response_logprobs(reference, c or dummy, rl.temperature)
                if c is not None:
                    ref.append(logp)
    old, entropy, logprob_diff = [None] * n_micro, 0.0, 0.0
    sums = {"loss": 0.0, "clipped": 0.0, "capped": 0.0, "approx_kl": 0.0, "kl": 0.0}
    for epoch_index in range(rl.update_epochs):
        first = epoch_index == 0
        epoch = {**{k: 0.0 for k in sums}, "non_finite": 0.0}
        for k, c in enumerate(micro):
            # The first epoch runs the weights the rollouts sampled (the optimizer steps after the last
            # micro-batch): its log-probs, detached, are the old policy's, so no separate pass makes them
            # (a forward of every sequence saved: a fifth of a one-epoch update with checkpointing).
            logp, ent = response_logprobs(run.model, c or dummy, rl.temperature, entropy=first or rl.entropy_coef > 0)
            if c is None:
                loss = logp.sum() * 0.0
            else:
                if first:
                    old[k] = logp.detach()
                    entropy += ent.detach().sum().item()
                    if len(sampled) == len(sequences) and c.num_response_tokens:
                        engine_logp = torch.tensor([x for lps in sampled[k * mbs : (k + 1) * mbs] for x in lps],
                                                   dtype=torch.float32, device=logp.device)
                        logprob_diff = max(logprob_diff, (old[k].float() - engine_logp).abs().max().item())
                loss, m = micro_batch_loss(logp, ent, c, old[k], ref[k] if ref else None, rl)
                loss = loss * _share(c, rl.loss_agg, totals)
                n = c.num_response_tokens
                for key, value in (("loss", loss.item()), ("clipped", m["clip_fraction"].item() * n),
                                   ("capped", m["clip_fraction_lower"].item() * n), ("approx_kl", m["approx_kl"].item() * n),
                                   ("kl", m["kl_sum"]), ("non_finite", float(not torch.isfinite(loss)))):
                    epoch[key] += value
            engine.backward(loss * engine.loss_scale, last=k == n_micro - 1)
        epoch = reduce_metrics(epoch, d.device)
        grad_norm, finite = engine.step(epoch.pop("non_finite") == 0)
        row["finite"] = row["finite"] and finite
        for key in sums:
            sums[key] += epoch[key]
    per_token = lambda key: sums[key] / (rl.update_epochs * max(totals["tokens"], 1))  # noqa: E731
    row.update({"loss": sums["loss"] / rl.update_epochs, "grad_norm": grad_norm, "clip_fraction": per_token("clipped"),
                "clip_fraction_lower": per_token("capped"), "approx_kl": per_token("approx_kl"),
                "kl": per_token("kl" if reference is not None else "approx_kl")})
    reduced = reduce_metrics({"entropy": entropy}, d.device, {"logprob_diff": logprob_diff})
    row["entropy"] = reduced["entropy"] / max(totals["tokens"], 1)
    row["rollout/logprob_diff_max"] = reduced["logprob_diff"]
    return row


def micro_batch_loss(logp: torch.Tensor, entropy: Optional[torch.Tensor], c: Packed, old_logp: torch.Tensor,
                     ref_logp: Optional[torch.Tensor], rl: RLCfg) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + kl_coef * k3 KL to the reference - entropy_coef * entropy, aggregated
    over this micro-batch per rl.loss_agg (the caller weighs it by its share of the step)."""
    logp = c.padded(logp)
    loss, metrics = policy_loss(logp, c.padded(old_logp), c.advantages, c.mask, rl)
    metrics["kl_sum"] = 0.0
    if ref_logp is not None:
        kl = kl_k3(logp, c.padded(ref_logp))
        loss = loss + rl.kl_coef * agg_loss(kl, c.mask, rl.loss_agg)
        metrics["kl_sum"] = kl[c.mask].sum().item()
    if rl.entropy_coef:
        loss = loss - rl.entropy_coef * agg_loss(c.padded(entropy), c.mask, rl.loss_agg)
    return loss, metrics
