// Resource exhaustion and output safety: out of host memory is an error the process survives,
// sizes past memory are refused before allocation, outputs that cannot be written leave nothing
// behind and existing files untouched, unusable input and output paths get clear errors, and a
// loaded model does not depend on its file.
#include <doctest/doctest.h>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include "ddim/ddim.h"
#include "ddim/ddim.hpp"
#include "hostile_util.hpp"

using namespace ddim;
namespace fs = std::filesystem;
using test::CliRun;
using test::contains;
using test::run_cli;
using test::TempDir;

namespace {

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;  // sanitizers reserve terabytes of address space: no RLIMIT_AS
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif
#else
constexpr bool kSanitized = false;
#endif

constexpr const char* kChildEnv = "DDIM_TEST_OOM_CHILD";

// The process's current address-space size (VmSize), in bytes.
std::uint64_t current_address_space() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmSize:", 0) == 0) return std::stoull(line.substr(7)) * 1024;
  }
  return 0;
}

ErrorCode code_of(const std::function<void()>& f, std::string* message = nullptr) {
  try {
    f();
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  FAIL("expected a ddim::Error");
  return ErrorCode::Internal;
}

}  // namespace

// Runs only inside the child process that the next test case starts (with kChildEnv set): there
// the address space is limited to what the process uses now plus 256 MB.
TEST_CASE("reliability: out of host memory (child process part)") {
  if (std::getenv(kChildEnv) == nullptr) return;
  auto model = test::tiny_model();
  const std::uint64_t limit = current_address_space() + (std::uint64_t{256} << 20);
  rlimit rl{limit, limit};
  REQUIRE(::setrlimit(RLIMIT_AS, &rl) == 0);

  // Planning: a batch whose activation arena cannot fit.
  SessionOptions big;
  big.backend = BackendKind::Cpu;
  big.batch = kMaxBatch;
  big.threads = 1;
  std::string message;
  CHECK(code_of([&] { Session::create(model, big); }, &message) == ErrorCode::OutOfMemory);
  CHECK(contains(message, "batch 65535"));

  // Threads that cannot be started (8 MB of stack each).
  SessionOptions many;
  many.backend = BackendKind::Cpu;
  many.batch = 1;
  many.threads = kMaxThreads;
  CHECK(code_of([&] { Session::create(model, many); }, &message) == ErrorCode::OutOfMemory);
  CHECK(contains(message, "thread"));

  // Sampling: a trajectory of 1001 x 256 samples (590 MB) fails before the first step.
  auto session = test::cpu_session(model, 256, 1);
  SampleOptions o;
  o.steps = 1000;
  o.want_trajectory = true;
  CHECK(code_of([&] { session->sample(o); }, &message) == ErrorCode::OutOfMemory);
  CHECK(contains(message, "trajectory"));

  // The C API reports the same code.
  const std::vector<std::uint8_t> bytes = graph::make_random_model_file(test::tiny_unet(), {}, 1);
  ddim_model* cmodel = nullptr;
  REQUIRE(ddim_model_load_memory(bytes.data(), bytes.size(), &cmodel) == DDIM_OK);
  ddim_session_options so;
  ddim_session_options_init(&so);
  so.backend = DDIM_BACKEND_CPU;
  so.batch = kMaxBatch;
  so.threads = 1;
  ddim_session* csession = nullptr;
  CHECK(ddim_session_create(cmodel, &so, &csession) == DDIM_ERR_OUT_OF_MEMORY);
  CHECK(csession == nullptr);
  ddim_model_release(cmodel);

  // The process goes on: a smaller session plans and samples.
  auto small = test::cpu_session(model, 2, 2);
  SampleOptions s;
  s.steps = 3;
  const SampleResult r = small->sample(s);
  CHECK(r.images.size() == 2 * 3 * 16 * 12);
  std::printf("OOM CHILD DONE\n");
}

TEST_CASE("reliability: out of host memory is ddim::Error(OutOfMemory) and the process goes on") {
  if (std::getenv(kChildEnv) != nullptr) return;  // the child runs the part above only
  if (kSanitized) {
    MESSAGE("skipped under sanitizers (they reserve more address space than the limit)");
    return;
  }
  // A fresh process (not a fork of this one, whose other threads may hold locks).
  const CliRun r = test::run_sh(std::string(kChildEnv) + "=1 /proc/" + std::to_string(::getpid()) +
                                "/exe --test-case='reliability: out of host memory (child process part)' --no-version");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(contains(r.output, "OOM CHILD DONE"));
  CHECK(contains(r.output, "1 passed"));
}

TEST_CASE("reliability: sizes past memory or addressing are refused before allocation, naming the value") {
  auto model = test::tiny_model();
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  o.batch = kMaxBatch;
  o.height = 4096;
  o.width = 4096;  // the arena: hundreds of terabytes
  std::string message;
  CHECK(code_of([&] { Session::create(model, o); }, &message) == ErrorCode::OutOfMemory);
  CHECK(contains(message, "the activation arena for batch 65535 needs "));
  CHECK(contains(message, "bytes of memory"));
  o.height = o.width = 65536;  // past the engine's sample size limit
  CHECK(code_of([&] { Session::create(model, o); }, &message) == ErrorCode::InvalidArgument);
  CHECK(contains(message, "65536x65536"));
  // The command line: the largest sample size it takes, and one past it.
  TempDir dir;
  const std::string path = test::tiny_model_file(dir);
  CliRun r = run_cli("sample --model " + path + " --batch 65535 --height 16384 --width 16384 --device cpu --out " + dir / "o.npy");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "the activation arena for batch 65535 needs "));
  r = run_cli("sample --model " + path + " --height 16385 --width 16384 --device cpu --out " + dir / "o.npy");
  CHECK(r.code == 2);
  CHECK(contains(r.output, "--height: '16385' is out of range [1, 16384]"));
  // A .npy whose element count passes 2^63 - 1.
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }";
  header.resize(128 - 10 - 1, ' ');
  header += '\n';
  std::string npy = std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(header.size()) + '\0' + header;
  test::write_text(dir / "huge.npy", npy);
  const CliRun h = run_cli("forward --model " + path + " --x " + dir / "huge.npy" + " --t 1 --out " + dir / "o.npy");
  CHECK(h.code == 1);
  CHECK(contains(h.output, "shape (4294967296, 4294967296) is too large"));
}

TEST_CASE("reliability: an output that cannot be written fails with a message and leaves everything as it was") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  test::write_text(dir / "out.npy", "OLD");
  // A file size limit with SIGXFSZ ignored: write() fails with EFBIG.
  const CliRun r = test::run_sh("trap '' XFSZ; ulimit -f 1; exec " + test::ddim_cli() + " sample --model " + model +
                                " --batch 1 --steps 2 --device cpu --out " + dir / "out.npy");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "ddim: error: --out: cannot write"));
  CHECK(contains(r.output, "File too large"));
  CHECK(test::read_text(dir / "out.npy") == "OLD");
  CHECK(test::no_temp_files(dir.path));
  // A new output: nothing appears.
  const CliRun n = test::run_sh("trap '' XFSZ; ulimit -f 1; exec " + test::ddim_cli() + " sample --model " + model +
                                " --batch 1 --steps 2 --device cpu --out " + dir / "new.png");
  CHECK(n.code == 1);
  CHECK(!fs::exists(dir / "new.png"));
  CHECK(test::no_temp_files(dir.path));
}

TEST_CASE("reliability: unusable input and output paths get clear errors") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  fs::create_directories(dir / "d.npy");
  fs::create_directories(dir / "d.ddim");
  struct Case {
    std::string args, needle;
  };
  std::vector<Case> cases = {
      {"info " + dir / "d.ddim", "is a directory, not a file"},
      {"info " + dir / "missing.ddim", "cannot open '" + dir / "missing.ddim" + "': No such file or directory"},
      {"sample --model " + model + " --x-T " + dir / "d.npy" + " --device cpu --out " + dir / "o.npy", "is a directory, not a file"},
      {"sample --model " + model + " --device cpu --out " + dir / "d.npy", "--out: '" + dir / "d.npy" + "' is a directory"},
      {"sample --model " + model + " --device cpu --out " + dir / "nowhere/o.npy", "does not exist"},
      {"sample --model " + model + " --device cpu --out-dir " + model, "exists and is not a directory"},
  };
  if (::geteuid() != 0) {  // root reads and writes anything
    test::write_text(dir / "secret.ddim", "x");
    ::chmod((dir / "secret.ddim").c_str(), 0);
    cases.push_back({"info " + dir / "secret.ddim", "Permission denied"});
    fs::create_directories(dir / "ro");
    ::chmod((dir / "ro").c_str(), 0555);
    cases.push_back({"sample --model " + model + " --batch 1 --steps 2 --device cpu --out " + dir / "ro/o.npy", "Permission denied"});
  }
  for (const Case& c : cases) {
    const CliRun r = run_cli(c.args);
    INFO(c.args << "\n" << r.output);
    CHECK(r.code == 1);
    CHECK(contains(r.output, c.needle));
    CHECK(test::count_lines(r.output) == 1);
  }
}

TEST_CASE("reliability: a model file changed or truncated on disk does not affect loaded models and their sessions") {
  TempDir dir;
  const std::string path = test::tiny_model_file(dir);
  auto model = Model::load(path);
  auto session = test::cpu_session(model, 2);
  SampleOptions o;
  o.steps = 3;
  o.seed = 11;
  const std::vector<float> before = session->sample(o).images;

  // Rewritten in place with other weights, then truncated to a few bytes.
  {
    std::fstream f(path, std::ios::binary | std::ios::in | std::ios::out);
    const std::vector<std::uint8_t> other = graph::make_random_model_file(test::tiny_unet(), {}, 99);
    f.write(reinterpret_cast<const char*>(other.data()), static_cast<std::streamsize>(other.size()));
  }
  CHECK(test::bitwise_equal(session->sample(o).images, before));
  fs::resize_file(path, 16);
  CHECK(test::bitwise_equal(session->sample(o).images, before));
  // A new session of the loaded model too; only a new load sees the file.
  CHECK(test::bitwise_equal(test::cpu_session(model, 2)->sample(o).images, before));
  CHECK(code_of([&] { Model::load(path); }) == ErrorCode::InvalidFile);
}
