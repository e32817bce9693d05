#pragma once
// cuDNN 9 is split in sub-libraries (libcudnn_graph, libcudnn_engines_precompiled,
// libcudnn_engines_runtime_compiled, libcudnn_heuristic, libcudnn_ops, libcudnn_cnn, ...) that
// libcudnn.so.9 loads with dlopen by name, which searches LD_LIBRARY_PATH and the system folders,
// not the folder libcudnn itself was loaded from. With the pip wheel's cuDNN (libddim finds it
// through its RUNPATH) they would not be found without LD_LIBRARY_PATH. So before the first
// cudnnCreate the backend loads every libcudnn_*.so* that lies beside the libcudnn in use, by its
// full path; libcudnn's own dlopen then finds each one already loaded (by its soname).
namespace ddim::cuda {

// Once per process (thread-safe); never throws: what cannot be loaded is left for cuDNN to report.
void preload_cudnn_sublibraries() noexcept;

}  // namespace ddim::cuda
