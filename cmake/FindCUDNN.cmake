# Locates cuDNN: CUDNN_ROOT first and alone (a prefix with include/ and lib/, e.g. the pip package
# nvidia-cudnn-cu13's site-packages/nvidia/cudnn), so that it wins over a system cuDNN and the
# header and the library always come from the same install; without it, the CUDA toolkit, then
# the system paths. NAMES_PER_DIR: a directory holding only libcudnn.so.9 (the pip wheel) is not
# skipped for a later one that has libcudnn.so.
# Sets CUDNN_FOUND, CUDNN_INCLUDE_DIR, CUDNN_LIBRARY, CUDNN_NOT_FOUND_REASON and, when found, the
# imported target ddim_cudnn.
set(CUDNN_FOUND OFF)
set(_ddim_cudnn_hints ${CUDNN_ROOT} $ENV{CUDNN_ROOT})
if(_ddim_cudnn_hints)
  find_path(CUDNN_INCLUDE_DIR cudnn.h HINTS ${_ddim_cudnn_hints} PATH_SUFFIXES include NO_DEFAULT_PATH)
  find_library(CUDNN_LIBRARY NAMES cudnn libcudnn.so.9 NAMES_PER_DIR HINTS ${_ddim_cudnn_hints}
               PATH_SUFFIXES lib lib64 NO_DEFAULT_PATH)
  if(NOT CUDNN_INCLUDE_DIR OR NOT CUDNN_LIBRARY)
    set(CUDNN_NOT_FOUND_REASON "CUDNN_ROOT=${_ddim_cudnn_hints} has no include/cudnn.h and lib/libcudnn.so*")
    return()
  endif()
else()
  find_path(CUDNN_INCLUDE_DIR cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(CUDNN_LIBRARY NAMES cudnn libcudnn.so.9 NAMES_PER_DIR HINTS ${CUDAToolkit_LIBRARY_DIR}
               PATH_SUFFIXES lib lib64 lib/x64)
  if(NOT CUDNN_INCLUDE_DIR OR NOT CUDNN_LIBRARY)
    set(CUDNN_NOT_FOUND_REASON "no cudnn.h / libcudnn.so in the CUDA toolkit or the system (set -DCUDNN_ROOT=<prefix>)")
    return()
  endif()
endif()
set(CUDNN_FOUND ON)
message(STATUS "ddim: cuDNN ${CUDNN_LIBRARY} (headers ${CUDNN_INCLUDE_DIR})")
add_library(ddim_cudnn INTERFACE IMPORTED)
target_include_directories(ddim_cudnn INTERFACE ${CUDNN_INCLUDE_DIR})
target_link_libraries(ddim_cudnn INTERFACE ${CUDNN_LIBRARY})
