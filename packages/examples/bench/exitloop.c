/* Baseline for `pnpm bench`: the smallest honest KVM_RUN loop in C. It loads the exact guest
 * state tsvm set up (memory image, kvm_regs, kvm_sregs dumped by bench/run.ts), runs until the
 * guest writes port 0xf4, and prints the number of exits and the nanoseconds per exit.
 * usage: exitloop <mem.bin> <regs.bin> <sregs.bin> <mem_size> */
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

static void die(const char *what) { perror(what); exit(1); }
static void slurp(const char *path, void *buf, size_t len) {
  FILE *f = fopen(path, "rb");
  if (!f || fread(buf, 1, len, f) != len) die(path);
  fclose(f);
}
static uint64_t now_ns(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: %s mem regs sregs size\n", argv[0]); return 2; }
  size_t size = strtoul(argv[4], 0, 0);
  int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm < 0) die("/dev/kvm");
  int vm = ioctl(kvm, KVM_CREATE_VM, 0);
  if (vm < 0) die("KVM_CREATE_VM");
  ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);
  void *mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) die("mmap");
  slurp(argv[1], mem, size);
  struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = size, .userspace_addr = (uint64_t)mem };
  if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) die("KVM_SET_USER_MEMORY_REGION");
  int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
  if (vcpu < 0) die("KVM_CREATE_VCPU");
  struct { struct kvm_cpuid2 h; struct kvm_cpuid_entry2 e[256]; } cpuid = { .h.nent = 256 };
  if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) die("KVM_GET_SUPPORTED_CPUID");
  if (ioctl(vcpu, KVM_SET_CPUID2, &cpuid) < 0) die("KVM_SET_CPUID2");
  int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  struct kvm_run *run = mmap(0, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) die("mmap kvm_run");
  struct kvm_sregs sregs; struct kvm_regs regs;
  slurp(argv[3], &sregs, sizeof sregs);
  slurp(argv[2], &regs, sizeof regs);
  if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
  if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
  uint64_t exits = 0, t0 = now_ns();
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
    exits++;
    if (run->exit_reason == KVM_EXIT_IO) {
      if (run->io.port == 0xf4) break;
      if (run->io.port == 0xee0) { /* tsvm's IDT stubs report a guest exception here */
        fprintf(stderr, "guest exception, vector %u\n", ((unsigned char *)run)[run->io.data_offset]);
        return 1;
      }
      continue;
    }
    if (run->exit_reason == KVM_EXIT_MMIO) continue;
    fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
    return 1;
  }
  uint64_t dt = now_ns() - t0;
  printf("{\"exits\":%llu,\"ns\":%llu}\n", (unsigned long long)exits, (unsigned long long)dt);
  return 0;
}
