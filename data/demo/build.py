"""Build the demo corpus: OUT/{train,heldout}/<source>/shard-NNNNNN.tar, OUT/tokenizer/, OUT/manifest.json.

    python -m data.demo build --out DIR [--scale 1.0] [--heldout 200] [--seed 0] [--workers 2]

Sources are generated in parallel worker processes; manifest.json is written last, so a corpus
with a manifest is complete.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from ..shards import write_shards
from .corpus import GENERATORS, _doc_chunks, default_counts, generate, manifest_json
from .tokenizer import ensure_demo_tokenizer

TRAIN_SHARDS_PER_SOURCE = 8  # >= 2 ranks x 4 workers read whole shards
HELDOUT_SHARDS_PER_SOURCE = 2


def _build_one(job: tuple) -> tuple[str, str, int, int]:
    out, source, split, count, seed, shards = job
    per_shard = max(1, math.ceil(count / shards))
    paths = write_shards(generate(source, split, count, seed), Path(out) / split / source, maxcount=per_shard)
    return source, split, count, len(paths)


def build_demo(out: str | os.PathLike, scale: float = 1.0, heldout: int = 200, seed: int = 0,
               workers: Optional[int] = None, counts: Optional[dict[str, int]] = None,
               train_shards: int = TRAIN_SHARDS_PER_SOURCE, heldout_shards: int = HELDOUT_SHARDS_PER_SOURCE) -> dict:
    """Write the corpus under `out` (replacing it); returns the manifest."""
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    counts = counts or default_counts(scale)
    held = {s: min(heldout, len(_doc_chunks("heldout"))) if s == "text" else heldout for s in GENERATORS}
    jobs = [(str(out), s, "train", counts[s], seed, train_shards) for s in GENERATORS if counts.get(s, 0) > 0]
    jobs += [(str(out), s, "heldout", held[s], seed, heldout_shards) for s in GENERATORS if held[s] > 0]
    jobs.sort(key=lambda j: -j[3])  # longest first balances the pool
    workers = workers or min(len(jobs), os.cpu_count() or 1, 4)
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_build_one, jobs, chunksize=1)
    else:
        results = [_build_one(j) for j in jobs]
    shutil.copytree(ensure_demo_tokenizer(), out / "tokenizer",
                    ignore=lambda d, names: [n for n in names if not n.endswith(".json")])
    manifest = manifest_json({s: c for s, sp, c, _ in results if sp == "train"},
                             {s: c for s, sp, c, _ in results if sp == "heldout"}, seed)
    (out / "manifest.json").write_text(manifest)
    return {"out": str(out), "results": results}


def build_small_corpus(out: str | os.PathLike, per_source: int = 48, heldout: int = 12, seed: int = 0) -> Path:
    """A corpus of the same sources in miniature (tests, CI smoke runs): 4 train shards and 2
    held-out shards per source, so 2 ranks x 2 workers read whole training shards."""
    build_demo(out, heldout=heldout, seed=seed, workers=1, counts={s: per_source for s in GENERATORS},
               train_shards=4, heldout_shards=2)
    return Path(out)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m data.demo", description="the bundled demo corpus and tokenizer")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the demo corpus (shards for train and heldout, tokenizer copy)")
    b.add_argument("--out", required=True)
    b.add_argument("--scale", type=float, default=1.0, help="multiplies the number of training samples per source")
    b.add_argument("--heldout", type=int, default=200, help="held-out samples per source")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--workers", type=int, default=None)
    t = sub.add_parser("tokenizer", help="retrain the demo tokenizer")
    t.add_argument("--out", default=None, help="default: data/demo (the bundled copy)")
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        from .tokenizer import HERE, train_demo_tokenizer

        print(f"wrote {train_demo_tokenizer(args.out or HERE)}")
        return 0
    start = time.time()
    result = build_demo(args.out, args.scale, args.heldout, args.seed, args.workers)
    total = sum(r[2] for r in result["results"])
    print(f"built {total} samples in {sum(r[3] for r in result['results'])} shards at {args.out} in {time.time() - start:.1f}s")
    return 0
