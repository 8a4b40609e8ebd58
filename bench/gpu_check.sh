#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU (CI has none, and GPU time comes in minutes). Parts, in order:
#   tests        the CUDA tests: tests/test_cuda.py and test_engine's compiled CUDA-graph case;
#   tiny_run     train_grpo.py end to end on CUDA with its GPU defaults (LoRA, bf16, compiled decode) on a tiny random
#                model: warm start, GRPO, validation, checkpoints, a kill-and---resume, then eval.py on the checkpoint;
#   grpo_4b      bench/grpo_step.py on a random Qwen3-4B-shaped model with the README's 4B settings: one rollout turn
#                of 64 rows on the full engine, then log-probs and update on synthetic episodes, with peak memory;
#   pack_4b      bench/grpo_step.py --ab-engine-pack: the 4B rollout turn (LoRA r=32) with the adapters as separate
#                matmuls, then merged into packed weights (the engine's CUDA default with LoRA); no update;
#   profile_4b   bench/generate.py at batch 1 with --profile: kernel time vs wall time per decode step, once with the
#                step compiled once for all cache capacities (the default) and once per capacity (--static-shapes);
#   generate_4b  bench/generate.py against transformers: batch 1, 16 and 64 from short prompts, then 16 rows 1,500
#                tokens deep as in rollouts;
#   update_prof  bench/update_profile.py --profile: update() on 4 episodes of ~1,600 tokens (two micro-batches of the
#                README's 4B command) under torch.profiler;
#   update_mb    the same update() on 16 episodes (two groups of 8) at micro-batch 2, 4, 8, then 2 again: time, peak memory;
#   feed_4b      bench/feed_backends.py: the engine's eager appends (tool responses into 64 deep rows) under each set
#                of SDPA backends, cuDNN's among them.
# Each part has its own time limit and log, so one that hangs or fails leaves the others' results.
#
#   [PARTS="tests grpo_4b"] bash bench/gpu_check.sh TOKENIZER_DIR [OUT]
# TOKENIZER_DIR holds tokenizer.json and tokenizer_config.json (any chat model's: the tiny model takes its vocabulary
# size); the synthetic tasks must exist (python -m data.synth). Logs go to OUT (default $OUT, else /tmp/gpu_check).
# PARTS (default: all) picks parts, for a lease too short for all of them.
set -u
TOK=${1:?usage: bash bench/gpu_check.sh TOKENIZER_DIR [OUT]}
OUT=${2:-${OUT:-/tmp/gpu_check}}
PY=${PYTHON:-python3}
PARTS=${PARTS:-tests tiny_run grpo_4b pack_4b profile_4b generate_4b update_prof update_mb feed_4b}
TASKS=data/generated/synth/tasks.jsonl
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
[ -f "$TASKS" ] || { echo "error: $TASKS is missing (python -m data.synth)"; exit 1; }

want() { [[ " $PARTS " == *" $1 "* ]]; }
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, report the status
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    tail -n "${TAIL:-6}" "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"; } \
  | tee "$OUT/env.log"

want tests && TAIL=4 part tests 100 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py -k "cuda"

if want tiny_run; then
  # a tiny random llama with TOKENIZER_DIR's vocabulary, written by transformers itself
  TINY=/tmp/tablerl_tiny
  $PY - "$TOK" "$TINY" <<'PYEOF'
import json, os, shutil, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM
tok, out = sys.argv[1:]
spec = json.load(open(os.path.join(tok, "tokenizer.json")))
vocab = 1 + max([*spec["model"]["vocab"].values()] + [t["id"] for t in spec["added_tokens"]])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=8192)
LlamaForCausalLM(cfg).save_pretrained(out)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok, f), out)
print("tiny model:", out, "vocab", vocab)
PYEOF
  RUN=/tmp/tablerl_gpu_run
  rm -rf "$RUN"
  COMMON=(--model "$TINY" --tasks "$TASKS" --out "$RUN" --sft-steps 2 --steps 2 --tasks-per-step 2 --group-size 4
          --max-new-tokens 48 --max-tokens 2048 --eval-every 2 --eval-tasks 4 --save-every 1 --wandb off)
  TAIL=3 part grpo_first 90 $PY train_grpo.py "${COMMON[@]}" --stop-at 3
  TAIL=4 part grpo_resume 60 $PY train_grpo.py "${COMMON[@]}" --resume
  cp "$RUN/metrics.jsonl" "$OUT/grpo_metrics.jsonl" 2>/dev/null
  TAIL=12 part eval 60 $PY eval.py --ckpt "$RUN/step_4" --tasks "$TASKS" --split test --limit 4 --samples 2 \
      --max-new-tokens 32 --batch-tasks 4
fi

# the README's Qwen3-4B command: 8 tasks x 8, --max-tokens 4096, --max-new-tokens 512, micro-batch 2, grad-ckpt, LoRA 32
want grpo_4b && TAIL=12 part grpo_4b 250 $PY bench/grpo_step.py --random-config qwen3-4b --device cuda \
    --synthetic-len 1600 4096 --tasks-per-step 8 --group-size 8 --max-tokens 4096 --max-new-tokens 512 \
    --temperature 0.6 --micro-batch 2 --grad-ckpt --json

want pack_4b && TAIL=12 part pack_4b 300 $PY bench/grpo_step.py --random-config qwen3-4b --device cuda \
    --synthetic-len 1600 --tasks-per-step 8 --group-size 8 --max-tokens 4096 --max-new-tokens 512 --temperature 0.6 \
    --ab-engine-pack --json

if want profile_4b; then
  TAIL=30 part profile_4b 100 $PY bench/generate.py --random-config qwen3-4b --device cuda --batch 1 --no-hf \
      --profile 20 --json
  TAIL=30 part profile_4b_static 85 $PY bench/generate.py --random-config qwen3-4b --device cuda --batch 1 --no-hf \
      --profile 20 --static-shapes --json
fi

if want generate_4b; then
  TAIL=8 part generate_4b 240 $PY bench/generate.py --random-config qwen3-4b --device cuda --batch 1 16 64
  TAIL=4 part generate_4b_deep 90 $PY bench/generate.py --random-config qwen3-4b --device cuda --batch 16 \
      --context 1500 --new-tokens 32
fi

want update_prof && TAIL=40 part update_prof 170 $PY bench/update_profile.py --random-config qwen3-4b --device cuda \
    --episodes 4 --length 1600 --max-tokens 4096 --micro-batch 2 --grad-ckpt --profile

want update_mb && TAIL=6 part update_mb 200 $PY bench/update_profile.py --random-config qwen3-4b --device cuda \
    --episodes 16 --length 1600 --max-tokens 4096 --group-size 8 --grad-ckpt --micro-batches 2 4 8 2

want feed_4b && TAIL=12 part feed_4b 230 $PY bench/feed_backends.py --random-config qwen3-4b --rows 64 --depth 1000 \
    --rounds 6 --json
