#!/usr/bin/env bash
# The wheels that benchmarks/device_check.py needs on a bare GPU machine with the project's GPU image (torch 2.11
# + CUDA 13, transformers 5.17, accelerate 1.15, peft, triton; no `datasets`; no registry access): `datasets`
# and what it needs beyond the image, TRL 1.16 (the peer the check times), prefalign itself, and, with
# --with-deepspeed, DeepSpeed and its dependencies. Built here, from the registry, for the target's Python and
# platform, small enough to travel with the working tree (64 MiB in all).
#
#     scripts/build_wheelhouse.sh                                  # Python 3.12, manylinux_2_28_x86_64 -> wheelhouse/
#     scripts/build_wheelhouse.sh --python-version 3.11 --out /tmp/wheelhouse-311 --with-deepspeed
#
# Then, on the GPU machine (the wheelhouse/ folder carried along with the working tree):
#
#     python -m pip install --no-index --no-deps wheelhouse/*.whl
#     python benchmarks/device_check.py --out results/gpu-check
#
# Every package is listed and pinned here, and downloaded with --no-deps: what the image already has (numpy,
# pyyaml, tqdm, filelock, packaging, psutil, jinja2, huggingface_hub 1.x and its httpx — transformers 5.17 needs
# huggingface_hub>=1.5,<2) is not repeated. The pins are a set that works together: datasets 4.8.0 (prefalign's
# oldest supported version, which takes the image's huggingface_hub 1.x; 5.1 and later want >=1.31) and the
# versions its requirements allow (pyarrow>=21, fsspec<=2026.2.0, dill<0.4.2, multiprocess<0.70.20, requests).
# prefalign's own plotting and statistics dependencies (matplotlib, scipy, python-rake) are imported lazily and
# not needed by the check: prefalign is installed with --no-deps too. The wheelhouse folder is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=3.12
PLATFORM=manylinux_2_28_x86_64
OUT=wheelhouse
DEEPSPEED=0
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) PY_VERSION="$2"; shift 2 ;;
        --platform) PLATFORM="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --with-deepspeed) DEEPSPEED=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "build_wheelhouse: unknown argument $1" >&2; usage 2 ;;
    esac
done
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
PIP=("$PYTHON" -m pip)

# datasets and what it needs beyond the image; TRL 1.16 (its other requirements are the image's or above)
PACKAGES=(
    datasets==4.8.0
    pyarrow==21.0.0
    pandas==3.1.1
    python-dateutil==2.9.0.post0
    six==1.17.0
    dill==0.4.1
    multiprocess==0.70.19
    xxhash==4.1.0
    fsspec==2026.2.0
    requests==2.34.2
    charset-normalizer==3.5.3
    idna==3.20
    urllib3==2.8.0
    certifi==2026.10.19.post1
    trl==1.16.0
)
# DeepSpeed ZeRO-3 (a part of the check): DeepSpeed has no wheel on the registry; it is built here from its
# source, below (DS_BUILD_OPS=0: pure Python, its ops JIT-compiled on first use). Its other requirements are
# the image's: numpy, packaging, psutil, tqdm, torch, and pydantic (typer, which transformers 5.17 requires,
# requires it)
DEEPSPEED_PACKAGES=(
    hjson==3.1.0
    msgpack==1.1.2
    ninja==1.13.0
    py-cpuinfo==9.0.0
    einops==0.8.1
)

# pip takes --platform literally: a wheel built for an older glibc (manylinux_2_17, manylinux2014, ...) runs on
# manylinux_2_28 too, so every older tag of the target's glibc is offered as well
PLATFORMS=(--platform "$PLATFORM")
if [[ "$PLATFORM" =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
    glibc="${BASH_REMATCH[1]}" arch="${BASH_REMATCH[2]}"
    for ((m = glibc - 1; m >= 5; m--)); do
        PLATFORMS+=(--platform "manylinux_2_${m}_${arch}")
        case "$m" in 17) PLATFORMS+=(--platform "manylinux2014_${arch}") ;; 12) PLATFORMS+=(--platform "manylinux2010_${arch}") ;;
                     5) PLATFORMS+=(--platform "manylinux1_${arch}") ;; esac
    done
fi

mkdir -p "$OUT"
rm -f "$OUT"/*.whl  # this script's own output: rebuilt whole
wanted=("${PACKAGES[@]}")
[ "$DEEPSPEED" = 1 ] && wanted+=("${DEEPSPEED_PACKAGES[@]}")
for spec in "${wanted[@]}"; do
    "${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        "${PLATFORMS[@]}" --dest "$OUT" "$spec"
done
# prefalign itself, from this checkout as it is (pure Python), built in a scratch copy: setuptools' build/ folder
# would otherwise keep modules deleted since and put them in the wheel
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
tar --exclude=__pycache__ --exclude='*.egg-info' -cf - pyproject.toml README.md src | tar -xf - -C "$src"
"${PIP[@]}" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT" "$src"
if [ "$DEEPSPEED" = 1 ]; then
    # its build imports torch (this environment's; no build isolation, which would download a CUDA torch)
    DS_BUILD_OPS=0 "${PIP[@]}" wheel --quiet --no-deps --no-build-isolation --no-binary deepspeed \
        --wheel-dir "$OUT" deepspeed==0.19.8
fi

echo "wheelhouse for Python $PY_VERSION on $PLATFORM: $OUT/"
ls -l "$OUT"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF; total += $5; n++}
    END {printf "total: %.1f MiB (%d bytes) in %d wheels\n", total / 1048576, total, n}'
total=$(cat "$OUT"/*.whl | wc -c)
if [ "$total" -gt $((60 * 1048576)) ]; then
    echo "warning: over 60 MiB; with the working tree it may not fit the 64 MiB a device run carries" >&2
fi
echo "install on the target: python -m pip install --no-index --no-deps $OUT/*.whl"
