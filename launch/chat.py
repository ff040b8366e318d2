"""Chat with a trained model: one-shot or interactive, with an optional image, reasoning on or off.

    python launch/chat.py ckpt=out/demo/grpo prompt="What is 12 + 30? Put the answer in \\boxed{}."
    python launch/chat.py ckpt=out/demo/sft/hf image=digit.png prompt="Which digit is this?" thinking=false
    python launch/chat.py ckpt=/path/to/EXAONE-4.5-33B tokenizer=/path/to/EXAONE-4.5-33B      # interactive

ckpt: a run directory (newest checkpoint), a checkpoint directory or a Hugging Face directory.
Other keys: tokenizer (default: the run's data.tokenizer, else the demo tokenizer), max_new_tokens=256,
temperature=0 (greedy; the model card recommends 1.0 with top_p=0.95 and presence_penalty=1.5), top_p,
presence_penalty, thinking=true.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `python launch/...`


def parse(argv: list[str]) -> dict:
    args = {"max_new_tokens": "256", "temperature": "0", "top_p": "1.0", "presence_penalty": "0", "thinking": "true"}
    for a in argv:
        if "=" not in a:
            sys.exit(f"arguments are key=value; got {a!r}\n{__doc__}")
        k, v = a.split("=", 1)
        args[k] = v
    if "ckpt" not in args:
        sys.exit(__doc__)
    return args


def reply(model, tokenizer, data_cfg, text: str, image_path, args) -> str:
    import torch

    from data.schema import Message, Sample, Segment
    from data.text import render_grpo_prompt
    from model.generate import generate

    content, images = [], {}
    if image_path:
        images["img0.png"] = open(image_path, "rb").read()
        content.append(Segment("image", image="img0.png"))
    content.append(Segment("text", text=text))
    sample = Sample("chat", "chat", "chat", messages=[Message("user", content)], images=images)
    prompt = render_grpo_prompt(sample, tokenizer, data_cfg.image_settings, data_cfg.special_tokens,
                                enable_thinking=args["thinking"] == "true")
    out = generate(model, [prompt.input_ids], pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
                   max_new_tokens=int(args["max_new_tokens"]), temperature=float(args["temperature"]),
                   top_p=float(args["top_p"]), presence_penalty=float(args["presence_penalty"]),
                   stop_ids=[data_cfg.special_tokens.end_of_turn_token_id], generator=torch.Generator().manual_seed(0))
    head = "<think>\n" if args["thinking"] == "true" else ""
    return head + tokenizer.decode(out.tokens[0], skip_special_tokens=False)


def main(argv: list[str]) -> None:
    from data.mixture import to_data_config
    from data.text import load_tokenizer
    from training.export import load_for_inference

    args = parse(argv)
    model, run_cfg = load_for_inference(args["ckpt"])
    data = dict(run_cfg.data) if run_cfg is not None else {}
    data_cfg = to_data_config({k: v for k, v in data.items() if k != "stages"})
    tokenizer = load_tokenizer(args.get("tokenizer") or data_cfg.tokenizer)
    if "prompt" in args:
        print(reply(model, tokenizer, data_cfg, args["prompt"], args.get("image"), args))
        return
    print("empty line to quit; `/image PATH` attaches an image to the next message")
    image = None
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line.startswith("/image "):
            image = line.split(" ", 1)[1]
            continue
        print(reply(model, tokenizer, data_cfg, line, image, args))
        image = None


if __name__ == "__main__":
    main(sys.argv[1:])
