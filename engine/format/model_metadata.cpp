#include "format/model_metadata.hpp"

#include <cmath>
#include <limits>

#include "ddim/error.hpp"
#include "format/container.hpp"

namespace ddim::format {

using nlohmann::json;

namespace {

[[noreturn]] void bad(const std::string& key, const std::string& msg) {
  throw Error(ErrorCode::InvalidFile,
              detail::bounded_message("ddim.schedule: key '" + key + "' " + msg +
                                      " (re-export the model with tools/export.py; keys are listed in weights/FORMAT.md)"));
}

}  // namespace

ParsedSchedule parse_schedule(const json& j) {
  if (!j.is_object()) throw Error(ErrorCode::InvalidFile, "ddim.schedule must be a JSON object (see weights/FORMAT.md)");
  ParsedSchedule out;
  ScheduleConfig& c = out.config;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = *it;
    auto num = [&]() {
      if (!v.is_number()) bad(k, "must be a number, got " + detail::short_json(v));
      double x = v.get<double>();
      if (!std::isfinite(x)) bad(k, "must be finite");
      return x;
    };
    auto integer = [&]() {
      if (!v.is_number_integer()) bad(k, "must be an integer, got " + detail::short_json(v));
      auto x = v.get<std::int64_t>();
      if (x < 0 || x > std::numeric_limits<int>::max()) bad(k, "is out of range: " + detail::short_json(v));
      return int(x);
    };
    auto boolean = [&]() {
      if (!v.is_boolean()) bad(k, "must be true or false, got " + detail::short_json(v));
      return v.get<bool>();
    };
    auto str = [&]() {
      if (!v.is_string()) bad(k, "must be a string, got " + detail::short_json(v));
      return v.get<std::string>();
    };
    auto parse_enum = [&](auto fn) {
      try {
        return fn(str());
      } catch (const Error& e) {
        bad(k, e.what());
      }
    };
    if (k == "num_train_timesteps") c.num_train_timesteps = integer();
    else if (k == "beta_schedule") c.beta_schedule = parse_enum(parse_beta_schedule);
    else if (k == "beta_start") c.beta_start = num();
    else if (k == "beta_end") c.beta_end = num();
    else if (k == "alphas_cumprod") out.alphas_cumprod_tensor = str();
    else if (k == "rescale_betas_zero_snr") c.rescale_betas_zero_snr = boolean();
    else if (k == "prediction_type") c.prediction_type = parse_enum(parse_prediction_type);
    else if (k == "timestep_spacing") {
      c.timestep_spacing = parse_enum(parse_spacing);
      if (c.timestep_spacing == Spacing::Custom) bad(k, "cannot be 'custom' in a file");
    } else if (k == "steps_offset") c.steps_offset = integer();
    else if (k == "clip_sample") c.clip_sample = boolean();
    else if (k == "clip_sample_range") c.clip_sample_range = num();
    else if (k == "set_alpha_to_one") c.set_alpha_to_one = boolean();
    else if (k == "thresholding") c.thresholding = boolean();
    else if (k == "dynamic_thresholding_ratio") c.dynamic_thresholding_ratio = num();
    else if (k == "sample_max_value") c.sample_max_value = num();
    else if (k == "variance_type") c.variance_type = parse_enum(parse_variance_type);
    else bad(k, "is unknown");
  }
  if (out.alphas_cumprod_tensor && out.alphas_cumprod_tensor->empty()) bad("alphas_cumprod", "must name a tensor");
  if (!out.alphas_cumprod_tensor) {
    try {
      c.validate();
    } catch (const Error& e) {
      throw Error(ErrorCode::InvalidFile, detail::bounded_message(std::string("ddim.schedule: ") + e.what()));
    }
  }
  return out;
}

json schedule_to_json(const ScheduleConfig& c, const std::optional<std::string>& alphas_tensor) {
  json j = {{"num_train_timesteps", c.num_train_timesteps},
            {"beta_schedule", to_string(c.beta_schedule)},
            {"beta_start", c.beta_start},
            {"beta_end", c.beta_end},
            {"rescale_betas_zero_snr", c.rescale_betas_zero_snr},
            {"prediction_type", to_string(c.prediction_type)},
            {"timestep_spacing", to_string(c.timestep_spacing)},
            {"steps_offset", c.steps_offset},
            {"clip_sample", c.clip_sample},
            {"clip_sample_range", c.clip_sample_range},
            {"set_alpha_to_one", c.set_alpha_to_one},
            {"thresholding", c.thresholding},
            {"dynamic_thresholding_ratio", c.dynamic_thresholding_ratio},
            {"sample_max_value", c.sample_max_value},
            {"variance_type", to_string(c.variance_type)}};
  if (alphas_tensor) j["alphas_cumprod"] = *alphas_tensor;
  return j;
}

std::map<std::string, std::string> make_metadata(const json& graph, const ScheduleConfig& schedule,
                                                 const std::optional<std::string>& alphas_tensor) {
  const bool conditional = graph.is_object() && graph.contains("inputs") && graph["inputs"].is_object() &&
                           graph["inputs"].contains("class_labels");
  return {{"ddim.format_version", std::to_string(conditional ? kFormatVersion : kPixelFormatVersion)},
          {"ddim.graph", graph.dump()},
          {"ddim.schedule", schedule_to_json(schedule, alphas_tensor).dump()}};
}

}  // namespace ddim::format
