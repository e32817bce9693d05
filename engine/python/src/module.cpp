// The extension module ddim._ddim: Model, ModelInfo and the free functions; Session and
// Scheduler are bound in session.cpp and scheduler.cpp. The public package is ddim (its
// __init__.py re-exports these names); see docs/python.md.
#include <nanobind/stl/filesystem.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <numeric>

#include "common.hpp"

#ifndef DDIM_VERSION_STRING
#define DDIM_VERSION_STRING "0.0.0"
#endif

namespace ddimpy {
using namespace nb::literals;

nb::dict schedule_to_dict(const ddim::ScheduleConfig& c) {
  nb::dict d;
  d["num_train_timesteps"] = c.num_train_timesteps;
  if (c.alphas_cumprod.empty()) {
    d["beta_schedule"] = ddim::to_string(c.beta_schedule);
    d["beta_start"] = c.beta_start;
    d["beta_end"] = c.beta_end;
  } else {
    d["alphas_cumprod"] = nb::cast(c.alphas_cumprod);
  }
  d["rescale_betas_zero_snr"] = c.rescale_betas_zero_snr;
  d["prediction_type"] = ddim::to_string(c.prediction_type);
  d["timestep_spacing"] = ddim::to_string(c.timestep_spacing);
  d["steps_offset"] = c.steps_offset;
  d["clip_sample"] = c.clip_sample;
  d["clip_sample_range"] = c.clip_sample_range;
  d["set_alpha_to_one"] = c.set_alpha_to_one;
  d["thresholding"] = c.thresholding;
  d["dynamic_thresholding_ratio"] = c.dynamic_thresholding_ratio;
  d["sample_max_value"] = c.sample_max_value;
  d["variance_type"] = ddim::to_string(c.variance_type);
  return d;
}

namespace {

PyModel load_from_buffer(nb::handle data, const std::string& name) {
  Py_buffer view;
  if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
  struct Release {
    Py_buffer* v;
    ~Release() { PyBuffer_Release(v); }
  } release{&view};
  std::span<const std::uint8_t> bytes(static_cast<const std::uint8_t*>(view.buf), std::size_t(view.len));
  std::shared_ptr<const ddim::Model> model;
  {
    nb::gil_scoped_release unlocked;
    model = ddim::Model::load_from_memory(bytes, name);
  }
  return PyModel{std::move(model), name};
}

std::string model_repr(const PyModel& m) {
  const auto& i = m.model->info();
  return "<ddim.Model '" + m.name + "': " + std::to_string(i.in_channels) + "x" + std::to_string(i.height) + "x" +
         std::to_string(i.width) + " -> " + std::to_string(i.out_channels) + " channels, " +
         std::to_string(i.parameter_count) + " parameters>";
}

}  // namespace

void bind_model(nb::module_& m) {
  nb::class_<ddim::ModelInfo>(m, "ModelInfo",
                              "What a model file declares (Model.info). Read-only; a copy owned by the caller.")
      .def_ro("format_version", &ddim::ModelInfo::format_version, "The file format version.")
      .def_ro("in_channels", &ddim::ModelInfo::in_channels, "Channels of the `sample` input (C of x_T).")
      .def_ro("out_channels", &ddim::ModelInfo::out_channels, "Channels of the network's output.")
      .def_ro("height", &ddim::ModelInfo::height,
              "The sample height the model declares (a Session may choose another size the architecture admits).")
      .def_ro("width", &ddim::ModelInfo::width, "The sample width the model declares.")
      .def_ro("parameter_count", &ddim::ModelInfo::parameter_count, "Number of weight values.")
      .def_ro("node_count", &ddim::ModelInfo::node_count, "Number of graph nodes.")
      .def_ro("class_kind", &ddim::ModelInfo::class_kind,
              "Class conditioning: '' (unconditional), 'index' (integer labels), 'scalar' or 'vector' (class_dim values).")
      .def_ro("num_classes", &ddim::ModelInfo::num_classes, "'index' models: labels are integers in [0, num_classes).")
      .def_ro("class_dim", &ddim::ModelInfo::class_dim, "Values per sample's condition (1, or D for 'vector').")
      .def_ro("null_class", &ddim::ModelInfo::null_class,
              "The unconditional input the file records for guidance (empty when none).")
      .def_ro("tensors_by_dtype", &ddim::ModelInfo::tensors_by_dtype,
              "Tensor count per stored dtype, e.g. {'F32': 120}.")
      .def_prop_ro("decoder", [](const ddim::ModelInfo& i) { return i.latent.decoder; },
                   "Latent models: 'vq' (VQModel) or 'kl' (AutoencoderKL); '' for a pixel-space model.")
      .def_prop_ro("latent_factor", [](const ddim::ModelInfo& i) { return i.is_latent() ? i.latent.factor : 1; },
                   "Latent models: image height / latent height (1 for a pixel-space model).")
      .def_prop_ro("image_channels",
                   [](const ddim::ModelInfo& i) { return i.is_latent() ? i.latent.image_channels : i.in_channels; },
                   "Channels of the images sample() returns (the decoder's output; in_channels for a pixel model).")
      .def_prop_ro("scaling_factor", [](const ddim::ModelInfo& i) { return i.is_latent() ? i.latent.scaling_factor : 1.0; },
                   "Latent models: the decoder's input is latents / scaling_factor + shift_factor (1 otherwise).")
      .def_prop_ro("shift_factor", [](const ddim::ModelInfo& i) { return i.is_latent() ? i.latent.shift_factor : 0.0; },
                   "Latent models: see scaling_factor (0 otherwise).")
      .def_prop_ro("decoder_parameter_count", [](const ddim::ModelInfo& i) { return i.latent.decoder_parameter_count; },
                   "Latent models: the decoder's weight values (parameter_count is the U-Net's); 0 otherwise.")
      .def("__repr__", [](const ddim::ModelInfo& i) {
        return "ModelInfo(in_channels=" + std::to_string(i.in_channels) + ", out_channels=" +
               std::to_string(i.out_channels) + ", height=" + std::to_string(i.height) + ", width=" +
               std::to_string(i.width) + ", parameter_count=" + std::to_string(i.parameter_count) + ")";
      });

  nb::class_<PyModel>(m, "Model",
                      "A validated ddim model file in host memory: fp32 weights, the network and the noise schedule.\n\n"
                      "Immutable after loading: one Model may be shared by any number of sessions and threads. "
                      "Sessions keep the model's data alive, so a Session outlives the Model object it was made "
                      "from.")
      .def(
          "__init__",
          [](PyModel* self, const std::filesystem::path& path) {
            std::shared_ptr<const ddim::Model> model;
            {
              nb::gil_scoped_release unlocked;
              model = ddim::Model::load(path);
            }
            new (self) PyModel{std::move(model), path.string()};
          },
          "path"_a,
          "Reads and validates the model file at `path` (str or os.PathLike).\n\n"
          "Raises InvalidFileError for a corrupt, hostile or unknown-version file and IoError when it cannot be "
          "read. The GIL is released while loading.")
      .def_static("from_bytes", &load_from_buffer, "data"_a, "name"_a = "<memory>",
                  "Loads a model from the bytes of a whole model file (bytes, bytearray, memoryview or any "
                  "buffer). `name` labels it in messages. The GIL is released while loading.")
      .def_prop_ro(
          "info", [](const PyModel& self) { return self.model->info(); },
          "The ModelInfo: in_channels, out_channels, height, width, parameter_count, node_count, ...")
      .def_prop_ro(
          "schedule", [](const PyModel& self) { return schedule_to_dict(self.model->schedule()); },
          nb::sig("def schedule(self) -> dict[str, object]"),
          "The noise schedule and sampling defaults as a dict in diffusers' spelling (num_train_timesteps, "
          "beta_schedule, beta_start, beta_end or alphas_cumprod, prediction_type, timestep_spacing, "
          "steps_offset, clip_sample, ...). ddim.Scheduler(model.schedule) rebuilds the scheduler.")
      .def_prop_ro(
          "name", [](const PyModel& self) { return self.name; }, "The path or name the model was loaded from.")
      .def("summary", [](const PyModel& self) { return self.model->summary(); },
           "A human-readable architecture summary (ops, shapes, parameters), as `ddim info` prints.")
      .def("__repr__", &model_repr);

  m.def(
      "slerp",
      [](nb::handle a, nb::handle b, double t) {
        InArray aa = import_array(a, "a", false), bb = import_array(b, "b", false);
        if (aa.shape != bb.shape)
          invalid("slerp: a has shape " + shape_str(aa.shape) + " and b has shape " + shape_str(bb.shape));
        std::vector<float> out;
        {
          nb::gil_scoped_release unlocked;
          out = ddim::slerp(aa.host_span(), bb.host_span(), t);
        }
        return to_numpy(std::move(out), aa.shape);
      },
      "a"_a, "b"_a, "t"_a,
      nb::sig("def slerp(a: object, b: object, t: float) -> numpy.typing.NDArray[numpy.float32]"),
      "Spherical linear interpolation of two whole arrays (one sample's x_T each), computed in double:\n"
      "sin((1-t) theta)/sin(theta) a + sin(t theta)/sin(theta) b with theta the angle between a and b; linear when "
      "they are (anti)parallel. t = 0 returns a and t = 1 returns b exactly. a and b: array-likes of the same "
      "shape (converted to float32 C-contiguous when they are not already). Returns a float32 NumPy array of "
      "a's shape. Raises InvalidArgumentError on different shapes, empty or non-finite inputs, or t outside [0, 1].");

  m.def(
      "initial_noise",
      [](std::uint64_t seed, nb::handle shape) {
        std::vector<std::int64_t> dims;
        if (!PySequence_Check(shape.ptr())) dims.push_back(nb::cast<std::int64_t>(shape));
        else
          for (nb::handle d : nb::iter(shape)) dims.push_back(nb::cast<std::int64_t>(d));
        std::size_t count = 1;
        for (auto d : dims) {
          if (d < 0) invalid("initial_noise: negative dimension in shape " + shape_str(dims));
          count *= std::size_t(d);
        }
        std::vector<float> out;
        {
          nb::gil_scoped_release unlocked;
          out = ddim::initial_noise(seed, count);
        }
        return to_numpy(std::move(out), dims);
      },
      "seed"_a, "shape"_a,
      nb::sig("def initial_noise(seed: int, shape: int | collections.abc.Sequence[int]) -> "
              "numpy.typing.NDArray[numpy.float32]"),
      "The x_T that Session.sample draws for a sample whose seed is `seed` (Philox normal noise), as a float32 "
      "array of `shape` (an int or a tuple, e.g. (C, H, W) = model.info's). Sample i of a batch sampled with "
      "seed=s uses seed s + i (or seeds[i]).");

  m.def("cuda_device_count", &ddim::cuda_device_count,
        "Number of usable CUDA devices: 0 when ddim was built without CUDA, or when the driver or device is "
        "missing. Never raises.");
  m.def(
      "cuda_available", []() {
#if DDIM_PY_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when this build of ddim contains the CUDA backend (whether or not a device is present).");
  m.def("_last_input_pointer", &last_input_pointer,
        "Debug hook for the tests: the host data pointer the binding last handed to the engine for an array "
        "input (equal to the caller's array's pointer when no copy was made).");
  m.attr("MAX_BATCH") = ddim::kMaxBatch;
  m.attr("__version__") = DDIM_VERSION_STRING;
}

}  // namespace ddimpy

NB_MODULE(_ddim, m) {
  m.doc() = "The compiled part of the ddim package (DDIM sampling engine). Import `ddim`, not this module.";
  ddimpy::register_errors(m);
  ddimpy::bind_model(m);
  ddimpy::bind_scheduler(m);
  ddimpy::bind_session(m);
}
