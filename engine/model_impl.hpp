#pragma once
// Model internals shared by the backends.
#include <string>
#include <unordered_map>
#include <vector>

#include "ddim/model.hpp"
#include "graph/ir.hpp"

namespace ddim {

struct WeightSlot {
  std::size_t offset = 0;  // floats into Model::Impl::weights
  std::vector<std::int64_t> shape;
  std::int64_t numel = 0;
};

struct __attribute__((visibility("hidden"))) Model::Impl {  // internal: not exported with Model
  std::string source;  // file path or name, for messages
  ModelInfo info;
  ScheduleConfig schedule;
  graph::Graph graph;  // shapes inferred at the declared sample size
  std::vector<float> weights;  // every graph parameter, converted to fp32 once at load
  std::unordered_map<std::string, WeightSlot> slots;

  // fp32 data of a graph parameter; throws Internal when absent (load validated presence).
  const float* weight(const std::string& tensor) const;
};

}  // namespace ddim
