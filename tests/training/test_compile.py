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
