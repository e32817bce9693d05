#pragma once
// The host half of DDIM inversion: the visited timesteps, the model-evaluation timesteps and the
// per-step parameters of the shared DDIM update (see ddim/toolkit.hpp for the definitions). The
// backend's sampling loop then runs the steps unchanged, starting from x0.
#include <string>
#include <vector>

#include "ddim/schedule.hpp"
#include "ddim/toolkit.hpp"
#include "kernels/ddim_step.h"

namespace ddim {

struct InversionPlan {
  std::vector<int> timesteps;        // u_1 .. u_S, ascending
  std::vector<int> model_timesteps;  // m_0 .. m_{S-1}
  std::vector<DdimStepParams> steps; // S steps; steps[k].t == model_timesteps[k]
  std::string warning;
};

// Throws ddim::Error(InvalidArgument) naming the problem: steps < 1, spacing 'custom' without a
// list, an invalid custom list, or a step whose x0 prediction would divide by zero.
InversionPlan plan_inversion(const Scheduler& scheduler, const InvertOptions& options);

}  // namespace ddim
