// The caller's GPU pipeline (suite "gpu"): a session on the caller's stream (set_stream), x_T and
// noise from the caller's device memory, images into the caller's device buffer (fp32 or the
// session's precision), sample_async, and sample_async captured into the caller's own CUDA graph.
// Every result is bitwise equal to the synchronous host path of the same session. Needs a CUDA
// device; runs under the CUDA emulator in CI (gpu_emu).
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include "../cpp/test_util.hpp"
#include "ddim/ddim.hpp"
#include "gpu_util.hpp"

using namespace ddim;
namespace g = ddim::test::gpu;
using cuda::DType;
using test::bitwise_equal;

namespace {

std::unique_ptr<Session> cuda_session(std::shared_ptr<const Model> model, int batch, Precision p = Precision::FP32) {
  SessionOptions o;
  o.backend = BackendKind::Cuda;
  o.batch = batch;
  o.precision = p;
  return Session::create(std::move(model), o);
}

// A non-blocking stream of the caller's, destroyed at the end of the scope.
struct CallerStream {
  cudaStream_t s = nullptr;
  CallerStream() { GPU_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~CallerStream() { cudaStreamDestroy(s); }
  void sync() const { GPU_CHECK(cudaStreamSynchronize(s)); }
};

std::vector<float> download_f32(const g::DevBytes& b) {
  std::vector<float> out(b.bytes() / 4);
  b.download(out.data());
  return out;
}

std::size_t sample_elements(const Session& s) {
  return std::size_t(s.model().info().in_channels) * std::size_t(s.plan_info().height) * std::size_t(s.plan_info().width);
}

template <class F>
void expect_invalid_argument(F&& f, const char* needle) {
  try {
    f();
    FAIL("expected InvalidArgument containing '" << needle << "'");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::InvalidArgument);
    CHECK_MESSAGE(std::string(e.what()).find(needle) != std::string::npos, e.what());
  }
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("cuda: the caller's stream and device buffers give the host path's images bitwise (sample and sample_async)") {
    CallerStream caller;  // outlives the session that uses it
    auto session = cuda_session(test::tiny_model(), 2);
    const std::size_t E = sample_elements(*session), NE = 2 * E;
    SampleOptions o;
    o.steps = 4;
    o.eta = 0.5;
    o.seeds = {7, 3};
    const SampleResult ref = session->sample(o);  // the session's own stream, results on the host
    const std::size_t S = ref.timesteps.size();

    session->set_stream(caller.s);
    CHECK(session->stream() == static_cast<void*>(caller.s));
    g::DevBytes out(NE * 4);
    out.fill(0xFF);
    SampleOptions d = o;
    d.output_device = out.data();
    // Synchronous, into the caller's buffer.
    const SampleResult r = session->sample(d);
    CHECK(r.images.empty());
    CHECK(bitwise_equal(download_f32(out), ref.images));
    // Asynchronous: complete when the caller's stream gets there.
    out.fill(0xFF);
    const TimestepPlan plan = session->sample_async(d);
    CHECK(plan.timesteps == ref.timesteps);
    caller.sync();
    CHECK(bitwise_equal(download_f32(out), ref.images));
    CHECK(out.guards_intact());

    // x_T and per-step noise from the caller's device memory equal the same values from the host.
    std::vector<float> x_T = initial_noise(11, E);
    const std::vector<float> x_T_second = initial_noise(12, E);
    x_T.insert(x_T.end(), x_T_second.begin(), x_T_second.end());
    const std::vector<float> noise = g::random_vector(S * NE, 5);
    SampleOptions h = o;
    h.x_T = x_T;
    h.noise = noise;
    session->set_stream(nullptr);  // back to the session's own stream for the host reference
    const SampleResult ref_given = session->sample(h);
    CHECK_FALSE(bitwise_equal(ref_given.images, ref.images));
    session->set_stream(caller.s);
    g::DevBytes x_T_dev(NE * 4), noise_dev(S * NE * 4);
    x_T_dev.upload(x_T.data());
    noise_dev.upload(noise.data());
    d.x_T_device = static_cast<const float*>(x_T_dev.data());
    d.noise_device = static_cast<const float*>(noise_dev.data());
    out.fill(0xFF);
    session->sample_async(d);
    caller.sync();
    CHECK(bitwise_equal(download_f32(out), ref_given.images));
    // The session's own stream again: still the same images.
    session->set_stream(nullptr);
    CHECK(session->stream() != static_cast<void*>(caller.s));
    CHECK(bitwise_equal(session->sample(o).images, ref.images));
  }

  TEST_CASE("cuda: images in the session's precision (fp16) into the caller's buffer are the host images rounded") {
    auto session = cuda_session(test::tiny_model(), 2, Precision::FP16);
    const std::size_t NE = 2 * sample_elements(*session);
    SampleOptions o;
    o.steps = 3;
    o.seed = 21;
    const SampleResult ref = session->sample(o);
    g::DevBytes out(NE * 2);
    o.output_device = out.data();
    o.output_type = OutputType::SessionPrecision;
    session->sample_async(o);
    GPU_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(session->stream())));
    std::vector<unsigned char> got(NE * 2);
    out.download(got.data());
    CHECK(got == g::encode(ref.images, DType::F16));
    CHECK(out.guards_intact());
  }

  TEST_CASE("cuda: sample_async captured into the caller's own CUDA graph replays to the same images") {
    CallerStream caller;  // outlives the session that uses it
    auto session = cuda_session(test::tiny_model(), 2);
    const std::size_t NE = 2 * sample_elements(*session);
    session->set_stream(caller.s);
    g::DevBytes out(NE * 4);
    SampleOptions o;
    o.steps = 3;
    o.eta = 1.0;
    o.seeds = {40, 2};
    o.output_device = out.data();
    // The first call outside a capture allocates and uploads what the capture then reuses.
    session->sample_async(o);
    caller.sync();
    const std::vector<float> ref = download_f32(out);

    out.fill(0);
    GPU_CHECK(cudaStreamBeginCapture(caller.s, cudaStreamCaptureModeGlobal));
    session->sample_async(o);  // no allocation, synchronisation or host copy: the capture stays valid
    cudaGraph_t graph = nullptr;
    GPU_CHECK(cudaStreamEndCapture(caller.s, &graph));
    cudaGraphExec_t exec = nullptr;
    GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      out.fill(0);
      GPU_CHECK(cudaGraphLaunch(exec, caller.s));
      caller.sync();
      CHECK(bitwise_equal(download_f32(out), ref));
    }
    GPU_CHECK(cudaGraphExecDestroy(exec));
    GPU_CHECK(cudaGraphDestroy(graph));
    // Inside the caller's capture the session made no graph of its own (no failed nested capture).
    for (const std::string& w : session->plan_info().warnings) CHECK_MESSAGE(w.find("CUDA graph") == std::string::npos, w);

    // Options that would allocate or upload inside the capture are refused before anything is
    // enqueued (the capture stays valid and empty); sample() cannot be captured at all.
    GPU_CHECK(cudaStreamBeginCapture(caller.s, cudaStreamCaptureModeGlobal));
    SampleOptions longer = o;
    longer.steps = 7;
    expect_invalid_argument([&] { session->sample_async(longer); }, "outside the capture");
    SampleOptions sync_call = o;
    expect_invalid_argument([&] { session->sample(sync_call); }, "only sample_async");
    GPU_CHECK(cudaStreamEndCapture(caller.s, &graph));
    if (graph) GPU_CHECK(cudaGraphDestroy(graph));
    // And the session still samples normally.
    session->sample_async(o);
    caller.sync();
    CHECK(bitwise_equal(download_f32(out), ref));
  }

  TEST_CASE("cuda: the caller's device buffers are checked: host memory, missing outputs, host-only options") {
    auto session = cuda_session(test::tiny_model(), 1);
    const std::size_t E = sample_elements(*session);
    std::vector<float> host(E);
    SampleOptions o;
    o.steps = 2;
    o.output_device = host.data();
    expect_invalid_argument([&] { session->sample_async(o); }, "not device memory");
    o.output_device = nullptr;
    o.x_T_device = host.data();
    expect_invalid_argument([&] { session->sample(o); }, "not device memory");
    o.x_T_device = nullptr;
    expect_invalid_argument([&] { session->sample_async(o); }, "output_device");
    g::DevBytes out(E * 4);
    o.output_device = out.data();
    o.want_trajectory = true;
    expect_invalid_argument([&] { session->sample_async(o); }, "trajectory");
    o.want_trajectory = false;
    o.progress = [](int, int) { return true; };
    expect_invalid_argument([&] { session->sample_async(o); }, "progress");
    o.progress = {};
    o.x_T = host;
    expect_invalid_argument([&] { session->sample_async(o); }, "device memory only");
    o.x_T = {};
    o.output_on_device = true;
    expect_invalid_argument([&] { session->sample(o); }, "not both");
    // After every refusal the session works.
    o.output_on_device = false;
    session->sample_async(o);
    GPU_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(session->stream())));
    SampleOptions plain;
    plain.steps = 2;
    CHECK(bitwise_equal(download_f32(out), session->sample(plain).images));
  }
}
