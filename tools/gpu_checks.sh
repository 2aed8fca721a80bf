#!/usr/bin/env bash
# GPU checks for depthkit, as ONE command on a lent GPU machine (one H200, python3 = 3.12, no network).
#
# Prepare here (this machine, any python3 with pip; the wheels target CPython 3.12 / manylinux x86-64):
#     bash tools/gpu_checks.sh --download      # (re)fills .whl/ (git-ignored) with the pinned wheels below, ~16 MiB
# Run there, with the device tool's `run`:
#     carry:     [".whl"]
#     command:   bash tools/gpu_checks.sh
#     timeout_s: 570        (the script stops itself after GPU_CHECKS_BUDGET_S=510 s, plus <= 10 s to kill a step)
#   A rerun of some steps only, on the still-warm machine: `bash tools/gpu_checks.sh losses_compile` (names below).
#   `bash tools/gpu_checks.sh --dry-run` prints the steps and their limits without running anything.
# Back here: the files land under the run's files_at; copy the CSVs into benchmarks/results/ if they are kept.
#
# Steps, in priority order (each under `timeout`; a failure does not stop the next; summary at the end):
#   setup           install .whl into /tmp/site, link depthkit + depthkit_kernels there, print versions/GPU, smoke imports
#   tests           pytest tests/kernels, all compiled on CUDA (small odd shapes and full size), then pytest -m gpu
#                   tests/pseudo_label tests/train (the labeler's queued copies, no host-GPU waits in depthkit fit)
#   train_step      benchmarks/train_step.py --device cuda --model dav2_vits --crop 518        needs braceexpand
#                   (+ --find-syncs: where each loop makes the host wait for the GPU)
#   losses_graph    benchmarks/losses.py, batch 32 at 518x518, fp32+bf16, --impls triton,eager --cudagraph: device
#                   time only, without the host's launch overhead                           needs no carried wheel
#   pseudo_label    benchmarks/pseudo_label.py --device cuda, dav2_vitl, 384 images 480x640, npz  needs braceexpand
#   fsdp2           depthkit fit with configs/trainer/gpu_fsdp.yaml (FSDP2, bf16), tiny teacher, 30 steps
#   losses_profile  torch.profiler tables (host vs device time): SSI least squares, trimmed median, gradient matching
#   select_sweep    masked_median device time at 2048 to 16384 pixels per select program
#   losses          losses_graph's run timed with do_bench (host launch overhead included)
#   losses_compile  benchmarks/losses.py --cudagraph, the full run (triton, eager AND torch.compile: device time,
#                   the fair measure against compiled code; it replaces losses_graph's CSV), with whatever time is
#                   left: ~22 inductor compiles, the slowest and least certain step, so it goes last. Its rows are
#                   printed as they finish, so a timeout still leaves them in the log.
# Files under $OUT (at most 8 come back): gpu_checks.log (everything), summary.tsv, pytest_gpu.xml,
#   losses_<GPU>-triton_eager.csv, losses_<GPU>-cudagraph.csv, losses_<GPU>.csv (full), pseudo_label-<GPU>.csv,
#   train_step-gpu.csv.
#
# Carried wheels: the closure of depthkit's dependencies minus what the GPU image already has, WITHOUT wandb:
# wandb 0.31.0 and its own tree (cwevals, distro, sniffio, platformdirs, googleapis-common-protos, 8 opentelemetry
# packages) add ~21 MiB, and nothing here imports it (depthkit imports wandb lazily, for `eval --wandb` and the
# demo's WandbLogger; timm's `try: import wandb` tolerates its absence). typing-extensions 4.16.0 (pydantic 2.14
# needs >= 4.16) travels in .whl/cond/ and is installed only when the machine's own is older.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
WHL_DIR=.whl

# One version of each (two of one name stop the whole install). Versions as in the tested dev venv.
WHEELS=(
    albucore==0.0.24
    albumentations==2.0.8
    annotated-types==0.8.0
    braceexpand==0.1.7
    docstring-parser==0.18.0
    jsonargparse==4.53.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    simsimd==6.5.16
    stringzilla==5.3.2
    typeshed-client==2.15.0
    typing-inspection==0.4.5
    webdataset==1.0.2
)
COND_WHEELS=(typing-extensions==4.16.0)  # installed there only if the image's is older than this
PIP_TARGET_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

download() {
    local py=${GPU_CHECKS_DOWNLOAD_PYTHON:-python3} tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks_whl.XXXXXX") || return 1
    echo "downloading ${#WHEELS[@]} + ${#COND_WHEELS[@]} wheels for CPython 3.12 manylinux x86-64 into $tmp"
    "$py" -m pip download -q "${PIP_TARGET_ARGS[@]}" -d "$tmp" "${WHEELS[@]}" || { rm -rf "$tmp"; return 1; }
    "$py" -m pip download -q "${PIP_TARGET_ARGS[@]}" -d "$tmp/cond" "${COND_WHEELS[@]}" || { rm -rf "$tmp"; return 1; }
    local n
    n=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
    if [ "$n" -ne "${#WHEELS[@]}" ]; then
        echo "expected ${#WHEELS[@]} wheels, got $n" >&2
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "$WHL_DIR" && mv "$tmp" "$WHL_DIR" && chmod 755 "$WHL_DIR" || return 1
    ls -l "$WHL_DIR" "$WHL_DIR/cond"
    du -sh "$WHL_DIR"
}

DRY_RUN=0
SELECTED=()
for arg in "$@"; do
    case "$arg" in
        --download) download; exit $? ;;
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        tests | train_step | fsdp2 | losses | losses_graph | losses_profile | select_sweep | pseudo_label | losses_compile)
            SELECTED+=("$arg") ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#SELECTED[@]} -eq 0 ] && SELECTED=(tests train_step losses_graph pseudo_label fsdp2 losses_profile select_sweep losses
    losses_compile)

# Overridable, for a local dry run of the control flow (GPU_CHECKS_PYTHON=.venv/bin/python GPU_CHECKS_NO_INSTALL=1
# GPU_CHECKS_ALLOW_CPU=1): none of these is needed on the GPU machine.
PY=${GPU_CHECKS_PYTHON:-python3}
BUDGET_S=${GPU_CHECKS_BUDGET_S:-510}
SITE=${GPU_CHECKS_SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu_checks_out}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
[ "$DRY_RUN" -eq 1 ] && OUT="$WORK/out"  # a dry run leaves a real run's log and files alone
mkdir -p "$OUT"
LOG="$OUT/gpu_checks.log"
: >"$LOG"
SUMMARY=()

log() { echo "$*" | tee -a "$LOG"; }

# run_step NAME CAP MIN CMD...: runs CMD under `timeout min(CAP, time left)`, output appended to the log;
# skipped when less than MIN seconds are left. CAP 0: all the time left.
run_step() {
    local name=$1 cap=$2 min=$3
    shift 3
    local left=$((BUDGET_S - SECONDS)) limit rc start
    limit=$cap
    if [ "$cap" -eq 0 ] || [ "$left" -lt "$cap" ]; then limit=$left; fi
    log ""
    log "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s (cap $cap, $left s of the budget left): $*"
    if [ "$DRY_RUN" -eq 1 ]; then
        SUMMARY+=("$name	dry-run	0	limit ${limit}s")
        return 0
    fi
    if [ "$limit" -lt "$min" ]; then
        log "=== [$name] SKIPPED: ${limit}s left, needs at least ${min}s"
        SUMMARY+=("$name	SKIPPED	0	out of budget")
        return 0
    fi
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status=FAILED; fi
    log "=== [$name] rc=$rc ($status) in $((SECONDS - start)) s"
    SUMMARY+=("$name	$rc	$((SECONDS - start))	$status")
    return "$rc"
}

selected() {
    local s
    for s in "${SELECTED[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}

# ---------------------------------------------------------------- setup
setup_start=$SECONDS
setup_rc=0
log "=== [setup] $(date -u +%FT%TZ) $(hostname) repo $PWD budget ${BUDGET_S}s steps: ${SELECTED[*]}"
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
if [ "$DRY_RUN" -eq 0 ] && [ -n "${GPU_CHECKS_NO_INSTALL:-}" ]; then
    log "GPU_CHECKS_NO_INSTALL set: not installing $WHL_DIR"
elif [ "$DRY_RUN" -eq 0 ]; then
    if ! compgen -G "$WHL_DIR/*.whl" >/dev/null; then
        log "no wheels in $WHL_DIR: prepare them with 'bash tools/gpu_checks.sh --download' and carry [\".whl\"]"
        setup_rc=1
    elif ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHL_DIR"/*.whl 2>&1 | tee -a "$LOG"; then
        log "pip install of $WHL_DIR/*.whl FAILED (steps needing braceexpand will fail)"
        setup_rc=1
    fi
    # pydantic 2.14 needs typing-extensions >= 4.16: add the carried one only if the image's is older.
    if ! "$PY" -c 'import importlib.metadata as m, sys; from packaging.version import Version as V
sys.exit(V(m.version("typing_extensions")) < V("4.16.0"))' 2>/dev/null; then
        log "typing-extensions older than 4.16.0 here: installing the carried one"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHL_DIR"/cond/*.whl 2>&1 | tee -a "$LOG" || setup_rc=1
    fi
fi
if [ "$DRY_RUN" -eq 0 ]; then
    # depthkit is not pip-installed there: link its two import packages (`kernels/` is `depthkit_kernels`).
    mkdir -p "$SITE"
    ln -sfn "$PWD/depthkit" "$SITE/depthkit"
    ln -sfn "$PWD/kernels" "$SITE/depthkit_kernels"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' \
        2>&1 | tee -a "$LOG"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
    "$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|torchvision|triton|numpy|scipy|timm|lightning|pytorch-lightning|typing.extensions|opencv-python-headless|pyyaml|protobuf|setuptools|pydantic|pydantic.core|braceexpand|webdataset|albumentations|jsonargparse)==' |
        tr '\n' ' ' | tee -a "$LOG"
    log ""
    # Smoke imports: what each step needs first, then the rest of depthkit's dependencies (informative only).
    "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, time
for name in ["depthkit_kernels", "depthkit.losses", "braceexpand", "depthkit.data.shards", "depthkit.pseudo_label.job",
             "depthkit.train", "webdataset", "albumentations", "jsonargparse", "lightning.pytorch.cli",
             "pydantic", "wandb"]:
    start = time.perf_counter()
    try:
        module = importlib.import_module(name)
        where = module.__file__ if name in ("depthkit_kernels", "depthkit.losses") else ""
        print(f"import {name}: ok {getattr(module, '__version__', '')} ({time.perf_counter() - start:.1f} s) {where}")
    except Exception as exc:
        note = " (not carried: expected, no step needs it)" if name == "wandb" else ""
        print(f"import {name}: FAILED{note} {exc!r}"[:300])
try:
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE as ok
    print("lightning sees jsonargparse[signatures]:", bool(ok))
except Exception as exc:
    print(f"lightning.pytorch.cli: {exc!r}"[:300])
EOF
    if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
        log "no CUDA device visible"
        [ -z "${GPU_CHECKS_ALLOW_CPU:-}" ] && { log "stopping (set GPU_CHECKS_ALLOW_CPU=1 to go on anyway)"; exit 2; }
    fi
fi
GPU_TAG=$("$PY" -c 'import re, torch; print(re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_"))' \
    2>/dev/null) || GPU_TAG=nogpu
[ -n "$GPU_TAG" ] || GPU_TAG=nogpu
SUMMARY+=("setup	$setup_rc	$((SECONDS - setup_start))	$([ "$setup_rc" -eq 0 ] && echo ok || echo FAILED)")
log "=== [setup] rc=$setup_rc in $((SECONDS - setup_start)) s, GPU tag $GPU_TAG"

# ---------------------------------------------------------------- steps
# a. Every kernel test compiled (on CUDA the parity tests run the compiled kernels: the small odd shapes, ties, empty
#    images and forced select paths the interpreter checks on CPU, then the full-size ones; the tiled gradient matching
#    and the sampled select have never been compiled by Triton on a GPU), then the other gpu-marked tests: the
#    labeler's batches collected after the next launch, training steps that never wait for the GPU between logging.
gpu_tests() {
    "$PY" -m pytest -q tests/kernels -p no:cacheprovider --maxfail=10 --durations=8 --junitxml="$OUT/pytest_gpu.xml"
    local rc=$?
    "$PY" -m pytest -q -m gpu tests/pseudo_label tests/train -p no:cacheprovider --durations=4 || rc=1  # results in the log only (8 files come back)
    return $rc
}
if selected tests; then
    run_step tests 240 30 env OUT="$OUT" PY="$PY" bash -c "$(declare -f gpu_tests); gpu_tests"
fi

# d. Lightning overhead of a training step on the GPU: 40 timed steps (after 10 warm-up) per loop, 2 pairs, then 5
#    steps of each with torch's sync debug mode, listing where each loop makes the host wait for the GPU.
if selected train_step; then
    rm -f "$OUT/train_step-gpu.csv"  # the script appends
    run_step train_step 110 45 "$PY" benchmarks/train_step.py --device cuda --model dav2_vits --crop 518 \
        --batch-size 8 --steps 40 --warmup 10 --repeats 2 --log-every 20 --find-syncs 5 \
        --out "$OUT/train_step-gpu.csv"
fi

# b2. The same, timed as replayed CUDA graphs: the device's time without the host's launch overhead.
if selected losses_graph; then
    run_step losses_graph 100 30 "$PY" benchmarks/losses.py --batch 32 --size 518 --dtypes fp32,bf16 \
        --impls triton,eager --cudagraph --out-dir "$OUT"
fi

# c. Pseudo-labeling throughput: the docstring's GPU sizes (dav2_vitl, 480x640, batch 32) with 384 instead of 1024
#    images, the one-at-a-time loop on 64 of them (the script scales it to --num), best of 2 instead of 3. The job
#    writes npz labels (f16 measured as fast in the first run); encoding is its largest CPU cost, so most of the 16
#    cores encode.
if selected pseudo_label; then
    run_step pseudo_label 110 45 "$PY" benchmarks/pseudo_label.py --device cuda --model dav2_vitl --num 384 \
        --size 480 640 --batch-size 32 --single-num 64 --repeat 2 --encoding npz --num-workers 4 \
        --num-encoders 11 --out "$OUT/pseudo_label-$GPU_TAG.csv"
fi

# e. FSDP2 on the GPU (NCCL, bf16-mixed, DTensor weights) through the user's path: `depthkit fit` with
#    configs/trainer/gpu_fsdp.yaml on synthetic shards, 30 steps of the tiny teacher on the one GPU, then the
#    losses it logged (finite, lower at the end) and the full checkpoint it saved (loads with create_model).
fsdp2_check() {
    local d="$WORK/fsdp2"
    "$PY" -m depthkit.cli synth --out "$d/labeled" --num 64 --size 96 128 --workers 2 || return 1
    "$PY" -m depthkit.cli fit --trainer configs/trainer/gpu_fsdp.yaml --config recipes/tiny_teacher.yaml \
        --data.labeled "$d/labeled" --data.val null --data.num_workers 2 --model.panel_every_n_steps 0 \
        --trainer.max_steps 30 --trainer.log_every_n_steps 5 --trainer.enable_progress_bar false \
        --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$d/run" \
        --trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint --trainer.callbacks.dirpath "$d/ckpt" \
        --trainer.callbacks.every_n_train_steps 30 --trainer.default_root_dir "$d/run" || return 1
    "$PY" - "$d" <<'PYEOF'
import csv, glob, math, sys
import torch
from depthkit.models import create_model
d = sys.argv[1]
(metrics,) = glob.glob(f"{d}/run/lightning_logs/version_*/metrics.csv")
losses = [float(r["train/loss"]) for r in csv.DictReader(open(metrics)) if r.get("train/loss")]
print("fsdp2 train/loss every 5 steps:", [round(x, 4) for x in losses])
assert losses and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
(path,) = glob.glob(f"{d}/ckpt/*step=30.ckpt")
state = torch.load(path, map_location="cpu", weights_only=False)
model = create_model(state["hyper_parameters"]["model"], checkpoint_path=path)
print("fsdp2 checkpoint:", path, "step", state["global_step"], "->", model.meta.name, "OK")
PYEOF
}
if selected fsdp2; then
    # `timeout` runs programs, not shell functions: hand the function to a child bash.
    run_step fsdp2 90 40 env WORK="$WORK" PY="$PY" bash -c "$(declare -f fsdp2_check); fsdp2_check"
fi

# b3. Where the fused SSI losses' time goes, host against device (tables in the log only).
if selected losses_profile; then
    run_step losses_profile 45 20 "$PY" benchmarks/losses.py --batch 32 --size 518 --dtypes fp32 \
        --ops ssi_lsq,ssi_median_trim0.1,gradient_matching --impls triton,eager --profile \
        --out-dir "$WORK/losses_profile"
fi

# b4. The select's pixels per program (partition and radix passes; the median family's device bottleneck in run 2).
select_sweep() {
    local b
    for b in 2048 4096 8192 16384; do
        "$PY" benchmarks/losses.py --batch 32 --size 518 --dtypes fp32 --ops masked_median --impls triton,eager \
            --cudagraph --select-block "$b" --out-dir "$WORK/select_$b" 2>/dev/null | grep -E "radix select|masked_median"
    done
}
if selected select_sweep; then
    run_step select_sweep 60 20 env WORK="$WORK" PY="$PY" bash -c "$(declare -f select_sweep); select_sweep"
fi

# b. Loss kernels vs eager at full size (batch 32, 518x518, fp32 and bf16): no torch.compile, so it is quick.
if selected losses; then
    run_step losses 100 30 "$PY" benchmarks/losses.py --batch 32 --size 518 --dtypes fp32,bf16 --impls triton,eager \
        --out-dir "$WORK/losses_te"
    for f in "$WORK"/losses_te/losses_*.csv; do [ -e "$f" ] && cp "$f" "$OUT/$(basename "$f" .csv)-triton_eager.csv"; done
fi

# f. The full losses benchmark (adds torch.compile of each reference): all the time left, at least 90 s.
if selected losses_compile; then
    run_step losses_compile 0 90 "$PY" benchmarks/losses.py --batch 32 --size 518 --dtypes fp32,bf16 --cudagraph \
        --out-dir "$OUT"
fi

# ---------------------------------------------------------------- summary
{
    printf 'step\trc\tseconds\tstatus\n'
    printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.tsv"
log ""
log "=== summary (total $SECONDS s of a ${BUDGET_S} s budget; files in $OUT)"
column -t -s $'\t' "$OUT/summary.tsv" 2>/dev/null | tee -a "$LOG" || tee -a "$LOG" <"$OUT/summary.tsv"
# shellcheck disable=SC2012
ls -l "$OUT" | tee -a "$LOG"
rm -rf "$WORK"
# Exit non-zero when any step failed (skips and dry runs are not failures).
! grep -qE $'\t(FAILED|TIMEOUT)$' "$OUT/summary.tsv"
