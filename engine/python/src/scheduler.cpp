// ddim.Scheduler: the schedules, timestep spacings and the DDIM step on NumPy arrays, without a
// model (any denoiser can drive it).
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cmath>

#include "common.hpp"

namespace ddimpy {
using namespace nb::literals;
namespace {

template <typename T>
T get_as(nb::handle v, const std::string& key, const char* kind) {
  T out{};
  if (!nb::try_cast(v, out, /*convert=*/!std::is_same_v<T, std::string>))
    invalid("scheduler config: '" + key + "' must be " + kind + ", got " +
            nb::cast<std::string>(nb::repr(v)));
  return out;
}

int get_int(nb::handle v, const std::string& key) {
  if (PyFloat_Check(v.ptr())) {
    const double d = nb::cast<double>(v);
    if (std::floor(d) == d && std::fabs(d) < 2e9) return int(d);
  }
  if (PyBool_Check(v.ptr())) invalid("scheduler config: '" + key + "' must be an integer, got a bool");
  return get_as<int>(v, key, "an integer");
}

bool get_bool(nb::handle v, const std::string& key) {
  if (PyBool_Check(v.ptr())) return v.ptr() == Py_True;
  const std::string type_name = nb::cast<std::string>(nb::str(v.type().attr("__name__")));
  if (type_name != "bool_")  // numpy.bool_
    invalid("scheduler config: '" + key + "' must be True or False, got " + nb::cast<std::string>(nb::repr(v)));
  return PyObject_IsTrue(v.ptr()) == 1;
}

std::vector<double> get_table(nb::handle v, const std::string& key) {
  InArray a = import_array(v, key.c_str(), false);
  std::vector<double> out(a.data, a.data + a.size());
  // float32 input loses precision; read float64 tables exactly when they come as NumPy / lists.
  try {
    nb::object np = nb::module_::import_("numpy");
    nb::object f64 = np.attr("ascontiguousarray")(v, "dtype"_a = np.attr("float64"));
    nb::ndarray<nb::ro, const double, nb::c_contig, nb::device::cpu> d;
    if (nb::try_cast(f64, d, false) && d.size() == out.size()) out.assign(d.data(), d.data() + d.size());
  } catch (nb::python_error&) {
  }
  return out;
}

// A parse_* call whose error names the config key.
template <typename F>
auto parsed(const std::string& key, F&& parse) {
  try {
    return parse();
  } catch (const ddim::Error& e) {
    throw ddim::Error(e.code(), "scheduler config: '" + key + "': " + e.what());
  }
}


// A ScheduleConfig from a diffusers-style config: a dict (or Mapping), a diffusers scheduler (its
// .config), a ddim.Model (its schedule) or None (DDIMScheduler's defaults).
ddim::ScheduleConfig config_from_python(nb::handle source) {
  ddim::ScheduleConfig c;
  if (source.is_none()) return c;
  if (nb::isinstance<PyModel>(source)) return nb::cast<const PyModel&>(source).model->schedule();
  nb::object mapping = nb::borrow(source);
  if (!PyDict_Check(source.ptr()) && !nb::hasattr(source, "keys") && nb::hasattr(source, "config"))
    mapping = source.attr("config");
  nb::dict d;
  try {
    d = nb::borrow<nb::dict>(nb::module_::import_("builtins").attr("dict")(mapping));
  } catch (nb::python_error&) {
    invalid("Scheduler: config must be a dict (diffusers' scheduler config), a diffusers scheduler, a ddim.Model "
            "or None, not " + nb::cast<std::string>(nb::str(source.type().attr("__name__"))));
  }
  std::vector<std::string> ignored;
  std::optional<std::vector<double>> trained_betas;
  for (auto [k, v] : d) {
    if (!nb::isinstance<nb::str>(k)) invalid("scheduler config: keys must be strings");
    const std::string key = nb::cast<std::string>(k);
    if (key == "num_train_timesteps") c.num_train_timesteps = get_int(v, key);
    else if (key == "beta_schedule") c.beta_schedule = parsed(key, [&] { return ddim::parse_beta_schedule(get_as<std::string>(v, key, "a string")); });
    else if (key == "beta_start") c.beta_start = get_as<double>(v, key, "a number");
    else if (key == "beta_end") c.beta_end = get_as<double>(v, key, "a number");
    else if (key == "alphas_cumprod") {
      if (!v.is_none()) c.alphas_cumprod = get_table(v, key);
    } else if (key == "trained_betas") {
      if (!v.is_none()) trained_betas = get_table(v, key);
    } else if (key == "rescale_betas_zero_snr") c.rescale_betas_zero_snr = get_bool(v, key);
    else if (key == "prediction_type") c.prediction_type = parsed(key, [&] { return ddim::parse_prediction_type(get_as<std::string>(v, key, "a string")); });
    else if (key == "timestep_spacing") c.timestep_spacing = parsed(key, [&] { return ddim::parse_spacing(get_as<std::string>(v, key, "a string")); });
    else if (key == "steps_offset") c.steps_offset = get_int(v, key);
    else if (key == "clip_sample") c.clip_sample = get_bool(v, key);
    else if (key == "clip_sample_range") c.clip_sample_range = get_as<double>(v, key, "a number");
    else if (key == "set_alpha_to_one") c.set_alpha_to_one = get_bool(v, key);
    else if (key == "thresholding") c.thresholding = get_bool(v, key);
    else if (key == "dynamic_thresholding_ratio") c.dynamic_thresholding_ratio = get_as<double>(v, key, "a number");
    else if (key == "sample_max_value") c.sample_max_value = get_as<double>(v, key, "a number");
    else if (key == "variance_type") {
      if (!v.is_none()) c.variance_type = parsed(key, [&] { return ddim::parse_variance_type(get_as<std::string>(v, key, "a string")); });
    } else if (!key.empty() && key[0] != '_') ignored.push_back(key);
  }
  if (trained_betas && c.alphas_cumprod.empty()) {
    // diffusers: alphas_cumprod = cumprod(1 - betas); T defaults to the table's length.
    if (!d.contains("num_train_timesteps")) c.num_train_timesteps = int(trained_betas->size());
    double acc = 1.0;
    for (double b : *trained_betas) c.alphas_cumprod.push_back(acc *= (1.0 - b));
  }
  if (!ignored.empty()) {
    std::string list;
    for (const auto& k : ignored) list += (list.empty() ? "" : ", ") + k;
    warn("ddim.Scheduler: ignoring scheduler config keys that DDIM does not use: " + list);
  }
  return c;
}

ddim::StepOptions step_options(double eta, bool use_clipped, std::optional<bool> clip, std::optional<bool> one) {
  ddim::StepOptions o;
  o.eta = eta;
  o.use_clipped_model_output = use_clipped;
  o.clip_sample = clip;
  o.set_alpha_to_one = one;
  return o;
}

nb::dict coefficients_dict(const ddim::DdimCoefficients& c) {
  nb::dict d;
  d["t"] = c.t;
  d["t_prev"] = c.t_prev;
  d["alpha_t"] = c.alpha_t;
  d["alpha_prev"] = c.alpha_prev;
  d["sigma"] = c.sigma;
  d["dir"] = c.dir;
  return d;
}

std::optional<ddim::Spacing> spacing_of(const std::optional<std::string>& s) {
  if (!s) return std::nullopt;
  return ddim::parse_spacing(*s);
}

nb::object step(const ddim::Scheduler& self, nb::handle model_output, int t, int t_prev, nb::handle sample, double eta,
                nb::handle noise, bool use_clipped_model_output, std::optional<bool> clip_sample,
                std::optional<bool> set_alpha_to_one, bool return_pred_x0) {
  InArray x = import_array(sample, "sample", false);
  InArray out = import_array(model_output, "model_output", false);
  if (out.shape != x.shape)
    invalid("Scheduler.step: model_output has shape " + shape_str(out.shape) + " but sample has shape " +
            shape_str(x.shape));
  InArray z;
  if (!noise.is_none()) {
    z = import_array(noise, "noise", false);
    if (z.shape != x.shape)
      invalid("Scheduler.step: noise has shape " + shape_str(z.shape) + " but sample has shape " + shape_str(x.shape));
  }
  const std::size_t total = x.size();
  const std::size_t batch = x.shape.size() >= 2 ? std::size_t(x.shape[0]) : 1;
  if (batch == 0 || total == 0) invalid("Scheduler.step: sample is empty");
  std::vector<float> prev(total), pred;
  if (return_pred_x0) pred.resize(total);
  const ddim::StepOptions o = step_options(eta, use_clipped_model_output, clip_sample, set_alpha_to_one);
  {
    nb::gil_scoped_release unlocked;
    self.step(out.host_span(), t, t_prev, x.host_span(), prev, batch, o, z.data ? z.host_span() : std::span<const float>{},
              pred);
  }
  nb::object prev_arr = to_numpy(std::move(prev), x.shape);
  if (!return_pred_x0) return prev_arr;
  return nb::make_tuple(prev_arr, to_numpy(std::move(pred), x.shape));
}

}  // namespace

void bind_scheduler(nb::module_& m) {
  nb::class_<ddim::Scheduler>(
      m, "Scheduler",
      "Noise schedules, timestep spacings and the DDIM step, usable without a model: any denoiser can drive it.\n\n"
      "All host math is in double; the per-element step is the engine's own (bitwise the backends' CPU math). "
      "Thread-safe: its methods do not modify it.")
      .def(
          "__init__",
          [](ddim::Scheduler* self, nb::handle config) { new (self) ddim::Scheduler(config_from_python(config)); },
          "config"_a = nb::none(),
          nb::sig("def __init__(self, config: collections.abc.Mapping[str, object] | Model | object | None = None) -> None"),
          "Builds a scheduler from a diffusers-style scheduler config: a dict such as DDIMScheduler.config or "
          "Model.schedule (num_train_timesteps, beta_schedule, beta_start, beta_end, trained_betas or "
          "alphas_cumprod, prediction_type, timestep_spacing, steps_offset, clip_sample, clip_sample_range, "
          "set_alpha_to_one, thresholding, dynamic_thresholding_ratio, sample_max_value, rescale_betas_zero_snr, "
          "variance_type), a diffusers scheduler object (its .config), a ddim.Model (its schedule), or None "
          "(DDIMScheduler's defaults). Missing keys take DDIMScheduler's defaults; keys starting with '_' are "
          "ignored and other unknown keys are ignored with a RuntimeWarning. Raises InvalidArgumentError on a bad "
          "value.")
      .def_prop_ro(
          "config", [](const ddim::Scheduler& s) { return schedule_to_dict(s.config()); },
          nb::sig("def config(self) -> dict[str, object]"),
          "The validated configuration as a dict (diffusers' spelling).")
      .def_prop_ro(
          "alphas_cumprod",
          [](const ddim::Scheduler& s) {
            std::vector<double> a = s.alphas_cumprod();
            const auto n = std::int64_t(a.size());
            return to_numpy_f64(std::move(a), {n});
          },
          nb::sig("def alphas_cumprod(self) -> numpy.typing.NDArray[numpy.float64]"),
          "alpha-bar for every training timestep (float64, length num_train_timesteps).")
      .def_prop_ro(
          "num_train_timesteps", [](const ddim::Scheduler& s) { return s.config().num_train_timesteps; },
          "T, the number of training timesteps.")
      .def(
          "timesteps",
          [](const ddim::Scheduler& s, int num_steps, std::optional<std::string> spacing, std::optional<int> steps_offset) {
            ddim::TimestepPlan p = s.timesteps(num_steps, spacing_of(spacing), steps_offset);
            warn(p.warning);
            return p.timesteps;
          },
          "num_steps"_a, "spacing"_a = nb::none(), "steps_offset"_a = nb::none(),
          "The timesteps of a sampling run of `num_steps` steps, most noisy first. spacing: 'leading', "
          "'trailing', 'linspace' (diffusers' DDIMScheduler), 'uniform', 'quadratic' (the DDIM paper's code) or "
          "'log'; default: the config's timestep_spacing. steps_offset (default: the config's) applies to "
          "'leading' only, as in diffusers. A RuntimeWarning says when the spacing gives fewer distinct steps "
          "than asked. Raises InvalidArgumentError on num_steps < 1 or > T.")
      .def(
          "custom_timesteps",
          [](const ddim::Scheduler& s, std::vector<int> timesteps) { return s.custom_timesteps(std::move(timesteps)).timesteps; },
          "timesteps"_a,
          "Validates a caller's timestep list (strictly decreasing, each in [0, T)) and returns it; raises "
          "InvalidArgumentError naming the offending entry.")
      .def(
          "step_coefficients",
          [](const ddim::Scheduler& s, int t, int t_prev, double eta, bool use_clipped_model_output,
             std::optional<bool> clip_sample, std::optional<bool> set_alpha_to_one) {
            return coefficients_dict(
                s.step_coefficients(t, t_prev, step_options(eta, use_clipped_model_output, clip_sample, set_alpha_to_one)));
          },
          "t"_a, "t_prev"_a, "eta"_a = 0.0, nb::kw_only(), "use_clipped_model_output"_a = false,
          "clip_sample"_a = nb::none(), "set_alpha_to_one"_a = nb::none(),
          "The coefficients of one DDIM step t -> t_prev (t_prev = -1: the final step) as a dict: t, t_prev, "
          "alpha_t, alpha_prev (alpha-bar at t and t_prev), sigma (eta * sqrt((1-a_prev)/(1-a_t)) * "
          "sqrt(1-a_t/a_prev)) and dir (sqrt(1 - a_prev - sigma^2)). Raises InvalidArgumentError on t outside "
          "[0, T), t_prev outside [-1, t), eta < 0 or a step that divides by zero.")
      .def(
          "coefficients",
          [](const ddim::Scheduler& s, std::vector<int> timesteps, double eta, bool use_clipped_model_output,
             std::optional<bool> clip_sample, std::optional<bool> set_alpha_to_one) {
            nb::list out;
            for (const auto& c : s.coefficients(timesteps, step_options(eta, use_clipped_model_output, clip_sample,
                                                                        set_alpha_to_one)))
              out.append(coefficients_dict(c));
            return out;
          },
          "timesteps"_a, "eta"_a = 0.0, nb::kw_only(), "use_clipped_model_output"_a = false,
          "clip_sample"_a = nb::none(), "set_alpha_to_one"_a = nb::none(),
          nb::sig("def coefficients(self, timesteps: collections.abc.Sequence[int], eta: float = 0.0, *, "
                  "use_clipped_model_output: bool = False, clip_sample: bool | None = None, "
                  "set_alpha_to_one: bool | None = None) -> list[dict[str, float]]"),
          "step_coefficients of every step of a plan: step i goes from timesteps[i] to timesteps[i+1] (the last "
          "to the final alpha).")
      .def("step", &step, "model_output"_a, "t"_a, "t_prev"_a, "sample"_a, "eta"_a = 0.0, nb::kw_only(),
           "noise"_a = nb::none(), "use_clipped_model_output"_a = false, "clip_sample"_a = nb::none(),
           "set_alpha_to_one"_a = nb::none(), "return_pred_x0"_a = false,
           nb::sig("def step(self, model_output: object, t: int, t_prev: int, sample: object, eta: float = 0.0, *, "
                   "noise: object | None = None, use_clipped_model_output: bool = False, "
                   "clip_sample: bool | None = None, set_alpha_to_one: bool | None = None, "
                   "return_pred_x0: bool = False) -> numpy.typing.NDArray[numpy.float32] | "
                   "tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]"),
           "One DDIM step t -> t_prev (t_prev = -1: the final step) on host arrays: returns prev_sample (float32, "
           "sample's shape), or (prev_sample, pred_x0) with return_pred_x0. model_output, sample and noise "
           "(unit normal, required when sigma > 0, ignored otherwise) are array-likes of one shape whose first "
           "dimension is the batch (dynamic thresholding works per sample); C-contiguous float32 inputs are read "
           "without a copy, others are converted. clip_sample / set_alpha_to_one default to the config. The GIL "
           "is released during the step.");
}

}  // namespace ddimpy
