#pragma once
// Non-finite values in results. Finite inputs can still overflow float32 (an x_T, a noise value,
// an image or a weight near 3.4e38): the sessions check what they compute and throw
// ddim::Error(InvalidArgument) naming where the first NaN or Inf appeared (the step, the sample,
// the element and, for the network, the first graph node whose output is not finite) instead of
// returning NaN images.
#include <cmath>
#include <cstddef>
#include <span>
#include <string>

#include "format/input_file.hpp"

namespace ddim {

inline constexpr std::size_t kAllFinite = static_cast<std::size_t>(-1);

// Index of the first NaN or infinite value, or kAllFinite.
inline std::size_t first_nonfinite(std::span<const float> v) noexcept {
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) return i;
  return kAllFinite;
}

// "sample 1, element 17" for index i of a batch of samples of `per_sample` elements.
inline std::string element_location(std::size_t index, std::size_t per_sample) {
  if (per_sample == 0) return "element " + std::to_string(index);
  return "sample " + std::to_string(index / per_sample) + ", element " + std::to_string(index % per_sample);
}

// "; it first appears in the output of node 'conv_in' (conv2d)", or "" when the node is unknown.
inline std::string node_location(const std::string& node, const std::string& op) {
  if (node.empty()) return "";
  return "; it first appears in the output of node " + format::quote_path(node) + " (" + op + ")";
}

// The hint every such error ends with.
inline const char* nonfinite_hint() {
  return ": finite inputs overflowed float32 (an x_T, noise, image or weight value too large?)";
}

}  // namespace ddim
