# One deterministic libFuzzer run of a harness, for CTest (tests/fuzz/CMakeLists.txt):
#   cmake -DHARNESS=... -DNAME=... -DRUNS=... -DMAX_LEN=... -DCORPUS=... -DREGRESSIONS=... -DDICT=... -DWORK=... -P run_fuzz.cmake
# The committed corpus (and regression files) are read only: new inputs go to WORK/corpus, a
# crashing input to WORK/crash-*. Fails on any crash, leak, sanitizer report, timeout or
# out-of-memory; the libFuzzer output is printed either way (executions, coverage).
file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}/corpus")
set(_dirs "${WORK}/corpus" "${CORPUS}")
if(EXISTS "${REGRESSIONS}")
  list(APPEND _dirs "${REGRESSIONS}")
endif()
set(_dict)
if(EXISTS "${DICT}")
  set(_dict "-dict=${DICT}")
endif()
execute_process(
  COMMAND "${HARNESS}" -seed=1 -runs=${RUNS} -max_len=${MAX_LEN} -timeout=25 -rss_limit_mb=2048 -malloc_limit_mb=1024
          -print_final_stats=1 "-artifact_prefix=${WORK}/" ${_dict} ${_dirs}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
string(REGEX MATCHALL "(#[0-9]+[ \t]+DONE[^\n]*|Done [0-9]+ runs in [0-9]+ second\\(s\\)|stat::[a-z_]+: *[0-9]+)" _stats "${out}")
if(NOT rc EQUAL 0)
  message("${out}")
  file(GLOB _found "${WORK}/crash-*" "${WORK}/leak-*" "${WORK}/timeout-*" "${WORK}/oom-*")
  message(FATAL_ERROR "fuzz_${NAME}: libFuzzer exited with ${rc}; the input: ${_found}. Add it to "
                      "tests/fuzz/regressions/${NAME}/ with the fix (README.md there).")
endif()
string(REPLACE ";" "\n  " _stats "${_stats}")
message("fuzz_${NAME}: ok\n  ${_stats}")
