#pragma once
// Shared pieces of the Python extension ddim._ddim (nanobind): array conversion in both
// directions, the exception mapping, the progress / Ctrl-C bridge and the binding entry points of
// each source file.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ddim/ddim.hpp"

namespace nb = nanobind;

namespace ddimpy {

// ---------------------------------------------------------------- errors (errors.cpp)
// Registers the translator of ddim::Error (one Python class per ErrorCode, from ddim._errors) and
// std::bad_alloc (ddim.OutOfMemoryError, a MemoryError).
void register_errors(nb::module_& m);
// Throws ddim::Error(InvalidArgument, message): the translator turns it into InvalidArgumentError.
[[noreturn]] void invalid(const std::string& message);
// A Python warning (RuntimeWarning) from a C++ result's warning text; throws when warnings are
// errors (the Python exception is then set).
void warn(const std::string& message);
// Raised by the binding itself (not the engine): a Session used by a second thread at once.
struct BusyError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------- arrays (arrays.cpp)
enum class Where { Host, Device };

// An input array as the engine reads it: C-contiguous float32, on the host or on a CUDA device.
// Holds whatever keeps the memory alive (the caller's array, or the converted copy). Destroy with
// the GIL held (it always is: these live in the binding functions).
struct InArray {
  const float* data = nullptr;
  std::vector<std::int64_t> shape;
  Where where = Where::Host;
  int device_id = 0;     // CUDA ordinal for Where::Device
  bool copied = false;   // the binding converted the input (dtype, layout or foreign type)
  nb::object keep;       // a converted copy, or the caller's object (__cuda_array_interface__)
  nb::ndarray<nb::ro> array;  // the imported array (DLPack / buffer protocol)

  std::size_t size() const {
    std::size_t n = 1;
    for (auto d : shape) n *= std::size_t(d);
    return n;
  }
  std::span<const float> host_span() const { return {data, size()}; }
};

// Imports `obj` (anything with __dlpack__, the buffer protocol, __array_interface__,
// __cuda_array_interface__, or a nested sequence of numbers): without a copy when it is already a
// C-contiguous float32 array, else converted (NumPy / the array's own framework). `what` names it
// in errors. With allow_device false a CUDA array is an InvalidArgumentError.
InArray import_array(nb::handle obj, const char* what, bool allow_device);
// Throws InvalidArgumentError unless arr.shape == expected.
void check_shape(const InArray& arr, const char* what, const std::vector<std::int64_t>& expected);
std::string shape_str(const std::vector<std::int64_t>& shape);
// The host pointer handed to the engine by the last host-array import (a debug hook for the
// zero-copy tests: ddim._ddim._last_input_pointer()).
void note_input_pointer(const void* p);
std::uintptr_t last_input_pointer();

// A NumPy float32 array owning `values` (moved, no copy).
nb::object to_numpy(std::vector<float>&& values, const std::vector<std::int64_t>& shape);
nb::object to_numpy_f64(std::vector<double>&& values, const std::vector<std::int64_t>& shape);

// ---------------------------------------------------------------- progress / Ctrl-C (session.cpp)
// The Python side of one engine call's progress callback. Everything it touches is used with the
// GIL held (the engine calls the callback on the calling thread, which released the GIL).
struct ProgressBridge {
  nb::object user;        // a callable (done, total), or invalid
  nb::object bar;         // ddim._progress bar (progress=True), or invalid
  bool check_signals = true;
  std::optional<nb::python_error> error;  // a KeyboardInterrupt (or the callback's exception)

  // progress: None, False, True or a callable. `desc` labels a tqdm bar.
  ProgressBridge(nb::handle progress, const char* desc, bool check_signals);
  ~ProgressBridge();
  // The engine-side callback (empty when there is nothing to do).
  ddim::ProgressCallback callback();
  // After the engine call threw: re-raises the stored Python exception, if any.
  void rethrow_if_error();
  void close();
};

// ---------------------------------------------------------------- bindings of each file
void bind_model(nb::module_& m);      // module.cpp: Model, ModelInfo, free functions
void bind_session(nb::module_& m);    // session.cpp
void bind_scheduler(nb::module_& m);  // scheduler.cpp

// The Python-side Model: shares ownership of the immutable ddim::Model with every session made
// from it, so a session outlives the Python Model object.
struct PyModel {
  std::shared_ptr<const ddim::Model> model;
  std::string name;
};
// Model.schedule: the ScheduleConfig as a dict in diffusers' spelling.
nb::dict schedule_to_dict(const ddim::ScheduleConfig& c);

}  // namespace ddimpy
