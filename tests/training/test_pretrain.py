"""Pretraining across engines and process counts: equivalence (1 vs 2 ranks, compiled, ZeRO-2/3, context
parallelism, with ZeRO-3's resume and export), ZeRO-3's parameter dtype, config errors, non-finite steps.
Resume and preemption of launched runs: test_preemption.py."""

import pytest
import torch

from .helpers import TINY, compose, metrics, run_workers


@pytest.fixture(scope="module")
def fixed_batches(tmp_path_factory, demo_corpus, demo_tokenizer):
    """Eight packed batches of one 256-token row from the demo corpus (images included)."""
    from data.mixture import build_loader

    cfg = compose(TINY + [f"data.root={demo_corpus}", "data.seq_len=256"])
    loader = build_loader(cfg.data, tokenizer=demo_tokenizer, rank=0, world_size=1, seed=0, micro_batch_size=1,
                          seq_len=256)
    batches = [b for _, b in zip(range(8), loader)]
    assert any(b.pixel_values is not None for b in batches)
    path = tmp_path_factory.mktemp("batches") / "batches.pt"
    torch.save(batches, path)
    return path


@pytest.fixture(scope="module")
def batches_with_an_image_free_step(tmp_path_factory, fixed_batches):
    """fixed_batches with an image-free batch moved to third place, so step 3 of a 4-step run on one row
    per step has no image: the vision tower must get zero gradients there, not none, or one process's
    AdamW skips it (no momentum, no weight decay) while N ranks step it (they run the blank vision pass);
    that left their held-out losses 5e-5 apart at step 4 (caption)."""
    batches = torch.load(fixed_batches, weights_only=False)
    text_only = next((i for i, b in enumerate(batches) if b.pixel_values is None), None)
    assert text_only is not None, "the demo corpus gave no image-free batch of 256 tokens in the first eight"
    batches.insert(2, batches.pop(text_only))
    assert batches[2].pixel_values is None and sum(b.pixel_values is not None for b in batches[:4]) >= 2
    path = tmp_path_factory.mktemp("batches_image_free_step") / "batches.pt"
    torch.save(batches, path)
    return path


def _overrides(tmp_path, name, demo_corpus, *extra):
    return TINY + [f"run_dir={tmp_path / name}", f"data.root={demo_corpus}", "data.seq_len=256", "train.steps=4",
                   "train.micro_batch_size=1", "train.warmup_steps=1", "train.lr=3e-3", "checkpoint.every=100", *extra]


def test_fsdp2_two_ranks_match_one_process_and_deepspeed(tmp_path, fixed_batches, demo_corpus):
    """1 process = the same compiled by inductor (train.compile) = FSDP2 on 2 ranks = DeepSpeed ZeRO-2 =
    ZeRO-3 on 2 ranks (the ranks' batches differ: one may hold images while the other runs the blank
    vision pass). The ZeRO-3 run stops after step 2 and resumes; its checkpoint (the same DCP layout,
    written whole) and its Hugging Face export hold the same weights. Inductor's kernels are checked in
    one process (a cold inductor compile costs ~45 s of CPU per process, and two ranks compile the same
    graphs side by side); FSDP2 with compiled blocks on 2 ranks, the graphs inductor would receive, is
    test_context_parallel_training_matches_one_process's allgather run (aot_eager). The runs of one
    process count share their processes (helpers.run_workers); the ZeRO-3 resume starts new ones."""
    accum = "train.grad_accum=2"
    one, compiled = run_workers(1, [_overrides(tmp_path, "one", demo_corpus, accum),
                                    _overrides(tmp_path, "compiled", demo_corpus, accum, "train.compile=true")],
                                fixed_batches)
    zero3 = _overrides(tmp_path, "z3", demo_corpus, "parallel.engine=deepspeed", "parallel.zero_stage=3")
    two, ds, stopped = run_workers(2, [_overrides(tmp_path, "fsdp", demo_corpus),
                                       _overrides(tmp_path, "ds", demo_corpus, "parallel.engine=deepspeed"),
                                       zero3 + ["train.stop_after=2"]], fixed_batches)
    assert [r["step"] for r in stopped] == [1, 2]
    (z3,) = run_workers(2, [zero3 + ["export.hf=true"]], fixed_batches)  # resumed in new processes
    assert len(one) == len(two) == len(ds) == len(z3) == len(compiled) == 4
    assert one[-1]["lm_loss"] < one[0]["lm_loss"] - 0.05  # it trains
    for a, b, c, z, k in zip(one, two, ds, z3, compiled):
        for key in ("lm_loss", "mtp_loss", "loss"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a[key], b[key])
            # torch.compile'd blocks (inductor's fused kernels) = eager; 6e-7 relative on 2 ranks (Intel Xeon)
            assert abs(a[key] - k[key]) <= 1e-5 * abs(a[key]), (key, a[key], k[key])
            assert abs(b[key] - c[key]) <= 1e-5 * abs(b[key]), (key, b[key], c[key])
            assert abs(b[key] - z[key]) <= 1e-5 * abs(b[key]), (key, b[key], z[key])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]
        assert abs(b["grad_norm"] - z["grad_norm"]) <= 1e-4 * b["grad_norm"]
        assert abs(a["grad_norm"] - k["grad_norm"]) <= 1e-4 * a["grad_norm"]

    from transformers import Exaone4_5_ForConditionalGeneration

    from training.export import load_for_inference

    hf = Exaone4_5_ForConditionalGeneration.from_pretrained(tmp_path / "z3" / "hf").eval()
    ids = torch.randint(100, 4000, (1, 50))
    with torch.no_grad():
        logits = hf(input_ids=ids).logits
        for run in ("z3", "fsdp"):
            assert (logits - load_for_inference(str(tmp_path / run))[0](ids).logits).abs().max() < 1e-4, run


def test_context_parallel_training_matches_one_process(tmp_path, batches_with_an_image_free_step, demo_corpus):
    """parallel.cp=2 on 2 ranks (both hold the same batch, each half of its sequence) trains like one
    process: losses, per-task losses and token counts within 1e-5, gradient norms within 1e-4; both
    CP kernels (all-gather under FSDP2 with compiled blocks, Ulysses under DeepSpeed); step 3 holds no
    image (the vision tower steps as on one process). The compiled blocks use the aot_eager backend:
    what CP changes under compile is the graph (the attention runs eagerly between compiled projections
    and MLPs), which aot_eager traces as inductor does; inductor's kernels are checked against eager in
    test_fsdp2_two_ranks_match_one_process_and_deepspeed (a cold inductor compile costs ~40 s here)."""
    evaluate = ["eval.every=2", "eval.batches=1"]  # held-out loss of whole sequences on a cp-patched model
    (one,) = run_workers(1, [_overrides(tmp_path, "one", demo_corpus, *evaluate)], batches_with_an_image_free_step)
    kernels = (("allgather", "fsdp2", True), ("ulysses", "deepspeed", False))
    runs = run_workers(2, [_overrides(tmp_path, impl, demo_corpus, "parallel.cp=2", f"parallel.cp_impl={impl}",
                                      f"parallel.engine={engine}", f"train.compile={compiled}",
                                      "train.compile_backend=aot_eager", *evaluate) for impl, engine, compiled in kernels],
                       batches_with_an_image_free_step)
    for (impl, _, _), cp in zip(kernels, runs):
        assert len(one) == len(cp) == 5  # step 0 (evaluation only), 1..4
        assert [k for k in one[2] if k.startswith("eval/")] == [k for k in cp[2] if k.startswith("eval/")] != []
        for key in (k for r in one for k in r if k.startswith("eval/")):
            a, b = [r.get(key) for r in one], [r.get(key) for r in cp]
            assert all((x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5 * x) for x, y in zip(a, b)), key
        for a, b in zip(one[1:], cp[1:]):
            assert a["tokens"] == b["tokens"]
            tasks = [k for k in a if k.startswith("loss/")]
            assert tasks and tasks == [k for k in b if k.startswith("loss/")]
            for key in ("lm_loss", "mtp_loss", "loss", *tasks):
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (impl, key, a[key], b[key])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]  # fp32 sums in another order


def test_config_errors_name_the_key(demo_corpus):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ValueError, match="train.bogus"):
        compose(TINY + ["+train.bogus=1"])
    with pytest.raises(ConfigCompositionException, match="train.bogus"):  # Hydra composes onto the typed schema
        compose(TINY + ["train.bogus=1"])
    with pytest.raises(ValueError, match="parallel.engine"):
        compose(TINY + ["parallel.engine=megatron"])
    with pytest.raises(ValueError, match="parallel.zero_stage"):
        compose(TINY + ["parallel.zero_stage=4"])
    with pytest.raises(ValueError, match="data.mixtur"):
        compose(TINY + ["+data.mixtur={a: 1}"])
    with pytest.raises(ValueError, match="train.compile_backend"):
        compose(TINY + ["train.compile_backend=cudagraphs"])
    with pytest.raises(ValueError, match="model.attn_impl"):
        compose(TINY + ["model.attn_impl=flash"])  # flash-attn runs fp16/bf16 only; the miniature is fp32
    with pytest.raises(ValueError, match="data.special_tokens"):
        compose(TINY + ["data.special_tokens.image_token_id=5"])  # the model's, not the data node's
    from training.distributed import check_layout

    with pytest.raises(ValueError, match="parallel.cp"):
        check_layout(3, 2)
    from data.mixture import build_loader

    cfg = compose(TINY + [f"data.root={demo_corpus}", "+data.mixture.nosuch_source=1.0"])
    with pytest.raises(Exception, match="nosuch_source"):
        build_loader(cfg.data, tokenizer=None, rank=0, world_size=1, seed=0, micro_batch_size=1)


def test_non_finite_steps_are_skipped_counted_then_abort(tmp_path, fixed_batches, demo_corpus):
    """In this process (a world of one): a NaN loss at one step skips that step only; NaN every
    step aborts after train.max_bad_steps with a clear error."""
    import torch.distributed as dist

    from training.trainer import setup, train

    from .helpers import ListLoader

    batches = torch.load(fixed_batches, weights_only=False)

    def poisoned(run, bad_steps):
        forward = run.module.forward

        def wrapped(*a, **k):
            out = forward(*a, **k)
            if run.step + 1 in bad_steps or "all" in bad_steps:
                out.lm_loss_sum = out.lm_loss_sum * float("nan")
            return out

        run.module.forward = wrapped
        return run

    try:
        cfg = compose(_overrides(tmp_path, "nan", demo_corpus, "train.steps=5"))
        run = poisoned(setup(cfg, lambda c, d, t: ListLoader(batches, 0, 1)), {2})
        before = {k: v.clone() for k, v in run.module.state_dict().items()}
        train(run)
        rows = metrics(tmp_path / "nan")
        assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1, 1]
        assert all(torch.isfinite(v).all() for v in run.module.state_dict().values())
        assert any(not torch.equal(before[k], v) for k, v in run.module.state_dict().items())

        cfg = compose(_overrides(tmp_path, "nan_all", demo_corpus, "train.steps=10", "train.max_bad_steps=3"))
        run = poisoned(setup(cfg, lambda c, d, t: ListLoader(batches, 0, 1)), {"all"})
        with pytest.raises(FloatingPointError, match="3 steps in a row"):
            train(run)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _zero3_dtype_worker(rank: int, port: int, out: str):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from deepspeed.accelerator import get_accelerator

    from model.vlm import Exaone45
    from training.distributed import Dist
    from training.engine import check_zero3_dtype, deepspeed_config, zero3_init
    from training.parallelize import model_config

    one = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"), dp=1, cp=1)
    seen = {}
    for fp16_supported in (False, True):  # AMD EPYC answers False, Xeons with AMX True
        get_accelerator().is_fp16_supported = lambda: fp16_supported
        for dtype in ("fp32", "bf16"):
            cfg = compose(TINY + ["parallel.engine=deepspeed", "parallel.zero_stage=3", f"train.dtype={dtype}"])
            ds_config = deepspeed_config(cfg, one)
            with zero3_init(ds_config):
                module = Exaone45(model_config(cfg))
            check_zero3_dtype(module, ds_config)
            seen[fp16_supported, dtype] = sorted({str(p.dtype) for p in module.parameters()})
    try:
        check_zero3_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16), deepspeed_config(compose(TINY), one))
        seen["raised"] = ""
    except RuntimeError as e:
        seen["raised"] = str(e)
    torch.save(seen, out)
    dist.destroy_process_group()


def test_zero3_builds_parameters_in_the_run_dtype_on_every_cpu(tmp_path):
    """zero.Init's `dtype=fp32` was ignored where DeepSpeed's accelerator has no fp16 (AMD EPYC): an
    fp32 run's ZeRO-3 parameters were bf16, its masters started bf16-rounded and its first loss was
    2.6e-5 off FSDP2's. The parameters follow train.dtype whatever the CPU answers, and a module in a
    lower precision than the run's is refused at start-up."""
    import torch.multiprocessing as mp

    from .helpers import free_port

    out = str(tmp_path / "dtypes.pt")
    mp.start_processes(_zero3_dtype_worker, args=(free_port(), out), nprocs=1, join=True, start_method="spawn")
    seen = torch.load(out)
    for fp16_supported in (False, True):
        assert seen[fp16_supported, "fp32"] == ["torch.float32"], fp16_supported
        assert seen[fp16_supported, "bf16"] == ["torch.bfloat16"], fp16_supported
    assert "torch.bfloat16" in seen["raised"] and "train.dtype" in seen["raised"]
