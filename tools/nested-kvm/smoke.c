/*
 * Minimal KVM smoke test for the nested-kvm harness.
 *
 * Opens /dev/kvm, checks the API version, creates a VM with one 64 KiB
 * memory slot and one vCPU, and runs this 16-bit real-mode code at 0x1000:
 *
 *     mov al, 'A'      ; b0 41
 *     mov dx, 0x3f8    ; ba f8 03
 *     out dx, al       ; ee
 *     hlt              ; f4
 *
 * Expected exits: KVM_EXIT_IO (port 0x3f8, byte 'A'), then KVM_EXIT_HLT.
 * Exit status 0 on success, non-zero with a message otherwise.
 *
 * With an argument N > 0 it then also times N round trips of
 * "out dx, al; jmp $-1" (one KVM_EXIT_IO per KVM_RUN) and prints the mean.
 *
 * Build: gcc -O2 -Wall -o smoke tools/nested-kvm/smoke.c
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE_ADDR 0x1000

static void die(const char *what)
{
    fprintf(stderr, "smoke: %s failed: %s\n", what, strerror(errno));
    exit(1);
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static const char *exit_name(uint32_t r)
{
    switch (r) {
    case KVM_EXIT_IO: return "KVM_EXIT_IO";
    case KVM_EXIT_HLT: return "KVM_EXIT_HLT";
    case KVM_EXIT_MMIO: return "KVM_EXIT_MMIO";
    case KVM_EXIT_SHUTDOWN: return "KVM_EXIT_SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "KVM_EXIT_FAIL_ENTRY";
    case KVM_EXIT_INTERNAL_ERROR: return "KVM_EXIT_INTERNAL_ERROR";
    default: return "other";
    }
}

static int bench(int vcpu, struct kvm_run *run, uint8_t *mem, long n)
{
    static const uint8_t loop[] = { 0xee, 0xeb, 0xfd }; /* out dx,al; jmp -3 */
    memcpy(mem + 0x2000, loop, sizeof loop);
    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = 0x2000;
    regs.rdx = 0x3f8;
    regs.rflags = 0x2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS (bench)");
    double t = now_ms();
    for (long i = 0; i < n; i++) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN (bench)");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "smoke: bench got exit %u\n", run->exit_reason);
            return 1;
        }
    }
    double ms = now_ms() - t;
    printf("BENCH: %ld IO exits in %.1f ms (%.1f us per KVM_RUN round trip)\n",
           n, ms, ms * 1000.0 / (double)n);
    return 0;
}

int main(int argc, char **argv)
{
    long bench_n = argc > 1 ? strtol(argv[1], NULL, 0) : 0;
    static const uint8_t code[] = { 0xb0, 'A', 0xba, 0xf8, 0x03, 0xee, 0xf4 };
    double t0 = now_ms();

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");

    int api = ioctl(kvm, KVM_GET_API_VERSION, 0);
    printf("KVM_GET_API_VERSION = %d\n", api);
    if (api != KVM_API_VERSION) {
        fprintf(stderr, "smoke: unexpected API version %d\n", api);
        return 1;
    }

    int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);
    if (vm < 0) die("KVM_CREATE_VM");
    printf("KVM_CREATE_VM ok (fd %d)\n", vm);

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap guest memory");
    memcpy(mem + CODE_ADDR, code, sizeof code);

    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = 0,
        .memory_size = MEM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
    if (vcpu < 0) die("KVM_CREATE_VCPU");

    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE,
                               MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    printf("KVM_CREATE_VCPU ok (mmap size %d)\n", run_size);

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");

    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = CODE_ADDR;
    regs.rflags = 0x2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    int saw_io = 0;
    for (int i = 0; i < 16; i++) {
        double t = now_ms();
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        printf("KVM_RUN #%d -> %s (%u) in %.3f ms\n", i,
               exit_name(run->exit_reason), run->exit_reason, now_ms() - t);
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            printf("  io: dir=%s port=0x%x size=%u count=%u data='%c'\n",
                   run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
                   run->io.port, run->io.size, run->io.count, data[0]);
            if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == 0x3f8 &&
                run->io.size == 1 && data[0] == 'A')
                saw_io = 1;
            break;
        }
        case KVM_EXIT_HLT:
            if (!saw_io) {
                fprintf(stderr, "smoke: HLT before expected IO exit\n");
                return 1;
            }
            printf("SMOKE OK: KVM_EXIT_IO then KVM_EXIT_HLT (total %.1f ms)\n",
                   now_ms() - t0);
            return bench_n > 0 ? bench(vcpu, run, mem, bench_n) : 0;
        case KVM_EXIT_FAIL_ENTRY:
            fprintf(stderr, "smoke: fail_entry hw reason 0x%llx\n",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
            return 1;
        case KVM_EXIT_INTERNAL_ERROR:
            fprintf(stderr, "smoke: internal error suberror %u\n",
                    run->internal.suberror);
            return 1;
        default:
            fprintf(stderr, "smoke: unexpected exit reason %u\n", run->exit_reason);
            return 1;
        }
    }
    fprintf(stderr, "smoke: too many exits\n");
    return 1;
}
