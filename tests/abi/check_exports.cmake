# Lists the dynamic symbols libddim defines and fails on anything outside its public API: the C
# API (ddim_*) and the documented C++ API (DDIM_API in engine/include/ddim). Invoked by CTest (test
# exported_symbols) with -DLIBRARY=<libddim.so> -DNM=<nm>.
execute_process(COMMAND ${NM} -D --defined-only -C ${LIBRARY} OUTPUT_VARIABLE listing RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "${NM} failed on ${LIBRARY}: ${rc}")
endif()
string(REPLACE "\n" ";" lines "${listing}")
set(c_symbols 0)
set(cpp_symbols 0)
set(bad "")
foreach(line IN LISTS lines)
  # "<address> <type> <name>"
  if(NOT line MATCHES "^[0-9a-fA-F]+ [A-Za-z] (.*)$")
    continue()
  endif()
  set(name "${CMAKE_MATCH_1}")
  # The name without its parameter list: a class of the API may take internal types as arguments
  # of its private members (Session::Session(std::unique_ptr<Session::Impl>)), but no internal
  # class or function may be exported itself.
  string(REGEX REPLACE "\\(.*$" "" head "${name}")
  if(head MATCHES "^ddim_[a-z0-9_]+$")
    math(EXPR c_symbols "${c_symbols} + 1")
  elseif(head MATCHES "^(typeinfo for |typeinfo name for |vtable for )?ddim::(Error|Model|Session|Scheduler|ScheduleConfig)(::|$)"
         AND NOT head MATCHES "::Impl(::|$)")
    math(EXPR cpp_symbols "${cpp_symbols} + 1")
  elseif(head MATCHES "^ddim::(to_string|parse_[a-z_]+|cuda_device_count|slerp|initial_noise)$")
    math(EXPR cpp_symbols "${cpp_symbols} + 1")
  elseif(head MATCHES "^(_init|_fini|__bss_start|_edata|_end)$")
  else()
    string(APPEND bad "  ${name}\n")
  endif()
endforeach()
if(bad)
  message(FATAL_ERROR "${LIBRARY} exports symbols outside the public API (mark internals hidden, or add to "
                      "the API and to tests/abi/check_exports.cmake):\n${bad}")
endif()
if(c_symbols LESS 30 OR cpp_symbols LESS 30)
  message(FATAL_ERROR "${LIBRARY} exports ${c_symbols} C and ${cpp_symbols} C++ symbols: the API is missing (at least 30 of each expected)")
endif()
message(STATUS "${LIBRARY}: ${c_symbols} C symbols (ddim_*), ${cpp_symbols} C++ symbols (ddim::), nothing else")
