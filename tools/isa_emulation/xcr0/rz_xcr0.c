// SPDX-License-Identifier: GPL-2.0
// Turns the AVX / AVX-512 register state back on in an emulated guest whose kernel turned it off.
//
// Why: Linux 6.1 checks the XSAVE layout the CPU describes (CPUID leaf 0xD) against its own
// computation and, when they disagree, disables XSAVE and with it AVX and AVX-512. bochs 2.7's
// AVX-512 CPU models describe it inconsistently ("XSAVE consistency problem: size 2432 !=
// kernel_size 2688": no MPX hole in one place, one in the other), so the booted kernel runs them
// with AVX off. This module sets CR4.OSXSAVE (through the kernel's CR4 shadow, so later CR4 writes
// keep it) and XCR0 to the x87, SSE, AVX and AVX-512 components the CPU offers. The kernel still
// context-switches with FXSAVE (x87 / SSE only), so the upper vector and mask registers are not saved
// per task: the harness then runs one thread, as the only process (see ../harness.cpp).
// Only for tools/isa_emulation/run.sh's throwaway emulated machine; never load it anywhere else.
#include <linux/irqflags.h>
#include <linux/module.h>
#include <asm/processor.h>
#include <asm/tlbflush.h>

static int __init rz_xcr0_init(void)
{
	unsigned int eax, ebx, ecx, edx, cr4_ecx;
	unsigned long flags;
	u64 want;

	cpuid_count(1, 0, &eax, &ebx, &cr4_ecx, &edx);
	if (!(cr4_ecx & (1u << 26)))  /* XSAVE */
		return -ENODEV;
	cpuid_count(0xd, 0, &eax, &ebx, &ecx, &edx);
	want = (((u64)edx << 32) | eax) & 0xe7;  /* x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM */
	local_irq_save(flags);
	cr4_update_irqsoff(X86_CR4_OSXSAVE, 0);
	asm volatile("xsetbv" : : "a"((u32)want), "d"((u32)(want >> 32)), "c"(0));
	local_irq_restore(flags);
	pr_info("rz_xcr0: XCR0 = %#llx\n", want);
	return 0;
}

static void __exit rz_xcr0_exit(void)
{
}

module_init(rz_xcr0_init);
module_exit(rz_xcr0_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("enable AVX/AVX-512 state in an emulated test guest (tools/isa_emulation)");
