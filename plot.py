"""
Plot a run's curves from its metrics.jsonl: warm-start NLL, GRPO reward and pass rate (with a moving average),
greedy val pass@1 and the behavior rubric rates. Also prints a table: time per step by phase and part, and the GRPO
steps' pass rate, signal and behavior in their first and second half.

    python plot.py runs/grpo [--out runs/grpo/curves.png]
"""
import argparse
import json
import os


def moving_average(xs, k):
    out = []
    for i in range(len(xs)):
        w = xs[max(0, i - k + 1): i + 1]
        out.append(sum(w) / len(w))
    return out


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summary(recs):
    """metrics.jsonl records -> the lines of a table: seconds per step by phase and part (steps that ran a validation
    pass are also shown without them), then GRPO's rollout statistics over its first half, second half and all."""
    sft = [r for r in recs if r["phase"] == "sft"]
    grpo = [r for r in recs if r["phase"] == "grpo" and "reward" in r]
    plain = lambda rs: [r for r in rs if "val/pass@1_greedy" not in r]  # noqa: E731
    rows = [("warm-start step, s", [r["step_s"] for r in sft]),
            ("GRPO step, s", [r["step_s"] for r in grpo]),
            ("  without validation passes", [r["step_s"] for r in plain(grpo)]),
            ("  rollout, s", [r["rollout_s"] for r in grpo]),
            ("  update, s (steps with one)", [r["update_s"] for r in grpo if "update_s" in r])]
    lines = [f"{'time':34s} {'steps':>6s} {'mean':>8s}"]
    lines += [f"{name:34s} {len(xs):6d} {mean(xs):8.1f}" for name, xs in rows if xs]
    if grpo:
        h = (len(grpo) + 1) // 2
        halves = (grpo[:h], grpo[h:], grpo)
        lines.append(f"{'GRPO rollouts (means over steps)':34s} {'1st half':>8s} {'2nd half':>8s} {'all':>8s}")
        for name, key, f in (("pass rate", "pass_rate", lambda v: v), ("groups with signal", "zero_var_frac", lambda v: 1 - v),
                             ("schema before query", "rubric/schema_before_query", lambda v: v),
                             ("guessed table or column", "rubric/guessed_table_or_column", lambda v: v),
                             ("answered without a good query", "rubric/hallucinated", lambda v: v),
                             ("answered on an unresolved empty", "rubric/answered_after_empty", lambda v: v),
                             ("answer not read from the data", "rubric/ungrounded_answer", lambda v: v),
                             ("sampled tokens per episode", "response_tokens", lambda v: v),
                             ("episode tokens", "episode_tokens", lambda v: v)):
            vals = [mean([f(r[key]) for r in part if key in r]) for part in halves]
            lines.append(f"  {name:32s} " + " ".join(f"{v:8.3f}" if v < 10 else f"{v:8.0f}" for v in vals))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a train_grpo.py --out folder")
    ap.add_argument("--out", default=None, help="PNG path (default RUN/curves.png)")
    ap.add_argument("--smooth", type=int, default=5, help="moving-average window for GRPO rewards")
    args = ap.parse_args(argv)
    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist (is {args.run} a train_grpo.py --out folder?)")
    recs = [json.loads(l) for l in open(path)]
    print("\n".join(summary(recs)))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [r for r in recs if r["phase"] == "sft"]
    grpo = [r for r in recs if r["phase"] == "grpo" and "reward" in r]
    val = [r for r in recs if "val/pass@1_greedy" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot([r["step"] for r in sft], [r["nll"] for r in sft], color="tab:purple")
    ax.set(title="expert warm start" + ("" if sft else " (none in this run: --init-from)"), xlabel="step",
           ylabel="NLL of oracle tokens")
    ax = axes[1]
    if grpo:
        steps = [r["step"] for r in grpo]
        ax.plot(steps, [r["reward"] for r in grpo], color="tab:blue", alpha=0.3, label="train reward (batch)")
        ax.plot(steps, moving_average([r["reward"] for r in grpo], args.smooth), color="tab:blue",
                label=f"train reward ({args.smooth}-step mean)")
        # the reward is the pass rate minus the shaping terms (--guess-penalty's charges), so both are drawn
        ax.plot(steps, moving_average([r["pass_rate"] for r in grpo], args.smooth), color="tab:green",
                label=f"train pass rate ({args.smooth}-step mean)")
        ax.plot(steps, [1 - r["zero_var_frac"] for r in grpo], color="tab:gray", ls=":", label="groups with signal")
    if val:
        ax.plot([r["step"] for r in val], [r["val/pass@1_greedy"] for r in val], "o-", color="tab:red", label="val pass@1 (greedy)")
    if sft:  # where the warm start ended
        ax.axvline(len(sft) + 0.5, color="k", lw=0.5)
    low = min([0.0] + [r["reward"] for r in grpo])  # a penalty can take a batch's mean reward below 0
    ax.set(title="GRPO", xlabel="step", ylim=(low - 0.02, 1.02))
    ax.legend(fontsize=8)
    ax = axes[2]
    for key, color in (("rubric/listed_tables_first", "tab:green"), ("rubric/schema_before_query", "tab:olive"),
                       ("rubric/hallucinated", "tab:red"), ("rubric/answered_after_empty", "tab:purple"),
                       ("rubric/guessed_table_or_column", "tab:orange"), ("rubric/ungrounded_answer", "tab:brown"),
                       ("truncated_frac", "tab:gray")):
        pts = [(r["step"], r[key]) for r in grpo if key in r]
        if pts:
            ax.plot([p[0] for p in pts], moving_average([p[1] for p in pts], args.smooth), color=color,
                    label=key.replace("rubric/", ""))
    ax.set(title=f"behavior ({args.smooth}-step mean)", xlabel="step", ylim=(-0.02, 1.02))
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or os.path.join(args.run, "curves.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
