"""The bundled demo corpus (data/demo/corpus.py), its builder (build.py) and tokenizer (tokenizer.py)."""
