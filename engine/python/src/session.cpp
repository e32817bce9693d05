// ddim.Session: sampling, DDPM, inversion and forward passes. The GIL is released while the engine
// runs; the progress callback re-acquires it, runs the caller's callback / tqdm bar and checks for
// Ctrl-C (PyErr_CheckSignals), cancelling the engine call at the next step boundary.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <atomic>

#include "common.hpp"

#if DDIM_PY_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ddimpy {
using namespace nb::literals;

// ---------------------------------------------------------------- progress / Ctrl-C

ProgressBridge::ProgressBridge(nb::handle progress, const char* desc, bool signals) : check_signals(signals) {
  if (progress.is_none() || progress.is(Py_False)) return;
  if (progress.is(Py_True)) {
    // tqdm when importable (ddim._progress returns None without it): no bar, no error.
    bar = nb::module_::import_("ddim._progress").attr("make_bar")(desc);
    if (bar.is_none()) bar = nb::object();
    return;
  }
  if (!PyCallable_Check(progress.ptr()))
    invalid("progress must be None, True, False or a callable (done, total), not " +
            nb::cast<std::string>(nb::str(progress.type().attr("__name__"))));
  user = nb::borrow(progress);
}

ProgressBridge::~ProgressBridge() {
  try {
    close();
  } catch (...) {
  }
}

void ProgressBridge::close() {
  if (!bar.is_valid()) return;
  nb::object b = std::move(bar);
  try {
    b.attr("close")();
  } catch (nb::python_error& e) {
    e.discard_as_unraisable("ddim progress bar");
  }
}

ddim::ProgressCallback ProgressBridge::callback() {
  if (!user.is_valid() && !bar.is_valid() && !check_signals) return {};
  return [this](int done, int total) -> bool {
    nb::gil_scoped_acquire locked;
    if (error) return false;
    try {
      if (bar.is_valid()) bar(done, total);
      if (user.is_valid()) {
        nb::object r = user(done, total);
        // False (or any false value but None) cancels: ddim.CancelledError.
        if (!r.is_none()) {
          const int truth = PyObject_IsTrue(r.ptr());
          if (truth < 0) throw nb::python_error();
          if (truth == 0) return false;
        }
      }
      // Ctrl-C: Python's SIGINT handler only sets a flag while the engine runs; running the handlers
      // here raises KeyboardInterrupt, which cancels the call and is re-raised by the binding.
      if (check_signals && PyErr_CheckSignals() != 0) throw nb::python_error();
    } catch (nb::python_error& e) {
      error.emplace(std::move(e));
      return false;
    }
    return true;
  };
}

void ProgressBridge::rethrow_if_error() {
  if (!error) return;
  nb::python_error e = std::move(*error);
  error.reset();
  throw e;
}

namespace {

// ---------------------------------------------------------------- the Python Session

struct PySession {
  std::shared_ptr<const ddim::Model> model;
  std::string model_name;
  std::unique_ptr<ddim::Session> session;
  int device = 0;
  bool whole_loop_graph = false;
  std::int64_t n = 0, c = 0, c_out = 0, h = 0, w = 0;
  // What sample() returns per sample: a latent model's decoded image when the session decodes,
  // else (c, h, w).
  std::int64_t image_c = 0, image_h = 0, image_w = 0;
  bool decodes = false;
  std::atomic<bool> busy{false};

  bool cuda() const { return session->backend() == ddim::BackendKind::Cuda; }
  std::vector<std::int64_t> batch_shape() const { return {n, c, h, w}; }
  std::vector<std::int64_t> image_shape() const { return {n, image_c, image_h, image_w}; }
};

// One Python thread at a time per Session (the C++ Session is not thread-safe, and the GIL is
// released while it runs): a second caller gets ddim.Error instead of undefined behaviour.
struct Busy {
  PySession& s;
  explicit Busy(PySession& session) : s(session) {
    if (s.busy.exchange(true))
      throw BusyError("this Session is in use by another call (a Session serves one thread at a time; make one "
                      "Session per thread, they can share a Model)");
  }
  ~Busy() { s.busy.store(false); }
  Busy(const Busy&) = delete;
  Busy& operator=(const Busy&) = delete;
};

// Runs `fn` (an engine call) with the GIL released and the progress bridge's exceptions re-raised.
template <typename F>
auto run_released(ProgressBridge* bridge, F&& fn) {
  try {
    nb::gil_scoped_release unlocked;
    return fn();
  } catch (...) {
    // A KeyboardInterrupt or an exception of the caller's callback wins over the engine's
    // Cancelled error that it caused.
    if (bridge) {
      bridge->close();
      bridge->rethrow_if_error();
    }
    throw;
  }
}

struct PySampleResult {
  nb::object images, trajectory, x0;
  std::vector<int> timesteps;
  std::string warning;
};

struct PyInvertResult {
  nb::object x_T, trajectory;
  std::vector<int> timesteps, model_timesteps;
  std::string warning;
};

bool output_on_device(const std::string& output) {
  if (output == "host") return false;
  if (output == "device") return true;
  invalid("output must be 'host' or 'device', got '" + output + "'");
}

// A seed: a Python int (or anything with __index__, e.g. a NumPy integer; not a bool) in
// [0, 2**64 - 1]. Anything else is an InvalidArgumentError naming `what`, instead of nanobind's
// TypeError with the whole signature.
std::uint64_t seed_of(nb::handle v, const std::string& what) {
  if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
    invalid(what + " must be an integer in [0, 2**64 - 1], not " +
            nb::cast<std::string>(nb::str(v.type().attr("__name__"))));
  nb::object index = nb::steal(PyNumber_Index(v.ptr()));
  if (!index.is_valid()) throw nb::python_error();
  const unsigned long long x = PyLong_AsUnsignedLongLong(index.ptr());
  if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    invalid(what + " must be in [0, 2**64 - 1], got " + nb::cast<std::string>(nb::str(index)));
  }
  return static_cast<std::uint64_t>(x);
}

std::optional<std::vector<std::uint64_t>> seeds_of(nb::handle v) {
  if (v.is_none()) return std::nullopt;
  if (!PySequence_Check(v.ptr()) || PyUnicode_Check(v.ptr()) || PyBytes_Check(v.ptr()))
    invalid("seeds must be a sequence of integers (one per sample), not " +
            nb::cast<std::string>(nb::str(v.type().attr("__name__"))));
  std::vector<std::uint64_t> out;
  for (nb::handle item : nb::iter(v)) out.push_back(seed_of(item, "seeds[" + std::to_string(out.size()) + "]"));
  return out;
}

std::optional<ddim::Spacing> spacing_of(const std::optional<std::string>& s) {
  if (!s) return std::nullopt;
  return ddim::parse_spacing(*s);
}

// ---------------------------------------------------------------- CUDA memory for output="device"

#if DDIM_PY_CUDA
struct DeviceGuard {  // switches the thread's current device, restores it
  int previous = -1;
  explicit DeviceGuard(int device) {
    if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
    if (cudaSetDevice(device) != cudaSuccess) {
      (void)cudaGetLastError();
      throw ddim::Error(ddim::ErrorCode::DeviceLost, "cudaSetDevice(" + std::to_string(device) + ") failed");
    }
  }
  ~DeviceGuard() {
    if (previous >= 0) (void)cudaSetDevice(previous);
  }
};

void cuda_check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  (void)cudaGetLastError();
  const auto code = e == cudaErrorMemoryAllocation ? ddim::ErrorCode::OutOfMemory : ddim::ErrorCode::DeviceLost;
  throw ddim::Error(code, std::string(what) + ": " + cudaGetErrorString(e));
}

struct DeviceBuffer {
  void* ptr = nullptr;
  int device = 0;
  DeviceBuffer(std::size_t bytes, int dev) : device(dev) {
    DeviceGuard g(dev);
    cuda_check(cudaMalloc(&ptr, bytes), "cudaMalloc of the output array");
  }
  ~DeviceBuffer() {
    if (ptr) {
      DeviceGuard g(device);
      (void)cudaFree(ptr);
    }
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  // A DLPack-capable array (nanobind's nb_ndarray: __dlpack__, __dlpack_device__) owning the buffer:
  // freed with cudaFree when the last consumer (e.g. a torch tensor from torch.from_dlpack) lets go.
  nb::object release_as_array(const std::vector<std::int64_t>& shape) {
    struct Owned {
      void* ptr;
      int device;
    };
    auto* owned = new Owned{ptr, device};
    ptr = nullptr;
    nb::capsule owner(owned, [](void* p) noexcept {
      auto* o = static_cast<Owned*>(p);
      int previous = -1;
      if (cudaGetDevice(&previous) != cudaSuccess) previous = -1;
      (void)cudaSetDevice(o->device);
      (void)cudaFree(o->ptr);
      if (previous >= 0) (void)cudaSetDevice(previous);
      delete o;
    });
    std::vector<std::size_t> dims(shape.begin(), shape.end());
    nb::ndarray<float, nb::device::cuda> arr(owned->ptr, dims.size(), dims.data(), owner, nullptr, nb::dtype<float>(),
                                             nb::device::cuda::value, owned->device);
    return nb::cast(arr, nb::rv_policy::reference);
  }
};

// Device inputs come from other libraries' streams: wait for all work queued on the device before
// the session (on its own stream) reads them.
void sync_device(int device) {
  DeviceGuard g(device);
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize before reading device inputs");
}
void sync_stream(void* stream, int device) {
  DeviceGuard g(device);
  cuda_check(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize after sampling");
}
#endif

void check_device_input(const PySession& s, const InArray& a, const char* what) {
  if (a.where != Where::Device) return;
#if DDIM_PY_CUDA
  if (!s.cuda())
    invalid(std::string(what) + " is a CUDA array but this session runs on the CPU; pass a host array "
            "(e.g. tensor.cpu()) or make the Session with device='cuda'");
  if (a.device_id != s.device)
    invalid(std::string(what) + " is on CUDA device " + std::to_string(a.device_id) + " but the session runs on device " +
            std::to_string(s.device));
#else
  (void)s;
  invalid(std::string(what) + " is a CUDA array but this ddim was built without CUDA; pass a host array");
#endif
}

// ---------------------------------------------------------------- Session methods

void session_init(PySession* self, const PyModel& model, const std::string& device, int batch, const std::string& precision,
                  std::optional<int> height, std::optional<int> width, int threads, bool profile, bool autotune,
                  bool whole_loop_graph, bool decode) {
  ddim::SessionOptions o;
  if (device.rfind("cuda:", 0) == 0) {
    o.backend = ddim::BackendKind::Cuda;
    try {
      std::size_t used = 0;
      o.device = std::stoi(device.substr(5), &used);
      if (used != device.size() - 5 || o.device < 0) throw std::invalid_argument("ordinal");
    } catch (const std::exception&) {
      invalid("device '" + device + "': expected auto, cpu, cuda or cuda:N");
    }
  } else {
    o.backend = ddim::parse_backend(device);
  }
  o.batch = batch;
  o.precision = ddim::parse_precision(precision);
  if (height.has_value() != width.has_value()) invalid("give both height and width, or neither");
  if (height && (*height < 1 || *width < 1)) invalid("height and width must be positive");
  o.height = height.value_or(0);
  o.width = width.value_or(0);
  o.threads = threads;
  o.profile = profile;
  o.autotune = autotune;
  o.whole_loop_graph = whole_loop_graph;
  o.decode = decode;
  std::unique_ptr<ddim::Session> session;
  {
    nb::gil_scoped_release unlocked;
    session = ddim::Session::create(model.model, o);
  }
  auto* s = new (self) PySession();
  s->model = model.model;
  s->model_name = model.name;
  s->session = std::move(session);
  s->device = o.device;
  s->whole_loop_graph = whole_loop_graph;
  const ddim::PlanInfo& info = s->session->plan_info();
  s->n = info.batch;
  s->h = info.height;
  s->w = info.width;
  s->c = model.model->info().in_channels;
  s->c_out = model.model->info().out_channels;
  const ddim::ModelInfo& mi = model.model->info();
  s->decodes = mi.is_latent() && !info.decoder.empty();
  s->image_c = s->decodes ? mi.latent.image_channels : s->c;
  s->image_h = s->decodes ? s->h * mi.latent.factor : s->h;
  s->image_w = s->decodes ? s->w * mi.latent.factor : s->w;
}

// The class-conditioning keyword arguments of sample, invert and forward (ddim::ClassConditioning):
// class_labels a number or a sequence / 1-D array of numbers; class_embeddings and
// null_class_embedding float32 arrays ((N, D) or (D), and (D)).
ddim::ClassConditioning conditioning_of(nb::handle labels, nb::handle embeddings, double scale, double rescale,
                                        nb::handle null_label, nb::handle null_embedding) {
  ddim::ClassConditioning c;
  if (!labels.is_none()) {
    if (PySequence_Check(labels.ptr()) || nb::hasattr(labels, "__array__")) {
      for (nb::handle v : nb::iter(labels)) c.class_labels.push_back(nb::cast<double>(v));
      if (c.class_labels.empty()) invalid("class_labels is empty");
    } else {
      c.class_labels.push_back(nb::cast<double>(labels));
    }
  }
  auto floats = [](nb::handle a, const char* what) {
    InArray arr = import_array(a, what, false);
    const auto span = arr.host_span();
    return std::vector<float>(span.begin(), span.end());
  };
  if (!embeddings.is_none()) c.class_embeddings = floats(embeddings, "class_embeddings");
  c.guidance_scale = scale;
  c.guidance_rescale = rescale;
  if (!null_label.is_none()) c.null_class_label = nb::cast<double>(null_label);
  if (!null_embedding.is_none()) c.null_class_embedding = floats(null_embedding, "null_class_embedding");
  return c;
}

nb::object sample(PySession& s, int steps, double eta, nb::handle seed_arg, nb::handle seeds_arg,
                  nb::handle x_T, nb::handle noise, std::optional<std::string> spacing,
                  std::optional<std::vector<int>> timesteps, std::optional<bool> clip_sample,
                  std::optional<bool> set_alpha_to_one, std::optional<int> steps_offset, bool use_clipped_model_output,
                  bool trajectory, bool x0, nb::handle progress, const std::string& output, nb::handle class_labels,
                  nb::handle class_embeddings, double guidance_scale, double guidance_rescale,
                  nb::handle null_class_label, nb::handle null_class_embedding) {
  Busy busy(s);
  ddim::SampleOptions o;
  o.conditioning = conditioning_of(class_labels, class_embeddings, guidance_scale, guidance_rescale, null_class_label,
                                   null_class_embedding);
  o.steps = steps;
  o.eta = eta;
  o.seed = seed_of(seed_arg, "seed");
  if (auto seeds = seeds_of(seeds_arg)) o.seeds = std::move(*seeds);
  o.spacing = spacing_of(spacing);
  if (timesteps) {
    if (timesteps->empty()) invalid("timesteps is empty");
    o.timesteps = *timesteps;
  }
  o.clip_sample = clip_sample;
  o.set_alpha_to_one = set_alpha_to_one;
  o.steps_offset = steps_offset;
  o.use_clipped_model_output = use_clipped_model_output;
  o.want_trajectory = trajectory;
  o.want_x0 = x0;
  const bool device_out = output_on_device(output);
  if (device_out && !s.cuda())
    invalid("output='device' needs a CUDA session; this one runs on the CPU (use output='host')");

  const ddim::TimestepPlan plan = s.session->timestep_plan(o);  // validates steps / spacing / timesteps
  const std::int64_t S = std::int64_t(plan.timesteps.size());
  bool device_inputs = false;
  InArray xa, na;
  if (!x_T.is_none()) {
    xa = import_array(x_T, "x_T", s.cuda());
    check_shape(xa, "x_T", s.batch_shape());
    check_device_input(s, xa, "x_T");
    if (xa.where == Where::Device) o.x_T_device = xa.data, device_inputs = true;
    else o.x_T = xa.host_span();
  }
  if (!noise.is_none()) {
    na = import_array(noise, "noise", s.cuda());
    check_shape(na, "noise", {S, s.n, s.c, s.h, s.w});
    check_device_input(s, na, "noise");
    if (na.where == Where::Device) o.noise_device = na.data, device_inputs = true;
    else o.noise = na.host_span();
  }

  ProgressBridge bridge(progress, "ddim sample", /*check_signals=*/!(s.whole_loop_graph && progress.is_none()));
  o.progress = bridge.callback();

#if DDIM_PY_CUDA
  std::unique_ptr<DeviceBuffer> out_buffer;
  if (device_out) {
    out_buffer = std::make_unique<DeviceBuffer>(std::size_t(s.n * s.image_c * s.image_h * s.image_w) * sizeof(float), s.device);
    o.output_device = out_buffer->ptr;
  }
#else
  (void)device_inputs;
#endif

  ddim::SampleResult r = run_released(&bridge, [&] {
#if DDIM_PY_CUDA
    if (device_inputs) sync_device(s.device);
    ddim::SampleResult res = s.session->sample(o);
    if (device_out) sync_stream(s.session->stream(), s.device);
    return res;
#else
    return s.session->sample(o);
#endif
  });
  bridge.close();
  warn(r.warning);

  nb::object images;
#if DDIM_PY_CUDA
  if (device_out) images = out_buffer->release_as_array(s.image_shape());
#endif
  if (!images.is_valid()) images = to_numpy(std::move(r.images), s.image_shape());
  if (!trajectory && !x0) return images;
  auto* res = new PySampleResult();
  res->images = std::move(images);
  res->trajectory = trajectory ? to_numpy(std::move(r.trajectory), {S + 1, s.n, s.c, s.h, s.w}) : nb::none();
  res->x0 = x0 ? to_numpy(std::move(r.x0), {S, s.n, s.c, s.h, s.w}) : nb::none();
  res->timesteps = std::move(r.timesteps);
  res->warning = std::move(r.warning);
  return nb::cast(res, nb::rv_policy::take_ownership);
}

nb::object sample_ddpm(PySession& s, nb::handle seed_arg, nb::handle seeds_arg, nb::handle x_T,
                       nb::handle noise, std::optional<std::string> variance, std::optional<bool> clip_sample,
                       bool trajectory, bool x0, nb::handle progress) {
  Busy busy(s);
  ddim::DdpmOptions o;
  o.seed = seed_of(seed_arg, "seed");
  if (auto seeds = seeds_of(seeds_arg)) o.seeds = std::move(*seeds);
  if (variance) o.variance = ddim::parse_variance_type(*variance);
  o.clip_sample = clip_sample;
  o.want_trajectory = trajectory;
  o.want_x0 = x0;
  const std::int64_t T = s.model->schedule().num_train_timesteps;
  InArray xa, na;
  if (!x_T.is_none()) {
    xa = import_array(x_T, "x_T", false);
    check_shape(xa, "x_T", s.batch_shape());
    o.x_T = xa.host_span();
  }
  if (!noise.is_none()) {
    na = import_array(noise, "noise", false);
    check_shape(na, "noise", {T, s.n, s.c, s.h, s.w});
    o.noise = na.host_span();
  }
  ProgressBridge bridge(progress, "ddim ddpm", !(s.whole_loop_graph && progress.is_none()));
  o.progress = bridge.callback();
  ddim::SampleResult r = run_released(&bridge, [&] { return s.session->sample_ddpm(o); });
  bridge.close();
  warn(r.warning);
  nb::object images = to_numpy(std::move(r.images), s.batch_shape());
  if (!trajectory && !x0) return images;
  auto* res = new PySampleResult();
  res->images = std::move(images);
  res->trajectory = trajectory ? to_numpy(std::move(r.trajectory), {T + 1, s.n, s.c, s.h, s.w}) : nb::none();
  res->x0 = x0 ? to_numpy(std::move(r.x0), {T, s.n, s.c, s.h, s.w}) : nb::none();
  res->timesteps = std::move(r.timesteps);
  res->warning = std::move(r.warning);
  return nb::cast(res, nb::rv_policy::take_ownership);
}

nb::object invert(PySession& s, nb::handle x0, int steps, std::optional<std::string> spacing,
                  std::optional<std::vector<int>> timesteps, const std::string& model_time, int refine, bool trajectory,
                  nb::handle progress, nb::handle class_labels, nb::handle class_embeddings, double guidance_scale,
                  double guidance_rescale, nb::handle null_class_label, nb::handle null_class_embedding) {
  Busy busy(s);
  ddim::InvertOptions o;
  o.conditioning = conditioning_of(class_labels, class_embeddings, guidance_scale, guidance_rescale, null_class_label,
                                   null_class_embedding);
  o.steps = steps;
  o.spacing = spacing_of(spacing);
  if (timesteps) {
    if (timesteps->empty()) invalid("timesteps is empty");
    o.timesteps = *timesteps;
  }
  o.model_time = ddim::parse_model_time(model_time);
  o.refine = refine;
  o.want_trajectory = trajectory;
  InArray xa = import_array(x0, "x0", false);
  check_shape(xa, "x0", s.batch_shape());
  ProgressBridge bridge(progress, "ddim invert", !(s.whole_loop_graph && progress.is_none()));
  o.progress = bridge.callback();
  ddim::InvertResult r = run_released(&bridge, [&] { return s.session->invert(xa.host_span(), o); });
  bridge.close();
  warn(r.warning);
  const std::int64_t S = std::int64_t(r.timesteps.size());
  nb::object x_T = to_numpy(std::move(r.x_T), s.batch_shape());
  if (!trajectory) return x_T;
  auto* res = new PyInvertResult();
  res->x_T = std::move(x_T);
  res->trajectory = to_numpy(std::move(r.trajectory), {S + 1, s.n, s.c, s.h, s.w});
  res->timesteps = std::move(r.timesteps);
  res->model_timesteps = std::move(r.model_timesteps);
  res->warning = std::move(r.warning);
  return nb::cast(res, nb::rv_policy::take_ownership);
}

nb::object forward(PySession& s, nb::handle x, nb::handle t, nb::handle dump, nb::handle class_labels,
                   nb::handle class_embeddings, double guidance_scale, double guidance_rescale, nb::handle null_class_label,
                   nb::handle null_class_embedding) {
  Busy busy(s);
  const ddim::ClassConditioning cond = conditioning_of(class_labels, class_embeddings, guidance_scale, guidance_rescale,
                                                       null_class_label, null_class_embedding);
  InArray xa = import_array(x, "x", false);
  check_shape(xa, "x", s.batch_shape());
  std::vector<int> ts;
  if (!PySequence_Check(t.ptr())) {  // an int (or a NumPy integer)
    ts.push_back(nb::cast<int>(t));
  } else {
    for (nb::handle v : nb::iter(t)) ts.push_back(nb::cast<int>(v));
    if (ts.size() != std::size_t(s.n))
      invalid("forward: t has " + std::to_string(ts.size()) + " timesteps; give one for all or one per sample (" +
              std::to_string(s.n) + ")");
  }
  std::vector<float> out;
  if (dump.is_none()) {
    out = run_released(nullptr, [&] { return s.session->forward(xa.host_span(), ts, cond); });
  } else {
    if (!PyCallable_Check(dump.ptr())) invalid("forward: dump must be a callable (name, array) or None");
    std::optional<nb::python_error> error;
    struct Abort {};
    const ddim::Session::NodeOutputCallback cb = [&](const std::string& node, const std::vector<std::int64_t>& shape,
                                                     std::span<const float> values) {
      nb::gil_scoped_acquire locked;
      if (error) throw Abort{};
      try {
        dump(node, to_numpy(std::vector<float>(values.begin(), values.end()), shape));
        if (PyErr_CheckSignals() != 0) throw nb::python_error();
      } catch (nb::python_error& e) {
        error.emplace(std::move(e));
        throw Abort{};
      }
    };
    try {
      out = run_released(nullptr, [&] { return s.session->forward(xa.host_span(), ts, cond, cb); });
    } catch (...) {
      if (error) {
        nb::python_error e = std::move(*error);
        error.reset();
        throw e;
      }
      throw;
    }
  }
  return to_numpy(std::move(out), {s.n, s.c_out, s.h, s.w});
}

// A latent model's decoder alone: latents (N, C, h, w) -> images (N, C_img, f*h, f*w).
nb::object decode(PySession& s, nb::handle latents) {
  Busy busy(s);
  if (!s.model->info().is_latent()) invalid("decode: the model is not a latent model (it has no decoder)");
  if (!s.decodes) invalid("decode: this Session was created with decode=False (no decoder is planned)");
  InArray la = import_array(latents, "latents", false);
  check_shape(la, "latents", s.batch_shape());
  std::vector<float> out = run_released(nullptr, [&] { return s.session->decode(la.host_span()); });
  return to_numpy(std::move(out), s.image_shape());
}

nb::dict plan_info_dict(PySession& s) {
  Busy busy(s);
  const ddim::PlanInfo& i = s.session->plan_info();
  nb::dict d;
  d["backend"] = i.backend;
  d["precision"] = i.precision;
  d["batch"] = i.batch;
  d["height"] = i.height;
  d["width"] = i.width;
  d["folded_nodes"] = nb::cast(i.folded_nodes);
  d["folded_per_label"] = nb::cast(i.folded_per_label);
  d["forward_batch"] = i.forward_batch;
  d["decoder"] = i.decoder;
  d["fusions"] = nb::cast(i.fusions);
  d["arena_bytes"] = i.arena_bytes;
  d["unplanned_bytes"] = i.unplanned_bytes;
  d["weight_bytes"] = i.weight_bytes;
  d["forward_flops"] = i.forward_flops;
  d["warnings"] = nb::cast(i.warnings);
  d["fallback"] = i.fallback;
  return d;
}

constexpr const char* kArrayNote =
    " Array inputs accept NumPy arrays, PyTorch tensors, CuPy arrays, anything with __dlpack__, the buffer "
    "protocol, __array_interface__ or __cuda_array_interface__, and nested lists: a C-contiguous float32 array "
    "is read in place (no copy); anything else is converted to one first (a copy).";

}  // namespace

void bind_session(nb::module_& m) {
  nb::class_<PySampleResult>(m, "SampleResult",
                             "What Session.sample / sample_ddpm return when trajectory or x0 is asked for.")
      .def_ro("images", &PySampleResult::images, nb::sig("def images(self) -> numpy.typing.NDArray[numpy.float32]"),
              "The final samples (N, C, H, W), float32, not clamped (a device array with output='device').")
      .def_ro("trajectory", &PySampleResult::trajectory,
              nb::sig("def trajectory(self) -> numpy.typing.NDArray[numpy.float32] | None"),
              "x_t after each step, x_T first: (S + 1, N, C, H, W); None unless trajectory=True.")
      .def_ro("x0", &PySampleResult::x0, nb::sig("def x0(self) -> numpy.typing.NDArray[numpy.float32] | None"),
              "The x0 prediction of each step: (S, N, C, H, W); None unless x0=True.")
      .def_ro("timesteps", &PySampleResult::timesteps, "The timesteps visited, most noisy first (S entries).")
      .def_ro("warning", &PySampleResult::warning,
              "Non-empty when the spacing gave a different step count than asked (also issued as a RuntimeWarning).");

  nb::class_<PyInvertResult>(m, "InvertResult", "What Session.invert returns when trajectory=True.")
      .def_ro("x_T", &PyInvertResult::x_T, nb::sig("def x_T(self) -> numpy.typing.NDArray[numpy.float32]"),
              "The inverted start point (N, C, H, W), float32.")
      .def_ro("trajectory", &PyInvertResult::trajectory,
              nb::sig("def trajectory(self) -> numpy.typing.NDArray[numpy.float32] | None"),
              "x after each step, x0 first: (S + 1, N, C, H, W).")
      .def_ro("timesteps", &PyInvertResult::timesteps,
              "The timesteps visited, ascending (the sampling timesteps reversed); x_T is x at the last.")
      .def_ro("model_timesteps", &PyInvertResult::model_timesteps, "Where the model was evaluated, per step.")
      .def_ro("warning", &PyInvertResult::warning, "Non-empty when the spacing gave a different step count than asked.");

  nb::class_<PySession>(
      m, "Session",
      "A model planned on one backend (CPU or CUDA) for one batch size, precision and sample size.\n\n"
      "Thread safety: a Session serves one thread at a time (a second thread calling into a Session that is "
      "busy gets ddim.Error); make one Session per thread, they can share one Model. While a Session runs the "
      "GIL is released, so other Python threads keep running. Ctrl-C (KeyboardInterrupt) cancels a running "
      "sample / sample_ddpm / invert at the next step boundary and is re-raised as KeyboardInterrupt. A Session "
      "keeps its model's data alive: it stays usable after the Model object is deleted.")
      .def("__init__", &session_init, "model"_a, "device"_a = "auto", "batch"_a = 1, "precision"_a = "auto",
           "height"_a = nb::none(), "width"_a = nb::none(), "threads"_a = 0, "profile"_a = false, "autotune"_a = false,
           "whole_loop_graph"_a = false, "decode"_a = true,
           "Plans `model` for sampling.\n\n"
           "device: 'auto' (CUDA when a usable device exists, else the CPU; plan_info['fallback'] says why the CPU "
           "was chosen despite a device), 'cpu', 'cuda' or 'cuda:N'. batch: samples per call, 1 .. MAX_BATCH. "
           "precision: 'auto' (fp16 on CUDA, fp32 on the CPU), 'fp32', 'fp16', 'bf16' (the last two CUDA only). "
           "height, width: the sample size (both or neither; default the model's). threads: CPU worker threads "
           "(0: all cores). profile (CUDA): every step eagerly, one NVTX range per node. autotune (CUDA): time "
           "cuDNN's engines at plan time. whole_loop_graph (CUDA): all steps as one CUDA graph when no progress "
           "callback is given (Ctrl-C is then noticed only after the call). Latent models: height and width are the "
           "decoded image's pixels (multiples of the decoder's factor); decode=True: sample() returns the decoded "
           "images, decode=False: no decoder is planned and sample() returns the latents (ignored for pixel "
           "models). The GIL is released while planning.")
      .def("sample", &sample, "steps"_a = 50, nb::kw_only(), "eta"_a = 0.0, "seed"_a = 0, "seeds"_a = nb::none(),
           "x_T"_a = nb::none(), "noise"_a = nb::none(), "spacing"_a = nb::none(), "timesteps"_a = nb::none(),
           "clip_sample"_a = nb::none(), "set_alpha_to_one"_a = nb::none(), "steps_offset"_a = nb::none(),
           "use_clipped_model_output"_a = false, "trajectory"_a = false, "x0"_a = false, "progress"_a = nb::none(),
           "output"_a = "host", "class_labels"_a = nb::none(), "class_embeddings"_a = nb::none(), "guidance_scale"_a = 1.0,
           "guidance_rescale"_a = 0.0, "null_class_label"_a = nb::none(), "null_class_embedding"_a = nb::none(),
           nb::sig("def sample(self, steps: int = 50, *, eta: float = 0.0, seed: int = 0, "
                   "seeds: collections.abc.Sequence[int] | None = None, x_T: object | None = None, "
                   "noise: object | None = None, spacing: str | None = None, "
                   "timesteps: collections.abc.Sequence[int] | None = None, clip_sample: bool | None = None, "
                   "set_alpha_to_one: bool | None = None, steps_offset: int | None = None, "
                   "use_clipped_model_output: bool = False, trajectory: bool = False, x0: bool = False, "
                   "progress: bool | collections.abc.Callable[[int, int], object] | None = None, "
                   "output: str = 'host', " "class_labels: float | collections.abc.Sequence[float] | None = None, "
                   "class_embeddings: object | None = None, guidance_scale: float = 1.0, "
                   "guidance_rescale: float = 0.0, null_class_label: float | None = None, "
                   "null_class_embedding: object | None = None) -> numpy.typing.NDArray[numpy.float32] | SampleResult"),
           (std::string("DDIM sampling of a whole batch. Returns the images, a float32 NumPy array (N, C, H, W) (raw "
                        "model space, not clamped), or a SampleResult (images, trajectory, x0, timesteps, warning) "
                        "when trajectory or x0 is True.\n\n"
                        "steps: the number of steps; spacing: 'leading', 'trailing', 'linspace', 'uniform', "
                        "'quadratic' or 'log' (default: the model's); timesteps: a custom strictly decreasing list "
                        "(overrides steps and spacing). eta: 0 is deterministic DDIM, 1 is DDPM-like. seed: sample i "
                        "uses seed + i; seeds: one seed per sample (N of them) instead, so a sample depends on its own "
                        "seed only. x_T: the (N, C, H, W) start instead of the seeded noise; noise: (S, N, C, H, W) "
                        "per-step unit noise for eta > 0 (S = len(session.timesteps(...))). clip_sample, "
                        "set_alpha_to_one, steps_offset: override the model's schedule. progress: True shows a tqdm bar "
                        "(when tqdm is installed), a callable is called as progress(done, total) after every step and "
                        "returning False cancels (ddim.CancelledError); an exception it raises is re-raised. output: "
                        "'host' (NumPy), or 'device' on a CUDA session: a DLPack-capable CUDA array that owns its "
                        "memory (torch.from_dlpack(a), cupy.from_dlpack(a)); on a CPU session 'device' raises "
                        "InvalidArgumentError. On a CUDA session, CUDA arrays (PyTorch, CuPy, DLPack or "
                        "__cuda_array_interface__, float32 C-contiguous, on the session's device) are read in place "
                        "for x_T and noise; the binding waits for the device (cudaDeviceSynchronize) before reading "
                        "them." " Class-conditional models: class_labels (one number for all or one per sample; integers for "
                        "num_class_embeds models) or class_embeddings ((N, D) or (D), 'identity' models); "
                        "guidance_scale w: classifier-free guidance u + w (c - u), both halves in one forward (1: "
                        "the conditional model only); guidance_rescale: diffusers' guidance_rescale; "
                        "null_class_label / null_class_embedding: the unconditional input (default: the model "
                        "file's).") +
            kArrayNote + " A RuntimeWarning says when the spacing gives a different step count than asked.")
               .c_str())
      .def("sample_ddpm", &sample_ddpm, nb::kw_only(), "seed"_a = 0, "seeds"_a = nb::none(), "x_T"_a = nb::none(),
           "noise"_a = nb::none(), "variance"_a = nb::none(), "clip_sample"_a = nb::none(), "trajectory"_a = false,
           "x0"_a = false, "progress"_a = nb::none(),
           nb::sig("def sample_ddpm(self, *, seed: int = 0, seeds: collections.abc.Sequence[int] | None = None, "
                   "x_T: object | None = None, noise: object | None = None, variance: str | None = None, "
                   "clip_sample: bool | None = None, trajectory: bool = False, x0: bool = False, "
                   "progress: bool | collections.abc.Callable[[int, int], object] | None = None) -> "
                   "numpy.typing.NDArray[numpy.float32] | SampleResult"),
           (std::string("DDPM ancestral sampling over all T training timesteps (diffusers' DDPMScheduler.step), for "
                        "comparison with DDIM. variance: 'fixed_small' or 'fixed_large' (default: the model's). noise: "
                        "(T, N, C, H, W) unit noise. Host arrays only. Returns like sample().") +
            kArrayNote)
               .c_str())
      .def("invert", &invert, "x0"_a, nb::kw_only(), "steps"_a = 50, "spacing"_a = nb::none(),
           "timesteps"_a = nb::none(), "model_time"_a = "current", "refine"_a = 0, "trajectory"_a = false,
           "progress"_a = nb::none(), "class_labels"_a = nb::none(), "class_embeddings"_a = nb::none(), "guidance_scale"_a = 1.0,
           "guidance_rescale"_a = 0.0, "null_class_label"_a = nb::none(), "null_class_embedding"_a = nb::none(),
           nb::sig("def invert(self, x0: object, *, steps: int = 50, spacing: str | None = None, "
                   "timesteps: collections.abc.Sequence[int] | None = None, model_time: str = 'current', "
                   "refine: int = 0, trajectory: bool = False, "
                   "progress: bool | collections.abc.Callable[[int, int], object] | None = None, " "class_labels: float | collections.abc.Sequence[float] | None = None, "
                   "class_embeddings: object | None = None, guidance_scale: float = 1.0, "
                   "guidance_rescale: float = 0.0, null_class_label: float | None = None, "
                   "null_class_embedding: object | None = None) -> "
                   "numpy.typing.NDArray[numpy.float32] | InvertResult"),
           (std::string("Deterministic DDIM inversion of x0 (N, C, H, W) to the x_T from which sample() with the "
                        "same steps / spacing at eta = 0 (clip_sample off) returns x0, up to the discretisation "
                        "error. model_time: 'current' (the DDIM ODE run backwards) or 'next' (diffusers' "
                        "DDIMInverseScheduler); refine: fixed-point refinements per step ('current' only, 0 .. 100). "
                        "Returns x_T (float32 NumPy), or an InvertResult with trajectory=True." " Class-conditional models: class_labels (one number for all or one per sample; integers for "
                        "num_class_embeds models) or class_embeddings ((N, D) or (D), 'identity' models); "
                        "guidance_scale w: classifier-free guidance u + w (c - u), both halves in one forward (1: "
                        "the conditional model only); guidance_rescale: diffusers' guidance_rescale; "
                        "null_class_label / null_class_embedding: the unconditional input (default: the model "
                        "file's).") +
            kArrayNote)
               .c_str())
      .def("forward", &forward, "x"_a, "t"_a, "dump"_a = nb::none(), nb::kw_only(), "class_labels"_a = nb::none(), "class_embeddings"_a = nb::none(), "guidance_scale"_a = 1.0,
           "guidance_rescale"_a = 0.0, "null_class_label"_a = nb::none(), "null_class_embedding"_a = nb::none(),
           nb::sig("def forward(self, x: object, t: int | collections.abc.Sequence[int], "
                   "dump: collections.abc.Callable[[str, numpy.typing.NDArray[numpy.float32]], object] | None = None, "
                   "*, " "class_labels: float | collections.abc.Sequence[float] | None = None, "
                   "class_embeddings: object | None = None, guidance_scale: float = 1.0, "
                   "guidance_rescale: float = 0.0, null_class_label: float | None = None, "
                   "null_class_embedding: object | None = None) "
                   "-> numpy.typing.NDArray[numpy.float32]"),
           (std::string("One network forward pass: x (N, C, H, W), t one timestep for all samples or one per sample. "
                        "Returns the model output (N, C_out, H, W). dump: called as dump(node_name, array) with every "
                        "graph node's output in graph order ((N, C, H, W) or (N, C) copies), for comparisons with "
                        "PyTorch (the conditional half only)." " Class-conditional models: class_labels (one number for all or one per sample; integers for "
                        "num_class_embeds models) or class_embeddings ((N, D) or (D), 'identity' models); "
                        "guidance_scale w: classifier-free guidance u + w (c - u), both halves in one forward (1: "
                        "the conditional model only); guidance_rescale: diffusers' guidance_rescale; "
                        "null_class_label / null_class_embedding: the unconditional input (default: the model "
                        "file's).") +
            kArrayNote)
               .c_str())
      .def(
          "timesteps",
          [](PySession& s, int steps, std::optional<std::string> spacing, std::optional<std::vector<int>> timesteps,
             std::optional<int> steps_offset) {
            Busy busy(s);
            ddim::SampleOptions o;
            o.steps = steps;
            o.spacing = spacing_of(spacing);
            if (timesteps) o.timesteps = *timesteps;
            o.steps_offset = steps_offset;
            ddim::TimestepPlan p = s.session->timestep_plan(o);
            warn(p.warning);
            return p.timesteps;
          },
          "steps"_a = 50, nb::kw_only(), "spacing"_a = nb::none(), "timesteps"_a = nb::none(),
          "steps_offset"_a = nb::none(),
          "The timesteps sample() visits for these options, without sampling (their count S sizes noise "
          "(S, N, C, H, W), trajectory (S + 1, ...) and x0 (S, ...)).")
      .def("decode", &decode, "latents"_a,
           nb::sig("def decode(self, latents: object) -> numpy.typing.NDArray[numpy.float32]"),
           (std::string("Latent models (a Session with decode=True): the decoder alone on latents (N, C, h, w) "
                        "(the session's shape) into images (N, C_img, f*h, f*w) (image_shape), as sample() decodes "
                        "its final latents: z = latents / scaling_factor + shift_factor, then the decoder. Raises "
                        "InvalidArgumentError for a pixel-space model or a Session with decode=False. The GIL is "
                        "released while it runs.") +
            kArrayNote)
               .c_str())
      .def_prop_ro("plan_info", &plan_info_dict,
                   nb::sig("def plan_info(self) -> dict[str, object]"),
                   "The plan as a dict: backend ('cpu' or 'cuda:0 (device name)'), precision, batch, height, width, "
                   "folded_nodes, folded_per_label (class-conditional models: folded per step and label), "
                   "forward_batch (the samples the plan holds), fusions, arena_bytes, unplanned_bytes, weight_bytes, "
                   "forward_flops, warnings, "
                   "fallback (why device='auto' chose the CPU although a CUDA device exists), decoder (latent "
                   "models: the decoder's plan in one line; '' when none is planned). height and width are the "
                   "sampled space's (a latent model's latents).")
      .def_prop_ro(
          "backend", [](PySession& s) { return std::string(ddim::to_string(s.session->backend())); },
          "'cpu' or 'cuda'.")
      .def_prop_ro(
          "shape", [](PySession& s) { return nb::make_tuple(s.n, s.c, s.h, s.w); },
          nb::sig("def shape(self) -> tuple[int, int, int, int]"),
          "(N, C, H, W) of one batch: the shape of x_T, x0, trajectory and forward's x (a latent model's latents).")
      .def_prop_ro(
          "image_shape", [](PySession& s) { return nb::make_tuple(s.n, s.image_c, s.image_h, s.image_w); },
          nb::sig("def image_shape(self) -> tuple[int, int, int, int]"),
          "(N, C, H, W) of the images sample() returns: a latent model's decoded images when the session decodes, "
          "else the same as shape.")
      .def_prop_ro(
          "model", [](PySession& s) { return PyModel{s.model, s.model_name}; },
          "The Model this session was planned from.")
      .def(
          "set_stream",
          [](PySession& s, std::uintptr_t stream) {
            Busy busy(s);
            s.session->set_stream(reinterpret_cast<void*>(stream));
          },
          "stream"_a,
          "CUDA sessions: enqueue all later work on this cudaStream_t (an int handle, e.g. "
          "torch.cuda.current_stream().cuda_stream; 0: the session's own stream). Raises InvalidArgumentError on a "
          "CPU session.")
      .def_prop_ro(
          "stream",
          [](PySession& s) {
            Busy busy(s);
            return reinterpret_cast<std::uintptr_t>(s.session->stream());
          },
          "CUDA sessions: the cudaStream_t the session runs on, as an int. Raises InvalidArgumentError on a CPU "
          "session.")
      .def("__repr__", [](PySession& s) {
        return "<ddim.Session " + std::string(ddim::to_string(s.session->backend())) + " shape=(" + std::to_string(s.n) +
               ", " + std::to_string(s.c) + ", " + std::to_string(s.h) + ", " + std::to_string(s.w) + ")>";
      });
}

}  // namespace ddimpy
