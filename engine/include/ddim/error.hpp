#pragma once
// ddim::Error: the one exception type the library throws. Library code never exits or aborts.
#include <stdexcept>
#include <string>

#include "ddim/export.hpp"

namespace ddim {

enum class ErrorCode {
  InvalidFile,      // a model file (or .npy) that is corrupt, hostile or of an unknown version
  InvalidArgument,  // a caller's argument that is out of range or inconsistent
  Unsupported,      // valid but not supported here (op, precision, backend)
  OutOfMemory,      // host or device allocation failed
  DeviceLost,       // a sticky device error; the session is unusable
  Cancelled,        // the progress callback asked to stop
  Io,               // a file could not be opened, read or written
  Internal,         // a bug in ddim: please report it
};

DDIM_API const char* to_string(ErrorCode code) noexcept;

class DDIM_API Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message);
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

}  // namespace ddim
