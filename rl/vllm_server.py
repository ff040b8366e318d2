"""The vLLM rollout server: one process that runs INSIDE the vLLM venv (`bash scripts/setup.sh vllm`,
default `.venv-vllm`) and serves token-level generation and in-place weight updates to
`rl.vllm_engine.VLLMEngine` over HTTP/JSON on 127.0.0.1.

It imports only vllm and the standard library (vllm brings torch): never the project's packages.
vLLM pins transformers < 5.20 and the project needs >= 5.23, so the two cannot share an interpreter;
the server runs as a file (`python rl/vllm_server.py ...`), not as `rl.vllm_server`.

Endpoints (request and response bodies are JSON):
    GET  /health          {"status": "ok", "architecture", "dtype", "max_model_len", "weight_version"}
    POST /generate        {"prompts": [[ids]], "n", "temperature", "top_p", "top_k", "presence_penalty",
                           "max_new_tokens", "stop_token_ids", "seed", "images"?}
                          -> {"outputs": [[{"tokens", "logprobs", "finished", "weight_versions"}]]}
    POST /update_weights  {"path": directory of *.safetensors (checkpoint names)} -> {"load_s", "weight_version"}
    POST /shutdown

Sampling is set up to equal `model.generate.generate`: `logprobs_mode="processed_logprobs"` returns
log_softmax of the logits after the presence penalty, temperature, top-k and top-p (the distribution
sampled from); `ignore_eos` and `generation_config="vllm"` make the caller's stop ids the only stop
condition (the config's eos id would stop too otherwise), and vLLM keeps a stop *token* in the output
ids (only stop strings are stripped, and there are none: no tokenizer is loaded). Prompt i of a
request samples with seed `seed + i * n`, and vLLM gives completion j of it `seed + i * n + j`, so
every completion of a request has its own seed and a request replays exactly.

Weight updates use vLLM's in-place reload (`reload_weights` on every worker through
`collective_rpc`, which re-runs the layer-wise weight post-processing): generation is paused until
in-flight requests finish, the KV and prefix caches are cleared, the new checkpoint is loaded, the
prefix cache is reset again and the weight version (vLLM labels every sampled token with it) moves
on before generation resumes. Requests that arrive meanwhile wait and run on the new weights.

The server ends when the process that started it dies (it polls its parent pid), on SIGTERM, on
/shutdown, and after any failure that could leave the engine in an unknown state (a failed weight
load), so a client sees a dead server rather than stale or half-loaded weights.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VLM_ARCH = "Exaone4_5_ForConditionalGeneration"


def log(msg: str) -> None:
    print(f"[vllm_server {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Server:
    """The engine, the event loop it runs on (its own thread), and the weight-update state."""

    def __init__(self, args):
        self.args = args
        self.loop = asyncio.new_event_loop()
        self.engine = None
        self.architecture = None
        self.weight_version = 0
        self.update_lock: asyncio.Lock | None = None
        self.stopping = threading.Event()

    # ----------------------------------------------------------------- start-up

    def check_model(self) -> None:
        config_path = os.path.join(self.args.model, "config.json")
        if not os.path.isfile(config_path):
            raise SystemExit(f"FATAL: {config_path} does not exist: not a model directory")
        with open(config_path) as f:
            config = json.load(f)
        self.architecture = (config.get("architectures") or ["?"])[0]
        if self.architecture == VLM_ARCH:
            try:
                importlib.import_module("vllm.model_executor.models.exaone4_5")
            except ImportError as e:
                raise SystemExit(
                    f"FATAL: vLLM's {VLM_ARCH} cannot be imported in this venv ({type(e).__name__}: {e}). "
                    "It needs torchvision, which has no CPU build for this torch: on CPU serve the text "
                    "model (rl.vllm_engine.export_text_model) instead."
                ) from e

    async def build(self):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = dict(json.loads(self.args.engine_args))
        kwargs.update(model=self.args.model, skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                      generation_config="vllm")
        if current_platform.is_cpu():
            # vLLM 0.32 rewinds a seeded request's generator when a chunked prefill discards its
            # sampled token, which CPU generators cannot do ("CPU Generator does not use offset"
            # kills the engine). Whole-prompt prefills never discard, as vLLM itself sets up for MLA
            # models on CPU (it then warns that this model "does not officially support disabling
            # chunked prefill"; tests/vllm checks the tokens and log-probs this way).
            kwargs.setdefault("enable_chunked_prefill", False)
            kwargs.setdefault("max_num_batched_tokens", max(int(kwargs.get("max_model_len") or 0), 8192))
        self.update_lock = asyncio.Lock()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        await self.engine.update_weight_version(str(self.weight_version))  # tokens carry it from now on

    # ----------------------------------------------------------------- requests

    def call(self, coro, timeout=None):
        """Run a coroutine on the engine's loop from an HTTP handler thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def health(self) -> dict:
        await asyncio.wait_for(self.engine.check_health(), 30)
        mc = self.engine.model_config
        return {"status": "ok", "architecture": self.architecture, "dtype": str(mc.dtype).replace("torch.", ""),
                "max_model_len": mc.max_model_len, "weight_version": self.weight_version, "pid": os.getpid()}

    async def generate(self, req: dict) -> dict:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n, seed = int(req["n"]), req.get("seed")
        images = req.get("images")
        # vLLM rejects n > 1 for greedy requests; greedy completions are all the same, so one is
        # decoded and repeated.
        greedy = float(req["temperature"]) == 0.0

        async def one(i: int, ids: list[int]):
            params = SamplingParams(
                n=1 if greedy else n, temperature=float(req["temperature"]), top_p=float(req["top_p"]), top_k=int(req["top_k"]),
                presence_penalty=float(req["presence_penalty"]), max_tokens=int(req["max_new_tokens"]),
                stop_token_ids=list(req["stop_token_ids"]), ignore_eos=True, logprobs=0,
                seed=None if seed is None else int(seed) + i * n, detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY)
            prompt = {"prompt_token_ids": ids}
            if images and images[i]:
                prompt["multi_modal_data"] = {"image": [_decode_image(b) for b in images[i]]}
            final = None
            async for out in self.engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                final = out
            completions = [_completion(c) for c in sorted(final.outputs, key=lambda c: c.index)]
            return completions * n if greedy else completions

        outputs = await asyncio.gather(*(one(i, list(p)) for i, p in enumerate(req["prompts"])))
        return {"outputs": outputs}

    async def update_weights(self, req: dict) -> dict:
        async with self.update_lock:
            engine = self.engine
            await engine.pause_generation(mode="wait", clear_cache=True)
            start = time.perf_counter()
            await engine.collective_rpc("reload_weights", kwargs={"weights_path": req["path"], "is_checkpoint_format": True})
            if not await engine.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after the weight update")
            load_s = time.perf_counter() - start
            self.weight_version += 1
            await engine.update_weight_version(str(self.weight_version))
            await engine.resume_generation()
            return {"load_s": load_s, "weight_version": self.weight_version}

    # ----------------------------------------------------------------- shutdown

    def shutdown(self, reason: str) -> None:
        """Stop the engine (its EngineCore process with it) and exit; safe to call from any thread."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        log(f"shutting down: {reason}")
        try:
            if self.engine is not None:
                self.engine.shutdown(timeout=10)
        finally:
            # Leader of its own process group (the client starts it in a new session): take down
            # anything the engine left behind, then this process (its own SIGTERM handler returns
            # at once: `stopping` is set).
            if os.getpgid(0) == os.getpid():
                os.killpg(os.getpid(), signal.SIGTERM)
            os._exit(0)

    def watch_parent(self) -> None:
        while not self.stopping.is_set():
            if os.getppid() != self.args.parent_pid:
                self.shutdown(f"parent process {self.args.parent_pid} is gone")
            time.sleep(1.0)


def _completion(c) -> dict:
    tokens = list(c.token_ids)
    logprobs = [float(c.logprobs[i][t].logprob) for i, t in enumerate(tokens)]
    versions = [span.version for span in (c.weight_versions or [])]
    return {"tokens": tokens, "logprobs": logprobs, "finished": c.finish_reason == "stop", "weight_versions": versions}


def _decode_image(b64_png: str):
    from vllm.multimodal.utils import fetch_image

    return fetch_image(f"data:image/png;base64,{b64_png}")


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # one line per request would flood the log
            pass

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path != "/health":
                return self.reply(404, {"error": f"no such endpoint {self.path}"})
            try:
                self.reply(200, server.call(server.health(), timeout=60))
            except Exception as e:  # an unhealthy engine is reported, not raised
                self.reply(500, {"status": "error", "error": f"{type(e).__name__}: {e}"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/shutdown":
                self.reply(200, {"status": "stopping"})
                threading.Thread(target=server.shutdown, args=("/shutdown",), daemon=True).start()
                return
            handlers = {"/generate": server.generate, "/update_weights": server.update_weights}
            if self.path not in handlers:
                return self.reply(404, {"error": f"no such endpoint {self.path}"})
            try:
                self.reply(200, server.call(handlers[self.path](body)))
            except Exception as e:
                log(f"{self.path} failed:\n{traceback.format_exc()}")
                self.reply(500, {"error": f"{type(e).__name__}: {e}"})
                if self.path == "/update_weights" or server.engine.errored:
                    # Half-loaded weights or a dead engine: never serve from it again.
                    threading.Thread(target=server.shutdown, args=(f"{self.path} failed",), daemon=True).start()

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--engine-args", required=True, help="JSON of vllm AsyncEngineArgs keyword arguments")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--port-file", required=True, help="written (atomically) with the port once the engine is ready")
    p.add_argument("--parent-pid", type=int, required=True)
    args = p.parse_args()

    server = Server(args)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, args=("SIGTERM",)).start())
    threading.Thread(target=server.watch_parent, daemon=True).start()
    server.check_model()
    log(f"starting vLLM for {args.model} ({server.architecture})")
    server.loop.run_until_complete(server.build())

    # The socket is bound only once the engine (and the processes it starts) is up, so no engine
    # process inherits it and a port that answers is a ready engine.
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(server))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    tmp = f"{args.port_file}.tmp"
    with open(tmp, "w") as f:
        json.dump({"port": port, "pid": os.getpid()}, f)
    os.replace(tmp, args.port_file)
    log(f"ready on 127.0.0.1:{port} (pid {os.getpid()}, the leader of its process group)")
    server.loop.run_forever()


if __name__ == "__main__":  # vLLM starts its engine process with spawn, which re-imports this file
    main()
