"""Chat rendering token-for-token against transformers' apply_chat_template, and the tool-call parser."""
import json

import pytest

from model import Tokenizer, parse_tool_calls, render_chat, render_tool_results
from rollout import assistant_text

TOOLS = [
    {"type": "function", "function": {"name": "get_table_names", "description": "List the tables.",
                                      "parameters": {"type": "object", "properties": {}, "required": []}}},
    {"type": "function", "function": {"name": "sql_query", "description": "Run a read-only SQL query.",
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                     "required": ["query"]}}},
]


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS = {
    "multi_turn_tools": [
        {"role": "system", "content": "You are a financial analyst. Use the tools."},
        {"role": "user", "content": "What was Acme's revenue growth in 2023?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_table_names")]},
        {"role": "tool", "content": "income_statement: revenue and costs\nbalance_sheet: assets"},
        {"role": "assistant", "content": "Let me query it.",
         "tool_calls": [call("sql_query", query="SELECT y2022, y2023 FROM income_statement WHERE item='revenue'")]},
        {"role": "tool", "content": "y2022 | y2023\n100.0 | 125.0"},
        {"role": "assistant", "content": "Revenue grew 25%.\nFINAL ANSWER: 25%"},
    ],
    "parallel_calls_and_results": [
        {"role": "user", "content": "Compare the tables — naïve € check."},
        {"role": "assistant", "content": "", "tool_calls": [call("sql_query", query="SELECT 1"), call("sql_query", query="SELECT 2")]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "FINAL ANSWER: 3"},
    ],
    "no_system_second_question": [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_table_names")]},
        {"role": "tool", "content": "t1"},
    ],
    "reasoning_content": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "<think>\nI should list tables.\n</think>\n\ncalling", "tool_calls": [call("get_table_names")]},
        {"role": "tool", "content": "t1"},
        {"role": "assistant", "content": "FINAL ANSWER: 1"},
    ],
}


@pytest.fixture(scope="module")
def qwen3(qwen3_tokenizer_dir):
    from transformers import AutoTokenizer
    return Tokenizer(qwen3_tokenizer_dir), AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)


def hf_ids(ref, messages, tools=None, **kw):
    out = ref.apply_chat_template(messages, tools=tools, tokenize=True, **kw)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("with_tools", [True, False])
def test_qwen3_render_matches_apply_chat_template(qwen3, name, with_tools):
    ours, ref = qwen3
    assert ours.fmt == "qwen3"
    msgs = CONVERSATIONS[name]
    tools = TOOLS if with_tools else None
    for end in range(1, len(msgs) + 1):  # every prefix, with and without the generation prompt
        for gen in (False, True):
            for thinking in ({}, {"enable_thinking": False}):
                kw = dict(add_generation_prompt=gen, **thinking)
                want = hf_ids(ref, msgs[:end], tools, **kw)
                got = ours.encode(render_chat(msgs[:end], tools, "qwen3", gen, enable_thinking=not thinking))
                assert got == want, (name, end, kw, ours.decode(got), ours.decode(want))


def test_special_tokens_are_single_ids(qwen3):
    ours, _ = qwen3
    assert (ours.im_start, ours.im_end, ours.tool_call_end) == (151644, 151645, 151658)
    assert ours.stop_ids == [151643, 151645]
    assert ours.encode("<tool_call>\n{}\n</tool_call>")[0] == 151657


def assistant_ids(tok, message):
    """What the model samples for an assistant message, as rollout.py assembles it: its text, then <|im_end|>."""
    return tok.encode(assistant_text(message, tok.fmt)) + [tok.im_end]


def test_turn_by_turn_assembly_equals_template(qwen3):
    """A rollout builds its stream as prompt + sampled ids + tool-result chunks, never re-rendering the history.
    Without the hybrid-thinking switch (the Qwen3-Instruct-2507 layout) that stream equals the template's rendering
    of the conversation at every turn."""
    ours, ref = qwen3
    msgs = CONVERSATIONS["multi_turn_tools"]
    stream = ours.encode(render_chat(msgs[:2], TOOLS, "qwen3-instruct", add_generation_prompt=True))
    assert stream == hf_ids(ref, msgs[:2], TOOLS, add_generation_prompt=True)
    i = 2
    while i < len(msgs):
        asst = msgs[i]
        stream += assistant_ids(ours, asst)
        i += 1
        results = []
        while i < len(msgs) and msgs[i]["role"] == "tool":
            results.append(msgs[i]["content"])
            i += 1
        if results:
            stream += ours.encode(render_tool_results(results, "qwen3-instruct"))
            assert stream == hf_ids(ref, msgs[:i], TOOLS, add_generation_prompt=True)
    # the final conversation: the template appends "\n" after the last <|im_end|>; Qwen3's hybrid template would
    # also add an empty think block to the last assistant turn, which Qwen3-Instruct-2507 does not
    final = render_chat(msgs, TOOLS, "qwen3-instruct")
    assert stream + ours.encode("\n") == ours.encode(final)


def test_hybrid_thinking_stream_differs_only_by_empty_think_blocks(qwen3):
    """Qwen3 hybrid with enable_thinking=False is not append-only: each generation prefix holds an empty think block
    that the template drops from earlier turns. Rollouts train on what the model saw (the stream); this pins the
    difference down to exactly those blocks."""
    ours, ref = qwen3
    msgs = CONVERSATIONS["multi_turn_tools"][:4]
    sampled = render_chat([msgs[2]], None, "qwen3-instruct")[len("<|im_start|>assistant\n"):-1]  # ends <|im_end|>
    stream = render_chat(msgs[:2], TOOLS, "qwen3", True) + sampled + render_tool_results([msgs[3]["content"]], "qwen3")
    want = ours.decode(hf_ids(ref, msgs, TOOLS, add_generation_prompt=True, enable_thinking=False))
    assert stream != want and stream.replace("<think>\n\n</think>\n\n", "", 1) == want


def test_chatml_matches_smollm2_template(default_model):
    from transformers import AutoTokenizer
    _, tok = default_model
    assert tok.fmt == "chatml"
    ref = AutoTokenizer.from_pretrained(tok_dir(default_model))
    for msgs in ([{"role": "user", "content": "hi there"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]):
        for gen in (False, True):
            assert tok.render(msgs, add_generation_prompt=gen) == hf_ids(ref, msgs, add_generation_prompt=gen)


def tok_dir(default_model):
    return default_model[0].source_dir


def test_chatml_tools_use_qwen_layout(default_model):
    _, tok = default_model
    text = render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], TOOLS, "chatml", True)
    assert text.startswith("<|im_start|>system\nS\n\n# Tools\n") and text.endswith("<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    assert json.dumps(TOOLS[1], ensure_ascii=False) in text


# --- tool-call parsing ----------------------------------------------------------------------------------------------


def test_parse_single_and_multiple_calls():
    text = ('Checking.\n<tool_call>\n{"name": "get_table_names", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name": "sql_query", "arguments": {"query": "SELECT 1"}}\n</tool_call>')
    content, calls, errors = parse_tool_calls(text)
    assert content == "Checking." and errors == []
    assert [(c.name, c.arguments) for c in calls] == [("get_table_names", {}), ("sql_query", {"query": "SELECT 1"})]


def test_parse_string_encoded_arguments():
    _, calls, errors = parse_tool_calls('<tool_call>{"name": "sql_query", "arguments": "{\\"query\\": \\"SELECT 2\\"}"}</tool_call>')
    assert errors == [] and calls[0].arguments == {"query": "SELECT 2"}


@pytest.mark.parametrize("text,fragment", [
    ('<tool_call>\n{"name": "sql_query", "arguments": {"query": "SELECT 1"}\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"tool": "sql_query", "args": {}}\n</tool_call>', 'exactly the keys "name" and "arguments"'),
    ('<tool_call>\n{"name": "sql_query", "arguments": {}, "id": 3}\n</tool_call>', 'exactly the keys'),
    ('<tool_call>\n["sql_query"]\n</tool_call>', "got list"),
    ('<tool_call>\n{"name": 5, "arguments": {}}\n</tool_call>', '"name" must be a string'),
    ('<tool_call>\n{"name": "x", "arguments": [1]}\n</tool_call>', '"arguments" an object'),
])
def test_parse_errors_are_messages(text, fragment):
    _, calls, errors = parse_tool_calls(text)
    assert calls == [] and len(errors) == 1 and fragment in errors[0]


def test_parse_missing_closing_tag_still_reads_the_call():
    _, calls, errors = parse_tool_calls('<tool_call>\n{"name": "get_table_names", "arguments": {}}<|im_end|>')
    assert [c.name for c in calls] == ["get_table_names"]
    assert errors == ["tool call is missing its closing </tool_call> tag"]


def test_parse_no_call_is_a_final_message():
    content, calls, errors = parse_tool_calls("Revenue grew 25%.\nFINAL ANSWER: 25%")
    assert (content, calls, errors) == ("Revenue grew 25%.\nFINAL ANSWER: 25%", [], [])
