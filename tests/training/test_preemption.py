"""Resume and preemption of a 2-rank pretraining run: a stopped run resumes bitwise (stopped under
`accelerate launch`, resumed under torchrun), a killed rank fails the job fast and the rerun loses
nothing, two "nodes" equal one, and SIGTERM as schedulers deliver it checkpoints every rank and
resumes exactly. (Split from test_pretrain.py so that the two pytest workers share the suite's
longest tests.)"""

import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from .helpers import TINY, launch, metrics


# 16 steps: a signal or kill sent once the first steps are logged must reach a job with most of its
# steps still to run (with 8 steps a fast machine once finished the whole job first).
STEPS = 16


def _preemptible(tmp, demo_corpus):
    return TINY + [f"data.root={demo_corpus}", "data.seq_len=256", f"train.steps={STEPS}", "train.micro_batch_size=1",
                   "checkpoint.every=4", "checkpoint.keep=5", "train.warmup_steps=2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, demo_corpus):
    """An uninterrupted 2-rank run of STEPS steps, the reference of the resume tests."""
    run_dir = tmp_path_factory.mktemp("straight")
    launch("pretrain.py", _preemptible(run_dir, demo_corpus) + [f"run_dir={run_dir}"], nproc=2)
    return metrics(run_dir)


def test_resume_is_bitwise_and_export_loads_in_transformers(tmp_path, demo_corpus, straight_run):
    """Stopped after step 4 under `accelerate launch` and resumed under torchrun, the run is the straight
    torchrun run bitwise: accelerate starts the same 2-rank FSDP2 run, step for step (a launcher only
    starts processes: the engine is parallel.engine's)."""
    common = _preemptible(tmp_path, demo_corpus) + [f"run_dir={tmp_path / 'resumed'}"]
    launch("pretrain.py", common + ["train.stop_after=4"], nproc=2, launcher="accelerate")
    assert [r["step"] for r in metrics(tmp_path / "resumed")] == [1, 2, 3, 4]
    assert OmegaConf.load(tmp_path / "resumed" / "config.yaml").parallel.engine == "fsdp2"
    launch("pretrain.py", common + ["export.hf=true"], nproc=2)
    resumed = metrics(tmp_path / "resumed")
    assert [r["loss"] for r in straight_run] == [r["loss"] for r in resumed]  # bitwise
    assert [r["tokens"] for r in straight_run] == [r["tokens"] for r in resumed]
    assert len(straight_run) == STEPS

    from transformers import Exaone4_5_ForConditionalGeneration

    from model.hf import load_pretrained

    hf = Exaone4_5_ForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "hf").eval()
    ours = load_pretrained(tmp_path / "resumed" / "hf").eval()
    ids = torch.randint(100, 4000, (1, 50))
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids).logits).abs().max() < 1e-4

    # launch/chat.py answers the same from the run directory and from its Hugging Face export
    from data.mixture import to_data_config
    from data.text import load_tokenizer
    from launch.chat import parse, reply
    from training.export import load_for_inference

    args = parse([f"ckpt={tmp_path / 'resumed'}", "max_new_tokens=12", "thinking=false"])
    data_cfg, tok = to_data_config({}), load_tokenizer(None)
    from_run, run_cfg = load_for_inference(str(tmp_path / "resumed"))
    assert run_cfg.model.name == "tiny"
    answers = [reply(m, tok, data_cfg, "How many circles are there?", None, args) for m in (from_run, ours)]
    assert answers[0] == answers[1] and answers[0].startswith("") and len(answers[0]) > 0


def test_killed_rank_fails_fast_and_rerun_loses_nothing(tmp_path, demo_corpus, straight_run):
    import psutil

    common = _preemptible(tmp_path, demo_corpus) + [f"run_dir={tmp_path / 'killed'}"]
    proc = launch("pretrain.py", common, nproc=2, popen=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "killed" / "checkpoints" / "step_4").is_dir():
        time.sleep(0.2)
    assert (tmp_path / "killed" / "checkpoints" / "step_4").is_dir()
    workers = psutil.Process(proc.pid).children()
    workers[-1].send_signal(signal.SIGKILL)
    t0 = time.time()
    proc.wait(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60  # torchrun fails fast
    launch("pretrain.py", common, nproc=2)
    assert [r["loss"] for r in straight_run] == [r["loss"] for r in metrics(tmp_path / "killed")]


def test_two_nodes_match_one_node(tmp_path, demo_corpus, straight_run):
    """Two torchrun agents as two "nodes" on this machine (c10d rendezvous on localhost) give the
    same run as one node with two processes."""
    import subprocess
    import sys

    from .helpers import ENV, ROOT, free_port

    port = free_port()
    common = _preemptible(tmp_path, demo_corpus) + [f"run_dir={tmp_path / 'nodes'}"]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--node_rank", str(i), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                                "--rdzv_id", "twonodes", str(ROOT / "launch" / "pretrain.py"), *common],
                               env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
              for i in range(2)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    assert [r["loss"] for r in straight_run] == [r["loss"] for r in metrics(tmp_path / "nodes")]


def _preempted_run(run_dir, overrides, stop):
    """A 2-rank torchrun job in its own process group; once it has logged 2 steps, `stop(job)` sends
    SIGTERM as a scheduler would. Returns the job's exit code (torchrun's own may be non-zero when it
    was signalled too) once every process has exited."""
    import subprocess
    import sys

    from .helpers import ENV, ROOT, free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "launch" / "pretrain.py"), *overrides]
    job = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2):
        time.sleep(0.05)
    t0 = time.time()
    stop(job)
    _, err = job.communicate(timeout=120)
    assert time.time() - t0 < 30, err[-3000:]  # within a scheduler's grace period (SLURM's KillWait, k8s' 30 s)
    return job.returncode, err


def test_sigterm_to_the_job_or_to_one_rank_checkpoints_every_rank_and_resumes_exactly(tmp_path, demo_corpus,
                                                                                       straight_run):
    """SIGTERM as SLURM's scancel delivers it (every process of the job: torchrun, both ranks and their
    data-loader workers), and SIGTERM to one rank's main process only: every rank stops after the
    same step with a checkpoint of it, within the grace period, and the rerun of the same command
    continues exactly where the straight run went (data workers on here: they leave the signal to
    their rank; one worker per rank reads what the rank itself would)."""
    import os

    import psutil

    def whole_job(job):
        os.killpg(job.pid, signal.SIGTERM)

    def one_rank(job):
        ranks = [p for p in psutil.Process(job.pid).children() if "pretrain.py" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        ranks[1].send_signal(signal.SIGTERM)

    for name, stop in (("job", whole_job), ("rank", one_rank)):
        run_dir = tmp_path / name
        common = _preemptible(tmp_path, demo_corpus) + ["data.num_workers=1", f"run_dir={run_dir}"]
        code, err = _preempted_run(run_dir, common, stop)
        last = metrics(run_dir)[-1]["step"]
        saved = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
        # stopped early, that step saved
        assert 2 <= last < STEPS and saved[-1] == last, (name, code, saved, last, err[-3000:])
        assert not list((run_dir / "checkpoints").glob("*.tmp"))
        assert all((run_dir / "checkpoints" / f"step_{last}" / f"rank_{r}.pt").exists() for r in (0, 1))
        launch("pretrain.py", common, nproc=2)
        assert [r["loss"] for r in metrics(run_dir)] == [r["loss"] for r in straight_run], name  # bitwise


def test_a_sigterm_handled_during_the_stop_vote_is_not_lost(monkeypatch):
    """SIGTERM handled while the rank waits inside the stop vote's all-reduce (where a rank spends
    much of its time) must count at the next vote; it was once overwritten by the verdict computed
    before it, and the job trained to its end (seen in the one-rank SIGTERM drill)."""
    from types import SimpleNamespace

    import training.trainer as trainer

    run = SimpleNamespace(d=SimpleNamespace(world=2, device="cpu"), preempted=False, sigterm=False)

    def vote(values, device):  # the other rank votes no; the signal arrives during the collective
        run.sigterm = True
        return [max(values)]

    monkeypatch.setattr(trainer, "all_reduce_max", vote)
    assert trainer._stop_requested(run) is False  # this vote began before the signal
    assert trainer._stop_requested(run) is True  # the next one carries it
