#!/usr/bin/env bash
# The official DePT learning-rate sweep (github.com/ZhengxiangShi/DePT, README "Run Experiments"): for each task,
# lora_embedding_lr in {5e-3, 3e-1, 5e-4} x learning_rate in {3e-1, 4e-1}, six runs per task. Each run starts from
# the task's recipe configs/nlp/<task>.yaml and goes to the README's directory name
#
#     ${ROOT}/${task}_lr${lr}_loralr${lora_lr}_pl${PREFIX_LENGTH}_r${R}_st${MAX_STEPS}      (ROOT: saved_${MODEL})
#
# Then scripts/summarize_sweep.py prints the best run of each task (by its validation main metric).
#
# Environment (all optional):
#   TASKS            tasks to sweep; default: the README's GLUE list "cola mrpc mnli qnli qqp rte sst2 stsb"
#   MODEL            base model; default t5-base. ROOT uses its last path component (saved_t5-base).
#   MAX_STEPS, PREFIX_LENGTH, R, MAX_LENGTH
#                    override max_steps, m, r and max_seq_length of every task's recipe (default: the recipe's).
#                    The README's GLUE sweep is MAX_STEPS=40000 PREFIX_LENGTH=40 R=45 MAX_LENGTH=256.
#   LORA_LRS, LRS    the two grids; default "5e-3 3e-1 5e-4" and "3e-1 4e-1"
#   LAUNCHER         what starts one run; default "accelerate launch". E.g. "python", or
#                    "accelerate launch --config_file configs/accelerate/single_gpu.yaml"
#   ROOT             where the runs go; default saved_${MODEL##*/}
#   PYTHON           interpreter for the summary; default the first python (or python3) on PATH
#   DRY_RUN=1        print the commands instead of running them
# Arguments are handed to every run, e.g.:  scripts/sweep.sh --mixed_precision bf16
#
# A run whose test_results.json exists is skipped, and an unfinished one resumes from its latest checkpoint,
# so the sweep can be restarted after an interruption. A failed run does not stop the others; the script exits
# non-zero at the end if any failed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TASKS="${TASKS:-cola mrpc mnli qnli qqp rte sst2 stsb}"
MODEL="${MODEL:-t5-base}"
LORA_LRS="${LORA_LRS:-5e-3 3e-1 5e-4}"
LRS="${LRS:-3e-1 4e-1}"
LAUNCHER="${LAUNCHER:-accelerate launch}"
ROOT="${ROOT:-saved_${MODEL##*/}}"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
DRY_RUN="${DRY_RUN:-0}"
read -r -a launcher <<< "${LAUNCHER}"

# The value of a top-level `key: value` line of a recipe.
recipe_value() {
    awk -v key="$1" -F': *' '$1 == key { print $2; exit }' "$2"
}

# Print or run one command, quoted so that it can be pasted back into a shell.
run() {
    if [[ "${DRY_RUN}" == 1 ]]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

failed=()
for task in ${TASKS}; do
    recipe="${REPO}/configs/nlp/${task}.yaml"
    if [[ ! -f "${recipe}" ]]; then
        echo "sweep.sh: no recipe ${recipe} for task '${task}'. Tasks with a recipe:" \
            "$(cd "${REPO}/configs/nlp" && ls -- *.yaml | sed 's/\.yaml$//' | tr '\n' ' ')" >&2
        exit 2
    fi
    max_steps="${MAX_STEPS:-$(recipe_value max_steps "${recipe}")}"
    prefix_length="${PREFIX_LENGTH:-$(recipe_value prefix_length "${recipe}")}"
    r="${R:-$(recipe_value r "${recipe}")}"
    length_flags=()
    if [[ -n "${MAX_LENGTH:-}" ]]; then
        length_flags=(--max_seq_length "${MAX_LENGTH}")
    fi
    for lora_lr in ${LORA_LRS}; do
        for lr in ${LRS}; do
            output_dir="${ROOT}/${task}_lr${lr}_loralr${lora_lr}_pl${prefix_length}_r${r}_st${max_steps}"
            if [[ -f "${output_dir}/test_results.json" ]]; then
                echo "# done, skipped: ${output_dir}"
                continue
            fi
            if ! run "${launcher[@]}" "${REPO}/scripts/train_nlp.py" \
                --config "${recipe}" \
                --model_name_or_path "${MODEL}" \
                --peft_type PROMPT_TUNING_LORA \
                --learning_rate "${lr}" \
                --lora_embedding_lr "${lora_lr}" \
                --prefix_length "${prefix_length}" \
                --r "${r}" \
                --max_steps "${max_steps}" \
                "${length_flags[@]}" \
                --output_dir "${output_dir}" \
                --resume_from_checkpoint auto \
                "$@"; then
                failed+=("${output_dir}")
            fi
        done
    done
done

if [[ "${DRY_RUN}" == 1 ]]; then
    echo "# then: ${PYTHON} ${REPO}/scripts/summarize_sweep.py ${ROOT}"
    exit 0
fi
"${PYTHON}" "${REPO}/scripts/summarize_sweep.py" "${ROOT}"
if (( ${#failed[@]} > 0 )); then
    printf 'sweep.sh: %d run(s) failed:\n' "${#failed[@]}" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
fi
