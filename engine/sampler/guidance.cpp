#include "sampler/guidance.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>

#include "ddim/error.hpp"
#include "kernels/cfg.h"

namespace ddim {

ConditionRows distinct_conditions(const Conditioning& c, std::size_t batch) {
  ConditionRows r;
  r.of_sample.assign(batch, 0);
  if (c.width == 0) return r;
  const std::size_t w = std::size_t(c.width);
  if (c.labels.size() != batch * w)
    throw Error(ErrorCode::Internal, "conditioning: " + std::to_string(c.labels.size()) + " label values for " +
                                         std::to_string(batch) + " samples of width " + std::to_string(w));
  std::map<std::vector<std::uint32_t>, int> index;  // bit patterns: -0 and +0 stay distinct
  auto add = [&](const float* v) {
    std::vector<std::uint32_t> key(w);
    std::memcpy(key.data(), v, w * sizeof(float));
    auto [it, inserted] = index.emplace(std::move(key), int(index.size()));
    if (inserted) r.conditions.insert(r.conditions.end(), v, v + w);
    return it->second;
  };
  for (std::size_t b = 0; b < batch; ++b) r.of_sample[b] = add(c.labels.data() + b * w);
  if (c.guided()) {
    if (c.null_label.size() != w) throw Error(ErrorCode::Internal, "conditioning: the null condition has the wrong width");
    r.null_index = add(c.null_label.data());
  }
  r.count = index.size();
  return r;
}

void combine_guidance(const float* out2, std::size_t batch, std::size_t elements, double scale, double rescale, float* out) {
  const float w = float(scale), phi = float(rescale);
  for (std::size_t b = 0; b < batch; ++b) {
    const float* cond = out2 + b * elements;
    const float* uncond = out2 + (batch + b) * elements;
    float* y = out + b * elements;
    for (std::size_t i = 0; i < elements; ++i) y[i] = cfg_combine(uncond[i], cond[i], w);
    if (rescale == 0.0) continue;
    // Unbiased standard deviations (torch.std), accumulated in double.
    auto stdev = [&](const float* v) {
      double mean = 0;
      for (std::size_t i = 0; i < elements; ++i) mean += v[i];
      mean /= double(elements);
      double ss = 0;
      for (std::size_t i = 0; i < elements; ++i) ss += (v[i] - mean) * (v[i] - mean);
      return std::sqrt(ss / double(elements - 1));
    };
    float ratio = 1.0f;
    if (elements >= 2) {
      const float sc = float(stdev(cond)), sg = float(stdev(y));
      if (sg > 0.0f) ratio = sc / sg;
    }
    for (std::size_t i = 0; i < elements; ++i) y[i] = cfg_rescale(y[i], ratio, phi);
  }
}

}  // namespace ddim
