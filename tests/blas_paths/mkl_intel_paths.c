/* Test tool, preloaded (LD_PRELOAD) into a test process only: makes MKL take the code paths it takes on
 * Intel CPUs on any x86-64 CPU. MKL asks these two functions whether the CPU is an Intel one before it picks
 * its kernels and its threading of a GEMM; torch's libtorch_cpu.so exports them, so a preloaded definition
 * wins. On AMD CPUs MKL otherwise never splits a GEMM's reduction between threads, and tests of
 * thread-count independence would pass there while failing on Intel. */
#ifdef __cplusplus
extern "C" {
#endif
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
#ifdef __cplusplus
}
#endif
