# Included before project(ddim) by the Python package build (pyproject.toml sets
# CMAKE_PROJECT_ddim_INCLUDE_BEFORE to this file): compile through ccache when it is installed, so
# that rebuilding the wheel does not compile every engine source again. The environment variables
# CMAKE_CXX_COMPILER_LAUNCHER / CMAKE_CUDA_COMPILER_LAUNCHER, or DDIM_NO_CCACHE=1, take precedence.
if(NOT DEFINED ENV{DDIM_NO_CCACHE} OR "$ENV{DDIM_NO_CCACHE}" STREQUAL "" OR "$ENV{DDIM_NO_CCACHE}" STREQUAL "0")
  find_program(DDIM_CCACHE ccache)
  if(DDIM_CCACHE)
    foreach(_lang C CXX CUDA)
      if(NOT DEFINED CMAKE_${_lang}_COMPILER_LAUNCHER AND NOT DEFINED ENV{CMAKE_${_lang}_COMPILER_LAUNCHER})
        set(CMAKE_${_lang}_COMPILER_LAUNCHER "${DDIM_CCACHE}")
      endif()
    endforeach()
    message(STATUS "ddim: compiling through ${DDIM_CCACHE}")
  endif()
endif()
