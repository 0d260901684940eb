#!/usr/bin/env bash
# Issue 25's GPU measurements in one command, for a session lent a GPU for 15 minutes in all:
# DeepSpeed from the wheels in .gpu/whl (`make gpu-wheels` builds them on a machine with a
# package registry), then the speed rows, the kernel table and the checks, each under its own
# time limit (at most 570 s together), each writing one file under $OUT (default gpu_out).
# Run from the project root, carrying .gpu:   bash benchmarks/gpu_session.sh
# What comes back: session.log (the device, each part's exit status and its last errors) and one
# JSON-lines file per part (docs/benchmarks.md says what each row means).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl >>"$LOG" 2>&1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi";
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >>"$LOG" 2>&1

# ONLY=a,b runs those parts alone; without it every part runs but the optional ones (OPTIONAL).
OPTIONAL=",gpu_step_autotune,gpu_step_combo,codegen_on_device,"
part() {  # part NAME LIMIT_S COMMAND...: its stdout to NAME.jsonl, its exit and last stderr lines to the log
  local name=$1 limit=$2 t0=$SECONDS status
  shift 2
  if [ -n "${ONLY:-}" ]; then [[ ",$ONLY," == *",$name,"* ]] || return 0
  elif [[ "$OPTIONAL" == *",$name,"* ]]; then return 0; fi
  timeout "$limit" "$@" >"$OUT/$name.jsonl" 2>"/tmp/$name.err"
  status=$?
  { echo "== $name: exit $status after $((SECONDS - t0)) s (limit $limit s)"; tail -n 15 "/tmp/$name.err"; } >>"$LOG"
  cat "$OUT/$name.jsonl"
}

# RevCol-B at batch 128: eager and compiled, reversible and plain, and timm's ConvNeXt-B in the same process
part gpu_step_base 140 python3 benchmarks/gpu_step.py --models revcol_base --policies reversible plain --compile both
# RevCol-B plain, compiled, beside the model alone with the same heads (the trainer's step at most 1.15x it?)
part gpu_step_alone 45 python3 benchmarks/gpu_step.py --models revcol_base --policies plain --compile on --alone
# RevCol-T at batch 64 (launch-bound?), reversible: eager, compiled, compiled and replayed as a CUDA graph
part gpu_step_tiny 100 python3 benchmarks/gpu_step.py --models revcol_tiny --policies reversible --compile both --graph both
# The late read leaves the device busy; the CUDA graph's training against eager steps (captures, replays,
# losses, weights); before the other checks
part gpu_check_graph 80 python3 benchmarks/gpu_check.py --only late_read,cuda_graph --budget-s 70
# The main job through the Trainer with the step captured (evaluation, checkpoint, export around it)
part trainer_graph 60 sh -c 'python3 launchers/pretrain.py --set train.cuda_graph=true --set train.compile=false \
  --set train.epochs=3 --set monitor.console=plain --set output_dir=/tmp/trainer_graph >/tmp/trainer_graph.log 2>&1; \
  s=$?; tail -n 5 /tmp/trainer_graph.log >&2; cat /tmp/trainer_graph/metrics.json; exit $s'
# Per-kernel table of RevCol-B's step: achieved GB/s and TFLOP/s against the H200's
part kernel_table 45 env BENCH_MODEL=revcol_base python3 benchmarks/kernel_table.py
# Optional (ONLY=gpu_step_autotune, a session of its own): RevCol-B reversible, compiled, with inductor's
# matmul search (train.compile_autotune) beside without it; the search's compilation takes minutes
part gpu_step_autotune 540 sh -c 'python3 benchmarks/gpu_step.py --models revcol_base --policies reversible \
  --compile on && python3 benchmarks/gpu_step.py --models revcol_base --policies reversible --compile on --autotune'
# Optional (ONLY=gpu_step_combo): inductor's combined pointwise kernels (train.compile_combo): the same
# values as without (gpu_check's compile_combo), then RevCol-T (launch-bound) and RevCol-B plain, compiled,
# with them beside without
part gpu_step_combo 300 sh -c 'python3 benchmarks/gpu_check.py --only compile_combo --budget-s 60 || exit $?; \
  for m in "revcol_tiny reversible" "revcol_base plain"; do set -- $m; \
  python3 benchmarks/gpu_step.py --models $1 --policies $2 --compile on && \
  python3 benchmarks/gpu_step.py --models $1 --policies $2 --compile on --combo || exit $?; done'
# Optional (ONLY=codegen_on_device): the block kernels as torch.compile generates them on this device,
# their launches against triton_codegen.py's fake device (the same commit's rows), and their time
part codegen_on_device 240 python3 benchmarks/codegen_on_device.py --functions forward_full,block_grads,shortcut \
  --budget-s 180
# Correctness on the device: process groups on NCCL, reversible gradients, offload, planner, data path
part gpu_check 100 python3 benchmarks/gpu_check.py --budget-s 85 --only local_step,process_groups,reversible_gradients,offload,memory_vs_planner,throughput,data_finish
cat "$LOG"
