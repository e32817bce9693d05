#pragma once
// Model internals shared by the backends.
#include <string>
#include <unordered_map>
#include <vector>

#include "ddim/model.hpp"
#include "graph/decoder.hpp"
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
  // Latent models (format version 2): the decoder as a model of its own (its graph, its weights;
  // the schedule copied), shared by every session; null for pixel-space models.
  std::shared_ptr<const Model> decoder;
  graph::LatentConfig latent;                  // meaningful when decoder is set
  std::unique_ptr<Model::Impl> pending_decoder;  // load_impl -> Model::from_impl

  // fp32 data of a graph parameter; throws Internal when absent (load validated presence).
  const float* weight(const std::string& tensor) const;
};

}  // namespace ddim
