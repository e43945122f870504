#!/usr/bin/env bash
# Builds the bochs that run.sh needs for the avx512_vnni and avx512_bf16 builds: bochs 3.0 (it
# implements vpdpbusd and vdpbf16ps) whose corei7_skylake_x model also reports AVX512_VNNI and
# AVX512_BF16 (CPUID leaf 7: ECX bit 11, sub-leaf 1 EAX bit 5), without the debugger, display "nogui".
# Why not a stock model: bochs 3.0's sapphire_rapids (VNNI + BF16) and 2.7's icelake_u / tigerlake
# (VNNI) stop booting Debian's Linux 6.1 right after "LSM: Security Framework initializing" (README.md),
# while Skylake-X boots; adding the two extensions to it changes nothing the kernel looks at early.
#
# usage: tools/isa_emulation/build_bochs.sh BOCHS_SRC_DIR
#   BOCHS_SRC_DIR: the "bochs" folder of bochs 3.0's source (git tag REL_3_0_FINAL of
#   https://github.com/bochs-emu/Bochs, or the bochs-3.0 release tarball), edited and built in place
#   (keep it outside this repository). Then: RZ_EMU_BOCHS=BOCHS_SRC_DIR/bochs tools/isa_emulation/run.sh
# environment: MAKE_JOBS (default 1; the build takes ~7 min of one core), CXX.
set -euo pipefail
SRC=$(cd "${1:?usage: build_bochs.sh BOCHS_SRC_DIR (bochs 3.0 source)}" && pwd)
MODEL="$SRC/cpu/cpudb/intel/corei7_skylake-x.cc"
[ -f "$MODEL" ] && [ -f "$SRC/cpu/avx/avx512_bf16.cc" ] || {
    echo "build_bochs.sh: $SRC is not a bochs >= 2.8 source folder (no $MODEL or cpu/avx/avx512_bf16.cc)" >&2
    exit 2
}

# The model edit (idempotent): enable the two extensions and report them in CPUID leaf 7.
python3 - "$MODEL" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
if "rwkv_zoo" in src:
    sys.exit(0)
def once(text, old, new):
    if text.count(old) != 1:
        sys.exit(f"build_bochs.sh: {path}: expected exactly one {old.strip()!r}: not bochs 3.0's model?")
    return text.replace(old, new)
src = once(src, "  enable_cpu_extension(BX_ISA_AVX512_BW);\n",
           "  enable_cpu_extension(BX_ISA_AVX512_BW);\n"
           "  // rwkv_zoo tools/isa_emulation: + AVX512_VNNI and AVX512_BF16 (Cooper Lake's additions)\n"
           "  enable_cpu_extension(BX_ISA_AVX512_VNNI);\n"
           "  enable_cpu_extension(BX_ISA_AVX512_BF16);\n")
start = src.index("void corei7_skylake_x_t::get_std_cpuid_leaf_7(")
end = src.index("\n}\n", start)
leaf7 = src[start:end]
leaf7 = once(leaf7, "leaf->eax = 0; /* report max sub-leaf", "leaf->eax = 1; /* report max sub-leaf")
first_ecx = leaf7.index("leaf->ecx = 0;")  # sub-leaf 0: the extensions' bits (VNNI) from bochs's helper
leaf7 = leaf7[:first_ecx] + "leaf->ecx = get_std_cpuid_leaf_7_ecx();" + leaf7[first_ecx + len("leaf->ecx = 0;"):]
leaf7 = once(leaf7, "  default:\n",
             "  case 1:  // sub-leaf 1: AVX512_BF16\n"
             "    leaf->eax = get_std_cpuid_leaf_7_subleaf_1_eax();\n"
             "    leaf->ebx = 0;\n    leaf->ecx = 0;\n    leaf->edx = 0;\n    break;\n"
             "  default:\n")
open(path, "w").write(src[:start] + leaf7 + src[end:])
EOF

cd "$SRC"
# x86-64 with AVX and EVEX (AVX-512); no debugger (run.sh then needs no "continue" command), no
# plugins, no instrumentation; PCI for the ACPI power-off the harness ends with.
[ -f Makefile ] || ./configure --enable-x86-64 --enable-avx --enable-evex --with-nogui --disable-debugger \
    --enable-all-optimizations --enable-cpu-level=6 --enable-pci --enable-cdrom --disable-docbook \
    --enable-vmx=no > configure.out 2>&1 || { tail -n 20 configure.out >&2; exit 1; }
nice -n 10 make -j"${MAKE_JOBS:-1}" > make.out 2>&1 || { tail -n 30 make.out >&2; exit 1; }
models=$(./bochs --help cpu 2>&1 || true)
grep -qx corei7_skylake_x <<< "$models" || { echo "build_bochs.sh: no corei7_skylake_x in the build" >&2; exit 1; }
echo "built $SRC/bochs; run: RZ_EMU_BOCHS=$SRC/bochs tools/isa_emulation/run.sh"
