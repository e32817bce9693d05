// Model loading: the container is validated first (format/container), then the ddim metadata
// (version, graph, schedule), then every tensor reference; only then is tensor data read.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ddim/error.hpp"
#include "format/container.hpp"
#include "format/input_file.hpp"
#include "host_memory.hpp"
#include "format/model_metadata.hpp"
#include "graph/decoder.hpp"
#include "graph/passes.hpp"
#include "model_impl.hpp"

namespace ddim {

namespace {

const char* const kReexport = " (re-export the model with tools/export.py)";

std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Reads `n` bytes at absolute offset `at` into `out`.
using ReadFn = std::function<void(std::uint64_t at, std::span<std::uint8_t> out)>;

std::unique_ptr<Model::Impl> load_impl(const std::string& source, std::uint64_t file_size, const ReadFn& read) {
  auto invalid = [&](const std::string& msg) {
    return Error(ErrorCode::InvalidFile, format::detail::bounded_message(source + ": " + msg));
  };
  if (file_size < 8) throw invalid("file is " + std::to_string(file_size) + " bytes, too short for a model file" + kReexport);
  std::uint8_t prefix[8];
  read(0, prefix);
  std::uint64_t header_len;
  std::vector<std::uint8_t> header;
  format::Container container;
  try {
    header_len = format::read_header_length(prefix, file_size);
    header.resize(header_len);
    read(8, header);
    container = format::parse_header(header, file_size);
  } catch (const Error& e) {
    throw Error(e.code(), source + ": " + e.what());
  }

  auto impl = std::make_unique<Model::Impl>();
  impl->source = source;
  auto meta = [&](const char* key) -> const std::string& {
    auto it = container.metadata.find(key);
    if (it == container.metadata.end())
      throw invalid(std::string("__metadata__ lacks '") + key + "': this is not a ddim model file" + kReexport);
    return it->second;
  };
  // Version policy: a reader accepts the versions it knows (1..kFormatVersion) and rejects newer
  // ones with a request to upgrade; see weights/FORMAT.md.
  const std::string& ver = meta("ddim.format_version");
  int version = 0;
  {
    const bool digits = !ver.empty() && ver.size() <= 9 && ver[0] != '0' &&
                        std::all_of(ver.begin(), ver.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
    if (!digits && ver != "0")
      throw invalid("__metadata__ 'ddim.format_version' must be a positive integer, got \"" + ver + "\"");
    version = std::stoi(ver);
    if (version > format::kFormatVersion)
      throw invalid("format version " + ver + " is newer than this reader supports (" + std::to_string(format::kFormatVersion) +
                    "); upgrade ddim");
    if (version < 1) throw invalid("format version " + ver + " is not a valid version (the first is 1)" + kReexport);
  }

  try {
    impl->graph = graph::parse_graph(format::parse_json_strict(meta("ddim.graph"), "__metadata__ ddim.graph"));
    graph::fold_time_only(impl->graph);  // validates that the output depends on the sample
  } catch (const Error& e) {
    throw Error(e.code(), source + ": " + e.what());
  }
  if (impl->graph.class_labels >= 0 && version < 2)
    throw invalid("the graph input 'class_labels' needs format version 2 (the file says " + ver + ")" + kReexport);
  format::ParsedSchedule sched;
  try {
    sched = format::parse_schedule(format::parse_json_strict(meta("ddim.schedule"), "__metadata__ ddim.schedule"));
  } catch (const Error& e) {
    throw Error(e.code(), source + ": " + e.what());
  }
  for (const auto& n : impl->graph.nodes)
    if (n.op == graph::Op::VectorQuantize && version < 2)
      throw invalid("graph node '" + n.name + "' uses op vector_quantize, which needs format version 2 or later (the file says " +
                    ver + ")" + kReexport);
  // Format version 2: a latent model's decoder and latent configuration (both or neither).
  const bool has_decoder = container.metadata.count("ddim.decoder") > 0, has_latent = container.metadata.count("ddim.latent") > 0;
  if (has_decoder != has_latent)
    throw invalid(std::string("__metadata__ has '") + (has_decoder ? "ddim.decoder" : "ddim.latent") + "' without '" +
                  (has_decoder ? "ddim.latent" : "ddim.decoder") + "' (a latent model needs both)" + kReexport);
  if (has_decoder && version < 2)
    throw invalid("__metadata__ 'ddim.decoder' needs format version 2 or later (the file says " + ver + ")" + kReexport);
  std::unique_ptr<Model::Impl> decoder;
  if (has_decoder) {
    decoder = std::make_unique<Model::Impl>();
    decoder->source = source + " (decoder)";
    try {
      impl->latent = graph::parse_latent_config(format::parse_json_strict(meta("ddim.latent"), "__metadata__ ddim.latent"));
      decoder->latent = impl->latent;
      decoder->graph =
          graph::parse_decoder_graph(format::parse_json_strict(meta("ddim.decoder"), "__metadata__ ddim.decoder"), impl->latent.factor);
      graph::fold_time_only(decoder->graph);
    } catch (const Error& e) {
      throw Error(e.code(), source + ": " + e.what());
    }
    const graph::Graph &u = impl->graph, &d = decoder->graph;
    if (d.in_channels != u.in_channels || d.height != u.height || d.width != u.width)
      throw invalid("ddim.decoder's sample (" + std::to_string(d.in_channels) + ", " + std::to_string(d.height) + ", " +
                    std::to_string(d.width) + ") differs from the U-Net's (" + std::to_string(u.in_channels) + ", " +
                    std::to_string(u.height) + ", " + std::to_string(u.width) + "): the decoder reads the latents the U-Net samples" +
                    kReexport);
    if (u.values[u.output].c != u.in_channels)
      throw invalid("the U-Net of a latent model must output its input's " + std::to_string(u.in_channels) + " channels, not " +
                    std::to_string(u.values[u.output].c) + kReexport);
  }
  for (const auto& [k, v] : container.metadata)
    if (k.rfind("ddim.", 0) == 0 && k != "ddim.format_version" && k != "ddim.graph" && k != "ddim.schedule" &&
        k != "ddim.decoder" && k != "ddim.latent")
      throw invalid("__metadata__ has unknown key '" + k + "' (keys starting with 'ddim.' are reserved)");

  // Every tensor the graphs reference must be present with the shape it needs; nothing else.
  std::set<std::string> referenced, decoder_tensors;
  std::vector<std::pair<const graph::Graph*, graph::ParamRequirement>> requirements;
  for (auto& r : graph::param_requirements(impl->graph)) requirements.push_back({&impl->graph, std::move(r)});
  if (decoder)
    for (auto& r : graph::param_requirements(decoder->graph)) {
      decoder_tensors.insert(r.tensor);
      requirements.push_back({&decoder->graph, std::move(r)});
    }
  for (const auto& [graph_of, req] : requirements) {
    const auto& node = graph_of->nodes[req.node];
    const format::TensorInfo* t = container.find(req.tensor);
    const std::string who = std::string(graph_of == &impl->graph ? "" : "decoder ") + "node '" + node.name + "' (" +
                            graph::to_string(node.op) + ") parameter '" + req.role + "'";
    if (!t) throw invalid("tensor '" + req.tensor + "' needed by " + who + " is missing" + kReexport);
    if (std::find(req.shapes.begin(), req.shapes.end(), t->shape) == req.shapes.end()) {
      std::string want;
      for (std::size_t i = 0; i < req.shapes.size(); ++i) want += (i ? " or " : "") + shape_str(req.shapes[i]);
      throw invalid("tensor '" + req.tensor + "' has shape " + shape_str(t->shape) + " but " + who + " needs " + want + kReexport);
    }
    if (t->dtype == format::DType::F64)
      throw invalid("tensor '" + req.tensor + "' is F64; weights must be F32, F16 or BF16" + kReexport);
    if (referenced.count(req.tensor))
      throw invalid("tensor '" + req.tensor + "' is used by two parameters (" + who + " and another); each needs its own tensor");
    referenced.insert(req.tensor);
  }
  const format::TensorInfo* alphas = nullptr;
  if (sched.alphas_cumprod_tensor) {
    alphas = container.find(*sched.alphas_cumprod_tensor);
    const std::string& name = *sched.alphas_cumprod_tensor;
    if (!alphas) throw invalid("tensor '" + name + "' named by ddim.schedule 'alphas_cumprod' is missing" + kReexport);
    const std::int64_t T = sched.config.num_train_timesteps;
    if (alphas->shape != std::vector<std::int64_t>{T})
      throw invalid("tensor '" + name + "' (alphas_cumprod) has shape " + shape_str(alphas->shape) + ", expected [" +
                    std::to_string(T) + "] (num_train_timesteps)");
    if (alphas->dtype != format::DType::F32 && alphas->dtype != format::DType::F64)
      throw invalid("tensor '" + name + "' (alphas_cumprod) must be F32 or F64, not " + format::to_string(alphas->dtype));
    if (referenced.count(name)) throw invalid("tensor '" + name + "' is both a weight and the alphas_cumprod table");
    referenced.insert(name);
  }
  for (const auto& t : container.tensors)
    if (!referenced.count(t.name))
      throw invalid("tensor '" + t.name + "' is not used by the graph or the schedule (unreferenced tensors are rejected" +
                    std::string(kReexport) + ")");

  // Validation passed: read and convert.
  std::size_t total = 0;
  for (const auto& t : container.tensors)
    if (&t != alphas) total += std::size_t(t.numel());
  try {
    impl->weights.resize(total);
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, source + ": cannot allocate " + std::to_string(total * 4) + " bytes for the weights");
  }
  std::vector<std::uint8_t> raw;
  std::size_t offset = 0;
  for (const auto& t : container.tensors) {
    raw.resize(t.end - t.begin);
    read(container.data_begin + t.begin, raw);
    auto& info = impl->info;
    info.tensors_by_dtype[format::to_string(t.dtype)] += 1;
    if (&t == alphas) {
      impl->schedule.alphas_cumprod.resize(std::size_t(t.numel()));
      format::convert_to_f64(t, raw, impl->schedule.alphas_cumprod);
      continue;
    }
    float* dst = impl->weights.data() + offset;
    format::convert_to_f32(t, raw, std::span<float>(dst, std::size_t(t.numel())));
    for (std::size_t i = 0; i < std::size_t(t.numel()); ++i)
      if (!std::isfinite(dst[i]))
        throw invalid("tensor '" + t.name + "' holds a NaN or infinite value at index " + std::to_string(i));
    if (decoder_tensors.count(t.name)) {  // the decoder's weights live in its own model
      decoder->slots[t.name] = {decoder->weights.size(), t.shape, t.numel()};
      decoder->weights.insert(decoder->weights.end(), dst, dst + t.numel());
      decoder->info.parameter_count += t.numel();
      decoder->info.tensors_by_dtype[format::to_string(t.dtype)] += 1;
      continue;
    }
    impl->slots[t.name] = {offset, t.shape, t.numel()};
    offset += std::size_t(t.numel());
    info.parameter_count += t.numel();
  }
  impl->weights.resize(offset);
  impl->weights.shrink_to_fit();
  std::vector<double> table = std::move(impl->schedule.alphas_cumprod);
  impl->schedule = sched.config;
  impl->schedule.alphas_cumprod = std::move(table);
  if (alphas) {
    try {
      impl->schedule.validate();
    } catch (const Error& e) {
      throw invalid(std::string("ddim.schedule: ") + e.what());
    }
  }
  const auto& g = impl->graph;
  impl->info.format_version = version;
  impl->info.in_channels = g.in_channels;
  impl->info.out_channels = g.values[g.output].c;
  impl->info.height = g.height;
  impl->info.width = g.width;
  impl->info.node_count = std::int64_t(g.nodes.size());
  if (g.class_labels >= 0) {
    impl->info.class_kind = graph::to_string(g.cls.kind);
    impl->info.num_classes = g.cls.num_classes;
    impl->info.class_dim = g.cls.width();
    impl->info.null_class = g.cls.null;
  }
  if (decoder) {
    const auto& d = decoder->graph;
    decoder->schedule = impl->schedule;
    decoder->info.format_version = version;
    decoder->info.in_channels = d.in_channels;
    decoder->info.out_channels = d.values[d.output].c;
    decoder->info.height = d.height;
    decoder->info.width = d.width;
    decoder->info.node_count = std::int64_t(d.nodes.size());
    auto& li = impl->info.latent;
    li.decoder = impl->latent.decoder;
    li.component = impl->latent.component;
    li.scaling_factor = impl->latent.scaling_factor;
    li.shift_factor = impl->latent.shift_factor;
    li.factor = impl->latent.factor;
    li.image_channels = d.values[d.output].c;
    li.decoder_parameter_count = decoder->info.parameter_count;
    li.decoder_node_count = decoder->info.node_count;
    impl->pending_decoder = std::move(decoder);
  }
  return impl;
}

}  // namespace

const float* Model::Impl::weight(const std::string& tensor) const {
  auto it = slots.find(tensor);
  if (it == slots.end()) throw Error(ErrorCode::Internal, "weight '" + tensor + "' was not loaded");
  return weights.data() + it->second.offset;
}

Model::Model(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

std::shared_ptr<const Model> Model::from_impl(std::unique_ptr<Impl> impl) {
  if (impl->pending_decoder) impl->decoder = std::shared_ptr<const Model>(new Model(std::move(impl->pending_decoder)));
  return std::shared_ptr<const Model>(new Model(std::move(impl)));
}
Model::~Model() = default;

std::shared_ptr<const Model> Model::load(const std::filesystem::path& path) {
  return with_host_memory_errors("loading " + format::quote_path(path.string()), [&] {
    // A regular file only (a FIFO would block here forever); every byte is copied into the
    // model, so later changes to the file (rewritten, truncated) do not affect it.
    const format::InputFile file(path);
    ReadFn read = [&](std::uint64_t at, std::span<std::uint8_t> out) { file.read_at(at, out); };
    return from_impl(load_impl(file.display_name(), file.size(), read));
  });
}

std::shared_ptr<const Model> Model::load_from_memory(std::span<const std::uint8_t> bytes, const std::string& name) {
  ReadFn read = [&](std::uint64_t at, std::span<std::uint8_t> out) {
    if (at > bytes.size() || out.size() > bytes.size() - at) throw Error(ErrorCode::Internal, name + ": read past the end");
    if (!out.empty()) std::memcpy(out.data(), bytes.data() + at, out.size());  // (an empty span's data() may be null)
  };
  return with_host_memory_errors("loading " + name, [&] {
    return from_impl(load_impl(name, bytes.size(), read));
  });
}

const ModelInfo& Model::info() const noexcept { return impl_->info; }
const ScheduleConfig& Model::schedule() const noexcept { return impl_->schedule; }

std::string Model::summary() const {
  const auto& g = impl_->graph;
  std::map<std::string, int> ops;
  for (const auto& n : g.nodes) ops[graph::to_string(n.op)] += 1;
  std::ostringstream s;
  s << "sample (" << g.in_channels << ", " << g.height << ", " << g.width << ") -> " << format::quote_path(g.values[g.output].name) << " ("
    << g.values[g.output].c << ", " << g.values[g.output].h << ", " << g.values[g.output].w << ")\n";
  s << g.nodes.size() << " nodes:";
  for (const auto& [op, n] : ops) s << " " << op << " x" << n;
  s << "\n" << impl_->info.parameter_count << " parameters in " << impl_->slots.size() << " tensors\n";
  std::set<std::pair<int, int>> resolutions;
  for (const auto& n : g.nodes)
    if (n.op == graph::Op::Attention) {
      const auto& v = g.values[n.inputs[0]];
      s << "attention " << format::quote_path(n.name) << ": " << v.h << "x" << v.w << " tokens, " << v.c << " channels, " << n.heads
        << (n.heads == 1 ? " head" : " heads") << "\n";
    }
  if (impl_->decoder) {
    const graph::LatentConfig& l = impl_->latent;
    s << "latent model: the U-Net samples latents; decoder '" << l.component << "' ("
      << (l.decoder == "vq" ? "VQModel: codebook quantisation" : "AutoencoderKL") << "), image = decode(latents / "
      << l.scaling_factor << (l.shift_factor != 0 ? " + " + std::to_string(l.shift_factor) : std::string()) << "), factor "
      << l.factor << "\n";
    std::string dec = impl_->decoder->summary();
    std::string indented;
    for (std::size_t i = 0; i < dec.size(); ++i) indented += (i == 0 || dec[i - 1] == '\n' ? "  decoder: " : "") + std::string(1, dec[i]);
    s << indented;
  }
  return s.str();
}

}  // namespace ddim
