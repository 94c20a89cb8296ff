// ASan / UBSan run-time defaults of the sanitized test and fuzz executables (MOE_EXT_SANITIZE); what each
// adds, and what is not needed, is written in CMakeLists.txt ("Sanitizers and fuzzing"). ASAN_OPTIONS and
// UBSAN_OPTIONS in the environment are applied after these and can override any of them.

extern "C" __attribute__((used, visibility("default"))) const char* __asan_default_options() {
  return "detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1";
}

extern "C" __attribute__((used, visibility("default"))) const char* __ubsan_default_options() {
  return "print_stacktrace=1";
}
