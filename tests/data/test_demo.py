import json
import re
from collections import Counter

from data.demo.corpus import SOURCES
from data.shards import decode_sample, iter_tar, list_shards, main


def _samples(root, split, source):
    return [decode_sample(r) for p in list_shards(root / split / source) for r in iter_tar(p)]


def test_demo_corpus_layout_and_verify(demo_corpus, capsys):
    manifest = json.loads((demo_corpus / "manifest.json").read_text())
    assert set(manifest["train"]) == set(SOURCES) and all(n == 48 for n in manifest["train"].values())
    for source, task in SOURCES.items():
        assert len(list_shards(demo_corpus / "train" / source)) == 4
        assert {s.task for s in _samples(demo_corpus, "train", source)} == {task}
    assert main(["verify", str(demo_corpus)]) == 0
    assert "0 problems" in capsys.readouterr().out
    assert (demo_corpus / "tokenizer" / "tokenizer_config.json").exists()


def test_demo_ground_truth_is_right(demo_corpus):
    for s in _samples(demo_corpus, "train", "math") + _samples(demo_corpus, "heldout", "math"):
        q = s.meta["question"]
        nums = [int(n) for n in re.findall(r"\d+", q)]
        if "*" in q:
            expected = nums[0] * nums[1]
        elif "-" in q or "gives away" in q or "left" in q:
            expected = nums[0] - nums[1]
        else:
            expected = nums[0] + nums[1]
        assert s.meta["answer"] == str(expected)
        assert f"\\boxed{{{expected}}}" in s.messages[-1].content[0].text
    counting = _samples(demo_corpus, "train", "counting")
    counts = Counter(s.meta["answer"] for s in counting)
    assert set(counts) == {str(k) for k in range(1, 10)} and max(counts.values()) - min(counts.values()) <= 1
    for s in _samples(demo_corpus, "train", "grounding"):
        (box,) = s.meta["boxes"]
        assert 0 <= box[0] < box[2] <= 1000 and 0 <= box[1] < box[3] <= 1000
        assert s.messages[-1].content[0].text == f"[{box[0]}, {box[1]}, {box[2]}, {box[3]}]"
        im = s.load_image("img0.png").convert("RGB")
        x1, y1, x2, y2 = (round(v * 112 / 1000) for v in box)
        assert im.getpixel(((x1 + x2) // 2, (y1 + y2) // 2 + 2)) != (255, 255, 255)  # the shape is inside its box
    for s in _samples(demo_corpus, "train", "ocr"):
        assert s.messages[-1].content[0].text == s.meta["text"] and 3 <= len(s.meta["text"]) <= 5
    reasoning = [m.reasoning is not None for s in _samples(demo_corpus, "train", "math") for m in s.messages if m.role == "assistant"]
    assert 0.25 < sum(reasoning) / len(reasoning) < 0.75  # both reasoning and non-reasoning forms


def test_heldout_problems_never_occur_in_training(demo_corpus):
    for source in ("math", "stem"):
        train = {s.meta["question"] for s in _samples(demo_corpus, "train", source)}
        held = {s.meta["question"] for s in _samples(demo_corpus, "heldout", source)}
        assert held and not train & held
    train_text = {s.segments[0].text for s in _samples(demo_corpus, "train", "text")}
    assert not train_text & {s.segments[0].text for s in _samples(demo_corpus, "heldout", "text")}


def test_demo_build_command(tmp_path, capsys):
    from data.demo.build import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["build", "--out", str(out), "--scale", "0.001", "--heldout", "2", "--workers", "1"]) == 0
    assert "built" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["train"]) == set(manifest["heldout"]) == set(SOURCES)
    assert main(["verify", str(out)]) == 0
