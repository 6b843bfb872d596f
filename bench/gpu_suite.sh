#!/usr/bin/env bash
# The GPU runs behind the committed results of the transfer/serving work, in parts that
# each fit a 10-minute slot on a 2 x H100 machine. Run from the repo root:
#   bash bench/gpu_suite.sh check|transfer|colocated|pd1|pd2-prefill|pd2-prefill-capped|pd2-balanced|pd2-slo-2048|pd2-slo-8192|gateway
#   bash bench/gpu_suite.sh prefix-shared|prefix-shared-off|prefix-chat|prefix-chat-off  (one H200)
#   bash bench/gpu_suite.sh prefix-chat-local [N]  (one H200; N 0: the baseline)
# Every benchmark writes its JSON to bench/results/ (card, commit, date, command).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
MODEL=(--model llama-3.1-8b --load-format dummy)
# Prefill-heavy and balanced workloads of the two-GPU comparison; the SLOs of issue 8.
SLO=(--goodput ttft:2000 tpot:40)
# The prefix parts' -off variants: the same run with prefix caching off.
CACHING_OFF=$([[ "${1:-}" == *-off ]] && echo --no-prefix-caching)

case "${1:-}" in
  check)  # the transports' GPU tests (cuda_ipc on one GPU and across two; nccl on two)
    $PY -m pytest -q -m "gpu or gpu2" -p no:cacheprovider --timeout 240 \
      tests/gpu/test_cuda_ipc_gpu.py tests/kvtransfer/test_nccl_backend.py
    ;;
  transfer)  # GB/s per backend beside its ceiling
    $PY -m tandem.bench transfer --backends zmq,cuda_ipc --requests 1,16 \
      --sender-device cuda:0 --receiver-device cuda:0
    $PY -m tandem.bench transfer --backends nccl --requests 1,16 \
      --sender-device cuda:0 --receiver-device cuda:1
    ;;
  colocated)  # the whole service vs the in-process engine, 1000 x 256/256 at rate inf
    $PY -m tandem.bench serve "${MODEL[@]}" --max-num-seqs 512 --modes colocated --gpus 1 \
      --rates inf --num-prompts 1000 --input-len 256 --output-len 256 \
      --offline-baseline --client-processes 4
    ;;
  pd1)  # one GPU shared by 1 prefill + 1 decode (cuda_ipc) vs one colocated worker
    $PY -m tandem.bench serve "${MODEL[@]}" --modes 1p1d,colocated --gpus 1 --kv-transport cuda_ipc \
      --rates 1,4,16,inf --duration 12 --min-prompts 12 --num-prompts 150 \
      --input-len 2048 --output-len 128 "${SLO[@]}" --client-processes 4
    ;;
  pd2-prefill)  # two GPUs: 1 prefill + 1 decode (nccl), the same with the decode worker
    # prefilling (512 prompt tokens a step) while the prefill worker is backed up, and
    # two colocated workers at the engine's defaults
    $PY -m tandem.bench serve "${MODEL[@]}" --modes 1p1d,1p1d-local,colocated --gpus 2 \
      --kv-transport nccl --local-prefill-after-ms 100 --max-local-prefills 2 \
      --local-prefill-tokens 512 \
      --rates 18,22,26,30,34 --duration 12 --min-prompts 30 --num-prompts 420 \
      --input-len 2048 --output-len 128 "${SLO[@]}" --client-processes 4
    ;;
  pd2-prefill-capped)  # two colocated workers with the 1p1d-local decode worker's cap
    $PY -m tandem.bench serve "${MODEL[@]}" --modes colocated --gpus 2 --max-prefill-tokens 512 \
      --rates 18,22,26,30,34 --duration 12 --min-prompts 30 --num-prompts 420 \
      --input-len 2048 --output-len 128 "${SLO[@]}" --client-processes 4
    ;;
  pd2-balanced)
    $PY -m tandem.bench serve "${MODEL[@]}" --modes 1p1d,colocated --gpus 2 --kv-transport nccl \
      --rates 32,48 --duration 12 --min-prompts 30 --num-prompts 600 \
      --input-len 512 --output-len 512 "${SLO[@]}" --client-processes 4
    ;;
  pd2-slo-2048|pd2-slo-8192)  # issue 19: three SLO readings of one sweep, DistServe's
    # p90 attainment, rates low enough to find each layout's goodput under a tight TPOT
    if [ "$1" = pd2-slo-2048 ]; then
      shape=(--input-len 2048 --output-len 128 --rates 4,8,12,16,20 --num-prompts 300)
    else
      shape=(--input-len 8192 --output-len 256 --rates 1,2,3,4,6 --num-prompts 120)
    fi
    $PY -m tandem.bench serve "${MODEL[@]}" --modes 1p1d,1p1d-local,colocated --gpus 2 \
      --kv-transport nccl --local-prefill-after-ms 100 --max-local-prefills 2 \
      --local-prefill-tokens 512 --duration 12 --min-prompts 24 "${shape[@]}" \
      --slo-sets tpot15=ttft:2000,tpot:15 tpot20=ttft:2000,tpot:20 tpot40=ttft:2000,tpot:40 \
      --slo-attainment 0.9 --client-processes 4
    ;;
  gateway)  # CPU only (issue 16): one gateway's capacity against the fake pool, gRPC and
    # HTTP, 1 and 2 gateway processes, pool as fast as it can; then gRPC paced at ~30k
    # tok/s offered (2,000 streams, a step every 66 ms: one token a message) for the
    # added latency; then the bare grpc.aio floor at the same pace. 4 pool processes and
    # 8 client processes, so that on 16 cores neither sets the pace (each run's JSON has
    # pool_cores_used, pool_late_steps and client_max_cpu_share to check). No torch
    # needed; pass --model-dir DIR (any tokenizer.json + config.json) where smollm2 is
    # not cached, and --out-dir DIR to write the JSON elsewhere. About 3 minutes.
    $PY -m tandem.bench gateway --streams 2000 --max-tokens 256 --client-processes 8 \
      --pool-processes 4 --apis grpc,http --gateway-workers 1,2 "${@:2}"
    $PY -m tandem.bench gateway --streams 2000 --max-tokens 128 --client-processes 8 \
      --pool-processes 4 --apis grpc --gateway-workers 1,2 --token-delay 0.066 "${@:2}"
    # The floor takes no --model-dir: only --out-dir of the extra arguments reaches it.
    FLOOR_OUT=()
    args=("${@:2}")
    for i in "${!args[@]}"; do
      [ "${args[$i]}" = --out-dir ] && FLOOR_OUT=(--out-dir "${args[$((i + 1))]}")
    done
    $PY -m tandem.bench grpc-floor --streams 2000 --max-tokens 128 --client-processes 8 \
      --handlers write,yield --token-delay 0.066 "${FLOOR_OUT[@]}"
    $PY -m tandem.bench grpc-floor --streams 2000 --max-tokens 128 --client-processes 8 \
      --handlers write "${FLOOR_OUT[@]}"
    ;;
  prefix-shared|prefix-shared-off)  # one H200: 2,000 shared + 100 own prompt tokens, 128
    # out; colocated and 1p1d (cuda_ipc) with prefix caching on (off: the -off part)
    $PY -m tandem.bench serve "${MODEL[@]}" --modes colocated,1p1d --gpus 1 --kv-transport cuda_ipc \
      --workload shared-prefix --shared-prefix-len 2000 --input-len 100 --output-len 128 \
      --rates 4,16,64,inf --duration 10 --min-prompts 24 --num-prompts 320 \
      "${SLO[@]}" --client-processes 4 ${CACHING_OFF}
    ;;
  prefix-chat|prefix-chat-off)  # one H200: 6-turn conversations, +200 prompt tokens and
    # 128 out a turn; colocated and 1p1d (cuda_ipc), caching on (off: the -off part)
    $PY -m tandem.bench serve "${MODEL[@]}" --modes colocated,1p1d --gpus 1 --kv-transport cuda_ipc \
      --workload multi-turn --turns 6 --turn-gap 2 --input-len 200 --output-len 128 \
      --rates 6,24 --duration 15 --min-prompts 36 --num-prompts 360 \
      "${SLO[@]}" --client-processes 4 ${CACHING_OFF}
    ;;
  prefix-chat-local)  # one H200: prefix-chat's 1p1d (cuda_ipc), the decode worker
    # prefilling itself every turn of which at most N tokens (default 384) are missing
    # from its cache: a first turn has 200 tokens, each next one ~315 beyond the blocks
    # the decode worker holds (the previous answer is a stand-in, not its own). N 0:
    # the same run without it, the baseline to run beside it on the same machine.
    n=${2:-384}
    local_flags=""
    if [ "$n" != 0 ]; then
      local_flags="--local-prefill-uncached-tokens $n --max-local-prefills 2"
    fi
    $PY -m tandem.bench serve "${MODEL[@]}" --modes 1p1d --gpus 1 --kv-transport cuda_ipc \
      --workload multi-turn --turns 6 --turn-gap 2 --input-len 200 --output-len 128 \
      --rates 6,24 --duration 15 --min-prompts 36 --num-prompts 360 \
      "${SLO[@]}" --client-processes 4 --serve-args "$local_flags"
    ;;
  *)
    echo "usage: $0 check|transfer|colocated|pd1|pd2-prefill|pd2-prefill-capped|pd2-balanced|pd2-slo-2048|pd2-slo-8192|gateway|prefix-shared[-off]|prefix-chat[-off]|prefix-chat-local [N]" >&2
    exit 2
    ;;
esac
