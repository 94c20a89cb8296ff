// ASan / UBSan run-time defaults of the sanitized test and fuzz executables (MOE_EXT_SANITIZE); what each
// adds, and what is not needed, is written in CMakeLists.txt ("Sanitizers and fuzzing"). ASAN_OPTIONS and
// UBSAN_OPTIONS in the environment are applied after these and can override any of them.

// MOE_EXT_FIBER_STACKS (the CUDA execution model of tests/cuda_emulation, whose emulated threads are fibers):
// no fake stacks for stack-use-after-return, which ASan would map and unmap for every fiber that starts, 10x
// the suite's run time in system calls; a kernel's locals cannot outlive its fiber's frame anyway.
extern "C" __attribute__((used, visibility("default"))) const char* __asan_default_options() {
#if defined(MOE_EXT_FIBER_STACKS)
  return "detect_stack_use_after_return=0:check_initialization_order=1:strict_init_order=1";
#else
  return "detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1";
#endif
}

extern "C" __attribute__((used, visibility("default"))) const char* __ubsan_default_options() {
  return "print_stacktrace=1";
}
