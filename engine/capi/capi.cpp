// The C API (ddim/ddim.h) over the C++ API: argument checks, struct_size-aware option structs,
// and the exception boundary (no exception leaves a ddim_* function).
#include "ddim/ddim.h"

#include <atomic>
#include <cstdio>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "ddim/ddim.hpp"

namespace {

using ddim::Error;
using ddim::ErrorCode;

// ---------------------------------------------------------------- errors
// The last message per thread, in a fixed buffer: recording an error never allocates (so it works
// after std::bad_alloc too). Long messages are truncated.
thread_local char g_last_error[4096] = "";

void set_error(const char* message) noexcept {
  std::snprintf(g_last_error, sizeof g_last_error, "%s", message);
}

ddim_status status_of(ErrorCode code) noexcept {
  switch (code) {
    case ErrorCode::InvalidFile: return DDIM_ERR_INVALID_FILE;
    case ErrorCode::InvalidArgument: return DDIM_ERR_INVALID_ARGUMENT;
    case ErrorCode::Unsupported: return DDIM_ERR_UNSUPPORTED;
    case ErrorCode::OutOfMemory: return DDIM_ERR_OUT_OF_MEMORY;
    case ErrorCode::DeviceLost: return DDIM_ERR_DEVICE_LOST;
    case ErrorCode::Cancelled: return DDIM_ERR_CANCELLED;
    case ErrorCode::Io: return DDIM_ERR_IO;
    case ErrorCode::Internal: return DDIM_ERR_INTERNAL;
  }
  return DDIM_ERR_INTERNAL;
}

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::InvalidArgument, message); }

// Runs f, turning every exception into a status and the thread's last error.
template <class F>
ddim_status guarded(F&& f) noexcept {
  try {
    f();
    g_last_error[0] = '\0';
    return DDIM_OK;
  } catch (const Error& e) {
    set_error(e.what());
    return status_of(e.code());
  } catch (const std::bad_alloc&) {
    set_error("out of host memory");
    return DDIM_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    set_error(e.what());
    return DDIM_ERR_INTERNAL;
  } catch (...) {
    set_error("an unknown exception inside ddim (please report it)");
    return DDIM_ERR_INTERNAL;
  }
}

// ---------------------------------------------------------------- struct_size
// Option structs grow at the end. The library reads the fields that fit in the caller's
// struct_size (the rest keep their defaults); a larger struct (a newer header) is accepted when
// the fields this library does not know are zero.
constexpr std::size_t kMaxStructSize = 1 << 16;

void check_struct_size(std::size_t size, std::size_t known, const char* name) {
  if (size == 0) invalid(std::string(name) + ".struct_size is 0: initialise the struct with its _init function (or set struct_size = sizeof)");
  if (size < sizeof(std::size_t) || size > kMaxStructSize)
    invalid(std::string(name) + ".struct_size is " + std::to_string(size) + ": not the size of a " + name +
            " (uninitialised memory?); this library's is " + std::to_string(known));
}

template <class T>
T read_struct(const T* in, void (*init)(T*), const char* name) {
  static_assert(std::is_trivially_copyable_v<T>);
  T out;
  init(&out);
  if (!in) return out;
  const std::size_t size = in->struct_size;
  check_struct_size(size, sizeof(T), name);
  std::memcpy(&out, in, std::min(size, sizeof(T)));
  if (size > sizeof(T)) {
    const auto* extra = reinterpret_cast<const unsigned char*>(in) + sizeof(T);
    for (std::size_t i = 0; i < size - sizeof(T); ++i)
      if (extra[i] != 0)
        invalid(std::string(name) + " sets fields that this library (ddim " + ddim_version() +
                ") does not know (struct_size " + std::to_string(size) + " > " + std::to_string(sizeof(T)) +
                "): the program was built against a newer ddim.h");
  }
  out.struct_size = sizeof(T);
  return out;
}

// Writes the fields of `value` that fit in out->struct_size (which stays as the caller set it).
template <class T>
void write_struct(T* out, const T& value, const char* name) {
  static_assert(std::is_trivially_copyable_v<T>);
  const std::size_t size = out->struct_size;
  check_struct_size(size, sizeof(T), name);
  const std::size_t n = std::min(size, sizeof(T));
  std::memcpy(reinterpret_cast<unsigned char*>(out) + sizeof(std::size_t),
              reinterpret_cast<const unsigned char*>(&value) + sizeof(std::size_t), n - sizeof(std::size_t));
}

// ---------------------------------------------------------------- argument checks
template <class T>
T* require(T* p, const char* name) {
  if (!p) invalid(std::string(name) + " is NULL");
  return p;
}

// An optional input array: (NULL, 0) is "not given"; NULL with a count, or a pointer with count 0,
// is an error.
template <class T>
std::span<const T> input_array(const T* p, std::size_t count, const char* name) {
  if (!p && count) invalid(std::string(name) + " is NULL but its count is " + std::to_string(count));
  if (p && !count) invalid(std::string(name) + " is given with a count of 0");
  return p ? std::span<const T>(p, count) : std::span<const T>();
}

// An output buffer that must hold at least `needed` values.
template <class T>
void check_output(const T* p, std::size_t count, std::size_t needed, const char* name) {
  if (!p) invalid(std::string(name) + " is NULL");
  if (count < needed)
    invalid(std::string(name) + " holds " + std::to_string(count) + " values; the call writes " + std::to_string(needed));
}

std::size_t product(std::initializer_list<std::size_t> factors, const char* name) {
  std::size_t r = 1;
  for (std::size_t f : factors) {
    if (f && r > std::numeric_limits<std::size_t>::max() / f) invalid(std::string(name) + ": the size overflows");
    r *= f;
  }
  return r;
}

template <class E>
E enum_value(int v, int count, const char* name) {
  if (v < 0 || v >= count) invalid(std::string(name) + " has the unknown value " + std::to_string(v));
  return static_cast<E>(v);
}

std::optional<bool> tri_state(int v, const char* name) {
  if (v == DDIM_DEFAULT) return std::nullopt;
  if (v == DDIM_OFF || v == DDIM_ON) return v == DDIM_ON;
  invalid(std::string(name) + " has the unknown value " + std::to_string(v) + " (DDIM_DEFAULT -1, DDIM_OFF 0, DDIM_ON 1)");
}

std::optional<ddim::Spacing> spacing_of(int v, const char* name) {
  if (v == DDIM_SPACING_DEFAULT) return std::nullopt;
  return enum_value<ddim::Spacing>(v, DDIM_SPACING_LOG + 1, name);
}

ddim::ProgressCallback progress_of(ddim_progress_fn fn, void* user) {
  if (!fn) return {};
  return [fn, user](int done, int total) { return fn(user, done, total) == 0; };
}

void copy_out(const std::vector<float>& values, float* out) {
  if (!values.empty()) std::memcpy(out, values.data(), values.size() * sizeof(float));
}

}  // namespace

// ---------------------------------------------------------------- handles
struct ddim_model {
  std::atomic<long> references{1};
  std::shared_ptr<const ddim::Model> model;
};

struct ddim_session {
  std::unique_ptr<ddim::Session> session;
  // What ddim_session_get_plan_info points into (rebuilt by every call).
  std::vector<const char*> fusions, folded_nodes, warnings, folded_per_label;
};

struct ddim_scheduler {
  ddim::Scheduler scheduler;
};

namespace {

const ddim::Model& model_of(const ddim_model* m) { return *require(m, "model")->model; }
ddim::Session& session_of(ddim_session* s) { return *require(s, "session")->session; }
const ddim::Session& session_of(const ddim_session* s) { return *require(s, "session")->session; }

std::size_t sample_elements(const ddim::Session& s) {
  const auto& p = s.plan_info();
  return product({static_cast<std::size_t>(s.model().info().in_channels), static_cast<std::size_t>(p.height),
                  static_cast<std::size_t>(p.width)},
                 "sample");
}
std::size_t batch_of(const ddim::Session& s) { return static_cast<std::size_t>(s.plan_info().batch); }

// What sample() returns per sample: a latent model's decoded image (C_img, f*h, f*w) when the
// session planned its decoder, else the sampled space.
struct ImageShape {
  int c, h, w;
};
ImageShape image_shape(const ddim::Session& s) {
  const auto& p = s.plan_info();
  const ddim::ModelInfo& i = s.model().info();
  if (i.is_latent() && !p.decoder.empty())
    return {i.latent.image_channels, p.height * i.latent.factor, p.width * i.latent.factor};
  return {i.in_channels, p.height, p.width};
}
std::size_t image_elements(const ddim::Session& s) {
  const ImageShape d = image_shape(s);
  return product({static_cast<std::size_t>(d.c), static_cast<std::size_t>(d.h), static_cast<std::size_t>(d.w)}, "image");
}

// ddim_class_conditioning (NULL: the defaults) -> ClassConditioning.
ddim::ClassConditioning conditioning_of(const ddim_class_conditioning* in) {
  const ddim_class_conditioning c = read_struct(in, ddim_class_conditioning_init, "ddim_class_conditioning");
  ddim::ClassConditioning o;
  const auto labels = input_array(c.class_labels, c.class_label_count, "conditioning.class_labels");
  o.class_labels.assign(labels.begin(), labels.end());
  const auto emb = input_array(c.class_embeddings, c.class_embedding_count, "conditioning.class_embeddings");
  o.class_embeddings.assign(emb.begin(), emb.end());
  o.guidance_scale = c.guidance_scale;
  o.guidance_rescale = c.guidance_rescale;
  if (c.has_null_class_label) o.null_class_label = c.null_class_label;
  const auto null = input_array(c.null_class_embedding, c.null_class_embedding_count, "conditioning.null_class_embedding");
  o.null_class_embedding.assign(null.begin(), null.end());
  return o;
}

// ddim_sample_options -> SampleOptions (the options only; buffers are checked by the callers).
ddim::SampleOptions sample_options_of(const ddim_sample_options& c) {
  ddim::SampleOptions o;
  o.steps = c.steps;
  o.spacing = spacing_of(c.spacing, "options.spacing");
  const auto ts = input_array(c.timesteps, c.timestep_count, "options.timesteps");
  o.timesteps.assign(ts.begin(), ts.end());
  o.eta = c.eta;
  o.seed = c.seed;
  const auto seeds = input_array(c.seeds, c.seed_count, "options.seeds");
  o.seeds.assign(seeds.begin(), seeds.end());
  o.x_T = input_array(c.x_T, c.x_T_count, "options.x_T");
  o.noise = input_array(c.noise, c.noise_count, "options.noise");
  o.conditioning = conditioning_of(c.conditioning);
  o.clip_sample = tri_state(c.clip_sample, "options.clip_sample");
  o.set_alpha_to_one = tri_state(c.set_alpha_to_one, "options.set_alpha_to_one");
  if (c.steps_offset < -1) invalid("options.steps_offset is " + std::to_string(c.steps_offset) + " (-1: the model's; else >= 0)");
  if (c.steps_offset >= 0) o.steps_offset = c.steps_offset;
  o.use_clipped_model_output = c.use_clipped_model_output != 0;
  o.progress = progress_of(c.progress, c.progress_user);
  o.x_T_device = c.x_T_device;
  o.noise_device = c.noise_device;
  o.output_device = c.output_device;
  o.output_type = enum_value<ddim::OutputType>(c.output_type, DDIM_OUTPUT_SESSION_PRECISION + 1, "options.output_type");
  return o;
}

ddim::ScheduleConfig schedule_of(const ddim_schedule& c) {
  ddim::ScheduleConfig s;
  s.num_train_timesteps = c.num_train_timesteps;
  s.beta_schedule = enum_value<ddim::BetaSchedule>(c.beta_schedule, DDIM_BETA_SQUAREDCOS_CAP_V2 + 1, "schedule.beta_schedule");
  s.beta_start = c.beta_start;
  s.beta_end = c.beta_end;
  const auto table = input_array(c.alphas_cumprod, c.alphas_cumprod_count, "schedule.alphas_cumprod");
  s.alphas_cumprod.assign(table.begin(), table.end());
  s.rescale_betas_zero_snr = c.rescale_betas_zero_snr != 0;
  s.prediction_type = enum_value<ddim::PredictionType>(c.prediction_type, DDIM_PREDICT_SAMPLE + 1, "schedule.prediction_type");
  s.timestep_spacing = enum_value<ddim::Spacing>(c.timestep_spacing, DDIM_SPACING_LOG + 1, "schedule.timestep_spacing");
  s.steps_offset = c.steps_offset;
  s.clip_sample = c.clip_sample != 0;
  s.clip_sample_range = c.clip_sample_range;
  s.set_alpha_to_one = c.set_alpha_to_one != 0;
  s.thresholding = c.thresholding != 0;
  s.dynamic_thresholding_ratio = c.dynamic_thresholding_ratio;
  s.sample_max_value = c.sample_max_value;
  s.variance_type = enum_value<ddim::VarianceType>(c.variance_type, DDIM_VARIANCE_LEARNED_RANGE + 1, "schedule.variance_type");
  return s;
}

ddim::StepOptions step_options_of(const ddim_step_options* in) {
  const ddim_step_options c = read_struct(in, ddim_step_options_init, "ddim_step_options");
  ddim::StepOptions o;
  o.eta = c.eta;
  o.use_clipped_model_output = c.use_clipped_model_output != 0;
  o.clip_sample = tri_state(c.clip_sample, "options.clip_sample");
  o.set_alpha_to_one = tri_state(c.set_alpha_to_one, "options.set_alpha_to_one");
  return o;
}

void write_timesteps(const std::vector<int>& ts, int* out, std::size_t capacity, std::size_t* count) {
  if (!out && capacity) invalid("timesteps is NULL but capacity is " + std::to_string(capacity));
  if (count) *count = ts.size();
  const std::size_t n = std::min(capacity, ts.size());
  if (n) std::memcpy(out, ts.data(), n * sizeof(int));
}

}  // namespace

// ==================================================================== the API
extern "C" {

const char* ddim_status_name(ddim_status status) {
  switch (status) {
    case DDIM_OK: return "DDIM_OK";
    case DDIM_ERR_INVALID_FILE: return "DDIM_ERR_INVALID_FILE";
    case DDIM_ERR_INVALID_ARGUMENT: return "DDIM_ERR_INVALID_ARGUMENT";
    case DDIM_ERR_UNSUPPORTED: return "DDIM_ERR_UNSUPPORTED";
    case DDIM_ERR_OUT_OF_MEMORY: return "DDIM_ERR_OUT_OF_MEMORY";
    case DDIM_ERR_DEVICE_LOST: return "DDIM_ERR_DEVICE_LOST";
    case DDIM_ERR_CANCELLED: return "DDIM_ERR_CANCELLED";
    case DDIM_ERR_IO: return "DDIM_ERR_IO";
    case DDIM_ERR_INTERNAL: return "DDIM_ERR_INTERNAL";
  }
  return "DDIM_ERR_UNKNOWN";
}

const char* ddim_last_error(void) { return g_last_error; }

#define DDIM_STR2(x) #x
#define DDIM_STR(x) DDIM_STR2(x)
const char* ddim_version(void) {
  return DDIM_STR(DDIM_VERSION_MAJOR) "." DDIM_STR(DDIM_VERSION_MINOR) "." DDIM_STR(DDIM_VERSION_PATCH);
}
int ddim_abi_version(void) { return DDIM_ABI_VERSION; }
int ddim_cuda_device_count(void) { return ddim::cuda_device_count(); }

// ---------------------------------------------------------------- models
ddim_status ddim_model_load(const char* path, ddim_model** out) {
  if (out) *out = nullptr;
  return guarded([&] {
    require(out, "out");
    auto m = std::make_unique<ddim_model>();
    m->model = ddim::Model::load(require(path, "path"));
    *out = m.release();
  });
}

ddim_status ddim_model_load_memory(const void* bytes, size_t size, ddim_model** out) {
  if (out) *out = nullptr;
  return guarded([&] {
    require(out, "out");
    require(bytes, "bytes");
    auto m = std::make_unique<ddim_model>();
    m->model = ddim::Model::load_from_memory(std::span<const std::uint8_t>(static_cast<const std::uint8_t*>(bytes), size));
    *out = m.release();
  });
}

ddim_model* ddim_model_retain(ddim_model* model) {
  if (model) model->references.fetch_add(1, std::memory_order_relaxed);
  return model;
}

void ddim_model_release(ddim_model* model) {
  if (model && model->references.fetch_sub(1, std::memory_order_acq_rel) == 1) delete model;
}

ddim_status ddim_model_get_info(const ddim_model* model, ddim_model_info* info) {
  return guarded([&] {
    const ddim::ModelInfo& i = model_of(model).info();
    ddim_model_info c{};
    c.format_version = i.format_version;
    c.in_channels = i.in_channels;
    c.out_channels = i.out_channels;
    c.height = i.height;
    c.width = i.width;
    c.parameter_count = i.parameter_count;
    c.node_count = i.node_count;
    c.class_kind = i.class_kind == "index" ? DDIM_CLASS_INDEX : i.class_kind == "scalar" ? DDIM_CLASS_SCALAR
                   : i.class_kind == "vector" ? DDIM_CLASS_VECTOR : DDIM_CLASS_NONE;
    c.num_classes = i.num_classes;
    c.class_dim = i.class_dim;
    c.has_null = !i.null_class.empty();
    c.decoder = i.latent.decoder == "vq" ? DDIM_DECODER_VQ : i.latent.decoder == "kl" ? DDIM_DECODER_KL : DDIM_DECODER_NONE;
    c.latent_factor = i.is_latent() ? i.latent.factor : 1;
    c.image_channels = i.is_latent() ? i.latent.image_channels : i.in_channels;
    c.scaling_factor = i.is_latent() ? i.latent.scaling_factor : 1.0;
    c.shift_factor = i.is_latent() ? i.latent.shift_factor : 0.0;
    c.decoder_parameter_count = i.latent.decoder_parameter_count;
    write_struct(require(info, "info"), c, "ddim_model_info");
  });
}

ddim_status ddim_model_get_summary(const ddim_model* model, char* buffer, size_t capacity, size_t* length) {
  return guarded([&] {
    const std::string s = model_of(model).summary();
    if (!buffer && capacity) invalid("buffer is NULL but capacity is " + std::to_string(capacity));
    if (length) *length = s.size();
    if (capacity) {
      const std::size_t n = std::min(capacity - 1, s.size());
      std::memcpy(buffer, s.data(), n);
      buffer[n] = '\0';
    }
  });
}

void ddim_schedule_init(ddim_schedule* schedule) {
  if (!schedule) return;
  const ddim::ScheduleConfig d;
  *schedule = ddim_schedule{};
  schedule->struct_size = sizeof(ddim_schedule);
  schedule->num_train_timesteps = d.num_train_timesteps;
  schedule->beta_schedule = static_cast<int>(d.beta_schedule);
  schedule->beta_start = d.beta_start;
  schedule->beta_end = d.beta_end;
  schedule->rescale_betas_zero_snr = d.rescale_betas_zero_snr;
  schedule->prediction_type = static_cast<int>(d.prediction_type);
  schedule->timestep_spacing = static_cast<int>(d.timestep_spacing);
  schedule->steps_offset = d.steps_offset;
  schedule->clip_sample = d.clip_sample;
  schedule->clip_sample_range = d.clip_sample_range;
  schedule->set_alpha_to_one = d.set_alpha_to_one;
  schedule->thresholding = d.thresholding;
  schedule->dynamic_thresholding_ratio = d.dynamic_thresholding_ratio;
  schedule->sample_max_value = d.sample_max_value;
  schedule->variance_type = static_cast<int>(d.variance_type);
}

ddim_status ddim_model_get_schedule(const ddim_model* model, ddim_schedule* schedule) {
  return guarded([&] {
    const ddim::ScheduleConfig& s = model_of(model).schedule();
    ddim_schedule c{};
    c.num_train_timesteps = s.num_train_timesteps;
    c.beta_schedule = static_cast<int>(s.beta_schedule);
    c.beta_start = s.beta_start;
    c.beta_end = s.beta_end;
    c.alphas_cumprod = s.alphas_cumprod.empty() ? nullptr : s.alphas_cumprod.data();
    c.alphas_cumprod_count = s.alphas_cumprod.size();
    c.rescale_betas_zero_snr = s.rescale_betas_zero_snr;
    c.prediction_type = static_cast<int>(s.prediction_type);
    c.timestep_spacing = static_cast<int>(s.timestep_spacing);
    c.steps_offset = s.steps_offset;
    c.clip_sample = s.clip_sample;
    c.clip_sample_range = s.clip_sample_range;
    c.set_alpha_to_one = s.set_alpha_to_one;
    c.thresholding = s.thresholding;
    c.dynamic_thresholding_ratio = s.dynamic_thresholding_ratio;
    c.sample_max_value = s.sample_max_value;
    c.variance_type = static_cast<int>(s.variance_type);
    write_struct(require(schedule, "schedule"), c, "ddim_schedule");
  });
}

// ---------------------------------------------------------------- sessions
void ddim_session_options_init(ddim_session_options* options) {
  if (!options) return;
  const ddim::SessionOptions d;
  *options = ddim_session_options{};
  options->struct_size = sizeof(ddim_session_options);
  options->backend = static_cast<int>(d.backend);
  options->device = d.device;
  options->batch = d.batch;
  options->precision = static_cast<int>(d.precision);
  options->height = d.height;
  options->width = d.width;
  options->threads = d.threads;
  options->profile = d.profile;
  options->autotune = d.autotune;
  options->whole_loop_graph = d.whole_loop_graph;
  options->decode = d.decode;
}

ddim_status ddim_session_create(ddim_model* model, const ddim_session_options* options, ddim_session** out) {
  if (out) *out = nullptr;
  return guarded([&] {
    require(out, "out");
    require(model, "model");
    const ddim_session_options c = read_struct(options, ddim_session_options_init, "ddim_session_options");
    ddim::SessionOptions o;
    o.backend = enum_value<ddim::BackendKind>(c.backend, DDIM_BACKEND_CUDA + 1, "options.backend");
    o.device = c.device;
    o.batch = c.batch;
    o.precision = enum_value<ddim::Precision>(c.precision, DDIM_PRECISION_BF16 + 1, "options.precision");
    o.height = c.height;
    o.width = c.width;
    o.threads = c.threads;
    o.profile = c.profile != 0;
    o.autotune = c.autotune != 0;
    o.whole_loop_graph = c.whole_loop_graph != 0;
    o.decode = c.decode != 0;
    auto s = std::make_unique<ddim_session>();
    // The session holds the model (a shared_ptr): releasing the ddim_model does not end it.
    s->session = ddim::Session::create(model->model, o);
    *out = s.release();
  });
}

void ddim_session_release(ddim_session* session) {
  try {
    delete session;
  } catch (...) {  // a destructor that throws would be a bug; never let it cross the C boundary
  }
}

ddim_status ddim_session_get_shape(const ddim_session* session, int* n, int* c, int* h, int* w, int* out_c) {
  return guarded([&] {
    const ddim::Session& s = session_of(session);
    const auto& p = s.plan_info();
    if (n) *n = p.batch;
    if (c) *c = s.model().info().in_channels;
    if (h) *h = p.height;
    if (w) *w = p.width;
    if (out_c) *out_c = s.model().info().out_channels;
  });
}

ddim_status ddim_session_get_image_shape(const ddim_session* session, int* n, int* c, int* h, int* w) {
  return guarded([&] {
    const ddim::Session& s = session_of(session);
    const ImageShape d = image_shape(s);
    if (n) *n = s.plan_info().batch;
    if (c) *c = d.c;
    if (h) *h = d.h;
    if (w) *w = d.w;
  });
}

ddim_status ddim_session_get_backend(const ddim_session* session, int* backend) {
  return guarded([&] { *require(backend, "backend") = static_cast<int>(session_of(session).backend()); });
}

ddim_status ddim_session_get_plan_info(ddim_session* session, ddim_plan_info* info) {
  return guarded([&] {
    require(info, "info");
    const ddim::PlanInfo& p = session_of(session).plan_info();
    auto pointers = [](const std::vector<std::string>& v, std::vector<const char*>& out) {
      out.clear();
      for (const auto& s : v) out.push_back(s.c_str());
    };
    pointers(p.fusions, session->fusions);
    pointers(p.folded_nodes, session->folded_nodes);
    pointers(p.warnings, session->warnings);
    pointers(p.folded_per_label, session->folded_per_label);
    ddim_plan_info c{};
    c.backend = p.backend.c_str();
    c.precision = p.precision.c_str();
    c.batch = p.batch;
    c.height = p.height;
    c.width = p.width;
    c.arena_bytes = p.arena_bytes;
    c.unplanned_bytes = p.unplanned_bytes;
    c.weight_bytes = p.weight_bytes;
    c.forward_flops = p.forward_flops;
    c.fusions = session->fusions.data();
    c.fusion_count = session->fusions.size();
    c.folded_nodes = session->folded_nodes.data();
    c.folded_node_count = session->folded_nodes.size();
    c.warnings = session->warnings.data();
    c.warning_count = session->warnings.size();
    c.fallback = p.fallback.c_str();
    c.folded_per_label = session->folded_per_label.data();
    c.folded_per_label_count = session->folded_per_label.size();
    c.forward_batch = p.forward_batch;
    c.decoder = p.decoder.c_str();
    write_struct(info, c, "ddim_plan_info");
  });
}

void ddim_sample_options_init(ddim_sample_options* options) {
  if (!options) return;
  const ddim::SampleOptions d;
  *options = ddim_sample_options{};
  options->struct_size = sizeof(ddim_sample_options);
  options->steps = d.steps;
  options->spacing = DDIM_SPACING_DEFAULT;
  options->eta = d.eta;
  options->seed = d.seed;
  options->clip_sample = DDIM_DEFAULT;
  options->set_alpha_to_one = DDIM_DEFAULT;
  options->steps_offset = -1;
  options->use_clipped_model_output = d.use_clipped_model_output;
  options->output_type = DDIM_OUTPUT_FLOAT32;
}

ddim_status ddim_session_timesteps(const ddim_session* session, const ddim_sample_options* options, int* timesteps,
                                   size_t capacity, size_t* count) {
  return guarded([&] {
    const ddim::Session& s = session_of(session);
    const ddim_sample_options c = read_struct(options, ddim_sample_options_init, "ddim_sample_options");
    write_timesteps(s.timestep_plan(sample_options_of(c)).timesteps, timesteps, capacity, count);
  });
}

ddim_status ddim_session_sample(ddim_session* session, const ddim_sample_options* options, float* images,
                                size_t image_count) {
  return guarded([&] {
    ddim::Session& s = session_of(session);
    const ddim_sample_options c = read_struct(options, ddim_sample_options_init, "ddim_sample_options");
    ddim::SampleOptions o = sample_options_of(c);
    // Every buffer is checked against the plan before any work.
    const std::size_t N = batch_of(s), E = sample_elements(s);
    const std::size_t S = s.timestep_plan(o).timesteps.size();
    if (o.output_device) {
      if (images || image_count) invalid("images must be NULL (count 0) when options.output_device is set");
    } else {
      check_output(images, image_count, product({N, image_elements(s)}, "images"), "images");
    }
    if (c.trajectory || c.trajectory_count) check_output(c.trajectory, c.trajectory_count, product({S + 1, N, E}, "trajectory"), "options.trajectory");
    if (c.x0 || c.x0_count) check_output(c.x0, c.x0_count, product({S, N, E}, "x0"), "options.x0");
    o.want_trajectory = c.trajectory != nullptr;
    o.want_x0 = c.x0 != nullptr;
    const ddim::SampleResult r = s.sample(o);
    if (!o.output_device) copy_out(r.images, images);
    if (o.want_trajectory) copy_out(r.trajectory, c.trajectory);
    if (o.want_x0) copy_out(r.x0, c.x0);
  });
}

void ddim_ddpm_options_init(ddim_ddpm_options* options) {
  if (!options) return;
  *options = ddim_ddpm_options{};
  options->struct_size = sizeof(ddim_ddpm_options);
  options->variance = DDIM_VARIANCE_DEFAULT;
  options->clip_sample = DDIM_DEFAULT;
}

ddim_status ddim_session_sample_ddpm(ddim_session* session, const ddim_ddpm_options* options, float* images,
                                     size_t image_count) {
  return guarded([&] {
    ddim::Session& s = session_of(session);
    const ddim_ddpm_options c = read_struct(options, ddim_ddpm_options_init, "ddim_ddpm_options");
    ddim::DdpmOptions o;
    o.seed = c.seed;
    const auto seeds = input_array(c.seeds, c.seed_count, "options.seeds");
    o.seeds.assign(seeds.begin(), seeds.end());
    o.x_T = input_array(c.x_T, c.x_T_count, "options.x_T");
    o.noise = input_array(c.noise, c.noise_count, "options.noise");
    if (c.variance != DDIM_VARIANCE_DEFAULT)
      o.variance = enum_value<ddim::VarianceType>(c.variance, DDIM_VARIANCE_LEARNED_RANGE + 1, "options.variance");
    o.clip_sample = tri_state(c.clip_sample, "options.clip_sample");
    o.progress = progress_of(c.progress, c.progress_user);
    const std::size_t N = batch_of(s), E = sample_elements(s);
    const std::size_t T = static_cast<std::size_t>(s.model().schedule().num_train_timesteps);
    check_output(images, image_count, product({N, E}, "images"), "images");
    if (c.trajectory || c.trajectory_count) check_output(c.trajectory, c.trajectory_count, product({T + 1, N, E}, "trajectory"), "options.trajectory");
    if (c.x0 || c.x0_count) check_output(c.x0, c.x0_count, product({T, N, E}, "x0"), "options.x0");
    o.want_trajectory = c.trajectory != nullptr;
    o.want_x0 = c.x0 != nullptr;
    const ddim::SampleResult r = s.sample_ddpm(o);
    copy_out(r.images, images);
    if (o.want_trajectory) copy_out(r.trajectory, c.trajectory);
    if (o.want_x0) copy_out(r.x0, c.x0);
  });
}

void ddim_class_conditioning_init(ddim_class_conditioning* conditioning) {
  if (!conditioning) return;
  const ddim::ClassConditioning d;
  *conditioning = ddim_class_conditioning{};
  conditioning->struct_size = sizeof(ddim_class_conditioning);
  conditioning->guidance_scale = d.guidance_scale;
  conditioning->guidance_rescale = d.guidance_rescale;
}

void ddim_invert_options_init(ddim_invert_options* options) {
  if (!options) return;
  const ddim::InvertOptions d;
  *options = ddim_invert_options{};
  options->struct_size = sizeof(ddim_invert_options);
  options->steps = d.steps;
  options->spacing = DDIM_SPACING_DEFAULT;
  options->model_time = static_cast<int>(d.model_time);
  options->refine = d.refine;
}

ddim_status ddim_session_invert(ddim_session* session, const float* x0, size_t x0_count, const ddim_invert_options* options,
                                float* x_T, size_t x_T_count) {
  return guarded([&] {
    ddim::Session& s = session_of(session);
    const ddim_invert_options c = read_struct(options, ddim_invert_options_init, "ddim_invert_options");
    ddim::InvertOptions o;
    o.steps = c.steps;
    o.spacing = spacing_of(c.spacing, "options.spacing");
    const auto ts = input_array(c.timesteps, c.timestep_count, "options.timesteps");
    o.timesteps.assign(ts.begin(), ts.end());
    o.model_time = enum_value<ddim::ModelTime>(c.model_time, DDIM_MODEL_TIME_NEXT + 1, "options.model_time");
    o.refine = c.refine;
    o.progress = progress_of(c.progress, c.progress_user);
    o.conditioning = conditioning_of(c.conditioning);
    require(x0, "x0");
    const std::size_t N = batch_of(s), E = sample_elements(s);
    check_output(x_T, x_T_count, product({N, E}, "x_T"), "x_T");
    if (c.trajectory || c.trajectory_count) {
      // Inversion visits the sampling timesteps of the same options, reversed.
      ddim::SampleOptions plan_options;
      plan_options.steps = o.steps;
      plan_options.spacing = o.spacing;
      plan_options.timesteps = o.timesteps;
      const std::size_t S = s.timestep_plan(plan_options).timesteps.size();
      check_output(c.trajectory, c.trajectory_count, product({S + 1, N, E}, "trajectory"), "options.trajectory");
    }
    o.want_trajectory = c.trajectory != nullptr;
    const ddim::InvertResult r = s.invert(std::span<const float>(x0, x0_count), o);
    copy_out(r.x_T, x_T);
    if (o.want_trajectory) copy_out(r.trajectory, c.trajectory);
  });
}

ddim_status ddim_session_forward(ddim_session* session, const float* x, size_t x_count, const int* t, size_t t_count,
                                 float* out, size_t out_count, ddim_node_fn dump, void* user) {
  return ddim_session_forward_conditioned(session, x, x_count, t, t_count, nullptr, out, out_count, dump, user);
}

ddim_status ddim_session_forward_conditioned(ddim_session* session, const float* x, size_t x_count, const int* t,
                                             size_t t_count, const ddim_class_conditioning* conditioning, float* out,
                                             size_t out_count, ddim_node_fn dump, void* user) {
  return guarded([&] {
    ddim::Session& s = session_of(session);
    require(x, "x");
    require(t, "t");
    const auto& p = s.plan_info();
    const std::size_t needed = product({batch_of(s), static_cast<std::size_t>(s.model().info().out_channels),
                                        static_cast<std::size_t>(p.height), static_cast<std::size_t>(p.width)},
                                       "out");
    check_output(out, out_count, needed, "out");
    const std::span<const float> xs(x, x_count);
    const std::span<const int> ts(t, t_count);
    const ddim::ClassConditioning cond = conditioning_of(conditioning);
    std::vector<float> r;
    if (dump) {
      r = s.forward(xs, ts, cond, [dump, user](const std::string& node, const std::vector<std::int64_t>& shape,
                                               std::span<const float> values) {
        dump(user, node.c_str(), shape.data(), shape.size(), values.data(), values.size());
      });
    } else {
      r = s.forward(xs, ts, cond);
    }
    copy_out(r, out);
  });
}

ddim_status ddim_session_decode(ddim_session* session, const float* latents, size_t latent_count, float* images,
                                size_t image_count, ddim_node_fn dump, void* user) {
  return guarded([&] {
    ddim::Session& s = session_of(session);
    const ddim::ModelInfo& i = s.model().info();
    if (!i.is_latent()) invalid("ddim_session_decode: the model is not a latent model (it has no decoder)");
    if (s.plan_info().decoder.empty())
      invalid("ddim_session_decode: this session was created with decode 0 (ddim_session_options.decode): no decoder is planned");
    require(latents, "latents");
    const std::size_t N = batch_of(s);
    const std::size_t expected = product({N, sample_elements(s)}, "latents");
    if (latent_count != expected)
      invalid("latents has " + std::to_string(latent_count) + " floats; the session's (N, C, h, w) latents are " +
              std::to_string(expected));
    check_output(images, image_count, product({N, image_elements(s)}, "images"), "images");
    const std::span<const float> zs(latents, latent_count);
    std::vector<float> r;
    if (dump) {
      r = s.decode(zs, [dump, user](const std::string& node, const std::vector<std::int64_t>& shape, std::span<const float> values) {
        dump(user, node.c_str(), shape.data(), shape.size(), values.data(), values.size());
      });
    } else {
      r = s.decode(zs);
    }
    copy_out(r, images);
  });
}

ddim_status ddim_session_set_stream(ddim_session* session, void* cuda_stream) {
  return guarded([&] { session_of(session).set_stream(cuda_stream); });
}

ddim_status ddim_session_sample_async(ddim_session* session, const ddim_sample_options* options) {
  return guarded([&] {
    ddim::Session& s = session_of(session);
    const ddim_sample_options c = read_struct(options, ddim_sample_options_init, "ddim_sample_options");
    if (c.trajectory || c.x0 || c.progress)
      invalid("ddim_session_sample_async returns before the steps run: no trajectory, x0 or progress callback");
    s.sample_async(sample_options_of(c));
  });
}

// ---------------------------------------------------------------- the scheduler alone
ddim_status ddim_scheduler_create(const ddim_schedule* schedule, ddim_scheduler** out) {
  if (out) *out = nullptr;
  return guarded([&] {
    require(out, "out");
    const ddim_schedule c = read_struct(require(schedule, "schedule"), ddim_schedule_init, "ddim_schedule");
    *out = new ddim_scheduler{ddim::Scheduler(schedule_of(c))};
  });
}

void ddim_scheduler_release(ddim_scheduler* scheduler) { delete scheduler; }

ddim_status ddim_scheduler_timesteps(const ddim_scheduler* scheduler, int num_steps, int spacing, int steps_offset,
                                     int* timesteps, size_t capacity, size_t* count) {
  return guarded([&] {
    const ddim::Scheduler& s = require(scheduler, "scheduler")->scheduler;
    if (steps_offset < -1) invalid("steps_offset is " + std::to_string(steps_offset) + " (-1: the schedule's; else >= 0)");
    const auto plan = s.timesteps(num_steps, spacing_of(spacing, "spacing"),
                                  steps_offset >= 0 ? std::optional<int>(steps_offset) : std::nullopt);
    write_timesteps(plan.timesteps, timesteps, capacity, count);
  });
}

void ddim_step_options_init(ddim_step_options* options) {
  if (!options) return;
  *options = ddim_step_options{};
  options->struct_size = sizeof(ddim_step_options);
  options->clip_sample = DDIM_DEFAULT;
  options->set_alpha_to_one = DDIM_DEFAULT;
}

ddim_status ddim_scheduler_step_coefficients(const ddim_scheduler* scheduler, int t, int t_prev,
                                             const ddim_step_options* options, ddim_step_coefficients* out) {
  return guarded([&] {
    const ddim::Scheduler& s = require(scheduler, "scheduler")->scheduler;
    require(out, "out");
    const ddim::DdimCoefficients k = s.step_coefficients(t, t_prev, step_options_of(options));
    ddim_step_coefficients c{};
    c.t = k.t;
    c.t_prev = k.t_prev;
    c.alpha_t = k.alpha_t;
    c.alpha_prev = k.alpha_prev;
    c.sigma = k.sigma;
    c.dir = k.dir;
    write_struct(out, c, "ddim_step_coefficients");
  });
}

ddim_status ddim_scheduler_step(const ddim_scheduler* scheduler, const float* model_output, int t, int t_prev,
                                const float* sample, float* prev_sample, size_t batch, size_t sample_size,
                                const ddim_step_options* options, const float* noise, float* pred_x0) {
  return guarded([&] {
    const ddim::Scheduler& s = require(scheduler, "scheduler")->scheduler;
    const std::size_t n = product({batch, sample_size}, "batch * sample_size");
    if (n == 0) invalid("batch and sample_size must be at least 1");
    const std::span<const float> noise_span = noise ? std::span<const float>(noise, n) : std::span<const float>();
    const std::span<float> x0_span = pred_x0 ? std::span<float>(pred_x0, n) : std::span<float>();
    s.step(std::span<const float>(require(model_output, "model_output"), n), t, t_prev,
           std::span<const float>(require(sample, "sample"), n), std::span<float>(require(prev_sample, "prev_sample"), n), batch,
           step_options_of(options), noise_span, x0_span);
  });
}

// ---------------------------------------------------------------- toolkit
ddim_status ddim_slerp(const float* a, const float* b, size_t count, double t, float* out) {
  return guarded([&] {
    require(a, "a");
    require(b, "b");
    require(out, "out");
    const std::vector<float> r = ddim::slerp(std::span<const float>(a, count), std::span<const float>(b, count), t);
    copy_out(r, out);
  });
}

ddim_status ddim_initial_noise(uint64_t seed, float* out, size_t count) {
  return guarded([&] {
    require(out, "out");
    if (count == 0) invalid("count must be at least 1");
    copy_out(ddim::initial_noise(seed, count), out);
  });
}

}  // extern "C"
