#pragma once
// The ddim keys of the file's __metadata__: ddim.format_version, ddim.graph, ddim.schedule.
#include <map>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "ddim/schedule.hpp"

namespace ddim::format {

// The newest version this reader accepts. Writers use the lowest version that holds the file's
// content: 1 for unconditional pixel-space models, 2 for class-conditional models (graph input
// class_labels, op embedding) and latent models (ddim.decoder, ddim.latent, op vector_quantize).
inline constexpr int kFormatVersion = 2;
inline constexpr int kPixelFormatVersion = 1;

// The schedule JSON object, every key optional (defaults: diffusers' DDIMScheduler). An
// explicit table is named by "alphas_cumprod": "<tensor name>" (F32 or F64, shape [T]); its
// values are filled in by the caller after validation.
struct ParsedSchedule {
  ScheduleConfig config;
  std::optional<std::string> alphas_cumprod_tensor;
};
// Throws ddim::Error(InvalidFile) naming the key.
ParsedSchedule parse_schedule(const nlohmann::json& j);
nlohmann::json schedule_to_json(const ScheduleConfig& config, const std::optional<std::string>& alphas_tensor = std::nullopt);

std::map<std::string, std::string> make_metadata(const nlohmann::json& graph, const ScheduleConfig& schedule,
                                                 const std::optional<std::string>& alphas_tensor = std::nullopt);

}  // namespace ddim::format
