#!/usr/bin/env bash
# Run one `merit` subcommand on this host with the given JAX device settings.
#
# Usage: launch/local.sh [OPTIONS] [--] SUBCOMMAND [ARGS...]
#
#   --platform P       set JAX_PLATFORMS: cpu, gpu (same as cuda), cuda, rocm or tpu
#   --cpu-devices N    split the host CPU into N XLA devices, so that on a CPU-only
#                      host each branch can get its own disjoint submesh
#   --gpus LIST        set CUDA_VISIBLE_DEVICES, e.g. 0,1
#   --mem-fraction F   set XLA_PYTHON_CLIENT_MEM_FRACTION, the share of GPU memory
#                      that JAX preallocates (JAX's default is 0.75)
#   --no-preallocate   set XLA_PYTHON_CLIENT_PREALLOCATE=false (allocate on demand)
#   --dry-run          print the settings and the command, run nothing
#
# Variables already set in the environment (JAX_PLATFORMS, XLA_FLAGS,
# CUDA_VISIBLE_DEVICES, XLA_PYTHON_CLIENT_*, MERIT_JAX_CACHE) pass through unless
# an option above overrides them. The command is $MERIT if set, else the
# repository's .venv/bin/merit if present, else `merit` on PATH.
#
# Example: launch/local.sh --platform cpu --cpu-devices 4 -- fetch
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "launch/local.sh: error: $*" >&2
  exit 2
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --platform)
      [[ $# -ge 2 ]] || die "--platform needs a value"
      case "$2" in
        cpu | cuda | rocm | tpu) export JAX_PLATFORMS="$2" ;;
        gpu) export JAX_PLATFORMS=cuda ;;
        *) die "invalid --platform '$2'; use cpu, gpu, cuda, rocm or tpu" ;;
      esac
      shift 2
      ;;
    --cpu-devices)
      [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices needs a positive integer"
      # Replace an existing device-count flag rather than passing two different ones.
      read -r -a kept_flags <<<"$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
      export XLA_FLAGS="${kept_flags[*]:+${kept_flags[*]} }--xla_force_host_platform_device_count=$2"
      shift 2
      ;;
    --gpus)
      [[ $# -ge 2 ]] || die "--gpus needs a comma-separated list such as 0,1"
      export CUDA_VISIBLE_DEVICES="$2"
      shift 2
      ;;
    --mem-fraction)
      [[ $# -ge 2 && "$2" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction needs a number in (0, 1]"
      export XLA_PYTHON_CLIENT_MEM_FRACTION="$2"
      shift 2
      ;;
    --no-preallocate)
      export XLA_PYTHON_CLIENT_PREALLOCATE=false
      shift
      ;;
    --dry-run)
      dry_run=1
      shift
      ;;
    -h | --help) usage 0 ;;
    --)
      shift
      break
      ;;
    -*) die "unknown option '$1'; see launch/local.sh --help" ;;
    *) break ;;
  esac
done

[[ $# -ge 1 ]] || die "missing merit subcommand; see launch/local.sh --help"

if [[ -n "${MERIT:-}" ]]; then
  read -r -a merit_cmd <<<"$MERIT"
elif [[ -x "$repo_root/.venv/bin/merit" ]]; then
  merit_cmd=("$repo_root/.venv/bin/merit")
elif command -v merit >/dev/null 2>&1 || [[ $dry_run -eq 1 ]]; then
  merit_cmd=(merit)
else
  die "merit not found; run 'make install' in $repo_root or 'pip install merit-jax', or set MERIT"
fi

settings=()
for name in JAX_PLATFORMS XLA_FLAGS CUDA_VISIBLE_DEVICES XLA_PYTHON_CLIENT_MEM_FRACTION \
  XLA_PYTHON_CLIENT_PREALLOCATE MERIT_JAX_CACHE; do
  if [[ -n "${!name:-}" ]]; then
    settings+=("$name=${!name}")
  fi
done
echo "launch/local.sh: ${settings[*]:-(no JAX settings)} ${merit_cmd[*]} $*" >&2

if [[ $dry_run -eq 1 ]]; then
  exit 0
fi
exec "${merit_cmd[@]}" "$@"
