// fuzz_metadata: the ddim metadata of a model file, as JSON text: the first byte chooses the
// document (even: ddim.graph, odd: ddim.schedule). A graph that parses has its shapes inferred at
// its declared size (when that is small) and its parameter requirements listed; a schedule that
// parses builds a Scheduler (alpha-bar table, validation) and a 10-step plan.
#include <algorithm>
#include <string_view>

#include <nlohmann/json.hpp>

#include "ddim/schedule.hpp"
#include "format/container.hpp"
#include "format/model_metadata.hpp"
#include "fuzz_common.hpp"
#include "graph/ir.hpp"

int ddim::fuzz::run_one(std::span<const std::uint8_t> data) {
  if (data.empty()) return 0;
  const bool graph = (data[0] & 1) == 0;
  const auto rest = data.subspan(1);
  const std::string_view text(reinterpret_cast<const char*>(rest.data()), rest.size());
  expect_only_ddim_errors("fuzz_metadata", [&] {
    const nlohmann::json j = ddim::format::parse_json_strict(text, graph ? "ddim.graph" : "ddim.schedule");
    if (graph) {
      ddim::graph::Graph g = ddim::graph::parse_graph(j);
      if (g.height > 0 && g.width > 0 && std::int64_t(g.height) * g.width <= 256 * 256) {
        ddim::graph::infer_shapes(g, g.height, g.width);
        (void)ddim::graph::param_requirements(g);
      }
    } else {
      const ddim::format::ParsedSchedule s = ddim::format::parse_schedule(j);
      if (s.alphas_cumprod_tensor) return;  // the table comes from a tensor: not in this document
      if (s.config.num_train_timesteps > 100000) return;
      const ddim::Scheduler scheduler(s.config);
      (void)scheduler.timesteps(std::min(10, s.config.num_train_timesteps));
    }
  });
  return 0;
}
