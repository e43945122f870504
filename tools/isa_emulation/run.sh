#!/usr/bin/env bash
# Runs the AVX-512, AVX-512 VNNI and AVX-512 BF16 builds of the cpu backend's kernels on CPUs emulated
# by bochs, and checks them against the portable build (harness.cpp). See README.md.
#
# usage: tools/isa_emulation/run.sh [CSRC_DIR]      (default: the repository's backends/cpu/csrc)
# environment:
#   RZ_EMU_MODELS   "bochs-cpu-model:isa-it-must-run ..." (default: corei7_skylake_x:avx512_bf16 with
#                   RZ_EMU_BOCHS, whose Skylake-X has VNNI and BF16; corei7_skylake_x:avx512_bf16_sw with
#                   Debian's bochs 2.7); one boot each, one after the other
#   RZ_EMU_BOCHS    the bochs binary (default: bochs on PATH), e.g. the bochs 3.0 of build_bochs.sh
#   RZ_EMU_BIOS, RZ_EMU_VGABIOS  its ROM images (default: next to a source-tree binary, else
#                   /usr/share/bochs, /usr/share/vgabios)
#   RZ_EMU_DISPLAY  bochs display library (default: rfb for Debian's /usr/bin/bochs, else nogui)
#   RZ_EMU_NICE     niceness of the bochs process (default 10: the emulation is one busy core)
#   RZ_EMU_SW_BF16  1 (default): also build avx512_bf16_sw, the avx512_bf16 build with its bf16 and VNNI
#                   instructions emulated in software (sw_bf16.h), which runs on any AVX-512 model; 0: not
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
BOCHS=${RZ_EMU_BOCHS:-bochs}
BOCHS_PATH=$(command -v "$BOCHS" || true)
# The models with VNNI / BF16 do not finish booting this kernel (bochs 2.7's corei7_icelake_u and
# tigerlake, 3.0's sapphire_rapids: README.md), so build_bochs.sh adds both to Skylake-X, which boots;
# Debian's bochs 2.7 runs the software-instruction build there instead.
# (bochs's help is read whole before grep: under pipefail an early grep -q exit could fail the pipe)
BOCHS_HELP=$([ -n "$BOCHS_PATH" ] && { "$BOCHS_PATH" --help; "$BOCHS_PATH" --help cpu; } 2>&1 || true)
if [ -n "${RZ_EMU_BOCHS:-}" ]; then
    MODELS=${RZ_EMU_MODELS:-"corei7_skylake_x:avx512_bf16"}
else
    MODELS=${RZ_EMU_MODELS:-"corei7_skylake_x:avx512_bf16_sw"}
fi
SW_BF16=${RZ_EMU_SW_BF16:-1}
KERNEL=${RZ_EMU_KERNEL:-$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)}
WORK=${RZ_EMU_WORK:-$(mktemp -d /tmp/rz-isa-emu.XXXXXX)}
TIMEOUT=${RZ_EMU_TIMEOUT:-1500}
IPS=${RZ_EMU_IPS:-200000000}
CXX=${CXX:-g++}
BOCHS_DIR=$(dirname "${BOCHS_PATH:-/usr/bin/bochs}")
if [ -f "$BOCHS_DIR/bios/BIOS-bochs-latest" ]; then  # a binary in its source tree (README.md's recipe)
    BIOS=${RZ_EMU_BIOS:-$BOCHS_DIR/bios/BIOS-bochs-latest}
    VGABIOS=${RZ_EMU_VGABIOS:-$BOCHS_DIR/bios/VGABIOS-lgpl-latest.bin}
else
    BIOS=${RZ_EMU_BIOS:-/usr/share/bochs/BIOS-bochs-latest}
    VGABIOS=${RZ_EMU_VGABIOS:-/usr/share/vgabios/vgabios.bin}
fi

missing=()
for tool in "$BOCHS" grub-mkrescue xorriso mformat cpio gzip python3 make objdump "$CXX"; do
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
echo "== work directory: $WORK; kernels from $CSRC; $(grep -o 'Bochs x86 Emulator [^ ]*' <<< "$BOCHS_HELP" | head -n 1) ($BOCHS_PATH)"

# 1. The kernel libraries, one per (library, ISA), with backends/cpu/kernels.py's own flags: read from
# its ISAS / LIBRARIES / build_flags without importing it (that would import torch).
python3 - "$KERNELS_PY" "$SW_BF16" "$HERE/sw_bf16.h" > "$WORK/flags.txt" <<'EOF'
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
        # avx512_bf16_sw: the same sources and flags, plus the header that replaces the BF16 / VNNI
        # intrinsics with exact AVX-512F code (sw_bf16.h; included first, before the sources' own).
        if isa == "avx512_bf16" and sys.argv[2] == "1":
            print(isa + "_sw", name, ns["LIBRARIES"][name][0],
                  " ".join(ns["build_flags"](name, isa)), "-include", sys.argv[3])
EOF
ROOT="$WORK/root"
rm -rf "$ROOT" && mkdir -p "$ROOT/rz"
echo "== building $(wc -l < "$WORK/flags.txt") kernel libraries and the harness"
pids=()
while read -r isa name src flags; do
    # shellcheck disable=SC2086  # flags is a list
    "$CXX" $flags -shared -o "$ROOT/rz/$name-$isa.so" "$CSRC/$src" 2> "$WORK/build-$name-$isa.log" &
    pids+=($!)
done < "$WORK/flags.txt"
"$CXX" -O2 -std=c++17 -Wall -Wextra -o "$ROOT/init" "$HERE/harness.cpp" "$HERE/decode_check.cpp" -ldl -lm \
    2> "$WORK/build-harness.log" &
pids+=($!)
for p in "${pids[@]}"; do
    wait "$p" || { echo "run.sh: a build failed:" >&2; cat "$WORK"/build-*.log >&2; exit 1; }
done
# The software build must not contain the instructions it stands in for (else it would fault, or not
# test what it says), and the real avx512_bf16 build must contain them.
for so in "$ROOT"/rz/*-avx512_bf16_sw.so; do
    [ -e "$so" ] || continue
    # (counted, not grep -q: under pipefail an early grep exit fails objdump with SIGPIPE)
    n_sw=$(objdump -d "$so" | grep -cE 'vdpbf16ps|vcvtne2?ps2bf16|vpdpbusd' || true)
    if [ "$n_sw" -ne 0 ]; then
        echo "run.sh: $so still contains $n_sw BF16 / VNNI instructions (sw_bf16.h did not replace them)" >&2
        exit 1
    fi
    hw=${so%_sw.so}.so
    n_hw=$(objdump -d "$hw" | grep -c vdpbf16ps || true)
    [ "$n_hw" -gt 0 ] || { echo "run.sh: $hw has no vdpbf16ps" >&2; exit 1; }
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

# 3. One boot per CPU model, headless: the serial port goes to a file, the display to "nogui", or on
# Debian's bochs (which has no "nogui" library) to its VNC server, which serves nobody (rfb with
# timeout=0 does not wait).
if [ -n "${RZ_EMU_DISPLAY:-}" ]; then
    DISPLAY_LIB=$RZ_EMU_DISPLAY
elif [ "$(readlink -f "$BOCHS_PATH")" = /usr/bin/bochs ]; then
    DISPLAY_LIB='rfb, options="timeout=0"'
else
    DISPLAY_LIB=nogui
fi
# Debian's bochs loads its sound plugin (dummy drivers: no device); a bochs built without sound
# rejects the option.
SOUND_LINE=
[ "$(readlink -f "$BOCHS_PATH")" = /usr/bin/bochs ] && SOUND_LINE="sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy"
# A bochs built with its debugger (Debian's) stops before the first instruction: "-rc" feeds it "c".
DEBUGGER_ARGS=()
if grep -q -- '-rc filename' <<< "$BOCHS_HELP"; then
    echo c > "$WORK/debugger.rc"
    DEBUGGER_ARGS=(-rc "$WORK/debugger.rc")
fi
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
display_library: $DISPLAY_LIB
mouse: enabled=0
speaker: enabled=0
$SOUND_LINE
clock: sync=none, time0=local
log: $log
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
EOF
    echo "== booting bochs cpu model $model (must run: $must)"
    tb=$(date +%s)
    nice -n "${RZ_EMU_NICE:-10}" "$BOCHS_PATH" -q -f "$rc" "${DEBUGGER_ARGS[@]}" < /dev/null > "$WORK/bochs-$model.stdout" 2>&1 &
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
        [ "$ran_must" -eq 0 ] && echo "run.sh: $model: the $must build did not run (see the cpuid line; a" \
            "bochs from build_bochs.sh gives corei7_skylake_x VNNI and BF16)" >&2
    fi
    summary+=("$model: $fails FAIL, $must ran: $([ "$ran_must" -gt 0 ] && echo yes || echo no), ${secs}s")
done

echo "== summary (total $(( $(date +%s) - t0 ))s, build ${t_build}s)"
printf '   %s\n' "${summary[@]}"
exit $status
