import io

import numpy as np
import pytest
from PIL import Image

from data.images import ImageSettings
from data.schema import Message, Sample, image, text
from data.text import IGNORE, load_tokenizer, render_chat, render_grpo_prompt, tokenize_sample

SETTINGS = ImageSettings(min_pixels=784, max_pixels=12544)


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 3 + 4?"},
    {"role": "assistant", "content": "\\boxed{7}", "reasoning": "3 + 4 = 7."},
]


def test_demo_tokenizer_vocab_and_special_ids(demo_tokenizer):
    tok = demo_tokenizer
    assert len(tok) == 4096
    ids = tok.convert_tokens_to_ids(["[PAD]", "[BOS]", "[|endofturn|]", "<|image_pad|>", "<|video_pad|>", "<vision>", "</vision>"])
    assert ids == [0, 1, 53, 67, 68, 73, 74]
    assert tok.eos_token_id == 53 and tok.pad_token_id == 0
    for t in ["[|system|]", "[|user|]", "[|assistant|]", "<think>", "</think>"]:
        assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert tok.convert_ids_to_tokens(tok.encode("1234", add_special_tokens=False)) == ["1", "2", "3", "4"]


def test_chat_template_text():
    assert render_chat(MESSAGES) == (
        "[|system|]\nBe brief.[|endofturn|]\n[|user|]\nWhat is 3 + 4?[|endofturn|]\n"
        "[|assistant|]\n<think>\n3 + 4 = 7.\n</think>\n\n\\boxed{7}[|endofturn|]\n"
    )
    no_think = render_chat(MESSAGES, enable_thinking=False)
    assert no_think.endswith("[|assistant|]\n<think>\n\n</think>\n\n\\boxed{7}[|endofturn|]\n")
    assert render_chat(MESSAGES[:2], add_generation_prompt=True).endswith("[|endofturn|]\n[|assistant|]\n<think>\n")
    assert render_chat(MESSAGES[:2], enable_thinking=False, add_generation_prompt=True).endswith(
        "[|assistant|]\n<think>\n\n</think>\n\n")
    # Earlier assistant turns carry no think block (EXAONE's template), the last one does.
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning": "r"},
           {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert render_chat(two) == ("[|user|]\na[|endofturn|]\n[|assistant|]\nb[|endofturn|]\n[|user|]\nc[|endofturn|]\n"
                                "[|assistant|]\n<think>\n\n</think>\n\nd[|endofturn|]\n")


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("generation", [True, False])
def test_bundled_jinja_template_equals_render_chat(demo_tokenizer, thinking, generation):
    msgs = MESSAGES + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    msgs = msgs if generation else msgs + [{"role": "assistant", "content": "x"}]
    expected = render_chat(msgs, enable_thinking=thinking, add_generation_prompt=generation)
    got = demo_tokenizer.apply_chat_template(msgs, tokenize=False, enable_thinking=thinking, add_generation_prompt=generation)
    assert got == expected


def test_chat_loss_mask_covers_assistant_turns_only(demo_tokenizer):
    tok = demo_tokenizer
    sample = Sample("c", "chat", "chat", [], [
        Message("system", [text("Be brief.")]),
        Message("user", [image("img0.png"), text("How many?")]),
        Message("assistant", [text("\\boxed{3}")], reasoning="I count 3."),
    ], {"answer": "3"}, {"img0.png": _png(112, 56)})
    ids, labels, images = tokenize_sample(sample, tok, SETTINGS)
    assert len(ids) == len(labels)
    assert [im.grid_thw for im in images] == [(1, 4, 8)]
    n_image = (4 * 8) // 4
    assert ids.count(67) == n_image
    start = ids.index(73)
    assert ids[start:start + n_image + 2] == [73] + [67] * n_image + [74]
    assert all(labels[i] == IGNORE for i in range(start, start + n_image + 2))
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert [lab for lab in labels if lab != IGNORE] == supervised  # unshifted: label == token
    assert tok.decode(supervised) == "I count 3.\n</think>\n\n\\boxed{3}[|endofturn|]"
    assert tok.decode(ids) == render_chat(sample.messages).replace("<|image_pad|>", "<|image_pad|>" * n_image)


def test_document_labels_all_text_and_eos(demo_tokenizer):
    sample = Sample("d", "caption", "caption", [image("img0.png"), text(" A red square.")], None, {},
                    {"img0.png": _png(56, 56)})
    ids, labels, images = tokenize_sample(sample, demo_tokenizer, SETTINGS)
    assert ids[:6] == [73, 67, 67, 67, 67, 74] and labels[:6] == [IGNORE] * 6
    assert ids[-1] == 53 and labels[-1] == 53
    assert labels[6:] == ids[6:]
    assert images[0].pixel_values.shape == (16, 1176)


@pytest.mark.parametrize("reasoning", ["Five.", None])
def test_grpo_prompt_is_the_training_prefix(demo_tokenizer, reasoning):
    """The generation prompt of each mode tokenizes exactly like the training sequence up to the
    first supervised token, so a model is trained on what it will be asked to continue."""
    sample = Sample("c", "counting", "counting", [], [
        Message("user", [image("img0.png"), text("How many dots?")]),
        Message("assistant", [text("\\boxed{5}")], reasoning=reasoning),
    ], {"answer": "5"}, {"img0.png": _png(112, 112)})
    prompt = render_grpo_prompt(sample, demo_tokenizer, SETTINGS, enable_thinking=reasoning is not None)
    head = "[|user|]\n<vision><|image_pad|></vision>How many dots?[|endofturn|]\n[|assistant|]\n<think>\n"
    assert prompt.text == (head if reasoning else head + "\n</think>\n\n")
    full = tokenize_sample(sample, demo_tokenizer, SETTINGS)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids
    assert set(full.labels[:n]) == {IGNORE} and full.labels[n] != IGNORE
    answer = demo_tokenizer.decode([t for t, lab in zip(full.input_ids, full.labels) if lab != IGNORE])
    assert answer == ("Five.\n</think>\n\n" if reasoning else "") + "\\boxed{5}[|endofturn|]"
    assert tuple(prompt.pixel_values.shape) == (64, 1176) and prompt.image_grid_thw.tolist() == [[1, 8, 8]]
    assert np.array_equal(prompt.pixel_values.numpy(), full.images[0].pixel_values)
    assert [m.role for m in prompt.messages] == ["user"]


def test_load_tokenizer_from_a_directory(tmp_path, demo_tokenizer):
    demo_tokenizer.save_pretrained(str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("[|user|]\nhi", add_special_tokens=False) == demo_tokenizer.encode("[|user|]\nhi", add_special_tokens=False)
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer(str(tmp_path / "missing"))
