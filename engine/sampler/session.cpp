// ddim::Session: backend selection, argument validation and the host half of sampling (the
// timestep plan and per-step coefficients), then the backend's executor runs the loop.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <thread>
#include <tuple>

#include "backend.hpp"
#include "cpu/cpu_backend.hpp"
#include "cuda/cuda_backend.hpp"
#include "ddim/session.hpp"
#include "ddim/toolkit.hpp"
#include "host_memory.hpp"
#include "model_impl.hpp"
#include "sampler/finite.hpp"
#include "sampler/guidance.hpp"
#include "sampler/inversion.hpp"
#include "schedule/ddim_params.hpp"

namespace ddim {

const char* to_string(BackendKind b) noexcept {
  switch (b) {
    case BackendKind::Auto: return "auto";
    case BackendKind::Cpu: return "cpu";
    case BackendKind::Cuda: return "cuda";
  }
  return "?";
}

const char* to_string(Precision p) noexcept {
  switch (p) {
    case Precision::Auto: return "auto";
    case Precision::FP32: return "fp32";
    case Precision::FP16: return "fp16";
    case Precision::BF16: return "bf16";
  }
  return "?";
}

BackendKind parse_backend(const std::string& s) {
  if (s == "auto") return BackendKind::Auto;
  if (s == "cpu") return BackendKind::Cpu;
  if (s == "cuda") return BackendKind::Cuda;
  throw Error(ErrorCode::InvalidArgument, "unknown device '" + s + "' (expected auto, cpu or cuda)");
}

Precision parse_precision(const std::string& s) {
  if (s == "auto") return Precision::Auto;
  if (s == "fp32") return Precision::FP32;
  if (s == "fp16") return Precision::FP16;
  if (s == "bf16") return Precision::BF16;
  throw Error(ErrorCode::InvalidArgument, "unknown precision '" + s + "' (expected auto, fp32, fp16 or bf16)");
}

int cuda_device_count() noexcept { return cuda::device_count(); }

struct __attribute__((visibility("hidden"))) Session::Impl {  // internal: not exported with Session
  std::shared_ptr<const Model> model;
  SessionOptions options;
  BackendKind backend = BackendKind::Cpu;
  std::unique_ptr<Executor> executor;
  mutable PlanInfo info;  // the executor's, plus the fallback reason
  std::string fallback;
  int height = 0, width = 0;  // the sampled space: latents for a latent model
  // Latent models: the decoder's executor (null for pixel models and with decode off) and the
  // decoded image's shape.
  std::unique_ptr<Executor> decoder;
  int image_c = 0, image_h = 0, image_w = 0;

  // z = latents / scaling_factor + shift_factor on the host (fp32, as diffusers divides before
  // vae.decode), then the decoder graph. Throws when the result is not finite.
  std::vector<float> decode_latents(std::span<const float> latents, const NodeOutputCallback& dump) const {
    if (!decoder)
      throw Error(ErrorCode::InvalidArgument, model->info().is_latent()
                                                  ? "decode: this session was created with decode off (SessionOptions::decode)"
                                                  : "decode: the model is not a latent model (it has no decoder)");
    check_batch(latents, "decode: latents");
    check_finite(latents, "decode: latents", sample_elements());
    const graph::LatentConfig& l = model->impl().latent;
    const float scaling = float(l.scaling_factor), shift = float(l.shift_factor);
    std::vector<float> z(latents.begin(), latents.end());
    for (float& v : z) v = v / scaling;
    if (shift != 0.0f)
      for (float& v : z) v = v + shift;
    std::vector<float> out(batch() * std::size_t(image_c) * std::size_t(image_h) * std::size_t(image_w));
    const std::vector<int> t0(1, 0);  // the decoder graph reads no timestep
    if (dump) decoder->forward_dump(z, t0, out, dump, Conditioning{});
    else decoder->forward(z, t0, out);
    if (const std::size_t bad = first_nonfinite(out); bad != kAllFinite)
      throw Error(ErrorCode::InvalidArgument, "decode: the decoder's output is NaN or infinite at " +
                                                  element_location(bad, out.size() / batch()) + nonfinite_hint());
    return out;
  }

  std::size_t batch() const { return std::size_t(options.batch); }
  std::size_t sample_elements() const {  // C * H * W of one sample
    return std::size_t(model->info().in_channels) * std::size_t(height) * std::size_t(width);
  }
  // Throws unless `x` holds exactly one (N, C, H, W) batch for this session.
  void check_batch(std::span<const float> x, const std::string& what) const {
    if (x.size() == batch() * sample_elements()) return;
    throw Error(ErrorCode::InvalidArgument, what + " has " + std::to_string(x.size()) +
                                                " values; the session needs (N, C, H, W) = (" + std::to_string(batch()) + ", " +
                                                std::to_string(model->info().in_channels) + ", " + std::to_string(height) + ", " +
                                                std::to_string(width) + ")");
  }
  // Throws unless every value of a caller's array is finite.
  static void check_finite(std::span<const float> v, const std::string& what, std::size_t per_sample) {
    if (const std::size_t bad = first_nonfinite(v); bad != kAllFinite)
      throw Error(ErrorCode::InvalidArgument, what + " holds NaN or Inf (first at " + element_location(bad, per_sample) + ")");
  }
  // Throws before any work when S steps of history ((S + 1) slices for a trajectory) cannot even
  // be addressed; the executor then allocates them up front (OutOfMemory when they do not fit).
  void check_history(std::size_t S, bool trajectory, bool x0) const {
    const std::size_t per_step = batch() * sample_elements();
    for (const auto& [wanted, slices, name] : {std::tuple{trajectory, S + 1, "trajectory"}, std::tuple{x0, S, "x0"}}) {
      if (!wanted) continue;
      if (per_step != 0 && slices > std::numeric_limits<std::size_t>::max() / sizeof(float) / per_step)
        throw Error(ErrorCode::InvalidArgument, std::string("the ") + name + " of " + std::to_string(slices) + " x " +
                                                    std::to_string(per_step) + " values is too large to address");
    }
  }
  // "; it first appears in the output of node ..." for a forward pass whose output is not finite.
  std::string locate_nonfinite(std::span<const float> x, std::span<const int> t, const Conditioning& cond) const {
    const graph::Graph& g = model->impl().graph;
    std::string where;
    try {
      std::vector<float> out(batch() * std::size_t(g.values[g.output].c) * std::size_t(height) * std::size_t(width));
      executor->forward_dump(x, t, out, [&](const std::string& node, const std::vector<std::int64_t>&, std::span<const float> v) {
        if (!where.empty() || first_nonfinite(v) == kAllFinite) return;
        for (const graph::Node& n : g.nodes)
          if (n.name == node) where = node_location(node, graph::to_string(n.op));
      }, cond);
    } catch (const std::exception&) {
      return "";  // only a diagnosis
    }
    return where;
  }
  // Throws when a forward pass's output is not finite, naming the first node where it is not.
  void check_forward_output(std::span<const float> out, std::span<const float> x, std::span<const int> t,
                            const std::string& what, const Conditioning& cond) const {
    const std::size_t bad = first_nonfinite(out);
    if (bad == kAllFinite) return;
    const graph::Graph& g = model->impl().graph;
    const std::size_t per = std::size_t(g.values[g.output].c) * std::size_t(height) * std::size_t(width);
    throw Error(ErrorCode::InvalidArgument, what + ": the network's output is NaN or infinite at " +
                                                element_location(bad, per) + locate_nonfinite(x, t, cond) + nonfinite_hint());
  }
  // A job with the per-sample seeds (`seeds`, one per sample, or seed + i) and the schedule's
  // thresholding settings.
  SampleJob new_job(std::uint64_t seed, const std::vector<std::uint64_t>& seeds = {}) const {
    if (!seeds.empty() && seeds.size() != batch())
      throw Error(ErrorCode::InvalidArgument, "seeds has " + std::to_string(seeds.size()) + " entries; the session's batch is " +
                                                  std::to_string(batch()) + " (one seed per sample, or none)");
    if (seeds.empty() && seed > std::numeric_limits<std::uint64_t>::max() - (batch() - 1))
      throw Error(ErrorCode::InvalidArgument,
                  "seed " + std::to_string(seed) + ": sample i of the batch uses seed + i, which passes 2^64 - 1 for the last " +
                      "samples of a batch of " + std::to_string(batch()) + " (use a seed <= " +
                      std::to_string(std::numeric_limits<std::uint64_t>::max() - (batch() - 1)) + ", or one seed per sample)");
    SampleJob job;
    if (!seeds.empty()) job.seeds = seeds;
    else
      for (std::size_t b = 0; b < batch(); ++b) job.seeds.push_back(seed + b);
    job.dynamic_thresholding_ratio = model->schedule().dynamic_thresholding_ratio;
    job.sample_max_value = model->schedule().sample_max_value;
    return job;
  }
  void require_cuda(const char* what) const {
    if (backend != BackendKind::Cuda)
      throw Error(ErrorCode::InvalidArgument, std::string(what) + " needs a CUDA session; this one runs on the CPU");
  }
  // The conditioning of a call, every field checked against the model: labels for a conditional
  // model (one for all or one per sample), none for an unconditional one; the null input when
  // guided (the caller's, else the file's). `what` prefixes the messages ("sample", ...).
  Conditioning conditioning(const ClassConditioning& o, const std::string& what) const {
    const graph::Graph& g = model->impl().graph;
    const graph::ClassInput& cls = g.cls;
    auto bad = [&](const std::string& msg) { return Error(ErrorCode::InvalidArgument, what + ": " + msg); };
    if (!(o.guidance_scale >= 0.0 && o.guidance_scale <= 1000.0))
      throw bad("guidance_scale must be finite and in [0, 1000], got " + std::to_string(o.guidance_scale));
    if (!(o.guidance_rescale >= 0.0 && o.guidance_rescale <= 1.0))
      throw bad("guidance_rescale must be in [0, 1], got " + std::to_string(o.guidance_rescale));
    Conditioning c;
    if (g.class_labels < 0) {
      const char* given = !o.class_labels.empty() ? "class labels" : !o.class_embeddings.empty() ? "class embeddings"
                          : o.guidance_scale != 1.0 ? "a guidance scale other than 1" : o.guidance_rescale != 0.0 ? "a guidance rescale"
                          : o.null_class_label ? "a null class label" : !o.null_class_embedding.empty() ? "a null class embedding" : nullptr;
      if (given) throw bad(std::string(given) + " given, but the model is unconditional (it has no class_labels input)");
      return c;
    }
    const std::size_t N = batch(), W = std::size_t(cls.width());
    const std::string kind = graph::to_string(cls.kind);
    c.width = int(W);
    c.guidance_scale = o.guidance_scale;
    c.guidance_rescale = o.guidance_rescale;
    auto number = [](double v) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%.9g", v);
      return std::string(buf);
    };
    auto check_label = [&](double v, const std::string& who) {
      if (!std::isfinite(v) || std::fabs(v) > 1e30) throw bad(who + " is not a finite number");
      if (cls.kind == graph::ClassKind::Index && !(v >= 0 && v < cls.num_classes && v == std::floor(v)))
        throw bad(who + " = " + number(v) + " is not an integer in [0, " + std::to_string(cls.num_classes) +
                  ") (the model has " + std::to_string(cls.num_classes) + " classes)");
      return float(v);
    };
    if (cls.kind == graph::ClassKind::Vector) {
      if (!o.class_labels.empty() || o.null_class_label)
        throw bad("the model takes class embeddings of " + std::to_string(W) + " values (kind vector), not class labels");
      if (o.class_embeddings.empty())
        throw bad("the model is class-conditional (kind vector, " + std::to_string(W) + " values): give class embeddings");
      if (o.class_embeddings.size() != W && o.class_embeddings.size() != N * W)
        throw bad("class embeddings have " + std::to_string(o.class_embeddings.size()) + " values; expected (N, D) = (" +
                  std::to_string(N) + ", " + std::to_string(W) + ") or one (D) for all");
      check_finite(o.class_embeddings, what + ": class embeddings", W);
      for (std::size_t b = 0; b < N; ++b)
        c.labels.insert(c.labels.end(), o.class_embeddings.begin() + std::ptrdiff_t(o.class_embeddings.size() == W ? 0 : b * W),
                        o.class_embeddings.begin() + std::ptrdiff_t(o.class_embeddings.size() == W ? W : (b + 1) * W));
      if (!o.null_class_embedding.empty()) {
        if (o.null_class_embedding.size() != W)
          throw bad("the null class embedding has " + std::to_string(o.null_class_embedding.size()) + " values; expected D = " +
                    std::to_string(W));
        check_finite(o.null_class_embedding, what + ": the null class embedding", W);
      }
    } else {
      if (!o.class_embeddings.empty() || !o.null_class_embedding.empty())
        throw bad("the model takes class labels (kind " + kind + "), not class embeddings");
      if (o.class_labels.empty())
        throw bad("the model is class-conditional (kind " + kind +
                  (cls.kind == graph::ClassKind::Index ? ", " + std::to_string(cls.num_classes) + " classes" : std::string()) +
                  "): give class labels");
      if (o.class_labels.size() != 1 && o.class_labels.size() != N)
        throw bad(std::to_string(o.class_labels.size()) + " class labels for a batch of " + std::to_string(N) +
                  " (give one for all or one per sample)");
      for (std::size_t b = 0; b < N; ++b) {
        const std::size_t i = o.class_labels.size() == 1 ? 0 : b;
        c.labels.push_back(check_label(o.class_labels[i], "class label " + std::to_string(i + 1)));
      }
    }
    if (c.guided()) {
      if (cls.kind == graph::ClassKind::Vector && !o.null_class_embedding.empty()) c.null_label = o.null_class_embedding;
      else if (o.null_class_label) c.null_label = {check_label(*o.null_class_label, "the null class label")};
      else if (!cls.null.empty()) c.null_label = cls.null;
      else
        throw bad("guidance (scale " + std::to_string(o.guidance_scale) + ") needs the unconditional input: give a null class " +
                  (cls.kind == graph::ClassKind::Vector ? "embedding" : "label") +
                  ", or re-export the model with it recorded (tools/export.py --null-class-" +
                  (cls.kind == graph::ClassKind::Vector ? "embedding" : "label") + ")");
    }
    return c;
  }
  // The timesteps of a sample call (Session::timestep_plan).
  TimestepPlan plan_of(const SampleOptions& o) const {
    const Scheduler scheduler(model->schedule());
    if (!o.timesteps.empty()) return scheduler.custom_timesteps(o.timesteps);
    if (o.steps < 1) throw Error(ErrorCode::InvalidArgument, "steps must be at least 1, got " + std::to_string(o.steps));
    if (o.spacing == Spacing::Custom)
      throw Error(ErrorCode::InvalidArgument, "spacing 'custom' needs a timestep list (SampleOptions::timesteps)");
    return scheduler.timesteps(o.steps, o.spacing, o.steps_offset);
  }
  // The job of a sample call, every option checked.
  SampleJob sample_job(const SampleOptions& o, const TimestepPlan& plan) const {
    if (!(o.eta >= 0.0 && o.eta <= 1e6))  // false for NaN too
      throw Error(ErrorCode::InvalidArgument, "eta must be finite and in [0, 1e6] (0: deterministic DDIM, 1: DDPM-like), got " +
                                                  std::to_string(o.eta));
    const std::size_t S = plan.timesteps.size(), N = batch(), E = sample_elements();
    if (!o.x_T.empty()) check_batch(o.x_T, "x_T");
    if (!o.noise.empty() && o.noise.size() != S * N * E)
      throw Error(ErrorCode::InvalidArgument, "noise has " + std::to_string(o.noise.size()) + " values; expected (S, N, C, H, W) with S = " +
                                                  std::to_string(S) + " steps taken and N = " + std::to_string(N));
    check_finite(o.x_T, "x_T", E);
    check_finite(o.noise, "noise", N * E);
    check_history(S, o.want_trajectory, o.want_x0);
    if ((!o.noise.empty() || o.noise_device) && o.eta == 0.0)
      throw Error(ErrorCode::InvalidArgument, "per-step noise was given but eta = 0, where no noise is added; use eta > 0");
    if (o.x_T_device) require_cuda("x_T_device");
    if (o.noise_device) require_cuda("noise_device");
    if (o.output_device) require_cuda("output_device");
    if (o.x_T_device && !o.x_T.empty()) throw Error(ErrorCode::InvalidArgument, "give x_T or x_T_device, not both");
    if (o.noise_device && !o.noise.empty()) throw Error(ErrorCode::InvalidArgument, "give noise or noise_device, not both");
    if (decoder && (o.output_device || o.output_on_device))
      throw Error(ErrorCode::Unsupported, "output_device and output_on_device are not available for a latent model's decoded "
                                          "images (the decoder runs after the loop); create the session with decode off to "
                                          "get the latents there");
    if (o.output_device && o.output_on_device)
      throw Error(ErrorCode::InvalidArgument, "give output_device (the caller's buffer) or output_on_device (the session's), not both");
    const Scheduler scheduler(model->schedule());
    const StepOptions so{o.eta, o.use_clipped_model_output, o.clip_sample, o.set_alpha_to_one};
    SampleJob job = new_job(o.seed, o.seeds);
    job.timesteps = plan.timesteps;
    for (const auto& c : scheduler.coefficients(plan.timesteps, so)) job.steps.push_back(make_step_params(c, model->schedule(), so));
    job.x_T = o.x_T;
    job.noise = o.noise;
    job.want_trajectory = o.want_trajectory;
    job.want_x0 = o.want_x0;
    job.progress = o.progress;
    job.output_on_device = o.output_on_device;
    job.x_T_device = o.x_T_device;
    job.noise_device = o.noise_device;
    job.output_device = o.output_device;
    job.output_session_precision = o.output_type == OutputType::SessionPrecision;
    job.cond = conditioning(o.conditioning, "sample");
    return job;
  }
  // Inversion with fixed-point refinement (ddim/toolkit.hpp): step by step through the executor's
  // forward, the update on the host with the shared per-element math.
  InvertResult invert_refined(std::span<const float> x0, const InvertOptions& o, InversionPlan plan, const Conditioning& cond) const {
    const std::size_t S = plan.steps.size(), N = batch(), E = sample_elements();
    const graph::Graph& g = model->impl().graph;
    if (std::size_t(g.values[g.output].c) != std::size_t(model->info().in_channels))
      throw Error(ErrorCode::Unsupported, "invert: the model's output does not have the sample's shape");
    std::vector<float> x(x0.begin(), x0.end()), y(N * E), out(N * E), eps(E), x0_pred(E);
    InvertResult r;
    if (o.want_trajectory) r.trajectory.assign(x.begin(), x.end());
    std::vector<int> t(N);
    for (std::size_t k = 0; k < S; ++k) {
      const DdimStepParams& explicit_step = plan.steps[k];
      std::fill(t.begin(), t.end(), plan.model_timesteps[k]);
      executor->forward(x, t, out, cond);
      check_forward_output(out, x, t, "invert: step " + std::to_string(k + 1) + " of " + std::to_string(S), cond);
      for (std::size_t b = 0; b < N; ++b)
        ddim_step_sample(explicit_step, std::span<const float>(x).subspan(b * E, E), std::span<const float>(out).subspan(b * E, E),
                         {}, x0_pred, std::span<float>(y).subspan(b * E, E), 0.995, 1.0);
      // The model output at the destination converted to noise there (a = alpha(u_{k+1}); with
      // sigma 0, dir = sqrt(1 - a_dst)); then the step from x with that noise.
      DdimStepParams at_dst = explicit_step;
      at_dst.sqrt_alpha_t = explicit_step.sqrt_alpha_prev;
      at_dst.sqrt_one_minus_alpha_t = explicit_step.dir;
      DdimStepParams from_eps = explicit_step;
      from_eps.prediction = kPredEpsilon;
      std::fill(t.begin(), t.end(), plan.timesteps[k]);
      for (int j = 0; j < o.refine; ++j) {
        executor->forward(y, t, out, cond);
        check_forward_output(out, y, t, "invert: step " + std::to_string(k + 1) + " of " + std::to_string(S) + ", refinement " +
                                            std::to_string(j + 1), cond);
        for (std::size_t b = 0; b < N; ++b) {
          const float* yb = y.data() + b * E;
          const float* ob = out.data() + b * E;
          for (std::size_t i = 0; i < E; ++i)
            eps[i] = ddim_pred_eps(yb[i], ob[i], ddim_pred_x0(yb[i], ob[i], at_dst), at_dst);
          ddim_step_sample(from_eps, std::span<const float>(x).subspan(b * E, E), eps, {}, x0_pred,
                           std::span<float>(y).subspan(b * E, E), 0.995, 1.0);
        }
      }
      if (const std::size_t bad = first_nonfinite(y); bad != kAllFinite)
        throw Error(ErrorCode::InvalidArgument, "invert: step " + std::to_string(k + 1) + " of " + std::to_string(S) +
                                                    ": the update gives NaN or Inf at " + element_location(bad, E) +
                                                    nonfinite_hint());
      x.swap(y);
      if (o.want_trajectory) r.trajectory.insert(r.trajectory.end(), x.begin(), x.end());
      if (o.progress && !o.progress(int(k + 1), int(S)))
        throw Error(ErrorCode::Cancelled, "inversion cancelled by the progress callback after step " + std::to_string(k + 1));
    }
    r.timesteps = std::move(plan.timesteps);
    r.model_timesteps = std::move(plan.model_timesteps);
    r.warning = std::move(plan.warning);
    r.x_T = std::move(x);
    return r;
  }

  std::vector<float> forward(std::span<const float> x, std::span<const int> t, const NodeOutputCallback& dump,
                             const Conditioning& cond) const;

  // Runs the job on the executor; the result's shape and visited timesteps filled in. With
  // `decode` and a decoder, the final latents are decoded into the images.
  SampleResult run(const SampleJob& job, bool decode = false) const {
    SampleResult r;
    r.n = options.batch;
    r.c = r.latent_c = model->info().in_channels;
    r.h = r.latent_h = height;
    r.w = r.latent_w = width;
    r.timesteps = job.timesteps;
    executor->sample(job, r);
    // The CPU executor checks every step; this catches what any backend returns to the host.
    if (const std::size_t bad = first_nonfinite(r.images); bad != kAllFinite)
      throw Error(ErrorCode::InvalidArgument, "the result holds NaN or Inf at " + element_location(bad, sample_elements()) +
                                                  " (run on the CPU backend to find the step and the node)" +
                                                  nonfinite_hint());
    if (decode && decoder && !job.async) {
      r.images = decode_latents(r.images, {});
      r.c = image_c;
      r.h = image_h;
      r.w = image_w;
    }
    return r;
  }
};

void Executor::set_stream(void*) {
  throw Error(ErrorCode::InvalidArgument, "set_stream: this session runs on the CPU: it has no CUDA stream");
}
void* Executor::stream() const { return nullptr; }

namespace {

// The decoder of a latent model, on the U-Net's backend. With --device auto, a CUDA decoder that
// cannot be planned (an unsupported op or size, too little memory) runs on the CPU instead, with
// the reason in PlanInfo::fallback.
void plan_decoder(Session::Impl& impl, const SessionOptions& options) {
  const ExecutorContext dctx{impl.model->impl().decoder, impl.height, impl.width};
  if (impl.backend == BackendKind::Cpu) {
    impl.decoder = std::make_unique<cpu::CpuExecutor>(dctx, options);
    return;
  }
  try {
    impl.decoder = cuda::make_executor(dctx, options);
  } catch (const Error& e) {
    if (options.backend != BackendKind::Auto || e.code() == ErrorCode::InvalidArgument || e.code() == ErrorCode::InvalidFile)
      throw;
    SessionOptions cpu_options = options;
    if (cpu_options.precision == Precision::FP16) cpu_options.precision = Precision::FP32;
    impl.decoder = std::make_unique<cpu::CpuExecutor>(dctx, cpu_options);
    impl.fallback += std::string(impl.fallback.empty() ? "" : "; ") + "the decoder runs on the CPU (" + to_string(e.code()) +
                     ": " + e.what() + ")";
  }
}

}  // namespace

Session::Session(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Session::~Session() = default;

std::unique_ptr<Session> Session::create(std::shared_ptr<const Model> model, const SessionOptions& options) {
  if (!model) throw Error(ErrorCode::InvalidArgument, "Session::create: model is null");
  // One limit for every backend: the CUDA kernels put the batch on a grid's y or z dimension
  // (attention, dynamic thresholding), which holds at most 65535 blocks.
  if (options.batch < 1 || options.batch > kMaxBatch)
    throw Error(ErrorCode::InvalidArgument,
                "batch must be in [1, " + std::to_string(kMaxBatch) + "], got " + std::to_string(options.batch));
  if (options.threads < 0 || options.threads > kMaxThreads)
    throw Error(ErrorCode::InvalidArgument,
                "threads must be in [0, " + std::to_string(kMaxThreads) + "], got " + std::to_string(options.threads));
  if ((options.height == 0) != (options.width == 0))
    throw Error(ErrorCode::InvalidArgument, "give both height and width, or neither");
  if (options.height < 0 || options.width < 0) throw Error(ErrorCode::InvalidArgument, "height and width must be positive");
  const std::string what = "planning a session (batch " + std::to_string(options.batch) + ")";
  return with_host_memory_errors(what, [&]() -> std::unique_ptr<Session> {
    auto impl = std::make_unique<Impl>();
    impl->model = model;
    impl->options = options;
    impl->height = options.height ? options.height : model->info().height;
    impl->width = options.width ? options.width : model->info().width;
    const ModelInfo& mi = model->info();
    if (mi.is_latent()) {  // height and width are pixels of the decoded image
      const int f = mi.latent.factor;
      if (!options.height) impl->height *= f, impl->width *= f;
      if (impl->height % f || impl->width % f)
        throw Error(ErrorCode::InvalidArgument,
                    "height and width are the decoded image's pixels: " + std::to_string(impl->height) + "x" +
                        std::to_string(impl->width) + " is not a multiple of the decoder's factor " + std::to_string(f) +
                        " (the U-Net samples latents of height/" + std::to_string(f) + " x width/" + std::to_string(f) + ")");
      impl->image_c = mi.latent.image_channels;
      impl->image_h = impl->height;
      impl->image_w = impl->width;
      impl->height /= f;
      impl->width /= f;
    }
    ExecutorContext ctx{model, impl->height, impl->width};

    auto make_cpu = [&]() {  // the executor rejects fp16, and bf16 on a CPU without the instructions
      impl->backend = BackendKind::Cpu;
      impl->executor = std::make_unique<cpu::CpuExecutor>(ctx, options);
    };
    switch (options.backend) {
      case BackendKind::Cpu: make_cpu(); break;
      case BackendKind::Cuda:
        if (cuda::device_count() <= options.device || options.device < 0)
          throw Error(ErrorCode::InvalidArgument, "CUDA device " + std::to_string(options.device) + " is not available (" +
                                                      std::to_string(cuda::device_count()) + " usable CUDA devices)");
        impl->backend = BackendKind::Cuda;
        impl->executor = cuda::make_executor(ctx, options);
        break;
      case BackendKind::Auto: {
        std::string fallback;
        if (cuda::device_count() > options.device && options.device >= 0) {
          try {
            impl->backend = BackendKind::Cuda;
            impl->executor = cuda::make_executor(ctx, options);
            break;
          } catch (const Error& e) {
            // The caller's own mistakes are reported; anything the device could not do (an
            // unsupported op or precision, too little memory, a device or library failure) falls
            // back to the CPU with the reason in plan_info().fallback.
            if (e.code() == ErrorCode::InvalidArgument || e.code() == ErrorCode::InvalidFile) throw;
            fallback = std::string(to_string(e.code())) + ": " + e.what();
          }
        }
        if (!fallback.empty() && options.precision == Precision::FP16)
          throw Error(ErrorCode::Unsupported, "the CUDA backend failed (" + fallback + ") and the CPU backend has no " +
                                                  to_string(options.precision));
        make_cpu();
        impl->fallback = std::move(fallback);
        break;
      }
    }
    if (mi.is_latent() && options.decode) plan_decoder(*impl, options);
    impl->info = impl->executor->plan_info();
    impl->info.fallback = impl->fallback;
    if (impl->decoder) {
      const PlanInfo& d = impl->decoder->plan_info();
      const graph::LatentConfig& l = model->impl().latent;
      impl->info.decoder = "'" + l.component + "' (" + (l.decoder == "vq" ? "VQModel" : "AutoencoderKL") + ", factor " +
                           std::to_string(l.factor) + "): latents (" + std::to_string(mi.in_channels) + ", " +
                           std::to_string(impl->height) + ", " + std::to_string(impl->width) + ") -> image (" +
                           std::to_string(impl->image_c) + ", " + std::to_string(impl->image_h) + ", " +
                           std::to_string(impl->image_w) + ") on " + d.backend + " " + d.precision + ", arena " +
                           std::to_string(d.arena_bytes) + " bytes, " + std::to_string(mi.latent.decoder_node_count) +
                           " nodes, once per sample call";
      for (const std::string& w : d.warnings) impl->info.warnings.push_back("decoder: " + w);
    }
    return std::unique_ptr<Session>(new Session(std::move(impl)));
  });
}

std::vector<float> Session::forward(std::span<const float> x, std::span<const int> t) { return forward(x, t, NodeOutputCallback{}); }

std::vector<float> Session::forward(std::span<const float> x, std::span<const int> t, const NodeOutputCallback& dump) {
  return with_host_memory_errors("forward", [&] { return impl_->forward(x, t, dump, impl_->conditioning({}, "forward")); });
}

std::vector<float> Session::forward(std::span<const float> x, std::span<const int> t, const ClassConditioning& conditioning,
                                    const NodeOutputCallback& dump) {
  return with_host_memory_errors("forward", [&] { return impl_->forward(x, t, dump, impl_->conditioning(conditioning, "forward")); });
}

std::vector<float> Session::Impl::forward(std::span<const float> x, std::span<const int> t, const NodeOutputCallback& dump,
                                          const Conditioning& cond) const {
  const auto& sched = model->schedule();
  for (int ti : t)
    if (ti < 0 || ti >= sched.num_train_timesteps)
      throw Error(ErrorCode::InvalidArgument, "forward: timestep " + std::to_string(ti) + " is outside [0, " +
                                                  std::to_string(sched.num_train_timesteps) + ")");
  check_finite(x, "forward: x", sample_elements());
  const auto& g = model->impl().graph;
  std::vector<float> out(std::size_t(options.batch) * std::size_t(g.values[g.output].c) * std::size_t(height) *
                         std::size_t(width));
  if (dump) {
    if (cond.guided()) throw Error(ErrorCode::InvalidArgument, "forward: a node dump shows one forward; it takes no guidance");
    executor->forward_dump(x, t, out, dump, cond);
  } else {
    executor->forward(x, t, out, cond);
  }
  check_forward_output(out, x, t, "forward", cond);
  return out;
}

SampleResult Session::sample(const SampleOptions& o) {
  return with_host_memory_errors("sample", [&] {
    const TimestepPlan plan = impl_->plan_of(o);
    SampleResult r = impl_->run(impl_->sample_job(o, plan), true);
    r.warning = plan.warning;
    return r;
  });
}

TimestepPlan Session::timestep_plan(const SampleOptions& o) const { return impl_->plan_of(o); }

TimestepPlan Session::sample_async(const SampleOptions& o) {
  impl_->require_cuda("sample_async");
  if (!o.output_device) throw Error(ErrorCode::InvalidArgument, "sample_async needs output_device (the caller's device buffer)");
  if (o.progress) throw Error(ErrorCode::InvalidArgument, "sample_async takes no progress callback (it returns before the steps run)");
  if (o.want_trajectory || o.want_x0 || o.output_on_device)
    throw Error(ErrorCode::InvalidArgument, "sample_async returns no host results: no trajectory, x0 or output_on_device");
  if (!o.x_T.empty() || !o.noise.empty())
    throw Error(ErrorCode::InvalidArgument, "sample_async reads x_T and noise from device memory only (x_T_device, noise_device) "
                                            "or draws them from the seeds");
  if (impl_->decoder)
    throw Error(ErrorCode::Unsupported, "sample_async: a latent model's images are decoded after the loop; create the session "
                                        "with decode off to sample latents asynchronously");
  TimestepPlan plan = impl_->plan_of(o);
  SampleJob job = impl_->sample_job(o, plan);
  job.async = true;
  SampleResult r;
  impl_->executor->sample(job, r);
  return plan;
}

void Session::set_stream(void* cuda_stream) {
  impl_->require_cuda("set_stream");
  impl_->executor->set_stream(cuda_stream);
}

void* Session::stream() const {
  impl_->require_cuda("stream");
  return impl_->executor->stream();
}

SampleResult Session::sample_ddpm(const DdpmOptions& o) {
  return with_host_memory_errors("sample_ddpm", [&] {
    const Model& model = *impl_->model;
    const Scheduler scheduler(model.schedule());
    const std::vector<double>& ac = scheduler.alphas_cumprod();
    const int T = model.schedule().num_train_timesteps;
    const std::size_t N = impl_->batch(), E = impl_->sample_elements();
    if (!o.x_T.empty()) impl_->check_batch(o.x_T, "sample_ddpm: x_T");
    if (!o.noise.empty() && o.noise.size() != std::size_t(T) * N * E)
      throw Error(ErrorCode::InvalidArgument, "sample_ddpm: noise has " + std::to_string(o.noise.size()) +
                                                  " values; expected (T, N, C, H, W) with T = " + std::to_string(T) +
                                                  " training timesteps and N = " + std::to_string(N));
    Impl::check_finite(o.x_T, "sample_ddpm: x_T", E);
    Impl::check_finite(o.noise, "sample_ddpm: noise", N * E);
    impl_->check_history(std::size_t(T), o.want_trajectory, o.want_x0);
    const VarianceType variance = o.variance.value_or(model.schedule().variance_type);

    // The DDIM loop runs DDPM unchanged: each step's parameters select the DDPM update.
    // DDPM ancestral sampling takes no class labels: a class-conditional model is refused here.
    impl_->conditioning({}, "sample_ddpm");
    SampleJob job = impl_->new_job(o.seed, o.seeds);
    for (int t = T - 1; t >= 0; --t) {
      job.timesteps.push_back(t);
      job.steps.push_back(make_ddpm_step_params(t, ac, model.schedule(), variance, o.clip_sample));
    }
    job.x_T = o.x_T;
    job.noise = o.noise;
    job.want_trajectory = o.want_trajectory;
    job.want_x0 = o.want_x0;
    job.progress = o.progress;
    return impl_->run(job, true);
  });
}

std::vector<float> Session::decode(std::span<const float> latents, const NodeOutputCallback& dump) {
  return with_host_memory_errors("decode", [&] { return impl_->decode_latents(latents, dump); });
}

InvertResult Session::invert(std::span<const float> x0, const InvertOptions& o) {
  return with_host_memory_errors("invert", [&] {
    const Model& model = *impl_->model;
    impl_->check_batch(x0, "invert: x0");
    Impl::check_finite(x0, "invert: x0", impl_->sample_elements());
    if (o.refine < 0 || o.refine > 100)
      throw Error(ErrorCode::InvalidArgument, "invert: refine must be in [0, 100], got " + std::to_string(o.refine));
    if (o.refine > 0 && o.model_time != ModelTime::Current)
      throw Error(ErrorCode::InvalidArgument, "invert: refine applies to model time 'current' only (the fixed point of "
                                              "the sampler's step); 'next' reproduces diffusers' inverse scheduler");
    const Scheduler scheduler(model.schedule());
    InversionPlan plan = plan_inversion(scheduler, o);
    impl_->check_history(plan.model_timesteps.size(), o.want_trajectory, false);
    const Conditioning cond = impl_->conditioning(o.conditioning, "invert");
    if (o.refine > 0) return impl_->invert_refined(x0, o, std::move(plan), cond);

    // The sampling loop runs the inversion unchanged: x_T is the given x0, the model is evaluated at
    // plan.model_timesteps and each step's coefficients carry the ascending alpha-bars. sigma is 0,
    // so the seeds are never used.
    SampleJob job = impl_->new_job(0);
    job.timesteps = plan.model_timesteps;
    job.steps = std::move(plan.steps);
    job.x_T = x0;
    job.want_trajectory = o.want_trajectory;
    job.progress = o.progress;
    job.cond = cond;
    SampleResult r = impl_->run(job);

    InvertResult out;
    out.timesteps = std::move(plan.timesteps);
    out.model_timesteps = std::move(plan.model_timesteps);
    out.warning = std::move(plan.warning);
    out.x_T = std::move(r.images);
    out.trajectory = std::move(r.trajectory);
    return out;
  });
}

const PlanInfo& Session::plan_info() const noexcept {
  // Refreshed: an executor may learn more after planning (PlanInfo::warnings).
  const std::size_t known = impl_->info.warnings.size();
  const std::vector<std::string>& now = impl_->executor->plan_info().warnings;
  if (now.size() != known) impl_->info.warnings = now;
  return impl_->info;
}
const Model& Session::model() const noexcept { return *impl_->model; }
BackendKind Session::backend() const noexcept { return impl_->backend; }

}  // namespace ddim
