/*
 * bench:smp's native reference: the guest's compute loop (add rax, rcx; dec rcx; jnz) on
 * `threads` host threads, `n` iterations each. Prints the wall seconds of the threads' run.
 * What the host's two cores give two threads at all (SMT siblings, a neighbour's load), so
 * tsvm's parallel vCPUs can be held against it. Usage: smp-native THREADS N
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static uint64_t n;
static volatile uint64_t sink;

static void *work(void *arg) {
  (void)arg;
  uint64_t rax = 0, rcx = n;
  __asm__ volatile("1: add %1, %0\n\tdec %1\n\tjnz 1b" : "+r"(rax), "+r"(rcx) : : "cc");
  sink = rax;
  return NULL;
}

int main(int argc, char **argv) {
  if (argc != 3) { fprintf(stderr, "usage: smp-native THREADS N\n"); return 2; }
  int threads = atoi(argv[1]);
  n = strtoull(argv[2], NULL, 10);
  if (threads < 1 || threads > 64 || n == 0) { fprintf(stderr, "bad arguments\n"); return 2; }
  pthread_t t[64];
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, work, NULL);
  for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
  clock_gettime(CLOCK_MONOTONIC, &b);
  printf("%.9f\n", (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9);
  return 0;
}
