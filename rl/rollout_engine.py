"""Where GRPO samples its rollouts: our KV-cache decoder (`rl.rollout_engine=native`) or one vLLM
server per node (`rl.rollout_engine=vllm`, rl/vllm_engine.py). Both give the loop the same thing:
token ids in (prompts rendered with our chat template), the completions' token ids, the log-probs
they were sampled with and finished flags out, in prompt order, n completions per prompt.

    rollouts = build_rollouts(run, rl)             # vllm: the server is up and serves the current policy
    try:
        with rollouts.session() as generate:       # native: the policy gathered whole once (collective)
            tokens, logprobs, finished = generate(prompts, sampling, n=G, generator=g)
        ...optimizer step...
        rollouts.sync(run)                         # collective: the next rollout samples the new weights
    finally:
        rollouts.close()

vLLM layout: local rank 0 of every node gathers the policy (`Engine.full_state_dict` to every node's
local rank 0; FSDP2 and ZeRO-3 gather tensor by tensor, a collective of every rank), exports it
and starts the server; the node's other ranks connect once it is up (its port reaches them in an
all-gather, which is also how a failed start reaches every rank). Every rank sends its own prompts
and the server batches them all (`rl.generation_batch_size` sequences at once per engine). After
every optimizer step `sync` gathers the new weights and local rank 0 pushes them
(`VLLMEngine.update_weights`: safetensors on /dev/shm, vLLM's in-place reload, prefix cache reset);
an all-gather of the outcome follows, the barrier before the next rollout, so that every rank
raises the same EngineError when a server died or hung, inside the step and before its
checkpoint: the newest checkpoint stays the last complete one (training/checkpoint.py writes them
atomically). A server that fails during a rollout raises on the ranks that asked it; the launcher
(torchrun) then ends the others, and a server whose parent is gone stops itself.

Model class: text-only data runs vLLM's `Exaone4ForCausalLM`, EXAONE 4.5's language model
(`export_text_model`; verified on CPU, tests/vllm). Prompts with images (and MTP speculative
decoding) need `Exaone4_5_ForConditionalGeneration`, the whole checkpoint with the images passed as
vLLM multimodal data: GPU vLLM only, and unverified (no GPU vLLM here). On CPU a mixture whose
shards hold any image fails at start-up (`check_rollout_engine`, before the model loads). The two
classes share everything else (start, sampling, seeds, sync).

Sampling maps one to one (temperature, top_p, top_k, presence_penalty, max_new_tokens, stop at the
end-of-turn token, n = group size). vLLM's seed s of a request is drawn from the rank's rollout
generator (seeded by train.seed and the rank, saved with checkpoints) and completion j of prompt i
samples with s + i*n + j, so a resumed run sends the same seeds; vLLM batches the ranks' requests
together, so where float sums differ with the batch a sample may still differ.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from data.mixture import ensure_demo_corpus, source_shards, to_data_config
from data.shards import first_image_member
from training.decoding import Sampling, cut_at_vision_token, decoding, sample, vision_token_ids


def build_rollouts(run, rl):
    """The rollout engine of `rl.rollout_engine` (a collective: call it on every rank)."""
    return VLLMRollouts(run, rl) if rl.rollout_engine == "vllm" else NativeRollouts(run, rl)


class NativeRollouts:
    """Our decoder (model/generate.py) on the policy gathered whole on every rank for each session."""

    def __init__(self, run, rl):
        self.run, self.rl = run, rl
        special = run.loader.cfg.special_tokens
        self.stop_id, self.pad_id = special.end_of_turn_token_id, special.pad_token_id

    @contextmanager
    def session(self):
        with decoding(self.run.engine) as model:

            def generate(prompts, sampling: Sampling, n: int = 1, generator: Optional[torch.Generator] = None):
                return sample(model, [p for p in prompts for _ in range(n)], sampling, stop_id=self.stop_id,
                              pad_id=self.pad_id, generator=generator, batch_size=self.rl.generation_batch_size)

            yield generate

    def sync(self, run) -> dict:
        return {"sync_s": 0.0, "sync_gb": 0.0}

    def close(self) -> None:
        pass


def check_rollout_engine(cfg) -> bool:
    """Whether vLLM rollouts need the VLM class (any shard of the mixture's sources, the held-out ones
    too when evaluating, holds an image; or MTP speculative decoding is on). On CPU, where vLLM
    serves the text model only, that is a config error naming `rl.rollout_engine`. Reads only tar
    headers; launch/grpo.py calls it before the model loads, `VLLMRollouts` again."""
    rl = cfg.rl
    if rl.rollout_engine != "vllm":
        return False
    data = to_data_config(cfg.data)
    ensure_demo_corpus(data)
    found = None
    for split in ["train"] + (["heldout"] if rl.eval_prompts_per_source > 0 else []):
        for source, shards in source_shards(data, split).items():
            member = first_image_member(shards)
            if member is not None:
                found = (source, member)
                break
        if found:
            break
    needs_vlm = found is not None or rl.vllm.speculative_mtp > 0
    if needs_vlm and not torch.cuda.is_available():
        why = (f"data source {found[0]!r} holds images ({found[1]})" if found
               else f"rl.vllm.speculative_mtp={rl.vllm.speculative_mtp} needs it")
        raise ValueError(
            f"config error at `rl.rollout_engine`: vllm on CPU serves the text model only (Exaone4ForCausalLM), but "
            f"{why}. Prompts with images and MTP speculative decoding need vLLM's Exaone4_5_ForConditionalGeneration, "
            "which runs on GPU vLLM only (unverified). Use a text-only mixture, rl.rollout_engine=native, or a GPU machine.")
    return needs_vlm


class VLLMRollouts:
    """One vLLM server per node, started by its local rank 0, shared by the node's ranks (see the
    module docstring)."""

    def __init__(self, run, rl):
        from rl.vllm_engine import EngineError, VLLMEngine

        self.run, self.rl, d = run, rl, run.d
        self.vlm = check_rollout_engine(run.cfg)
        special = run.loader.cfg.special_tokens
        self.stop_id = special.end_of_turn_token_id
        self.vision_ids = vision_token_ids(run.module.cfg)
        self.patch_size = run.loader.cfg.patch.patch_size
        self.dtype = torch.bfloat16 if run.cfg.train.dtype == "bf16" else torch.float32
        self.engine = None
        host = socket.gethostname()
        places = _all_gather((host, d.local_rank))
        self.leaders = tuple(r for r, (_, local) in enumerate(places) if local == 0)
        state = run.engine.full_state_dict(self.leaders)  # every rank takes part
        port, error = None, None
        if d.local_rank == 0:
            try:
                self.engine = self._start(state)
                port = self.engine.port
            except (EngineError, OSError, ValueError) as e:
                error = f"{type(e).__name__}: {e}"
        del state
        ports = _all_gather(port)
        self._agree(error, "did not start")
        if d.local_rank != 0:
            leader = next(r for r, (h, local) in enumerate(places) if h == host and local == 0)
            try:
                self.engine = VLLMEngine.connect(ports[leader], request_timeout_s=rl.vllm.request_timeout_s)
            except EngineError as e:
                error = str(e)
        self._agree(error, "could not be reached from another rank of its node")

    def _start(self, state: dict):
        from rl.vllm_engine import VLLMEngine, export_text_model

        v, cfg, mcfg = self.rl.vllm, self.run.cfg, self.run.module.cfg
        out = Path(tempfile.mkdtemp(prefix="exaone_vllm_policy_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        try:
            if self.vlm:
                export_vlm_model(state, mcfg, out, self.dtype)
            else:
                export_text_model(state, mcfg, out, self.dtype)
            engine_args = {"tensor_parallel_size": v.tensor_parallel_size, "max_num_seqs": self.rl.generation_batch_size}
            if v.kv_cache_gib is None:
                engine_args["kv_cache_memory_bytes"] = None  # vLLM sizes it from gpu_memory_utilization
            return VLLMEngine.start(
                out, port=v.port, dtype=str(self.dtype).replace("torch.", ""), seed=cfg.train.seed,
                max_model_len=v.max_model_len or self.rl.max_prompt_tokens + self.rl.max_new_tokens,
                gpu_memory_utilization=v.gpu_memory_utilization, kv_cache_gib=v.kv_cache_gib or 1.0,
                speculative_config={"method": "mtp", "num_speculative_tokens": v.speculative_mtp} if v.speculative_mtp else None,
                engine_args=engine_args, startup_timeout_s=v.startup_timeout_s, request_timeout_s=v.request_timeout_s,
                python=v.python, log_path=Path(cfg.run_dir) / f"vllm_server.rank{self.run.d.rank}.log")
        finally:
            shutil.rmtree(out, ignore_errors=True)  # the server has loaded it; syncs bring their own files

    def _agree(self, error: Optional[str], what: str) -> None:
        """Every rank raises the same EngineError if any rank's server failed (a collective)."""
        from rl.vllm_engine import EngineError

        errors = [(r, e) for r, e in enumerate(_all_gather(error)) if e]
        if errors:
            self.close()
            rank, message = errors[0]
            raise EngineError(f"the vLLM rollout server of rank {rank} {what}: {message}")

    @contextmanager
    def session(self):
        yield self._generate

    def _generate(self, prompts, sampling: Sampling, n: int = 1, generator: Optional[torch.Generator] = None):
        seed = None
        if sampling.temperature > 0 and generator is not None:
            seed = int(torch.randint(0, 2**31, (1,), generator=generator, device=generator.device))
        outs = self.engine.generate(
            [p.input_ids for p in prompts], n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k, presence_penalty=sampling.presence_penalty, max_new_tokens=sampling.max_new_tokens,
            stop_token_ids=[self.stop_id], seed=seed, images=[prompt_images(p, self.patch_size) for p in prompts] if self.vlm else None)
        tokens, logprobs, finished = [], [], []
        for row in outs:
            for toks, lps, done in row:
                toks, lps, done = cut_at_vision_token(toks, lps, done, self.vision_ids)
                tokens.append(toks)
                logprobs.append(lps)
                finished.append(done)
        return tokens, logprobs, finished

    def sync(self, run) -> dict:
        """Serve the policy's current weights (a collective): seconds it took (gathering included) and
        GB written by this rank (the node's local rank 0 writes them)."""
        from rl.vllm_engine import EngineError

        start = time.perf_counter()
        state = run.engine.full_state_dict(self.leaders)
        error, nbytes = None, 0
        if run.d.local_rank == 0:
            try:
                self.engine.update_weights(state)
                nbytes = self.engine.last_sync.bytes
            except EngineError as e:
                error = str(e)
        del state
        self._agree(error, "could not serve the new weights")
        return {"sync_s": time.perf_counter() - start, "sync_gb": nbytes / 1e9}

    def close(self) -> None:
        """Stop the server this rank started (idempotent; connected ranks only let go)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop()


def export_vlm_model(state: dict, model_cfg, out: Path, dtype: torch.dtype) -> Path:
    """The whole EXAONE 4.5 checkpoint (`Exaone4_5_ForConditionalGeneration`, MTP included) for the
    VLM class, in shards of ~5 GiB. Unverified with vLLM (GPU only); vLLM's image processor may also
    need the released checkpoint's processor files (preprocessor_config.json) beside it."""
    from model.hf import config_to_hf
    from rl.vllm_engine import _write_shards, vlm_weights

    out.mkdir(parents=True, exist_ok=True)
    _write_shards(vlm_weights(state, dtype), out, 5 * 2**30)
    config = config_to_hf(model_cfg)
    config["dtype"] = str(dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def prompt_images(prompt, patch_size: int) -> list:
    """A prompt's images in prompt order, resized to the size our image processor chose (its grid
    times the patch size), so that vLLM's processor, which keeps a size already on its grid, gives
    the same number of image tokens as the prompt holds. Unverified (GPU vLLM only)."""
    from PIL import Image

    names = [s.image for m in prompt.messages for s in m.content if s.type == "image"]
    grids = [] if prompt.image_grid_thw is None else prompt.image_grid_thw.tolist()
    images = []
    for name, (_, h, w) in zip(names, grids):
        image = prompt.sample.load_image(name).convert("RGB")
        images.append(image.resize((w * patch_size, h * patch_size), resample=Image.BICUBIC))
    return images


def _all_gather(value) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
