#pragma once
// Classifier-free guidance, per element: the arithmetic every backend runs (the CPU sampler calls
// these functions; a CUDA kernel calls the same ones).
//   guided   = u + w (c - u)                      u: the null half's model output, c: the conditional half's
//   rescaled = phi (guided r) + (1 - phi) guided   r = std(c) / std(guided) over one sample's elements,
// diffusers' rescale_noise_cfg (guidance_rescale = phi; torch.std, unbiased), applied to the model
// output whatever its prediction type, as diffusers' pipelines do. float32, each operation
// rounded once (kernels/hd.h).
#include "kernels/hd.h"

namespace ddim {

DDIM_HD float cfg_combine(float uncond, float cond, float w) {
  return hd::rn_add(uncond, hd::rn_mul(w, hd::rn_sub(cond, uncond)));
}

DDIM_HD float cfg_rescale(float guided, float ratio, float phi) {
  const float rescaled = hd::rn_mul(guided, ratio);
  return hd::rn_add(hd::rn_mul(phi, rescaled), hd::rn_mul(hd::rn_sub(1.0f, phi), guided));
}

}  // namespace ddim
