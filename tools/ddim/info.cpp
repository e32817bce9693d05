// ddim info: what a model file holds (shapes, parameters, schedule) and, with --plan, what a
// session plans for it.
#include <cstdio>
#include <iostream>
#include <sstream>

#include "commands.hpp"
#include "ddim/model.hpp"
#include "ddim/schedule.hpp"

namespace ddim::cli {
namespace {

constexpr OptionSpec kOptions[] = {
    {"--plan", "", "", "also plan a session (batch 1) and print what it folded, fused and allocated"},
    {"--device", "DEV", "cpu", "device for --plan: auto|cpu|cuda|cuda:N"},
    {"--precision", "P", "auto", "precision for --plan: auto|fp32|fp16|bf16"},
    {"--threads", "N", "0", "CPU worker threads for --plan, 0 for all cores"},
};

std::string with_commas(std::int64_t value) {
  std::string digits = std::to_string(value < 0 ? -value : value);
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return value < 0 ? "-" + out : out;
}

std::string real(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

const char* yes_no(bool v) { return v ? "true" : "false"; }

void print_schedule(std::ostream& os, const ScheduleConfig& s) {
  os << "schedule:\n"
     << "  num_train_timesteps:        " << s.num_train_timesteps << "\n"
     << "  beta_schedule:              " << to_string(s.beta_schedule) << "\n"
     << "  beta_start:                 " << real(s.beta_start) << "\n"
     << "  beta_end:                   " << real(s.beta_end) << "\n";
  os << "  alphas_cumprod:             ";
  if (s.alphas_cumprod.empty()) {
    os << "computed from the betas";
  } else {
    os << s.alphas_cumprod.size() << " values from the file";
  }
  try {
    const Scheduler scheduler(s);
    const std::vector<double>& a = scheduler.alphas_cumprod();
    if (!a.empty()) os << " (first " << real(a.front()) << ", last " << real(a.back()) << ")";
  } catch (const std::exception& e) {
    os << " (invalid: " << e.what() << ")";
  }
  os << "\n"
     << "  rescale_betas_zero_snr:     " << yes_no(s.rescale_betas_zero_snr) << "\n"
     << "  prediction_type:            " << to_string(s.prediction_type) << "\n"
     << "  timestep_spacing:           " << to_string(s.timestep_spacing) << "\n"
     << "  steps_offset:               " << s.steps_offset << "\n"
     << "  clip_sample:                " << yes_no(s.clip_sample) << "\n"
     << "  clip_sample_range:          " << real(s.clip_sample_range) << "\n"
     << "  set_alpha_to_one:           " << yes_no(s.set_alpha_to_one) << "\n"
     << "  thresholding:               " << yes_no(s.thresholding) << "\n"
     << "  dynamic_thresholding_ratio: " << real(s.dynamic_thresholding_ratio) << "\n"
     << "  sample_max_value:           " << real(s.sample_max_value) << "\n"
     << "  variance_type:              " << to_string(s.variance_type) << "\n";
}

void print_list(std::ostream& os, const char* title, const std::vector<std::string>& items) {
  os << "  " << title << ": " << items.size() << "\n";
  for (const std::string& item : items) os << "    " << item << "\n";
}

}  // namespace

const CommandSpec kInfoCommand{"info", "FILE", "Describe a model file (and, with --plan, a session planned for it).",
                               kOptions};

int run_info(const ParsedArgs& args) {
  const std::filesystem::path path = args.positionals().front();
  const bool plan = args.flag("--plan");
  if (!plan) {
    for (const char* option : {"--device", "--precision", "--threads"})
      if (args.given(option)) throw UsageError(std::string(option) + " applies to --plan only; add --plan");
  }
  SessionOptions session_options = session_options_from(args);
  session_options.batch = 1;

  const std::shared_ptr<const Model> model = Model::load(path);
  const ModelInfo& info = model->info();
  std::ostringstream os;
  os << "model:          " << one_line(path.string()) << "\n"
     << "format version: " << info.format_version << "\n"
     << "sample:         " << info.in_channels << " x " << info.height << " x " << info.width << " (C x H x W)\n"
     << "in channels:    " << info.in_channels << "\n"
     << "out channels:   " << info.out_channels << "\n"
     << "parameters:     " << with_commas(info.parameter_count) << "\n"
     << "nodes:          " << info.node_count << "\n"
     << "tensors:       ";
  if (info.tensors_by_dtype.empty()) os << " none";
  for (const auto& [dtype, count] : info.tensors_by_dtype) os << " " << dtype << " x " << count;
  if (!info.class_kind.empty()) {
    os << "\nclass labels:   " << info.class_kind;
    if (info.class_kind == "index") os << ", integers in [0, " << info.num_classes << ")";
    if (info.class_kind == "vector") os << ", " << info.class_dim << " values per sample";
    if (info.null_class.empty()) {
      os << "; no null input recorded (guidance needs --null-class-label / --null-class-embedding)";
    } else if (info.class_kind == "vector") {
      os << "; null embedding recorded";
    } else {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(info.null_class[0]));
      os << "; null label " << buf << " recorded";
    }
  }
  os << "\n\n" << model->summary();
  if (!model->summary().empty() && model->summary().back() != '\n') os << "\n";
  os << "\n";
  print_schedule(os, model->schedule());

  // Everything is printed at the end: a failure to plan prints the error only, not half a report.
  if (plan) {
    const std::unique_ptr<Session> session = create_session(model, session_options, "the model's sample size", false, args);
    const PlanInfo& p = session->plan_info();
    std::ostringstream ps;
    ps << "\nplan:\n"
       << "  backend:   " << p.backend << "\n"
       << "  precision: " << p.precision << "\n"
       << "  batch:     " << p.batch << ", sample " << p.height << " x " << p.width << "\n";
    print_list(ps, "folded nodes", p.folded_nodes);
    if (!p.folded_per_label.empty()) {
      print_list(ps, "folded per (step, class label)", p.folded_per_label);
      ps << "  forward batch: " << p.forward_batch << " (guidance runs the conditional and the null half in one forward)\n";
    }
    print_list(ps, "fusions", p.fusions);
    ps << "  activation arena: " << format_bytes(p.arena_bytes) << " (" << p.arena_bytes << " bytes)";
    if (p.unplanned_bytes > 0) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.1f%%", 100.0 * static_cast<double>(p.arena_bytes) /
                                                   static_cast<double>(p.unplanned_bytes));
      ps << " vs " << format_bytes(p.unplanned_bytes) << " unplanned (" << p.unplanned_bytes << " bytes; " << buf
         << ")";
    }
    ps << "\n  weights:   " << format_bytes(p.weight_bytes) << " (" << p.weight_bytes << " bytes)\n";
    char flops[64];
    std::snprintf(flops, sizeof flops, "%.3f", p.forward_flops / 1e9);
    ps << "  forward:   " << flops << " GFLOP per step (convolutions, projections, attention; unpadded)\n";
    if (!p.decoder.empty()) ps << "  decoder:   " << one_line(p.decoder) << "\n";
    if (!p.fallback.empty()) ps << "  note:      on the CPU because the CUDA backend failed: " << one_line(p.fallback) << "\n";
    os << ps.str();
  }
  std::cout << os.str();
  return 0;
}

}  // namespace ddim::cli
