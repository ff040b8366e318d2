"""SFT: the curriculum under DeepSpeed's launcher raises held-out exact match over a briefly pretrained
tiny model (initialized from its Hugging Face export); FSDP2 stopped under torchrun resumes
mid-curriculum in the right stage under `accelerate launch`; the plan (mixtures, steps, LRs) and the chat forms and masks the data feeds it."""

import json

import pytest
from omegaconf import OmegaConf

from data.schema import Message, Sample, image, text
from data.text import IGNORE, render_chat, tokenize_sample

from .helpers import TINY, compose, launch, metrics

SFT_STAGES = ("sft.stages=[{name: general, mixture: {chat: 0.6, math: 0.2, counting: 0.1, caption: 0.1}, steps: 60},"
              "{name: reasoning, mixture: {chat: 0.5, math: 0.5}, steps: 40, lr_scale: 0.5}]")


@pytest.fixture(scope="module")
def sft_corpus(tmp_path_factory):
    """The demo sources, heavy on the chats the SFT run reads, with enough held-out digit chats (about
    a third of the chat source) and math problems to measure exact match on."""
    from data.demo.build import build_demo
    from data.demo.corpus import GENERATORS

    counts = {s: 48 for s in GENERATORS}
    counts.update(chat=2400, math=1200, counting=400, caption=600)
    root = tmp_path_factory.mktemp("sft_corpus")
    build_demo(root, heldout=150, workers=1, counts=counts, train_shards=2, heldout_shards=1)
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, sft_corpus):
    """A tiny model pretrained briefly through the launcher, exported to Hugging Face format."""
    run_dir = tmp_path_factory.mktemp("pretrained")
    launch("pretrain.py", TINY + [f"run_dir={run_dir}", f"data.root={sft_corpus}", "data.seq_len=256",
                                  "train.micro_batch_size=8", "train.steps=20", "train.lr=3e-3", "train.warmup_steps=3",
                                  "checkpoint.every=1000", "export.hf=true"], nproc=0)
    return run_dir


def test_deepspeed_sft_curriculum_raises_heldout_exact_match(tmp_path, sft_corpus, pretrained):
    """`deepspeed --num_gpus 2 launch/sft.py +recipe=sft ...` from the Hugging Face export of the
    pretrained model: a two-stage curriculum (its 60 + 40 steps scaled to train.steps=60)."""
    run_dir = tmp_path / "sft"
    launch("sft.py", TINY + ["+recipe=sft", "parallel.engine=deepspeed", f"run_dir={run_dir}", f"data.root={sft_corpus}",
                       f"init_from={pretrained / 'hf'}",
                       "data.seq_len=256", "train.micro_batch_size=4", "train.steps=60", "train.lr=3e-3",
                       "checkpoint.every=1000", SFT_STAGES, "sft.generation_eval.tasks=[math,digits,counting]",
                       "sft.generation_eval.limit_per_task=64", "sft.generation_eval.max_new_tokens=40", "eval.batches=2"],
           nproc=2, timeout=600, launcher="deepspeed")
    stage_cfg = OmegaConf.load(run_dir / "stages" / "1-general" / "config.yaml")
    assert stage_cfg.parallel.engine == "deepspeed" and stage_cfg.parallel.zero_stage == 2 and stage_cfg.model.name == "tiny"
    assert (run_dir / "stages" / "1-general" / "checkpoints" / "step_36").is_dir()  # the stage boundary
    final_ckpt = run_dir / "stages" / "2-reasoning" / "checkpoints" / "step_24"
    assert (final_ckpt / "ds").is_dir() and (run_dir / "checkpoints" / "step_60").resolve() == final_ckpt.resolve()
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(61))
    assert {r["stage"] for r in rows[1:37]} == {"general"} and {r["stage"] for r in rows[37:]} == {"reasoning"}
    peak = {stage: max(r["lr"] for r in rows if r["stage"] == stage and "lr" in r) for stage in ("general", "reasoning")}
    assert peak == {"general": pytest.approx(3e-3), "reasoning": pytest.approx(1.5e-3)}

    evals = json.loads((run_dir / "generation_eval.json").read_text())
    init, final = evals["init"], evals["reasoning"]
    curve = {k: [round(evals[s][k], 3) if k in evals[s] else None for s in ("init", "general", "reasoning")]
             for k in init if k.startswith(("gen/", "eval/loss"))}
    print("held-out eval, init -> end of each stage:", curve)
    assert final["eval/loss"] < init["eval/loss"] - 1.0
    tasks = ("math", "digits", "counting")
    assert all(init[f"gen/{t}/count"] == final[f"gen/{t}/count"] >= 40 for t in tasks)
    pooled = {name: sum(e[f"gen/{t}"] * e[f"gen/{t}/count"] for t in tasks) / sum(e[f"gen/{t}/count"] for t in tasks)
              for name, e in (("init", init), ("final", final))}
    assert pooled["final"] >= pooled["init"] + 0.04, pooled  # boxed-answer exact match over math, digits, counting
    assert final["gen/math"] >= init["gen/math"] and final["gen/digits"] >= init["gen/digits"]


def test_fsdp2_curriculum_resumes_in_the_right_stage_under_another_launcher(tmp_path, demo_corpus):
    """The same script under torchrun trains with FSDP2 and evaluates generation on the sharded model;
    stopped inside stage 2 and run again under `accelerate launch`, it resumes stage 2 from its
    checkpoint (a launcher only starts processes: the engine stays FSDP2) and exports the final model;
    `init_from=<run_dir>` of a finished curriculum is its last checkpoint."""
    from training.checkpoint import resolve_init_from

    run_dir = tmp_path / "sft"
    common = TINY + ["+recipe=sft", f"run_dir={run_dir}", f"data.root={demo_corpus}", "data.seq_len=128",
                     "train.micro_batch_size=1", "train.steps=4", "eval.batches=1", "checkpoint.every=1000",
                     "sft.generation_eval.limit_per_task=4", "sft.generation_eval.max_new_tokens=8",
                     "sft.stages=[{name: one, mixture: sft, steps: 20}, {name: two, mixture: {math: 1.0}, steps: 20}]"]
    launch("sft.py", common + ["train.stop_after=3"], nproc=2)
    assert [r["stage"] for r in metrics(run_dir)] == ["one", "one", "one", "two"]
    assert not (run_dir / "checkpoints").exists()  # not finished: no final checkpoint link yet
    launch("sft.py", common + ["export.hf=true"], nproc=2, launcher="accelerate")
    assert OmegaConf.load(run_dir / "stages" / "1-one" / "config.yaml").parallel.engine == "fsdp2"
    assert OmegaConf.load(run_dir / "stages" / "2-two" / "config.yaml").parallel.engine == "fsdp2"  # accelerate's
    rows = metrics(run_dir)
    assert [(r["step"], r["stage"], r["stage_step"]) for r in rows] == [
        (0, "one", 0), (1, "one", 1), (2, "one", 2), (3, "two", 1), (4, "two", 2)]
    stage2 = [json.loads(line)["step"] for line in (run_dir / "stages" / "2-two" / "metrics.jsonl").read_text().splitlines()]
    assert stage2 == [0, 1, 2]  # resumed from its step-1 checkpoint, not restarted
    assert [k for k in rows[4] if k.startswith("loss/")] == ["loss/math"]  # stage two's mixture
    assert rows[4]["gen/digits/count"] > 0 and rows[0]["gen/math/count"] > 0
    assert sorted(json.loads((run_dir / "generation_eval.json").read_text())) == ["init", "one", "two"]
    assert resolve_init_from(str(run_dir)) == ("ckpt", run_dir / "checkpoints" / "step_4")
    assert (run_dir / "hf" / "config.json").exists()


def test_plan_scales_steps_resolves_mixtures_and_names_bad_keys(demo_corpus):
    from training.sft import plan, stage_config

    cfg = compose(TINY + ["+recipe=sft", f"data.root={demo_corpus}", "train.steps=20"], "sft")
    stages = plan(cfg)
    assert [(s.name, s.steps) for s in stages] == [("general", 12), ("reasoning", 8)]
    second = stage_config(cfg, stages, 2, "out/sft/stages/1-general")
    assert second.train.lr == pytest.approx(cfg.train.lr * 0.5) and second.train.steps == 8
    assert second.init_from == "out/sft/stages/1-general" and second.data["mixture"]["math"] == 0.4
    assert second.run_dir.endswith("stages/2-reasoning") and second.train.seed == cfg.train.seed + 1
    named = plan(compose(TINY + [f"data.root={demo_corpus}", "+data.stages.only_math={math: 1.0}",
                                 "sft.stages=[{name: m, mixture: only_math, steps: 200}]"], "sft"))
    assert named[0].mixture == {"math": 1.0} and named[0].steps == 200
    for override, message in [
        ("sft.stages=[{name: a, mixture: nosuch, steps: 2}]", "sft.stages\\[0\\].mixture"),
        ("sft.stages=[{name: a, mixture: {math: 1}, steps: 2, lr: 1}]", "unknown keys \\['lr'\\]"),
        ("sft.stages=[{name: a, mixture: {math: 1}, steps: 2, train: {steps: 3}}]", "cannot set \\['steps'\\]"),
        ("sft.stages=[{name: a, mixture: {math: 1}, steps: 2, data: {seq_lenn: 3}}]", "seq_lenn"),
        ("+sft.nosuch=1", "sft.nosuch"),
    ]:
        with pytest.raises(ValueError, match=message):
            compose(TINY + [f"data.root={demo_corpus}", override], "sft")  # validated once, at start-up


def test_long_context_recipe_keeps_the_released_rope(monkeypatch):
    from model.config import preset
    from training.config import model_config

    monkeypatch.setenv("WORLD_SIZE", "64")  # its layout: dp 8 x cp 8
    cfg = compose(["+recipe=sft_long"], "sft")
    assert cfg.parallel.cp == 8 and cfg.train.activation_checkpointing and cfg.data.seq_len == 262144
    assert model_config(cfg).text_config.rope_parameters == preset("exaone4_5_33b").text_config.rope_parameters
    assert model_config(cfg).loss_chunk_size == 4096


def test_launcher_arguments():
    """DeepSpeed's `--local_rank` is dropped (the engine stays `parallel.engine`'s); the scale overlay
    goes after the recipe whatever the order typed, then the recipe's miniature values."""
    from launch.common import launcher_args

    assert launcher_args(["--local_rank=1", "train.steps=3"]) == ["train.steps=3"]
    assert launcher_args(["--local_rank", "0", "parallel.engine=fsdp2"]) == ["parallel.engine=fsdp2"]
    assert launcher_args(["+scale=mini", "+recipe=sft", "x=1"]) == ["+recipe=sft", "x=1", "+scale=mini", "+scale_recipe=mini_sft"]
    mini = compose(["+scale=mini", "+recipe=stage2"])
    assert mini == compose(["+recipe=stage2", "+scale=mini"])
    assert (mini.model.name, mini.train.dtype, mini.train.steps, mini.data.name) == ("tiny", "fp32", 150, "demo")
    assert compose(["+recipe=stage2", "+scale=mini", "train.steps=7"]).train.steps == 7  # the command line wins


# ----------------------------------------------------------------------------- what SFT reads


def _png():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (0, 0, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_multi_turn_chat_masks_token_by_token(demo_tokenizer):
    """Loss on every assistant turn (earlier ones without a think block) through its end-of-turn token;
    none on the system prompt, user turns, the image, the role headers or the newline after a turn."""
    tok = demo_tokenizer
    sample = Sample("c", "chat", "chat", [], [
        Message("system", [text("Be brief.")]),
        Message("user", [text("What is 2 + 2?")]),
        Message("assistant", [text("\\boxed{4}")], reasoning="ignored: not the last turn"),
        Message("user", [image("img0.png"), text("And this digit?")]),
        Message("assistant", [text("\\boxed{7}")], reasoning="It looks like a 7."),
    ], {}, {"img0.png": _png()})
    ids, labels, _ = tokenize_sample(sample, tok)
    spans, current = [], []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        assert lab in (IGNORE, t)
        if lab != IGNORE:
            current.append(t)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == ["\\boxed{4}[|endofturn|]", "It looks like a 7.\n</think>\n\n\\boxed{7}[|endofturn|]"]
    assert tok.decode(ids).replace("<|image_pad|>" * ids.count(67), "<|image_pad|>") == render_chat(sample.messages)


def test_reasoning_and_non_reasoning_samples_mix_in_the_sft_stream(demo_corpus, demo_tokenizer):
    """Each chat renders its own form: reasoning in the think block, or the empty block; the SFT
    mixture carries both; data.enable_thinking=false renders every sample in the empty form."""
    from data.mixture import build_sample_stream

    cfg = compose(TINY + [f"data.root={demo_corpus}", "stage=sft"], "sft")
    forms = {True: 0, False: 0}
    for _, sample in zip(range(60), build_sample_stream(cfg.data, tokenizer=demo_tokenizer)):
        last = sample.messages[-1]
        rendered = render_chat(sample.messages)
        if last.reasoning:
            assert f"[|assistant|]\n<think>\n{last.reasoning}\n</think>\n\n" in rendered
            assert "<think>\n\n</think>" in render_chat(sample.messages, enable_thinking=False)
        else:
            assert rendered.count("<think>\n\n</think>\n\n") == 1
        forms[bool(last.reasoning)] += 1
    assert forms[True] >= 10 and forms[False] >= 10
