"""vLLM as the GRPO rollout engine: the client, used from the project's environment.

vLLM cannot live in the project's environment (it pins transformers < 5.20, the project needs
>= 5.23), so it runs in its own venv (`bash scripts/setup.sh vllm`, default `.venv-vllm`) as a
separate server process, `rl/vllm_server.py`, and this module talks to it over HTTP on 127.0.0.1.

    export_text_model(model.state_dict(), model.cfg, "/tmp/policy")        # Exaone4ForCausalLM dir
    engine = VLLMEngine.start("/tmp/policy", max_model_len=4096, kv_cache_gib=4)
    outs = engine.generate([prompt_ids, ...], n=8, temperature=1.0, max_new_tokens=1024,
                           stop_token_ids=[end_of_turn], seed=step)
    tokens, logprobs, finished = outs[0][0]   # prompt 0, completion 0
    ...optimizer step...
    engine.update_weights(model.state_dict())  # the next generate samples from the new policy
    engine.stop()

Layout: one server per node, started by local rank 0 (`VLLMEngine.start(..., port=P)`); the other
local ranks attach with `VLLMEngine.connect(P)` after a barrier (or broadcast `engine.port` when
started with `port=None`) and send their own prompts, which the server batches together (continuous
batching over all ranks' requests). Only local rank 0 calls `update_weights`, after the optimizer
step and before a barrier that precedes the next rollout. On CPU the server shares the cores with
training (verified here, with a second process attached by `connect`). On GPU two placements are possible
and neither is verified (no GPU was available): colocated on the training GPUs (start with a small
`gpu_memory_utilization`, e.g. 0.3, and `tensor_parallel_size` in `engine_args`), or on GPUs set
aside for it (`CUDA_VISIBLE_DEVICES` in `env`). Multi-node: one server per node, each updated by its
own local rank 0.

Weight sync: the new weights are written as safetensors (checkpoint names, engine dtype) to a fresh
directory in /dev/shm and the server reloads them in place with vLLM's `reload_weights` (see
rl/vllm_server.py), resetting its prefix cache. vLLM 0.32 also ships a weight-transfer API
(`init_weight_transfer_engine` / `start_weight_update` / `update_weights` / `finish_weight_update`),
but its backends move CUDA tensors (nccl, sparse_nccl, nccl_m2n over NCCL; ipc over CUDA IPC) or
pull from a Ray trainer actor over NIXL (sharded_rdt), and each needs its trainer half from
`vllm.distributed.weight_transfer` in the training process, which cannot import vllm: it serves
neither CPU nor this two-environment layout. `reload_weights` is what those backends run inside
the workers too (layer-wise reload), fed from a file instead of a collective.

Everything the server does for the text model `Exaone4ForCausalLM` is verified on CPU by tests/vllm.
The VLM class (`Exaone4_5_ForConditionalGeneration`, images), MTP speculative decoding and GPUs are
not: see `VLLMEngine.start` and `VLLMEngine.generate`.
"""

from __future__ import annotations

import atexit
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from model.config import SLIDING, ModelConfig, TextConfig
from model.hf import hf_key

ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = Path(__file__).with_name("vllm_server.py")
DEFAULT_VENV = ROOT / ".venv-vllm"
TEXT_ARCH = "Exaone4ForCausalLM"
VLM_ARCH = "Exaone4_5_ForConditionalGeneration"
SETUP_HINT = "bash scripts/setup.sh vllm"

Weights = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
Completion = tuple[list[int], list[float], bool]


class EngineError(RuntimeError):
    """The vLLM server failed, died, hung past a timeout, or could not start."""


def default_python() -> Path:
    """The venv interpreter: $EXAONE_VLLM_PYTHON, else .venv-vllm/bin/python in the repo."""
    return Path(os.environ.get("EXAONE_VLLM_PYTHON", DEFAULT_VENV / "bin" / "python"))


# ----------------------------------------------------------------------------- export


def text_hf_config(tc: TextConfig, dtype: torch.dtype) -> dict:
    """transformers' Exaone4Config (as vLLM 0.32's venv, transformers 5.19, reads it) of our decoder.

    `layer_types` is written per trunk layer (the MTP entries are ours); `rope_parameters` is already
    in transformers 5's form (rope_type, rope_theta, llama3 factors). `head_dim` is not an Exaone4Config
    field: vLLM reads it when present and otherwise uses hidden_size / heads, so it is written.
    """
    layer_types = list(tc.layer_types[: tc.num_hidden_layers])
    if tc.sliding_window is not None and SLIDING not in layer_types:
        # Our decoder then uses no positional encoding anywhere, vLLM (and transformers) RoPE everywhere.
        raise ValueError("text_config has a sliding_window but no sliding layer: vLLM would apply RoPE on every layer")
    return {
        "architectures": [TEXT_ARCH],
        "model_type": "exaone4",
        "vocab_size": tc.vocab_size,
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_attention_heads": tc.num_attention_heads,
        "num_key_value_heads": tc.num_key_value_heads,
        "head_dim": tc.head_dim,
        "hidden_act": tc.hidden_act,
        "max_position_embeddings": tc.max_position_embeddings,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_parameters": dict(tc.rope_parameters),
        "sliding_window": tc.sliding_window,
        "sliding_window_pattern": None if tc.sliding_window is None else 4,
        "layer_types": layer_types,
        "bos_token_id": tc.bos_token_id,
        "eos_token_id": tc.eos_token_id,
        "pad_token_id": tc.pad_token_id,
        "initializer_range": tc.initializer_range,
        "tie_word_embeddings": False,
        "dtype": str(dtype).replace("torch.", ""),
    }


def text_weights(weights: Weights, dtype: Optional[torch.dtype] = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Our (name, tensor) pairs as Exaone4ForCausalLM's checkpoint names: `language_model.*` ->
    `model.*`, `lm_head.weight` as is; the vision tower and MTP are dropped (the text model has
    neither). Tensors come out detached, contiguous, on CPU, in `dtype` if given."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    for name, tensor in items:
        if name.startswith("language_model."):
            name = "model." + name[len("language_model.") :]
        elif name != "lm_head.weight":
            continue
        yield name, _host(tensor, dtype)


def vlm_weights(weights: Weights, dtype: Optional[torch.dtype] = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Our names as the EXAONE 4.5 checkpoint's (`model.hf.hf_key`), MTP included. Unverified with
    vLLM: the VLM class cannot run on CPU."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    for name, tensor in items:
        yield hf_key(name), _host(tensor, dtype)


def _host(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    t = t.detach()
    return t.to(device="cpu", dtype=dtype or t.dtype).contiguous()


def export_text_model(state_dict: Mapping[str, torch.Tensor], model_cfg: ModelConfig, out_dir,
                      dtype: Optional[torch.dtype] = None) -> Path:
    """Write a Hugging Face `Exaone4ForCausalLM` directory (config.json + model.safetensors) of our
    model's language model and LM head, the part of EXAONE 4.5 that vLLM can serve on CPU.

    `state_dict` is our full state dict (`language_model.*`, `lm_head.weight`, `visual.*`, `mtp.*`);
    `dtype` defaults to that of the embedding. No tokenizer is written: the engine takes token ids.
    """
    tensors = dict(text_weights(state_dict, dtype))
    needed = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    if not needed <= set(tensors):
        raise ValueError(f"state dict lacks {sorted(needed - set(tensors))}: pass the full model's state_dict()")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = text_hf_config(model_cfg.text_config, tensors["model.embed_tokens.weight"].dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _write_shards(items: Iterable[tuple[str, torch.Tensor]], out: Path, shard_bytes: int) -> int:
    """Write (name, tensor) pairs as safetensors shards of about `shard_bytes`, so an iterable of
    gathered tensors never needs the whole model in one extra copy. Returns the bytes written."""
    shard, size, total, index = {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            save_file(shard, out / f"weights-{index:05d}.safetensors", metadata={"format": "pt"})
            shard, size, index = {}, 0, index + 1

    for name, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    return total


# ----------------------------------------------------------------------------- client


@dataclass
class SyncStats:
    """One `update_weights`: bytes moved, seconds writing them, seconds the server took to load them."""

    bytes: int
    write_s: float
    load_s: float
    total_s: float


class VLLMEngine:
    """Client of one rollout server. Every call has a timeout; a dead, failed or hung server raises
    `EngineError` (with the server's log tail when this client started it), never hangs."""

    def __init__(self, port: int, *, proc: Optional[subprocess.Popen] = None, log_path: Optional[Path] = None,
                 request_timeout_s: float = 3600.0, health_timeout_s: float = 60.0):
        self.port, self.proc, self.log_path = port, proc, log_path
        self.request_timeout_s, self.health_timeout_s = request_timeout_s, health_timeout_s
        self.last_sync: Optional[SyncStats] = None
        info = self.health()
        self.architecture, self.dtype = info["architecture"], getattr(torch, info["dtype"])
        self.weight_version = info["weight_version"]
        if proc is not None:
            _STARTED.add(self)

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def start(cls, model_dir, *, port: Optional[int] = None, dtype: str = "float32", seed: int = 0,
              max_model_len: int = 4096, gpu_memory_utilization: float = 0.1, kv_cache_gib: float = 1.0,
              enforce_eager: bool = True, speculative_config: Optional[dict] = None, engine_args: Optional[dict] = None,
              startup_timeout_s: float = 600.0, request_timeout_s: float = 3600.0, python=None, log_path=None,
              env: Optional[Mapping[str, str]] = None) -> "VLLMEngine":
        """Start the server from the vLLM venv on `model_dir` and wait until it serves.

        The model class is the directory's `architectures[0]`: `Exaone4ForCausalLM` (from
        `export_text_model`, verified on CPU) or `Exaone4_5_ForConditionalGeneration` (a full
        checkpoint from `model.hf.save_pretrained`, with images; unverified: no GPU here). On CPU the
        VLM class cannot import (torchvision has no CPU build for this torch) and start-up fails
        with that message. `gpu_memory_utilization` is vLLM's; on CPU it is the share of host memory
        reserved (the default 0.92 fails there). `kv_cache_gib` sizes the KV cache explicitly on CPU
        and GPU. `speculative_config` is passed to vLLM as is, e.g. `{"method": "mtp",
        "num_speculative_tokens": 1}`: EXAONE 4.5's MTP draft model (`Exaone4_5_MTP`) is derived only
        from the VLM config, so it needs the VLM class (unverified, GPU only). `engine_args` adds any
        other `vllm.AsyncEngineArgs` field (e.g. `tensor_parallel_size`). `port=None` picks a free
        port. The server's output goes to `log_path` (a temporary file by default); it lives in its own
        process group and ends with this process (atexit here, and it watches its parent's pid).
        """
        python = Path(python) if python is not None else default_python()
        if not python.exists():
            raise EngineError(f"the vLLM venv interpreter {python} does not exist: create it with `{SETUP_HINT}`")
        model_dir = Path(model_dir).resolve()
        if (speculative_config or {}).get("method") == "mtp" and _architecture(model_dir) != VLM_ARCH:
            raise EngineError(
                f"MTP speculative decoding needs the EXAONE 4.5 checkpoint ({VLM_ARCH}, `model.hf.save_pretrained`): "
                f"vLLM derives its MTP draft model (Exaone4_5_MTP) from that config only, and rejects 'mtp' for "
                f"{_architecture(model_dir)} ('Unsupported speculative method'). On CPU that class cannot run, "
                "so there is no MTP on CPU.")
        args = dict(dtype=dtype, seed=seed, max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                    kv_cache_memory_bytes=int(kv_cache_gib * 2**30), enforce_eager=enforce_eager)
        if speculative_config is not None:
            args["speculative_config"] = speculative_config
        args.update(engine_args or {})
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm_server_", suffix=".log")
            os.close(fd)
        log_path = Path(log_path)
        port_file = Path(tempfile.mkdtemp(prefix="vllm_port_")) / "port.json"
        cmd = [str(python), str(SERVER_SCRIPT), "--model", str(model_dir), "--engine-args", json.dumps(args),
               "--port", str(port or 0), "--port-file", str(port_file), "--parent-pid", str(os.getpid())]
        # The project's PYTHONPATH must not leak into the venv; spawn keeps engine processes from
        # inheriting the server's threads and sockets.
        server_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        server_env.update(VLLM_WORKER_MULTIPROC_METHOD="spawn", **(env or {}))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=server_env, start_new_session=True)
        deadline = time.monotonic() + startup_timeout_s
        try:
            while not port_file.exists():
                if proc.poll() is not None:
                    raise EngineError(f"the vLLM server exited with code {proc.returncode} while starting"
                                      f"{_log_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise EngineError(f"the vLLM server did not come up within {startup_timeout_s:.0f} s"
                                      f"{_log_tail(log_path)}")
                time.sleep(0.2)
            served = json.loads(port_file.read_text())["port"]
            return cls(served, proc=proc, log_path=log_path, request_timeout_s=request_timeout_s)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            shutil.rmtree(port_file.parent, ignore_errors=True)

    @classmethod
    def connect(cls, port: int, *, request_timeout_s: float = 3600.0) -> "VLLMEngine":
        """Attach to a server another local rank started (same node); `stop` then leaves it running."""
        return cls(port, request_timeout_s=request_timeout_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the server if this client started it (its whole process group); idempotent."""
        proc, self.proc = self.proc, None
        _STARTED.discard(self)
        if proc is None or proc.poll() is not None:
            if proc is not None:
                _kill_group(proc)
            return
        try:
            self._post("/shutdown", {}, timeout=5)
        except EngineError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(proc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ requests

    def health(self) -> dict:
        """The server's state (architecture, dtype, max_model_len, weight_version); raises
        `EngineError` if it is dead, unhealthy or does not answer within `health_timeout_s`."""
        return self._request("GET", "/health", None, self.health_timeout_s)

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, presence_penalty: float = 0.0, max_new_tokens: int = 1024,
                 stop_token_ids: Sequence[int] = (), seed: Optional[int] = None,
                 images: Optional[Sequence[Sequence]] = None, timeout_s: Optional[float] = None,
                 ) -> list[list[Completion]]:
        """n completions of each prompt (token ids, chat template already rendered), as
        [prompt][completion] -> (new token ids, the stop token included when it stopped on one;
        log-probabilities of those tokens under the distribution sampled from, i.e.
        log_softmax(top-k/top-p filtered (logits - presence_penalty * seen) / temperature), as
        `model.generate.generate`; finished = stopped on a stop token, False when cut at max_new_tokens).

        temperature 0 is greedy (log-probs of the unscaled logits). With a seed the request replays
        exactly: prompt i, completion j samples with seed + i * n + j. Every completion is checked to
        come from one weight version (the one after the last `update_weights`).

        `images[i]`: PIL images of prompt i, for the VLM class only (unverified: no GPU here; vLLM's
        own image processor then expands the image placeholders, which must agree with ours).
        """
        body = {"prompts": [list(map(int, p)) for p in prompts], "n": n, "temperature": temperature, "top_p": top_p,
                "top_k": top_k, "presence_penalty": presence_penalty, "max_new_tokens": max_new_tokens,
                "stop_token_ids": list(map(int, stop_token_ids)), "seed": seed}
        if images is not None:
            body["images"] = [[_png_b64(img) for img in row] for row in images]
        outputs = self._post("/generate", body, timeout_s or self.request_timeout_s)["outputs"]
        result = []
        for row in outputs:
            for c in row:
                if len(set(c["weight_versions"])) > 1:
                    raise EngineError(f"a completion mixes weight versions {c['weight_versions']}")
                if c["weight_versions"]:
                    self.weight_version = int(c["weight_versions"][0])
            result.append([(c["tokens"], c["logprobs"], c["finished"]) for c in row])
        return result

    def update_weights(self, weights: Weights, *, sync_dir: Optional[str] = None,
                       shard_gib: float = 2.0, timeout_s: Optional[float] = None) -> float:
        """Serve `weights` (our state dict or (name, tensor) pairs of whole tensors, e.g. gathered
        one by one from FSDP/ZeRO-3 shards) from the next request on; returns the seconds it took
        (details in `last_sync`). Call it from one process per server (local rank 0), with no
        `generate` of that server in flight: requests still running finish on the old weights first.

        Tensors are cast to the engine's dtype and written as safetensors to a fresh directory in
        `sync_dir` (/dev/shm by default: memory, not disk), which the server reloads in place with
        vLLM's `reload_weights`; it resets the prefix cache, so nothing computed under the old
        weights is reused, and bumps `weight_version`. The directory is removed afterwards.
        """
        start = time.perf_counter()
        names = text_weights if self.architecture == TEXT_ARCH else vlm_weights
        root = sync_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        out = Path(tempfile.mkdtemp(prefix="exaone_vllm_sync_", dir=root))
        try:
            nbytes = _write_shards(names(weights, self.dtype), out, int(shard_gib * 2**30))
            write_s = time.perf_counter() - start
            reply = self._post("/update_weights", {"path": str(out)}, timeout_s or self.request_timeout_s)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self.weight_version = reply["weight_version"]
        total = time.perf_counter() - start
        self.last_sync = SyncStats(nbytes, write_s, reply["load_s"], total)
        return total

    # ------------------------------------------------------------------ transport

    def _post(self, path: str, body: dict, timeout: float) -> dict:
        return self._request("POST", path, body, timeout)

    def _request(self, method: str, path: str, body: Optional[dict], timeout: float) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise EngineError(f"vLLM server {path} failed ({e.code}): {detail}{self._tail()}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                what = f"did not answer {path} within {timeout:.0f} s (hung?)"
            else:
                what = f"is unreachable on port {self.port} ({type(reason).__name__}: {reason}; dead?)"
            raise EngineError(f"the vLLM server {what}{self._tail()}") from None

    def _tail(self) -> str:
        state = ""
        if self.proc is not None and self.proc.poll() is not None:
            # Its engine processes outlive a killed server: end them now, not at exit.
            _kill_group(self.proc)
            state = f"\nserver process exited with code {self.proc.returncode}"
        return state + (_log_tail(self.log_path) if self.log_path else "")


def _architecture(model_dir: Path) -> Optional[str]:
    try:
        return (json.loads((model_dir / "config.json").read_text()).get("architectures") or [None])[0]
    except (OSError, ValueError):
        return None  # the server reports a missing or broken config with its log


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


_EXCEPTION_LINE = re.compile(r"\b\w*(Error|Exception|Exit)\b: ")


def _log_tail(path: Path, lines: int = 40) -> str:
    """The log's last lines, and its first exception line: vLLM's root cause is usually raised in a
    worker process, a few tracebacks above the tail."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    first = next((line for line in text if _EXCEPTION_LINE.search(line)), None)
    head = f"\nfirst error in the log: {first}" if first and first not in text[-lines:] else ""
    return f"{head}\n--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def _group_pids(pgid: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _mapped_shm(pgid: int) -> set[str]:
    """The /dev/shm files the processes of a group have mapped (vLLM's message queues)."""
    files = set()
    for pid in _group_pids(pgid):
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for fields in map(str.split, lines):  # address perms offset dev inode [path]
            if len(fields) >= 6 and fields[5].startswith("/dev/shm/"):
                files.add(fields[5])
    return files


def _kill_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGKILL the server's process group (it is the leader: start_new_session), wait until it is
    empty (vLLM's engine processes do not exit when the server is killed), then remove the shared
    memory they had mapped: killed, they leave vLLM's /dev/shm message queues (160-250 MB each)
    behind, which only a clean shutdown unlinks."""
    shm = _mapped_shm(proc.pid)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            break
        proc.poll()  # reap the leader, or the group never empties
        time.sleep(0.05)
    for path in shm:
        try:
            os.unlink(path)
        except OSError:
            pass


# Strong references: an engine dropped without stop() is still stopped at exit.
_STARTED: "set[VLLMEngine]" = set()


@atexit.register
def _stop_all() -> None:
    for engine in list(_STARTED):
        engine.stop(timeout_s=5)
