"""
Multi-turn episodes of a model acting in the SQL environment, batched on the KV-cache engine, in token IDs end to
end: the history is never re-tokenized. Each turn the engine samples an assistant message for every live episode;
its tool calls run in that episode's SQLEnv; the tool responses are rendered exactly as the chat template renders
them and appended to that row's cache; and the next turn starts. An episode ends on a message without a tool call
(the final answer), at the turn limit or at the token budget; the last two are flagged, never silently cut.

    episodes = run_episodes(model, tok, tasks, group_size=4, max_turns=8, max_tokens=4096)

episode_from_messages() assembles the same token stream for a scripted conversation (the oracle's), which is what the
expert warm start trains on.
"""
from dataclasses import dataclass, field

import torch

from env_sql import TOOLS, SQLEnv, grade_task, rubric, task_messages
from model import Engine, parse_tool_calls, render_chat, render_tool_results


@dataclass
class Episode:
    task: dict
    tokens: list  # the whole stream: prompt, sampled turns, tool responses
    mask: list  # 1 on tokens the model sampled (its closing <|im_end|> included), 0 elsewhere
    logprobs: list  # the sampled tokens' log-probs under the sampling distribution; 0.0 where mask is 0
    prompt_len: int
    messages: list = field(default_factory=list)  # the transcript after the opening messages
    calls: list = field(default_factory=list)  # the environment's tool-call log
    turns: int = 0
    format_errors: int = 0
    finish: str = ""  # answer | turn_limit | token_budget | turn_tokens (one message ran past max_new_tokens)
    answer_text: str = ""
    stopped: bool = True  # the last assistant message ended with a stop token it sampled
    reward: float = 0.0
    rubric: dict = field(default_factory=dict)

    @property
    def truncated(self):
        return self.finish != "answer"

    def transcript(self):
        """A readable transcript: one block per message."""
        lines = [f"### task {self.task['id']}: {self.task['question']}"]
        for m in self.messages:
            lines.append(f"--- {m['role']}\n{m['content']}")
        lines.append(f"=== finish: {self.finish}, reward {self.reward}, gold {self.task['answer']}")
        return "\n".join(lines)


def common_prefix_len(seqs):
    """How many leading tokens all seqs (lists of ids) share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def prefill_groups(eng, prompts, G):
    """Prefill prompt i into engine rows [i*G, (i+1)*G). The prompts share their opening (the system prompt and the
    tool schemas: ~580 of ~610 tokens with the default prompt): prefill it once and fork it into each group's first
    row, which then takes only its own tail; each tail keeps at least one token, so that every row's next-token
    logits are its own. Each group's first row is then forked into the rest of the group."""
    lead, n = [i * G for i in range(len(prompts))], common_prefix_len(prompts)
    n = min(n, min(len(p) for p in prompts) - 1)
    if len(prompts) > 1 and n > 0:
        eng.feed([0], [prompts[0][:n]])
        eng.fork(0, lead[1:])
        eng.feed(lead, [p[n:] for p in prompts])
    else:
        eng.feed(lead, prompts)
    for i in range(len(prompts)):
        eng.fork(i * G, list(range(i * G + 1, (i + 1) * G)))


def prompt_ids(tok, task):
    return tok.render(task_messages(task), tools=TOOLS, add_generation_prompt=True)


def assistant_text(message, fmt):
    """What the model emits for an assistant message: the template's rendering between the generation prefix and
    <|im_end|> (tool calls in the template's own JSON layout)."""
    # an assistant turn renders alike in every format (chatml would only add its default system prompt here, and
    # qwen3's empty think block belongs to the generation prefix, not to what the model samples)
    text = render_chat([{"role": "user", "content": ""}, message], None, "qwen3-instruct")
    text = text[len("<|im_start|>user\n<|im_end|>\n"):]
    start = "<|im_start|>assistant\n"
    return text[len(start):-len("<|im_end|>\n")]


def finish_episode(ep, env, max_turns):
    ep.calls = [vars(c) for c in env.log]
    t = ep.task
    ep.reward = float(grade_task(t, ep.answer_text)) if ep.finish == "answer" else 0.0
    ep.rubric = rubric(env.log, ep.answer_text, ep.turns, max_turns, ep.format_errors, t.get("gold_tables"))
    ep.rubric["truncated"] = ep.truncated


@torch.no_grad()
def run_episodes(model, tok, tasks, group_size=1, max_turns=8, max_tokens=4096, max_new_tokens=512, temperature=1.0,
                 top_k=0, top_p=1.0, generator=None, engine=None, repeat_note=False):
    """Run len(tasks) * group_size episodes to completion. Rows [i*G, (i+1)*G) are task i's group: its prompt is
    prefilled once and forked. Returns the episodes in that order. repeat_note: see SQLEnv.call."""
    G, N = group_size, len(tasks) * group_size
    eng = engine or Engine(model, N, max_tokens + 1)
    if eng.B < N or eng.S < max_tokens:
        raise ValueError(f"engine holds {eng.B} rows x {eng.S} tokens; this batch needs {N} x {max_tokens}")
    eng.reset()
    prompts = [prompt_ids(tok, t) for t in tasks]
    for t, p in zip(tasks, prompts):
        if len(p) >= max_tokens:
            raise ValueError(f"task {t['id']}: its prompt is {len(p)} tokens, over the episode budget --max-tokens {max_tokens}")
    prefill_groups(eng, prompts, G)
    eps = [Episode(tasks[r // G], list(prompts[r // G]), [0] * len(prompts[r // G]), [0.0] * len(prompts[r // G]),
                   len(prompts[r // G])) for r in range(N)]
    envs = [SQLEnv(ep.task["db_path"], repeat_note=repeat_note) for ep in eps]
    live = list(range(N))
    try:
        while live:
            caps = [min(max_new_tokens, max_tokens - len(eps[r].tokens)) for r in live]
            outs = eng.generate(live, caps, temperature, top_k, top_p, stop_ids=tok.stop_ids, generator=generator)
            rows, chunks = [], []
            for r, cap, out in zip(live, caps, outs):
                ep, env = eps[r], envs[r]
                ep.tokens += out.tokens
                ep.mask += [1] * len(out.tokens)
                ep.logprobs += out.logprobs
                ep.turns += 1
                body = out.tokens[:-1] if out.stop == "stop" else out.tokens
                text = tok.decode(body)
                ep.messages.append({"role": "assistant", "content": text})
                ep.stopped = out.stop == "stop"
                if out.stop != "stop":
                    ep.finish = "token_budget" if len(ep.tokens) >= max_tokens or out.stop == "max_len" else "turn_tokens"
                    continue
                _, calls, errors = parse_tool_calls(text)
                if not calls and not errors:
                    ep.finish, ep.answer_text = "answer", text
                    continue
                if ep.turns >= max_turns:
                    ep.finish = "turn_limit"
                    continue
                results = [env.call(c.name, c.arguments) for c in calls] + [f"Error: {e}" for e in errors]
                ep.format_errors += len(errors)
                chunk = tok.tool_results(results)
                if len(ep.tokens) + len(chunk) >= max_tokens:  # no room left to answer after these results
                    ep.finish = "token_budget"
                    continue
                ep.tokens += chunk
                ep.mask += [0] * len(chunk)
                ep.logprobs += [0.0] * len(chunk)
                ep.messages += [{"role": "tool", "content": res} for res in results]
                rows.append(r)
                chunks.append(chunk)
            # Episodes of a group that sampled the same turns so far (a warm-started model often opens with the same
            # call) have the same token stream: prefill it once and copy the cache row, as the prompt was.
            first, feed, copies = {}, [], []
            for r, ch in zip(rows, chunks):
                key = tuple(eps[r].tokens)
                if key in first:
                    copies.append((first[key], r))
                else:
                    first[key] = r
                    feed.append((r, ch))
            if feed:
                eng.feed([r for r, _ in feed], [ch for _, ch in feed])
            for src, dst in copies:
                eng.fork(src, [dst])
            live = rows
        for ep, env in zip(eps, envs):
            finish_episode(ep, env, max_turns)
    finally:
        for env in envs:
            env.close()
    return eps


def episode_from_messages(tok, task, messages, max_turns=64):
    """The token stream a rollout would build if the model had emitted these assistant messages (the oracle's),
    with mask 1 on the assistant tokens (0 on a message marked "train": False: an oracle detour's wrong turn).
    Graded like a rollout; used as the expert demonstration."""
    ids = prompt_ids(tok, task)
    ep = Episode(task, list(ids), [0] * len(ids), [0.0] * len(ids), len(ids))
    i = 0
    while i < len(messages):
        m = messages[i]
        assert m["role"] == "assistant", f"expected an assistant message at {i}, got {m['role']}"
        text = assistant_text(m, tok.fmt)
        sampled = tok.encode(text) + [tok.im_end]
        ep.tokens += sampled
        ep.mask += [int(m.get("train", True))] * len(sampled)  # "train": False: shown in context, not cloned
        ep.logprobs += [0.0] * len(sampled)
        ep.messages.append({"role": "assistant", "content": text})
        ep.turns += 1
        i += 1
        results = []
        while i < len(messages) and messages[i]["role"] == "tool":
            results.append(messages[i]["content"])
            i += 1
        if results:
            chunk = tok.tool_results(results)
            ep.tokens += chunk
            ep.mask += [0] * len(chunk)
            ep.logprobs += [0.0] * len(chunk)
            ep.messages += [{"role": "tool", "content": r} for r in results]
        else:
            ep.finish, ep.answer_text = "answer", text
    with SQLEnv(task["db_path"]) as env:  # replay the calls so the rubric sees the same log a rollout would
        for m in messages:
            for c in m.get("tool_calls") or []:
                env.call(c["name"], c["arguments"])
        finish_episode(ep, env, max_turns)
    return ep


def render_episode_text(tok, ep):
    """The chat template's text for the episode's transcript, as the model saw it (for checks and debugging)."""
    text = render_chat(task_messages(ep.task), TOOLS, tok.fmt, add_generation_prompt=True)
    msgs = ep.messages
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            text += m["content"] + ("<|im_end|>" if i < len(msgs) - 1 or ep.stopped else "")
        elif i == 0 or msgs[i - 1]["role"] != "tool":
            j = i
            while j < len(msgs) and msgs[j]["role"] == "tool":
                j += 1
            text += render_tool_results([n["content"] for n in msgs[i:j]], tok.fmt)
    return text
