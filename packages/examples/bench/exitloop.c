/* Baseline for `pnpm bench`: the smallest honest KVM_RUN loop in C. It loads the exact guest
 * state tsvm set up (memory image, kvm_regs, kvm_sregs dumped by bench/run.ts), runs until the
 * guest writes port 0xf4, and prints the number of exits and the nanoseconds per exit.
 * usage: exitloop <mem.bin> <regs.bin> <sregs.bin> <mem_size>
 * Built with -DEXITLOOP_LIB -shared it is instead a library whose exitloop_run() runs the same
 * loop on a vCPU a Node process set up: the C loop inside a Node process (bench/run.ts). */
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

#ifndef EXITLOOP_LIB
static void die(const char *what) { perror(what); exit(1); }
static void slurp(const char *path, void *buf, size_t len) {
  FILE *f = fopen(path, "rb");
  if (!f || fread(buf, 1, len, f) != len) die(path);
  fclose(f);
}
#endif
static uint64_t now_ns(void) {
  struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

/* The loop itself, on a set-up vCPU and its kvm_run: exits until port 0xf4, or -1 on an
 * error, -2 on a guest exception, -3 on an unexpected exit. *ns gets the loop's time. */
long exitloop_loop(int vcpu, struct kvm_run *run, unsigned long long *ns) {
  long exits = 0;
  uint64_t t0 = now_ns();
  for (;;) {
    if (ioctl(vcpu, KVM_RUN, 0) < 0) return -1;
    exits++;
    if (run->exit_reason == KVM_EXIT_IO) {
      if (run->io.port == 0xf4) break;
      if (run->io.port == 0xee0) return -2; /* tsvm's IDT stubs report a guest exception here */
      continue;
    }
    if (run->exit_reason == KVM_EXIT_MMIO) continue;
    return -3;
  }
  *ns = now_ns() - t0;
  return exits;
}

#ifdef EXITLOOP_LIB
/* For Node (koffi): maps the vCPU's kvm_run itself, runs the loop, unmaps. */
long exitloop_run(int vcpu, int mmap_size, unsigned long long *ns) {
  struct kvm_run *run = mmap(0, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
  if (run == MAP_FAILED) return -1;
  long r = exitloop_loop(vcpu, run, ns);
  munmap(run, mmap_size);
  return r;
}
#else
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
  unsigned long long dt = 0;
  long exits = exitloop_loop(vcpu, run, &dt);
  if (exits == -1) die("KVM_RUN");
  if (exits == -2) { fprintf(stderr, "guest exception, vector %u\n", ((unsigned char *)run)[run->io.data_offset]); return 1; }
  if (exits < 0) { fprintf(stderr, "unexpected exit %u\n", run->exit_reason); return 1; }
  printf("{\"exits\":%ld,\"ns\":%llu}\n", exits, dt);
  return 0;
}
#endif
