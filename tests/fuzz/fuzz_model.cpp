// fuzz_model: a whole model file through Model::load_from_memory (container, header JSON, metadata,
// graph, schedule, tensor validation and conversion); for a file that loads and declares a small
// network, a CPU session planned at batch 1 and one forward pass. The size caps keep what one
// input may allocate far below the fuzzer's -rss_limit_mb / -malloc_limit_mb (tests/fuzz/README.md).
#include <vector>

#include "ddim/ddim.hpp"
#include "fuzz_common.hpp"

namespace {
constexpr std::int64_t kMaxParameters = std::int64_t(1) << 20;  // 4 MiB of fp32 weights
constexpr int kMaxPixels = 64 * 64;
constexpr int kMaxNodes = 512;
}  // namespace

int ddim::fuzz::run_one(std::span<const std::uint8_t> data) {
  expect_only_ddim_errors("fuzz_model", [&] {
    const auto model = ddim::Model::load_from_memory(data, "fuzz input");
    (void)model->summary();
    const ddim::ModelInfo& info = model->info();
    if (info.parameter_count > kMaxParameters || std::int64_t(info.height) * info.width > kMaxPixels ||
        info.in_channels > 8 || info.node_count > kMaxNodes)
      return;
    ddim::SessionOptions o;
    o.backend = ddim::BackendKind::Cpu;
    o.batch = 1;
    o.threads = 1;
    auto session = ddim::Session::create(model, o);
    const ddim::PlanInfo& plan = session->plan_info();
    std::vector<float> x(std::size_t(info.in_channels) * std::size_t(plan.height) * std::size_t(plan.width), 0.25f);
    const int t = model->schedule().num_train_timesteps / 2;
    (void)session->forward(x, std::vector<int>{t});
  });
  return 0;
}
