#include "cuda/cudnn_loader.hpp"

#include <cudnn.h>
#include <dlfcn.h>

#include <filesystem>
#include <mutex>
#include <string>
#include <system_error>
#include <vector>

namespace ddim::cuda {

void preload_cudnn_sublibraries() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&cudnnGetVersion), &info) == 0 || !info.dli_fname) return;
    std::error_code ec;
    const std::filesystem::path dir = std::filesystem::path(info.dli_fname).parent_path();
    std::vector<std::string> libraries;
    for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind("libcudnn_", 0) == 0 && name.find(".so") != std::string::npos) libraries.push_back(entry.path().string());
    }
    // libcudnn_graph first: the others depend on it.
    for (int pass = 0; pass < 2; ++pass)
      for (const std::string& path : libraries) {
        const bool graph = path.find("libcudnn_graph") != std::string::npos;
        if ((pass == 0) == graph) (void)dlopen(path.c_str(), RTLD_LAZY | RTLD_LOCAL);
      }
  });
}

}  // namespace ddim::cuda
