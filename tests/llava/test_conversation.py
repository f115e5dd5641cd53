"""The `llada` chat template rendered as text (spec 1.5)."""
from llava.conversation import build_prompt, conv_templates, default_conversation

SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)
SYS_BLOCK = f"<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
OPEN_ASSISTANT = "<|start_header_id|>assistant<|end_header_id|>\n\n"


def test_inference_prompt_exact():
    assert build_prompt("What is shown?") == (
        SYS_BLOCK
        + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
        + OPEN_ASSISTANT
    )


def test_text_only_prompt_and_trimmed_content():
    assert build_prompt("  hi there \n", with_image=False) == (
        SYS_BLOCK + "<|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>" + OPEN_ASSISTANT
    )


def test_multi_turn_bos_once_and_always_ends_with_open_assistant_header():
    conv = conv_templates["llada"].copy()
    conv.append_message("user", "<image>\nWhat animal?")
    conv.append_message("assistant", " A cat. ")
    conv.append_message("user", "Its colour?")
    conv.append_message("assistant", None)
    prompt = conv.get_prompt()
    assert prompt == (
        SYS_BLOCK
        + "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat animal?<|eot_id|>"
        + "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        + "<|start_header_id|>user<|end_header_id|>\n\nIts colour?<|eot_id|>"
        + OPEN_ASSISTANT
    )
    assert prompt.count("<|startoftext|>") == 1
    # a finished exchange still gets the trailing assistant header (the template always adds it)
    done = conv_templates["llada"].copy()
    done.append_message("user", "hi")
    done.append_message("assistant", "hello")
    assert done.get_prompt().endswith("hello<|eot_id|>" + OPEN_ASSISTANT)


def test_template_metadata_and_copy_independence():
    conv = conv_templates["llada"]
    assert conv is default_conversation
    assert conv.roles == ("user", "assistant") and conv.stop_str == "<|eot_id|>" and conv.system == SYSTEM
    copy = conv.copy()
    copy.append_message("user", "x")
    assert conv.messages == [] and copy.messages == [("user", "x")]
    assert conv.get_prompt() == SYS_BLOCK + OPEN_ASSISTANT
