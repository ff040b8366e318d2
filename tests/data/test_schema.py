import json

import pytest

from data.schema import TASKS, Message, Sample, SchemaError, image, text


def _chat():
    return Sample(
        "chat-1", "chat", "chat", [],
        [Message("system", [text("Be brief.")]),
         Message("user", [image("img0.png"), text("What digit?"), image("img1.png")]),
         Message("assistant", [text("\\boxed{7}")], reasoning="It is a 7.")],
        {"answer": "7"}, {"img0.png": b"a", "img1.png": b"b"},
    )


def test_json_roundtrip_keeps_order_and_meta():
    s = _chat()
    back = Sample.loads(s.dumps(), s.images)
    assert back.to_json() == s.to_json()
    assert back.image_names() == ["img0.png", "img1.png"]
    assert back.messages[2].reasoning == "It is a 7." and back.meta == {"answer": "7"}
    doc = Sample("d-1", "interleaved", "web", [text("a "), image("img0.png"), text(" b")], None, {}, {"img0.png": b"x"})
    obj = json.loads(doc.dumps())
    assert obj["messages"] is None and [seg["type"] for seg in obj["segments"]] == ["text", "image", "text"]
    assert Sample.from_json(obj).segments[1].image == "img0.png"


def test_string_content_is_shorthand_for_one_text_segment():
    s = Sample.from_json({"id": "x", "task": "math", "source": "m",
                          "messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]})
    assert s.messages[0].content[0].text == "1+1?" and s.is_chat


@pytest.mark.parametrize("bad,match", [
    ({"id": "a.b", "task": "text", "source": "s", "segments": [{"type": "text", "text": "x"}]}, "id"),
    ({"id": "a", "task": "poetry", "source": "s", "segments": [{"type": "text", "text": "x"}]}, "task"),
    ({"id": "a", "task": "text", "source": "s", "segments": [{"type": "video"}]}, "segments"),
    ({"id": "a", "task": "text", "source": "s", "segments": []}, "neither"),
    ({"id": "a", "task": "chat", "source": "s", "messages": [{"role": "user", "content": "x", "reasoning": "r"}]}, "reasoning"),
    ({"id": "a", "task": "caption", "source": "s", "segments": [{"type": "image", "image": "../etc/passwd"}]}, "image reference"),
])
def test_schema_errors_name_the_problem(bad, match):
    with pytest.raises(SchemaError, match=match):
        Sample.from_json(bad)


def test_broken_json_is_a_schema_error():
    with pytest.raises(SchemaError, match="broken JSON"):
        Sample.loads(b'{"id": "a", ')


def test_tasks_are_the_issue_list():
    assert TASKS == ("caption", "interleaved", "ocr", "document", "grounding", "counting", "text", "math", "stem", "chat")
