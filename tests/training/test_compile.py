"""train.compile: the blocks compile a bounded number of graphs (one per block kind, dynamic after the
first change of shape), not one per batch, and compute what eager blocks do. Graph capture is
dynamo's, whatever the backend: aot_eager keeps this test at seconds on a cold machine (inductor
compiles C++ per graph, ~1 min here); inductor's numbers are checked by the 2-rank runs in
test_pretrain.py (compiled FSDP2, compiled context parallelism)."""

import copy

import torch


def test_compiled_blocks_equal_eager_and_stop_recompiling():
    import torch._dynamo.utils as dynamo_utils

    from model.config import preset
    from model.vlm import build_model
    from training.parallelize import apply_compile

    torch.manual_seed(0)
    torch._dynamo.reset()
    eager = build_model(preset("tiny"))
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager")
    graphs = []
    for length, docs in ((128, 3), (200, 2), (96, 4), (160, 5)):  # every batch packs differently
        ids = torch.randint(100, 4000, (1, length))
        cuts = sorted(torch.randperm(length - 1)[: docs - 1].add(1).tolist())
        batch = dict(input_ids=ids, labels=ids, cu_seqlens=torch.tensor([0, *cuts, length], dtype=torch.int32))
        a, b = eager(**batch), compiled(**batch)
        a.loss.backward()
        b.loss.backward()
        assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * a.loss.item()
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.grad is not None:  # measured: at most 3.5e-7 apart (Intel Xeon), gradients ~0.2
                assert (p.grad - q.grad).abs().max() <= 1e-5, name
        eager.zero_grad()
        compiled.zero_grad()
        graphs.append(dynamo_utils.counters["stats"]["unique_graphs"])
    # sliding and global layers x (the first shape, then dynamic): then no batch compiles again
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[3], graphs


def test_fsdp2_blocks_receive_the_callers_mask_spec(monkeypatch):
    """FSDP2's forward-input cast rebuilds dataclass arguments (torch.distributed.utils._apply_to_tensors):
    the blocks opt out, so every decoder layer reads the one MaskSpec (and mask cache) the model
    prepared, and the vision tower keeps its fp32 RoPE tables; bf16 parameters still compute."""
    from model.attention import MaskSpec
    from model.config import preset
    from model.vlm import build_model
    from training.distributed import init_distributed, shutdown
    from training.parallelize import apply_fsdp2

    from .helpers import free_port

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    d = init_distributed()
    try:
        model = apply_fsdp2(build_model(preset("tiny")), d, bf16=True)
        seen = []
        for layer in model.language_model.layers:
            layer.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
        model.visual.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
        ids = torch.randint(100, 4000, (1, 64))
        ids[0, 8:12] = model.cfg.image_token_id  # one 4 x 4-patch image: 4 merged tokens
        vc = model.cfg.vision_config
        pixels = torch.randn(16, vc.in_channels * vc.temporal_patch_size * vc.patch_size**2)
        out = model(ids, pixels, torch.tensor([[1, 4, 4]]), labels=ids)
        out.loss.backward()
        specs, (vision_cos,) = seen[1:], seen[:1]
        assert vision_cos.dtype == torch.float32
        assert len(specs) == len(model.language_model.layers) and all(isinstance(s, MaskSpec) for s in specs)
        assert all(s is specs[0] for s in specs)
        assert torch.isfinite(out.loss)
    finally:
        shutdown()
