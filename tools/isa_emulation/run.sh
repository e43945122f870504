#!/usr/bin/env bash
# Runs the AVX-512 and AVX-512 VNNI builds of the cpu backend's kernels on CPUs emulated by bochs, and
# checks them against the portable build (harness.cpp). See README.md.
#
# usage: tools/isa_emulation/run.sh [CSRC_DIR]      (default: the repository's backends/cpu/csrc)
# environment:
#   RZ_EMU_MODELS   "bochs-cpu-model:isa-it-must-run ..." (default: corei7_skylake_x:avx512; e.g. add
#                   corei7_icelake_u:avx512_vnni); each model is booted once, one after the other
#   RZ_EMU_KERNEL   the Linux kernel to boot (default: the newest /boot/vmlinuz-*)
#   RZ_EMU_WORK     build / log directory (default: a new temporary directory, kept for inspection)
#   RZ_EMU_TIMEOUT  seconds per boot before it counts as failed (default 1500)
#   RZ_EMU_IPS      bochs instructions per emulated second (default 200000000; only the guest's clock)
#   RZ_EMU_APPEND   extra kernel command-line arguments (e.g. to switch off a CPU feature a model hangs on)
#   CXX             the compiler (default g++)
# Exit status: 0 when every model reached the harness, ran the ISA it must run and printed no FAIL;
# 1 otherwise; 2 for a missing tool.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CSRC=$(cd "${1:-$REPO/backends/cpu/csrc}" && pwd)
KERNELS_PY=${RZ_EMU_KERNELS_PY:-$REPO/backends/cpu/kernels.py}
# The VNNI models (corei7_icelake_u, tigerlake) do not finish booting this kernel yet (README.md).
MODELS=${RZ_EMU_MODELS:-"corei7_skylake_x:avx512"}
KERNEL=${RZ_EMU_KERNEL:-$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)}
WORK=${RZ_EMU_WORK:-$(mktemp -d /tmp/rz-isa-emu.XXXXXX)}
TIMEOUT=${RZ_EMU_TIMEOUT:-1500}
IPS=${RZ_EMU_IPS:-200000000}
CXX=${CXX:-g++}
BIOS=/usr/share/bochs/BIOS-bochs-latest
VGABIOS=/usr/share/vgabios/vgabios.bin

missing=()
for tool in bochs grub-mkrescue xorriso mformat cpio gzip python3 make "$CXX"; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
[ -f "$BIOS" ] || missing+=("$BIOS")
[ -f "$VGABIOS" ] || missing+=("$VGABIOS")
[ -n "$KERNEL" ] && [ -f "$KERNEL" ] || missing+=("a kernel in /boot (RZ_EMU_KERNEL)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "run.sh: missing ${missing[*]}; on Debian/Ubuntu: apt-get install bochs bochsbios vgabios" \
         "linux-image-amd64 linux-headers-amd64 grub-pc-bin xorriso mtools cpio g++ make" >&2
    exit 2
fi
[ -r "$KERNEL" ] || { echo "run.sh: cannot read $KERNEL (run as root, or set RZ_EMU_KERNEL)" >&2; exit 2; }

t0=$(date +%s)
mkdir -p "$WORK"
echo "== work directory: $WORK; kernels from $CSRC"

# 1. The kernel libraries, one per (library, ISA), with backends/cpu/kernels.py's own flags: read from
# its ISAS / LIBRARIES / build_flags without importing it (that would import torch).
python3 - "$KERNELS_PY" > "$WORK/flags.txt" <<'EOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
wanted = {"BASE_FLAGS", "_AVX2", "_AVX512", "ISAS", "LIBRARIES"}
body = []
for node in tree.body:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    if any(isinstance(t, ast.Name) and t.id in wanted for t in targets) or (
            isinstance(node, ast.FunctionDef) and node.name == "build_flags"):
        body.append(node)
ns = {}
exec(compile(ast.Module(body=body, type_ignores=[]), sys.argv[1], "exec"), ns)
for isa in ns["ISAS"]:
    for name in ("cpu_gemv", "cpu_decode"):
        print(isa, name, ns["LIBRARIES"][name][0], " ".join(ns["build_flags"](name, isa)))
EOF
ROOT="$WORK/root"
rm -rf "$ROOT" && mkdir -p "$ROOT/rz"
echo "== building $(wc -l < "$WORK/flags.txt") kernel libraries and the harness"
pids=()
while read -r isa name src flags; do
    # shellcheck disable=SC2086  # flags is a list
    "$CXX" $flags -o "$ROOT/rz/$name-$isa.so" "$CSRC/$src" 2> "$WORK/build-$name-$isa.log" &
    pids+=($!)
done < "$WORK/flags.txt"
"$CXX" -O2 -std=c++17 -Wall -Wextra -o "$ROOT/init" "$HERE/harness.cpp" "$HERE/decode_check.cpp" -ldl -lm \
    2> "$WORK/build-harness.log" &
pids+=($!)
for p in "${pids[@]}"; do
    wait "$p" || { echo "run.sh: a build failed:" >&2; cat "$WORK"/build-*.log >&2; exit 1; }
done

# The kernel module that turns the AVX / AVX-512 state back on (xcr0/rz_xcr0.c: Linux rejects the XSAVE
# layout that bochs 2.7 describes and runs with AVX off), built for the kernel that boots.
KVER=${RZ_EMU_KVER:-$(basename "$KERNEL" | sed 's/^vmlinuz-//')}
KBUILD=/lib/modules/$KVER/build
[ -d "$KBUILD" ] || KBUILD=/usr/src/linux-headers-$KVER
if [ -d "$KBUILD" ]; then
    rm -rf "$WORK/xcr0" && cp -r "$HERE/xcr0" "$WORK/xcr0"
    make -s -C "$KBUILD" M="$WORK/xcr0" modules > "$WORK/build-xcr0.log" 2>&1 \
        || { echo "run.sh: building xcr0/rz_xcr0.ko failed:" >&2; cat "$WORK/build-xcr0.log" >&2; exit 1; }
    cp "$WORK/xcr0/rz_xcr0.ko" "$ROOT/rz/"
else
    echo "run.sh: no headers for kernel $KVER (apt-get install linux-headers-$KVER): booting without" \
         "rz_xcr0.ko, so the AVX builds will not run" >&2
fi

# 2. The initramfs: the harness as /init, the libraries, and the shared objects they load (copied at
# their paths, so the dynamic loader finds them as on this machine).
for lib in $(ldd "$ROOT/init" "$ROOT"/rz/*.so | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\/.*ld-linux/ {print $1}' | sort -u); do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
(cd "$ROOT" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) > "$WORK/initrd.gz"

ISODIR="$WORK/iso"
rm -rf "$ISODIR" && mkdir -p "$ISODIR/boot/grub"
cp "$KERNEL" "$ISODIR/boot/vmlinuz"
cp "$WORK/initrd.gz" "$ISODIR/boot/initrd.gz"
# quiet + loglevel: every console line costs emulated time on the serial port. No disk, no network.
cat > "$ISODIR/boot/grub/grub.cfg" <<EOF
set timeout=0
set default=0
menuentry "rwkv_zoo isa harness" {
    linux /boot/vmlinuz console=ttyS0,115200 rdinit=/init quiet loglevel=3 nokaslr mitigations=off panic=0 ${RZ_EMU_APPEND:-}
    initrd /boot/initrd.gz
}
EOF
grub-mkrescue -o "$WORK/boot.iso" "$ISODIR" > "$WORK/grub-mkrescue.log" 2>&1 \
    || { cat "$WORK/grub-mkrescue.log" >&2; exit 1; }
t_build=$(( $(date +%s) - t0 ))
echo "== built in ${t_build}s: initrd $(du -h "$WORK/initrd.gz" | cut -f1), iso $(du -h "$WORK/boot.iso" | cut -f1)"

# 3. One boot per CPU model, headless: the serial port goes to a file, the display to bochs's VNC
# server (it serves nobody: Debian's bochs has no "nogui" library, and rfb with timeout=0 does not wait).
status=0
summary=()
for spec in $MODELS; do
    model=${spec%%:*} must=${spec#*:}
    serial="$WORK/serial-$model.txt" log="$WORK/bochs-$model.log" rc="$WORK/bochsrc-$model"
    rm -f "$serial"
    cat > "$rc" <<EOF
megs: 256
romimage: file=$BIOS
vgaromimage: file=$VGABIOS
cpu: model=$model, count=1, ips=$IPS, reset_on_triple_fault=0
ata0-master: type=cdrom, path=$WORK/boot.iso, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=$serial
display_library: rfb, options="timeout=0"
mouse: enabled=0
speaker: enabled=0
sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy
clock: sync=none, time0=local
log: $log
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
EOF
    echo "== booting bochs cpu model $model (must run: $must)"
    tb=$(date +%s)
    # Debian's bochs is built with its debugger, which stops before the first instruction: "c" continues.
    echo c > "$WORK/debugger.rc"
    bochs -q -f "$rc" -rc "$WORK/debugger.rc" < /dev/null > "$WORK/bochs-$model.stdout" 2>&1 &
    bpid=$!
    outcome="bochs exited"
    while kill -0 "$bpid" 2>/dev/null; do
        if grep -q "ISA-HARNESS-END" "$serial" 2>/dev/null; then outcome=done; break; fi
        if grep -qE "Kernel panic|Attempted to kill init" "$serial" 2>/dev/null; then outcome=panic; break; fi
        if [ $(( $(date +%s) - tb )) -ge "$TIMEOUT" ]; then outcome="timeout after ${TIMEOUT}s"; break; fi
        sleep 2
    done
    grep -q "ISA-HARNESS-END" "$serial" 2>/dev/null && outcome=done
    # The harness powers off (ACPI); give bochs a moment to leave by itself, then stop it.
    for _ in 1 2 3 4 5; do kill -0 "$bpid" 2>/dev/null || break; sleep 1; done
    kill "$bpid" 2>/dev/null || true
    wait "$bpid" 2>/dev/null || true
    secs=$(( $(date +%s) - tb ))
    echo "-- serial output ($model, ${secs}s, $outcome):"
    { grep '^xcr0:' "$serial"; sed -n '/ISA-HARNESS-BEGIN/,/ISA-HARNESS-END/p' "$serial"; } 2>/dev/null | tr -d '\r' || true
    if [ "$outcome" != done ]; then
        echo "run.sh: $model: the boot did not reach the end of the harness ($outcome); last lines of $serial:" >&2
        { tail -n 20 "$serial" 2>/dev/null || tail -n 5 "$log"; } | tr -d '\r' >&2 || true
        status=1
        summary+=("$model: NO RESULT ($outcome, ${secs}s)")
        continue
    fi
    fails=$(tr -d '\r' < "$serial" | grep -c '^FAIL' || true)
    ran_must=$(tr -d '\r' < "$serial" | grep -cE "^PASS $must +gemv-" || true)
    if [ "$fails" -gt 0 ] || [ "$ran_must" -eq 0 ]; then
        status=1
        [ "$ran_must" -eq 0 ] && echo "run.sh: $model: the $must build did not run (see the cpuid line)" >&2
    fi
    summary+=("$model: $fails FAIL, $must ran: $([ "$ran_must" -gt 0 ] && echo yes || echo no), ${secs}s")
done

echo "== summary (total $(( $(date +%s) - t0 ))s, build ${t_build}s)"
printf '   %s\n' "${summary[@]}"
exit $status
