#include "ddim/error.hpp"

namespace ddim {

const char* to_string(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::InvalidFile: return "invalid file";
    case ErrorCode::InvalidArgument: return "invalid argument";
    case ErrorCode::Unsupported: return "unsupported";
    case ErrorCode::OutOfMemory: return "out of memory";
    case ErrorCode::DeviceLost: return "device lost";
    case ErrorCode::Cancelled: return "cancelled";
    case ErrorCode::Io: return "I/O error";
    case ErrorCode::Internal: return "internal error";
  }
  return "unknown error";
}

Error::Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}

}  // namespace ddim
