import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from data.shards import ShardStream, decode_sample, iter_tar, list_shards, main, verify, write_shards

from .helpers import caption, make_bad_shards, png, qa


def test_write_and_read_back(tmp_path):
    samples = [caption(i) for i in range(7)] + [qa(i) for i in range(3)]
    paths = write_shards(samples, tmp_path, maxcount=4)
    assert [os.path.basename(p) for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    raws = [r for p in list_shards(tmp_path) for r in iter_tar(p)]
    assert [r.index for r in raws] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    back = [decode_sample(r) for r in raws]
    assert [s.to_json() for s in back] == [s.to_json() for s in samples]
    assert back[0].images == samples[0].images
    assert [r.key for r in iter_tar(paths[1], start=2)] == [samples[6].id, samples[7].id]


def _drain(stream):
    out = []
    while (raw := stream.next()) is not None:
        out.append(raw.key)
    return out


@pytest.mark.parametrize("num_shards", [8, 2])  # whole shards per slot; fewer shards than slots (strided)
def test_shard_stream_partitions_an_epoch_exactly(tmp_path, num_shards):
    samples = [qa(i) for i in range(40)]
    shards = write_shards(samples, tmp_path, maxcount=40 // num_shards)
    seen = []
    for slot in range(4):
        seen += _drain(ShardStream("qa", shards, slot, 4, (0, 1), block_size=3, epochs=1))
    assert sorted(seen) == sorted(s.id for s in samples)
    two = _drain(ShardStream("qa", shards, 0, 1, (0, 1), block_size=7, epochs=2))
    assert len(two) == 80 and Counter(two) == Counter({s.id: 2 for s in samples})
    assert two[:40] != two[40:]  # reshuffled per epoch


def test_shard_stream_resumes_mid_block(tmp_path):
    shards = write_shards([qa(i) for i in range(30)], tmp_path, maxcount=7)
    reference = _drain(ShardStream("qa", shards, 1, 2, (3, 4), block_size=4, epochs=3))
    for cut in [0, 1, 5, 8, 22, len(reference) - 1]:
        stream = ShardStream("qa", shards, 1, 2, (3, 4), block_size=4, epochs=3)
        head = [stream.next().key for _ in range(cut)]
        state = json.loads(json.dumps(stream.state()))
        rest = _drain(ShardStream("qa", shards, 1, 2, (3, 4), block_size=4, epochs=3, state=state))
        assert head + rest == reference


def test_cli_build_from_jsonl_inspect_and_verify(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png())
    rows = [
        {"id": "s1", "task": "caption", "source": "web", "segments": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "a square"}]},
        {"id": "s2", "task": "math", "source": "gen", "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "\\boxed{2}"}], "meta": {"answer": "2"}},
        {"id": "s3", "task": "chat", "source": "gen", "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "colour?"}]}, {"role": "assistant", "content": "green"}]},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    assert main(["build", "--jsonl", str(tmp_path / "in.jsonl"), "--images", str(tmp_path / "imgs"), "--out", str(out), "--maxcount", "2"]) == 0
    assert len(list_shards(out)) == 2
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["samples"] == 3 and report["totals"]["images"] == 2
    assert report["tasks"] == {"caption": 1, "chat": 1, "math": 1} and report["sources"] == {"gen": 2, "web": 1}
    assert main(["verify", str(out)]) == 0
    chat = decode_sample([r for p in list_shards(out) for r in iter_tar(p)][2])
    assert chat.messages[0].content[0].image == "img0.png" and chat.images["img0.png"] == png()


def test_cli_build_from_a_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    img = Image.new("RGB", (40, 30), (1, 2, 3))
    ds = datasets.Dataset.from_dict({
        "image": [img, img],
        "messages": [[{"role": "user", "content": "<image>How big?"}, {"role": "assistant", "content": "small"}]] * 2,
        "answer": ["small", "small"],
    }, features=datasets.Features({
        "image": datasets.Image(),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "answer": datasets.Value("string"),
    }))
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    datasets.Dataset.from_dict({"text": ["plain one", "plain two", "three"]}).to_json(str(tmp_path / "t.jsonl"))
    for src, n in [(tmp_path / "saved", 2), (tmp_path / "data.parquet", 2), (tmp_path / "t.jsonl", 3)]:
        out = tmp_path / f"out_{src.name}"
        assert main(["build", "--hf", str(src), "--out", str(out), "--source", "hf"]) == 0
        samples = [decode_sample(r) for p in list_shards(out) for r in iter_tar(p)]
        assert len(samples) == n
        if n == 2:
            s = samples[0]
            assert s.task == "chat" and s.meta["answer"] == "small"
            assert [seg.type for seg in s.messages[0].content] == ["image", "text"]
            assert s.load_image(s.messages[0].content[0].image).size == (40, 30)
        else:
            assert samples[2].task == "text" and samples[2].segments[0].text == "three"


def test_verify_lists_each_bad_member_and_fails(tmp_path):
    make_bad_shards(tmp_path)
    problems = verify(str(tmp_path))
    found = {(os.path.basename(shard), member, reason.split(":")[0]) for shard, member, reason in problems}
    assert found == {
        ("shard-000000.tar", "bad-00100.img0.png", "bad_image"),
        ("shard-000000.tar", "bad-00101.json", "bad_json"),
        ("shard-000000.tar", "bad-00102.img1.png", "missing_image"),
        ("shard-000001.tar", "-", "truncated_shard"),
    }
    run = subprocess.run([sys.executable, "-m", "data.shards", "verify", str(tmp_path)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert run.returncode == 1
    assert "BAD" in run.stdout and "bad-00101.json" in run.stdout and "4 problems" in run.stdout
