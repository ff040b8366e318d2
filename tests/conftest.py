"""Shared fixtures of the data path (kept to data only): a miniature demo corpus and its tokenizer."""

import pytest


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
