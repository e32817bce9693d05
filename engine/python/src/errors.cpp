// ddim::Error -> the Python classes of ddim/_errors.py (one per ErrorCode, all under ddim.Error).
#include <new>

#include "common.hpp"

namespace ddimpy {
namespace {

constexpr int kCodes = 8;  // ddim::ErrorCode::InvalidFile .. Internal
// Strong references kept for the life of the process (never released: the interpreter may be
// finalised before static destructors run).
PyObject* g_types[kCodes] = {};
PyObject* g_base = nullptr;

const char* class_name(ddim::ErrorCode code) {
  switch (code) {
    case ddim::ErrorCode::InvalidFile: return "InvalidFileError";
    case ddim::ErrorCode::InvalidArgument: return "InvalidArgumentError";
    case ddim::ErrorCode::Unsupported: return "UnsupportedError";
    case ddim::ErrorCode::OutOfMemory: return "OutOfMemoryError";
    case ddim::ErrorCode::DeviceLost: return "DeviceLostError";
    case ddim::ErrorCode::Cancelled: return "CancelledError";
    case ddim::ErrorCode::Io: return "IoError";
    case ddim::ErrorCode::Internal: return "InternalError";
  }
  return "Error";
}

void set_error(PyObject* type, const char* message) { PyErr_SetString(type, message); }

}  // namespace

void invalid(const std::string& message) { throw ddim::Error(ddim::ErrorCode::InvalidArgument, message); }

void warn(const std::string& message) {
  if (message.empty()) return;
  if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) throw nb::python_error();
}

void register_errors(nb::module_& m) {
  nb::module_ errors = nb::module_::import_("ddim._errors");
  g_base = errors.attr("Error").inc_ref().ptr();
  for (int i = 0; i < kCodes; ++i) g_types[i] = errors.attr(class_name(ddim::ErrorCode(i))).inc_ref().ptr();
  (void)m;
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const ddim::Error& e) {
      const int code = int(e.code());
      set_error(code >= 0 && code < kCodes ? g_types[code] : g_base, e.what());
    } catch (const std::bad_alloc&) {
      set_error(g_types[int(ddim::ErrorCode::OutOfMemory)], "out of host memory (std::bad_alloc)");
    } catch (const BusyError& e) {
      set_error(g_base, e.what());
    }
  });
}

}  // namespace ddimpy
