"""Shared fixtures of the data path (kept to data only): a miniature demo corpus and its tokenizer;
and the order in which the files run."""

import pytest

# The longest files first (CPU seconds of each file's processes on the 2 cores of an AMD EPYC with AVX-512,
# 2026-12-04, inductor's cache emptied first; 1,006 s in all): scripts/test.sh runs the suite on 2 pytest
# workers, a file at a time each (--dist loadfile), and a long file started last would leave one worker
# running it alone at the end. Only the order changes; every file still runs.
LONGEST_FIRST = ("training/test_preemption.py",  # ~185 s
                 "training/test_pretrain.py",  # ~160 s (~110 s with inductor's cache warm)
                 "rl/test_grpo_learning.py",  # ~140 s
                 "training/test_sft.py",  # ~115 s
                 "rl/test_grpo_loop.py",  # ~95 s
                 "training/test_curriculum.py",  # ~73 s
                 "model/test_fp8_training.py",  # ~71 s
                 "data/test_loader.py")  # ~47 s


def pytest_collection_modifyitems(config, items):
    def rank(item):
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith("tests/" + name)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: within a file, and among the other files, the order stays


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Root of a miniature demo corpus (48 training and 12 held-out samples per source, all ten
    sources), built once per session; pass it as `data.root`."""
    from data.demo.build import build_small_corpus

    return build_small_corpus(tmp_path_factory.mktemp("demo_corpus"))


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The bundled demo tokenizer (4,096 tokens, EXAONE special ids)."""
    from data.text import load_tokenizer

    return load_tokenizer(None)
