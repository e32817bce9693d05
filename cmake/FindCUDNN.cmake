# Locates cuDNN: first CUDNN_ROOT (a prefix with include/ and lib/, e.g. the pip package
# nvidia-cudnn-cu13's site-packages/nvidia/cudnn), then the CUDA toolkit, then system paths.
# Defines the imported target ddim_cudnn.
find_path(CUDNN_INCLUDE_DIR cudnn.h
  HINTS ${CUDNN_ROOT} $ENV{CUDNN_ROOT} ${CUDAToolkit_INCLUDE_DIRS}
  PATH_SUFFIXES include)
find_library(CUDNN_LIBRARY NAMES cudnn libcudnn.so.9
  HINTS ${CUDNN_ROOT} $ENV{CUDNN_ROOT} ${CUDAToolkit_LIBRARY_DIR}
  PATH_SUFFIXES lib lib64 lib/x64)
if(NOT CUDNN_INCLUDE_DIR OR NOT CUDNN_LIBRARY)
  message(FATAL_ERROR "cuDNN not found: set -DCUDNN_ROOT=<prefix with include/cudnn.h and lib/libcudnn.so*> "
                      "or build without CUDA (-DDDIM_CUDA=OFF)")
endif()
message(STATUS "ddim: cuDNN ${CUDNN_LIBRARY}")
add_library(ddim_cudnn INTERFACE IMPORTED)
target_include_directories(ddim_cudnn INTERFACE ${CUDNN_INCLUDE_DIR})
target_link_libraries(ddim_cudnn INTERFACE ${CUDNN_LIBRARY})
