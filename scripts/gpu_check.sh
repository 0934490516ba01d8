#!/usr/bin/env bash
# One prepared check for a GPU machine (one GPU, under 8 minutes), printing one table:
#   1. the efficiency benchmark, --device cuda --bf16, at t5-base, t5-large and a LLaMA-7B-shaped model with
#      4 layers (benchmarks.throughput's "gpu" sizes): the targets of benchmarks.throughput.TARGETS, measured against their goals;
#   2. the memory benchmark (scripts/benchmark_memory.py, fp32, batch 8) at t5-base, llama-small and ViT-B/16:
#      torch.cuda.max_memory_allocated of a training step and of an eval forward, and the activations saved for
#      backward, for DePT, PT l=100 and the limit (the same model on m+s tokens, no A·B); target DePT <= 1.02x limit;
#   3. a short DePT training (sst2 sample data, a small random T5, fp32 so that runs are comparable) under
#      accelerate's single-GPU, DeepSpeed ZeRO-2, ZeRO-3 (with zero3_init_flag, so the prompt init reads a
#      ZeRO-3 shard where the model is built after the Accelerator) and FSDP 1 / FSDP 2 configs, one process each, in parallel:
#        - its adapter against the single-GPU run's (max |difference|);
#        - a run SIGKILLed after its first checkpoint, resumed with --resume_from_checkpoint auto, against the
#          uninterrupted run of the same config (max |difference|, 0 = bit-identical).
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--cpu]
#     --out DIR   where everything goes (default: gpu_check_output; replaced)
#     --dry-run   print the commands, run nothing
#     --cpu       run what a machine without CUDA can: the tiny benchmark and the single-process training
#                 (configs/accelerate/cpu.yaml); DeepSpeed and FSDP rows say "skipped"
#   PY=python3 scripts/gpu_check.sh    the interpreter (default: .venv/bin/python, else python3)
#   BENCH_TIMEOUT=240 MEMORY_TIMEOUT=240 TRAIN_TIMEOUT=300    seconds for each part
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=gpu_check_output
DRY_RUN=0
CPU=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --cpu) CPU=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}
MEMORY_TIMEOUT=${MEMORY_TIMEOUT:-240}
TRAIN_TIMEOUT=${TRAIN_TIMEOUT:-300}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: a resumed run can then be bit-identical
START=$SECONDS
ROWS="$OUT/table.md"

run() {  # print, and run unless --dry-run
    echo "+ $*" >&2
    [[ $DRY_RUN == 1 ]] || "$@"
}

run_logged() {  # run_logged LOG COMMAND...: print, and run with its output in LOG unless --dry-run
    local log=$1; shift
    echo "+ $* > $log" >&2
    [[ $DRY_RUN == 1 ]] || "$@" > "$log" 2>&1
}

row() { echo "| $1 | $2 | $3 | $4 |" >> "$ROWS"; }

if [[ $DRY_RUN == 0 ]]; then
    rm -rf "$OUT" && mkdir -p "$OUT"
    : > "$ROWS"
    "$PY" - <<'EOF' >&2 || { echo "torch/dept do not import with $PY" >&2; exit 1; }
import torch, dept
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}:",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
fi

# ------------------------------------------------------------------------------------------------ benchmark
if [[ $CPU == 1 ]]; then
    BENCH=(--sizes tiny --device cpu --steps 1 --warmup 0 --workloads fixed,short)
else
    BENCH=(--sizes gpu --device cuda --bf16 --steps 5 --warmup 2)
fi
run_logged "$OUT/bench.log" timeout "$BENCH_TIMEOUT" "$PY" scripts/benchmark.py "${BENCH[@]}" --output_dir "$OUT/bench"
BENCH_RC=$?
if [[ $DRY_RUN == 0 ]]; then
    if [[ $BENCH_RC != 0 ]]; then
        row "benchmark" "${BENCH[*]}" "FAILED (exit $BENCH_RC)" "see $OUT/bench.log"
    else
        "$PY" - "$OUT/bench/results.json" >> "$ROWS" <<'EOF'
import json, sys
for t in json.load(open(sys.argv[1]))["targets"]:
    value = " → ".join(f"{v:.2f}" for v in t["value"]) if isinstance(t["value"], list) else f"{t['value']:.2f}"
    goal = t["comparison"] if t["threshold"] is None else f"{t['comparison']} {t['threshold']}"
    print(f"| benchmark: {t['target']} | {t['model']}, {t['workload']} | {'met' if t['met'] else 'NOT met'} "
          f"| {value} (goal {goal}) |")
EOF
    fi
fi

# ------------------------------------------------------------------------------------------------ memory
if [[ $CPU == 1 ]]; then
    MEMORY=(--models t5-tiny,llama-tiny,vit-tiny --device cpu --batch_size 2 --max_length 32)
else
    MEMORY=(--models t5-base,llama-small,vit-b16 --device cuda --batch_size 8 --max_length 256 --isolation inline)
fi
run_logged "$OUT/memory.log" timeout "$MEMORY_TIMEOUT" "$PY" scripts/benchmark_memory.py "${MEMORY[@]}" \
    --output_dir "$OUT/memory"
MEMORY_RC=$?
if [[ $DRY_RUN == 0 ]]; then
    if [[ $MEMORY_RC != 0 ]]; then
        row "memory" "${MEMORY[*]}" "FAILED (exit $MEMORY_RC)" "see $OUT/memory.log"
    else
        "$PY" - "$OUT/memory/results.json" >> "$ROWS" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
for record in results["records"]:
    over, methods = record["dept_over"], record["methods"]
    met = all(t["met"] for t in results["targets"] if t["model"] == record["model"])
    peaks = " / ".join(f"{methods[m].get('train_peak_allocated_bytes', methods[m]['train_peak_bytes']) / 2**20:,.0f}"
                       for m in ("dept", "limit", "pt"))
    print(f"| memory: DePT / limit (goal <= 1.02), DePT / PT | {record['model']} | {'met' if met else 'NOT met'} "
          f"| train peak {over['limit']['train_peak_bytes']:.4f} / {over['pt']['train_peak_bytes']:.3f}, inference "
          f"{over['limit']['inference_peak_bytes']:.4f} / {over['pt']['inference_peak_bytes']:.3f}, saved "
          f"{over['limit']['saved_activation_bytes']:.4f} / {over['pt']['saved_activation_bytes']:.3f}; "
          f"train peak DePT / limit / PT {peaks} MiB ({methods['dept']['memory_source']}) |")
EOF
    fi
fi

# ------------------------------------------------------------------------------------------------ training
# A small random T5 (d=256, 4 layers; the tests' d=32 one with --cpu) with a word tokenizer over the sample sst2
# data: no download needed.
run "$PY" - "$OUT/model" "$CPU" <<'EOF'
import json, sys
from scripts.tiny_models import save_tiny_model
from dept_nlp.data_files import sample_sst2_files
texts = [json.loads(line)["sentence"] for path in sample_sst2_files().values() for line in open(path)]
shape = {} if sys.argv[2] == "1" else dict(d_model=256, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64,
                                           d_ff=1024)
save_tiny_model("seq2seq", sys.argv[1], texts, **shape)
EOF
readarray -t DATA < <("$PY" -c "
from dept_nlp.data_files import sample_sst2_files
for key, path in sample_sst2_files().items(): print(f'--{key}'); print(path)")

if [[ $CPU == 1 ]]; then STEPS=12 SAVE=4; else STEPS=40 SAVE=10; fi
FLAGS=(--model_name_or_path "$OUT/model" --task_name sst2 "${DATA[@]}" --peft_type PROMPT_TUNING_LORA
       --prefix_length 8 --r 4 --max_seq_length 64 --learning_rate 3e-1 --lora_embedding_lr 5e-3
       --per_device_train_batch_size 8 --per_device_eval_batch_size 16 --max_steps $STEPS --warmup_steps 4
       --save_strategy steps --save_steps $SAVE --evaluation_strategy steps --eval_steps $SAVE
       --save_total_limit 2 --load_best_model_at_end --do_train --do_eval --mixed_precision no
       --generation_max_length 4 --report_to none --seed 7)

# name -> "config file|extra accelerate launch flags"
declare -A CONFIGS=(
    [single_gpu]="single_gpu.yaml|"
    [deepspeed_zero2]="deepspeed_zero2.yaml|"
    [deepspeed_zero3]="deepspeed_zero3.yaml|--zero3_init_flag true"
    [fsdp1]="fsdp.yaml|"
    [fsdp2]="fsdp2.yaml|"
)
ORDER=(single_gpu deepspeed_zero2 deepspeed_zero3 fsdp1 fsdp2)
[[ $CPU == 1 ]] && CONFIGS[single_gpu]="cpu.yaml|"

launch() {  # launch NAME INDEX OUTPUT_DIR [extra trainer flags...]: one accelerate process
    local name=$1 index=$2 output=$3; shift 3
    local config=${CONFIGS[$name]%%|*} extra=${CONFIGS[$name]#*|}
    # shellcheck disable=SC2086  # $extra holds whole flags
    "$PY" -m accelerate.commands.launch --config_file "configs/accelerate/$config" --num_processes 1 \
        --main_process_port $((29500 + 10 * index + RANDOM % 10)) $extra \
        scripts/train_nlp.py "${FLAGS[@]}" --output_dir "$output" "$@"
}

check_config() {  # check_config NAME INDEX: straight run, killed run, resumed run; writes $OUT/<name>/status
    local name=$1 index=$2 dir="$OUT/$1"
    mkdir -p "$dir"
    launch "$name" "$index" "$dir/straight" > "$dir/straight.log" 2>&1 || { echo "straight run failed" > "$dir/status"; return; }
    setsid bash -c "$(declare -p CONFIGS FLAGS PY; declare -f launch); launch $name $index $dir/killed" \
        > "$dir/killed.log" 2>&1 &
    local pid=$! waited=0
    until [[ -f "$dir/killed/checkpoint-$SAVE/trainer_state.json" ]] || ! kill -0 $pid 2>/dev/null || ((waited > 6000)); do
        sleep 0.05; waited=$((waited + 1))
    done
    kill -9 -- -$pid 2>/dev/null; wait $pid 2>/dev/null
    if [[ -f "$dir/killed/train_results.json" ]]; then echo "the run ended before the kill" > "$dir/status"; return; fi
    if [[ ! -d "$dir/killed/checkpoint-$SAVE" ]]; then echo "no checkpoint before the kill" > "$dir/status"; return; fi
    launch "$name" "$index" "$dir/killed" --resume_from_checkpoint auto > "$dir/resumed.log" 2>&1 \
        || { echo "resumed run failed" > "$dir/status"; return; }
    echo ok > "$dir/status"
}

needs_gpu_engine() { [[ $1 == deepspeed_* || $1 == fsdp* ]]; }

if [[ $DRY_RUN == 1 ]]; then
    for name in "${ORDER[@]}"; do
        echo "+ [$name] accelerate launch --config_file configs/accelerate/${CONFIGS[$name]%%|*} --num_processes 1" \
             "${CONFIGS[$name]#*|} scripts/train_nlp.py ${FLAGS[*]} --output_dir $OUT/$name/{straight,killed}" \
             "; SIGKILL after checkpoint-$SAVE; the same with --resume_from_checkpoint auto" >&2
    done
    exit 0
fi

HAS_DEEPSPEED=$("$PY" -c "import deepspeed" >/dev/null 2>&1 && echo 1 || echo 0)
pids=()
for index in "${!ORDER[@]}"; do
    name=${ORDER[$index]}
    if needs_gpu_engine "$name" && [[ $CPU == 1 ]]; then echo "skipped: needs CUDA" > /dev/null; continue; fi
    if [[ $name == deepspeed_* && $HAS_DEEPSPEED == 0 ]]; then continue; fi
    (timeout "$TRAIN_TIMEOUT" bash -c "$(declare -p CONFIGS FLAGS PY OUT SAVE; declare -f launch check_config); check_config $name $index") &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

compare() {  # compare A B: max |difference| over the adapter tensors, or a reason
    "$PY" - "$1/adapter_model.safetensors" "$2/adapter_model.safetensors" <<'EOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
if not all(Path(p).is_file() for p in sys.argv[1:]):
    print("missing adapter"); sys.exit()
a, b = (load_file(p) for p in sys.argv[1:])
if a.keys() != b.keys():
    print(f"keys differ: {sorted(a)} vs {sorted(b)}"); sys.exit()
print(f"{max((a[k].float() - b[k].float()).abs().max().item() for k in a):.3g}")
EOF
}

verdict() {  # verdict DIFF TOLERANCE
    [[ $1 =~ ^[0-9.e+-]+$ ]] && "$PY" -c "import sys; sys.exit(0 if float('$1') <= $2 else 1)" && echo PASS || echo FAIL
}

reference="$OUT/single_gpu/straight"
for name in "${ORDER[@]}"; do
    config=${CONFIGS[$name]%%|*}
    if needs_gpu_engine "$name" && [[ $CPU == 1 ]]; then
        row "training: adapter = single-GPU run's" "$name ($config)" "skipped" "needs CUDA (--cpu)"; continue
    fi
    if [[ $name == deepspeed_* && $HAS_DEEPSPEED == 0 ]]; then
        row "training: adapter = single-GPU run's" "$name ($config)" "skipped" "deepspeed not installed: pip install '.[deepspeed]'"; continue
    fi
    status=$(cat "$OUT/$name/status" 2>/dev/null || echo "timed out after ${TRAIN_TIMEOUT}s")
    if [[ $name != single_gpu ]]; then
        diff=$(compare "$OUT/$name/straight" "$reference")
        row "training: adapter = single-GPU run's" "$name ($config)" "$(verdict "$diff" 1e-5)" "max abs diff $diff"
    fi
    if [[ $status == ok ]]; then
        diff=$(compare "$OUT/$name/killed" "$OUT/$name/straight")
        row "training: SIGKILL + resume = uninterrupted" "$name ($config)" "$(verdict "$diff" 0)" "max abs diff $diff"
    else
        row "training: SIGKILL + resume = uninterrupted" "$name ($config)" "FAIL" "$status (logs in $OUT/$name)"
    fi
done

echo
echo "## scripts/gpu_check.sh ($((SECONDS - START)) s)"
echo
echo "| check | model / config | result | detail |"
echo "|---|---|---|---|"
cat "$ROWS"
