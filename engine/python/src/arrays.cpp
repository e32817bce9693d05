// Arrays between Python and the engine: inputs through nb::ndarray (DLPack, the buffer protocol,
// the framework's own conversion), __cuda_array_interface__ and NumPy as the last resort; outputs
// as NumPy arrays that own the engine's std::vector (no copy).
#include <atomic>
#include <sstream>

#include "common.hpp"

#if DDIM_PY_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ddimpy {
using namespace nb::literals;
namespace {

std::atomic<std::uintptr_t> g_last_input{0};

using FloatArray = nb::ndarray<nb::ro, const float, nb::c_contig>;

bool is_cuda_device(int device_type) {
  return device_type == nb::device::cuda::value || device_type == nb::device::cuda_managed::value;
}

// A CUDA pointer's device ordinal (CUDA builds), for __cuda_array_interface__ inputs.
int device_of(const void* p) {
#if DDIM_PY_CUDA
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, p) == cudaSuccess && attr.type != cudaMemoryTypeUnregistered &&
      attr.type != cudaMemoryTypeHost)
    return attr.device;
  (void)cudaGetLastError();
  return -1;
#else
  (void)p;
  return 0;
#endif
}

[[noreturn]] void device_refused(const char* what) {
  invalid(std::string(what) + " is a CUDA array, but this call reads host memory" +
          " (device arrays are taken by Session.sample's x_T and noise on a CUDA session);"
          " copy it to the host first (e.g. tensor.cpu())");
}

// __cuda_array_interface__ (Numba, CuPy, PyTorch): C-contiguous little-endian float32 only.
bool import_cuda_array_interface(nb::handle obj, const char* what, bool allow_device, InArray& out) {
  if (!nb::hasattr(obj, "__cuda_array_interface__")) return false;
  if (!allow_device) device_refused(what);
  nb::dict cai = nb::cast<nb::dict>(obj.attr("__cuda_array_interface__"));
  const std::string typestr = nb::cast<std::string>(cai["typestr"]);
  nb::tuple shape = nb::cast<nb::tuple>(cai["shape"]);
  std::vector<std::int64_t> dims;
  for (nb::handle d : shape) dims.push_back(nb::cast<std::int64_t>(d));
  if (typestr != "<f4")
    invalid(std::string(what) + ": a CUDA array must be float32 (typestr '<f4'), got '" + typestr +
            "'; convert it on the device first");
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    nb::tuple strides = nb::cast<nb::tuple>(cai["strides"]);
    std::int64_t expect = 4;
    bool contiguous = true;
    for (std::size_t i = dims.size(); i-- > 0;) {
      if (dims[i] != 1 && nb::cast<std::int64_t>(strides[i]) != expect) contiguous = false;
      expect *= dims[i];
    }
    if (!contiguous) invalid(std::string(what) + ": a CUDA array must be C-contiguous; make it contiguous on the device first");
  }
  nb::tuple data = nb::cast<nb::tuple>(cai["data"]);
  out.data = reinterpret_cast<const float*>(nb::cast<std::uintptr_t>(data[0]));
  out.shape = std::move(dims);
  out.where = Where::Device;
  out.device_id = device_of(out.data);
  out.keep = nb::borrow(obj);
  return true;
}

}  // namespace

void note_input_pointer(const void* p) { g_last_input.store(reinterpret_cast<std::uintptr_t>(p)); }
std::uintptr_t last_input_pointer() { return g_last_input.load(); }

std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) s << ",";
  s << ")";
  return s.str();
}

InArray import_array(nb::handle obj, const char* what, bool allow_device) {
  InArray out;
  if (obj.is_none()) invalid(std::string(what) + " is None");
  FloatArray a;
  // The first attempt converts dtype and layout through the array's own framework (NumPy astype,
  // torch .to().contiguous(), CuPy astype) only when it has to; a C-contiguous float32 array is
  // taken as it is.
  bool ok = nb::try_cast(obj, a, /*convert=*/false);
  if (!ok) {
    ok = nb::try_cast(obj, a, /*convert=*/true);
    out.copied = ok;
  }
  if (!ok && import_cuda_array_interface(obj, what, allow_device, out)) return out;
  if (!ok) {
    // Anything NumPy understands: __array_interface__, nested sequences, other dtypes.
    nb::object np = nb::module_::import_("numpy");
    nb::object converted;
    try {
      converted = np.attr("ascontiguousarray")(obj, "dtype"_a = np.attr("float32"));
    } catch (nb::python_error& e) {
      invalid(std::string(what) + ": expected an array of numbers (NumPy, PyTorch, CuPy, DLPack, "
              "__array_interface__ or __cuda_array_interface__), got " +
              nb::cast<std::string>(nb::str(obj.type().attr("__name__"))) + " (" + e.what() + ")");
    }
    if (!nb::try_cast(converted, a, false))
      invalid(std::string(what) + ": cannot read " + nb::cast<std::string>(nb::str(obj.type().attr("__name__"))) +
              " as a float32 array");
    out.keep = std::move(converted);
    out.copied = true;
  }
  out.shape.assign(a.shape_ptr(), a.shape_ptr() + a.ndim());
  out.data = a.data();
  const int device_type = a.device_type();
  if (is_cuda_device(device_type)) {
    if (!allow_device) device_refused(what);
    out.where = Where::Device;
    out.device_id = a.device_id();
  } else if (device_type != nb::device::cpu::value) {
    invalid(std::string(what) + ": arrays on this kind of device (DLPack device type " + std::to_string(device_type) +
            ") are not supported; pass a host (CPU) or CUDA array");
  }
  out.array = nb::ndarray<nb::ro>(a);  // keeps the imported array (and any converted copy) alive
  if (out.where == Where::Host) note_input_pointer(out.data);
  return out;
}

void check_shape(const InArray& arr, const char* what, const std::vector<std::int64_t>& expected) {
  if (arr.shape != expected)
    invalid(std::string(what) + " has shape " + shape_str(arr.shape) + "; expected " + shape_str(expected));
}

nb::object to_numpy(std::vector<float>&& values, const std::vector<std::int64_t>& shape) {
  auto* heap = new std::vector<float>(std::move(values));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<float>*>(p); });
  std::vector<std::size_t> dims(shape.begin(), shape.end());
  nb::ndarray<nb::numpy, float> arr(heap->data(), dims.size(), dims.data(), owner);
  return nb::cast(arr, nb::rv_policy::reference);
}

nb::object to_numpy_f64(std::vector<double>&& values, const std::vector<std::int64_t>& shape) {
  auto* heap = new std::vector<double>(std::move(values));
  nb::capsule owner(heap, [](void* p) noexcept { delete static_cast<std::vector<double>*>(p); });
  std::vector<std::size_t> dims(shape.begin(), shape.end());
  nb::ndarray<nb::numpy, double> arr(heap->data(), dims.size(), dims.data(), owner);
  return nb::cast(arr, nb::rv_policy::reference);
}

}  // namespace ddimpy
