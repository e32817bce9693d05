// The `ddim` tool used as a hostile user would: one test case per class of defect, each of which
// failed on the tool before its fix (huge finite inputs, non-regular inputs, several outputs,
// outputs naming one file, declared sizes, standard output, long names, non-regular outputs,
// option ranges, messages).
#include <doctest/doctest.h>

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <filesystem>
#include <limits>

#include "ddim/ddim.hpp"
#include "hostile_util.hpp"
#include "png.hpp"

using namespace ddim;
namespace fs = std::filesystem;
using test::CliRun;
using test::contains;
using test::run_cli;
using test::TempDir;

extern char** environ;

namespace {

constexpr std::size_t kSample = 3 * 16 * 12;  // the tiny model's C * H * W

// A model file whose tensor `name` (F32) holds `value` everywhere.
std::vector<std::uint8_t> with_tensor_filled(std::vector<std::uint8_t> file, const std::string& name, float value) {
  const std::uint64_t n = format::read_header_length(file, file.size());
  const format::Container c = format::parse_header(std::span(file).subspan(8, n), file.size());
  const format::TensorInfo* t = c.find(name);
  REQUIRE(t != nullptr);
  REQUIRE(t->dtype == format::DType::F32);
  for (std::uint64_t at = c.data_begin + t->begin; at < c.data_begin + t->end; at += 4) std::memcpy(&file[at], &value, 4);
  return file;
}

}  // namespace

TEST_CASE("hostile cli: finite inputs that overflow float32 fail naming where NaN first appears, never a NaN result") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  const std::vector<float> big(kSample, 3.4e38f);
  test::write_npy(dir / "big.npy", {1, 3, 16, 12}, big);

  // x_T: PNG (was black) and .npy (was all NaN) outputs, both with exit 0 before.
  for (const char* out : {"o.png", "o.npy"}) {
    const CliRun r = run_cli("sample --model " + model + " --x-T " + dir / "big.npy" + " --steps 3 --device cpu --out " + dir / out);
    INFO(r.output);
    CHECK(r.code == 1);
    CHECK(contains(r.output, "step 1 of 3"));
    CHECK(contains(r.output, "NaN or infinite"));
    CHECK(contains(r.output, "node 'conv_in' (conv2d)"));
    CHECK(!fs::exists(dir / out));
  }
  // The per-step noise: the sampler's update overflows.
  test::write_npy(dir / "noise.npy", {3, 1, 3, 16, 12}, std::vector<float>(3 * kSample, 3.4e38f));
  CliRun r = run_cli("sample --model " + model + " --batch 1 --steps 3 --eta 1 --clip-sample off --noise " + dir / "noise.npy" +
                     " --device cpu --out " + dir / "n.npy");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "the sampler's update gives NaN or Inf"));
  CHECK(!fs::exists(dir / "n.npy"));
  // An image to invert, and a forward pass.
  r = run_cli("invert --model " + model + " --input " + dir / "big.npy" + " --steps 3 --device cpu --out " + dir / "xt.npy");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "node 'conv_in'"));
  CHECK(!fs::exists(dir / "xt.npy"));
  r = run_cli("forward --model " + model + " --x " + dir / "big.npy" + " --t 10 --device cpu --out " + dir / "eps.npy");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "forward: the network's output is NaN or infinite"));
  CHECK(contains(r.output, "node 'conv_in'"));
  CHECK(!fs::exists(dir / "eps.npy"));
  // A weight near the float limit (finite, so the file is valid).
  format::write_file(dir / "heavy.ddim", with_tensor_filled(graph::make_random_model_file(test::tiny_unet(), {}, 4),
                                                            "conv_in.weight", 3.0e38f));
  r = run_cli("sample --model " + dir / "heavy.ddim" + " --batch 2 --steps 2 --device cpu --out " + dir / "h.png");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "node 'conv_in'"));
  CHECK(!fs::exists(dir / "h.png"));

  // The library says the same (the CLI only passes it on).
  auto lib = Model::load(model);
  SampleOptions o;
  o.steps = 3;
  o.x_T = big;
  const std::string m = test::error_of([&] { test::cpu_session(lib, 1)->sample(o); });
  CHECK(contains(m, "step 1 of 3"));
  CHECK(contains(m, "node 'conv_in'"));
}

TEST_CASE("hostile cli: a FIFO or a directory given as an input is refused at once, never read") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  for (const char* name : {"fifo.ddim", "fifo.npy", "fifo.png"}) REQUIRE(::mkfifo((dir / name).c_str(), 0600) == 0);
  test::write_npy(dir / "x.npy", {1, 3, 16, 12}, std::vector<float>(kSample, 0.5f));
  const std::vector<std::string> cases = {
      "info " + dir / "fifo.ddim",
      "sample --model " + dir / "fifo.ddim" + " --out " + dir / "o.npy",
      "sample --model " + model + " --x-T " + dir / "fifo.npy" + " --device cpu --out " + dir / "o.npy",
      "invert --model " + model + " --input " + dir / "fifo.png" + " --device cpu --out " + dir / "o.npy",
      "forward --model " + model + " --x " + dir / "fifo.npy" + " --t 1 --device cpu --out " + dir / "o.npy",
      "forward --model " + model + " --x " + dir / "x.npy" + " --t " + dir / "fifo.npy" + " --device cpu --out " + dir / "o.npy",
  };
  for (const std::string& args : cases) {
    // `timeout` only turns a hang (the defect) into a failure; nothing here depends on time.
    const CliRun r = test::run_sh("timeout 120 " + test::ddim_cli() + " " + args);
    INFO(args << "\n" << r.output);
    CHECK(r.code == 1);
    CHECK(contains(r.output, "FIFO (named pipe), not a regular file"));
    CHECK(test::count_lines(r.output) == 1);
  }
  const CliRun r = run_cli("info " + dir.path.string());
  CHECK(r.code == 1);
  CHECK(contains(r.output, "is a directory"));
}

TEST_CASE("hostile cli: the outputs of one command are all or nothing") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  test::write_text(dir / "out.npy", "OLD OUT");

  // The trajectory (48 kB) passes a 20 kB file size limit, the samples (2.4 kB) do not: the
  // samples used to be in place already.
  CliRun r = test::run_sh("trap '' XFSZ; ulimit -f 40; exec " + test::ddim_cli() + " sample --model " + model +
                          " --batch 1 --steps 20 --device cpu --out " + dir / "out.npy" + " --trajectory " + dir / "traj.npy");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "--trajectory"));
  CHECK(contains(r.output, "File too large"));
  CHECK(test::read_text(dir / "out.npy") == "OLD OUT");
  CHECK(!fs::exists(dir / "traj.npy"));
  CHECK(test::no_temp_files(dir.path));

  // A directory in the way of one --out-dir file.
  fs::create_directories(dir / "imgs/3_0.png");
  r = run_cli("sample --model " + model + " --batch 1 --seed 3 --steps 2 --device cpu --out " + dir / "out.npy" +
              " --out-dir " + dir / "imgs");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "3_0.png"));
  CHECK(test::read_text(dir / "out.npy") == "OLD OUT");
  CHECK(test::no_temp_files(dir.path));

  // forward --dump: a node output (12 kB) passes a 5 kB limit; neither --out nor any dump file
  // may appear (they used to be written node by node).
  test::write_npy(dir / "x.npy", {1, 3, 16, 12}, std::vector<float>(kSample, 0.5f));
  r = test::run_sh("trap '' XFSZ; ulimit -f 10; exec " + test::ddim_cli() + " forward --model " + model + " --x " +
                   dir / "x.npy" + " --t 5 --device cpu --out " + dir / "out.npy" + " --dump " + dir / "dump");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "--dump"));
  CHECK(test::read_text(dir / "out.npy") == "OLD OUT");
  CHECK(!fs::exists(dir / "dump"));  // created by the command, removed again
  CHECK(test::no_temp_files(dir.path));
}

TEST_CASE("hostile cli: two outputs naming the same file are a usage error") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  test::write_text(dir / "X.npy", "OLD");
  fs::create_symlink(dir / "X.npy", dir / "link.npy");
  fs::create_hard_link(dir / "X.npy", dir / "hard.npy");
  fs::create_directories(dir / "sub");
  const std::string sample = "sample --model " + model + " --batch 1 --steps 2 --device cpu ";
  const std::vector<std::string> cases = {
      sample + "--out " + dir / "X.npy" + " --trajectory " + dir / "X.npy",
      sample + "--out " + dir / "X.npy" + " --x0 " + dir / "sub/../X.npy",
      sample + "--trajectory " + dir / "X.npy" + " --x0 " + dir / "link.npy",
      sample + "--out " + dir / "X.npy" + " --x0 " + dir / "hard.npy",
      sample + "--out " + dir / "sub/0_0.png" + " --out-dir " + dir / "sub",
      "invert --model " + model + " --input " + dir / "X.npy" + " --out " + dir / "t.npy" + " --trajectory " + dir / "t.npy",
      "forward --model " + model + " --x " + dir / "X.npy" + " --t 3 --out " + dir / "sub/eps.npy" + " --dump " + dir / "sub",
  };
  for (const std::string& args : cases) {
    const CliRun r = run_cli(args);
    INFO(args << "\n" << r.output);
    CHECK(r.code == 2);
    CHECK((contains(r.output, "same file") || contains(r.output, "inside --dump")));
    CHECK(test::read_text(dir / "X.npy") == "OLD");
    CHECK(!fs::exists(dir / "t.npy"));
    CHECK(!fs::exists(dir / "sub/0_0.png"));
  }
}

TEST_CASE("hostile cli: declared sizes are checked before anything is allocated or read") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  // A .npy declaring a batch of 2^20 samples, as large as it says (sparse: nothing is stored).
  {
    std::vector<std::uint8_t> header = tools::encode_npy_f32(std::vector<std::int64_t>{1, 3, 16, 12}, std::vector<float>(kSample));
    std::string text(header.begin(), header.begin() + 128);
    text.replace(text.find("(1, 3, 16, 12)"), 14, "(1048576, 3, 16, 12)");
    test::write_text(dir / "huge.npy", text.substr(0, 128));
    fs::resize_file(dir / "huge.npy", 128 + std::uint64_t{1048576} * kSample * 4);
  }
  // A PNG of a few bytes declaring 65535 x 65535 pixels.
  {
    std::vector<std::uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    const auto chunk = [&](const char* type, std::vector<std::uint8_t> data) {
      const std::uint32_t n = static_cast<std::uint32_t>(data.size());
      for (int s = 24; s >= 0; s -= 8) png.push_back(static_cast<std::uint8_t>(n >> s));
      std::vector<std::uint8_t> body(type, type + 4);
      body.insert(body.end(), data.begin(), data.end());
      png.insert(png.end(), body.begin(), body.end());
      const std::uint32_t crc = tools::crc32(body);
      for (int s = 24; s >= 0; s -= 8) png.push_back(static_cast<std::uint8_t>(crc >> s));
    };
    chunk("IHDR", {0, 0, 0xff, 0xff, 0, 0, 0xff, 0xff, 8, 0, 0, 0, 0});
    std::vector<std::uint8_t> zero(16, 0);
    uLongf size = compressBound(16);
    std::vector<std::uint8_t> z(size);
    REQUIRE(compress(z.data(), &size, zero.data(), 16) == Z_OK);
    z.resize(size);
    chunk("IDAT", z);
    chunk("IEND", {});
    test::write_bytes(dir / "huge.png", png);
    CHECK(png.size() < 100);
  }
  // Under a 1 GB address-space limit a read or an allocation of the declared size fails with
  // "out of memory"; the size checks must come first.
  const std::string limited = "ulimit -v 1000000; exec " + test::ddim_cli() + " ";
  CliRun r = test::run_sh(limited + "sample --model " + model + " --x-T " + dir / "huge.npy" + " --device cpu --out " + dir / "o.npy");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "batch 1048576 is out of range [1, 65535]"));
  r = test::run_sh(limited + "forward --model " + model + " --x " + dir / "huge.npy" + " --t 1 --device cpu --out " + dir / "o.npy");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "N must be in [1, 65535]"));
  r = test::run_sh(limited + "invert --model " + model + " --input " + dir / "huge.png" + " --device cpu --out " + dir / "o.npy");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "65535x65535"));
  CHECK(contains(r.output, "cannot hold"));
  CHECK(!fs::exists(dir / "o.npy"));
}

TEST_CASE("hostile cli: a failed write to standard output is an error, and a closed pipe ends quietly") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  const CliRun r = test::run_sh(test::ddim_cli() + " info " + model + " > /dev/full");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "ddim: error: cannot write to standard output: No space left on device"));

  // stdout: a pipe whose reader has already gone; stderr: a file.
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  ::close(fds[0]);
  const std::string err_path = dir / "stderr.txt";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  std::vector<std::string> args = {DDIM_CLI_PATH, "info", model, "--plan"};
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  REQUIRE(posix_spawn(&pid, DDIM_CLI_PATH, &actions, nullptr, argv.data(), environ) == 0);
  posix_spawn_file_actions_destroy(&actions);
  ::close(fds[1]);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK_MESSAGE(WIFEXITED(status), "killed by signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0));
  CHECK((WIFEXITED(status) && WEXITSTATUS(status) == 0));
  CHECK(test::read_text(err_path).empty());
}

TEST_CASE("hostile cli: an output name as long as the file system allows is written") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  const std::string name = std::string(246, 'a') + ".npy";  // 250 bytes; the limit is 255
  CliRun r = run_cli("sample --model " + model + " --batch 1 --steps 2 --device cpu --out " + dir / name);
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(tools::read_npy_f32(dir / name).shape == std::vector<std::int64_t>{1, 3, 16, 12});
  CHECK(test::no_temp_files(dir.path));
  // Too long: refused before the work, with the reason.
  r = run_cli("sample --model " + model + " --batch 1 --steps 2 --device cpu --out " + dir / (std::string(252, 'b') + ".npy"));
  CHECK(r.code == 1);
  CHECK(contains(r.output, "more than the file system allows"));
  CHECK(test::count_lines(r.output) == 1);
}

TEST_CASE("hostile cli: an existing non-regular output is refused, a link to a regular file is written through") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  REQUIRE(::mkfifo((dir / "fifo.npy").c_str(), 0600) == 0);
  fs::create_symlink("/dev/null", dir / "null.npy");
  const std::string sample = "sample --model " + model + " --batch 1 --steps 2 --device cpu ";
  CliRun r = run_cli(sample + "--out " + dir / "fifo.npy");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(contains(r.output, "is a FIFO (named pipe), not a regular file"));
  CHECK(fs::is_fifo(dir / "fifo.npy"));
  r = run_cli(sample + "--trajectory " + dir / "null.npy");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "is a character device, not a regular file"));
  CHECK(fs::is_symlink(dir / "null.npy"));
  CHECK(fs::is_character_file(dir / "null.npy"));
  // A link to a regular file: the file it points to is replaced, the link stays.
  test::write_text(dir / "target.npy", "OLD");
  fs::create_symlink("target.npy", dir / "link.npy");
  r = run_cli(sample + "--out " + dir / "link.npy");
  CHECK(r.code == 0);
  CHECK(fs::is_symlink(dir / "link.npy"));
  CHECK(tools::read_npy_f32(dir / "target.npy").shape == std::vector<std::int64_t>{1, 3, 16, 12});
  CHECK(test::no_temp_files(dir.path));
}

TEST_CASE("hostile cli: option ranges are the engine's, range errors name the option, seeds never wrap") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  const std::string out = dir / "o.npy";
  const std::string sample = "sample --model " + model + " --out " + out + " ";
  struct Case {
    std::string args, needle;
  };
  const std::vector<Case> cases = {
      {sample + "--steps 2 --batch 70000", "--batch"},
      {sample + "--steps 2 --threads 2000 --device cpu", "--threads"},
      {sample + "--steps 2000 --device cpu", "--steps 2000"},
      {sample + "--timesteps 999,5000 --device cpu", "--timesteps"},
      {sample + "--steps 2 --height 17 --width 12 --device cpu", "--height/--width"},
      {sample + "--steps 2 --seed 18446744073709551615 --batch 2 --device cpu", "--seed 18446744073709551615"},
      {sample + "--steps 2 --eta 2 --device cpu", "--eta"},
      {sample + "--steps 2 --eta 1000000 --device cpu", "--eta"},
      {sample + "--steps 2 --autotune --device cpu", "--autotune"},
      {sample + "--steps 2 --profile --device cpu", "--profile"},
      {sample + "--steps 2 --precision fp16 --device cpu", "--precision fp16"},
      {"info " + model + " --precision fp16", "--precision"},
      {"eta-study --model " + model + " --seed 18446744073709551615 --out " + dir / "e.png", "--seed"},
      {"compare --model " + model + " --threads 4096 --out " + dir / "c.png", "--threads"},
  };
  for (const Case& c : cases) {
    const CliRun r = run_cli(c.args);
    INFO(c.args << "\n" << r.output);
    CHECK(r.code == 2);
    CHECK(r.output.rfind("ddim: error: " + c.needle, 0) == 0);
    CHECK(test::count_lines(r.output) == 1);
    CHECK(!fs::exists(out));
  }
  // The largest seed is fine for one sample.
  CHECK(run_cli(sample + "--steps 2 --seed 18446744073709551615 --batch 1 --device cpu").code == 0);
  // The library refuses the wrap too.
  SampleOptions o;
  o.steps = 2;
  o.seed = std::numeric_limits<std::uint64_t>::max();
  CHECK(contains(test::error_of([&] { test::cpu_session(test::tiny_model(), 2)->sample(o); }), "2^64 - 1"));
}

TEST_CASE("hostile cli: every error is one bounded line, with no report printed before it") {
  TempDir dir;
  const std::string model = test::tiny_model_file(dir);
  // No arguments.
  CliRun r = test::run_sh(test::ddim_cli());
  CHECK(r.code == 2);
  CHECK(test::count_lines(r.output) == 1);
  // A failure to plan after the model's description was ready: the error only.
  r = run_cli("info " + model + " --plan --device cuda:3");
  INFO(r.output);
  CHECK(r.code == 2);
  CHECK(test::count_lines(r.output) == 1);
  CHECK(contains(r.output, "--device cuda:3"));
  // A table that used to start before the picture failed to be written.
  r = test::run_sh("trap '' XFSZ; ulimit -f 1; exec " + test::ddim_cli() + " eta-study --model " + model +
                   " --steps 2 --runs 2 --device cpu --out " + dir / "eta.png");
  INFO(r.output);
  CHECK(r.code == 1);
  CHECK(test::count_lines(r.output) == 1);
  CHECK(r.output.rfind("ddim: error: --out", 0) == 0);
  r = test::run_sh("trap '' XFSZ; ulimit -f 1; exec " + test::ddim_cli() + " compare --model " + model +
                   " --ddpm off --steps-list 2 --batch 1 --device cpu --out " + dir / "cmp.png");
  CHECK(r.code == 1);
  CHECK(test::count_lines(r.output) == 1);
  // A newline in a value is escaped, not echoed.
  r = test::run_sh(test::ddim_cli() + " sample --model \"$(printf 'a\\nb.ddim')\"");
  CHECK(r.code == 1);
  CHECK(test::count_lines(r.output) == 1);
  CHECK(contains(r.output, "a\\nb.ddim"));
  // Unbounded content is cut: a 100 kB option name, a million-entry schedule.
  r = run_cli("sample --" + std::string(100000, 'x'));
  CHECK(r.code == 2);
  CHECK(r.output.size() < 1200);
  CHECK(test::count_lines(r.output) == 1);
  ScheduleConfig long_schedule;
  long_schedule.num_train_timesteps = 1000000;
  const std::string long_model = test::tiny_model_file(dir, long_schedule, "long.ddim");
  test::write_npy(dir / "z.npy", {2, 1, 3, 16, 12}, std::vector<float>(2 * kSample, 0.f));
  r = run_cli("sample --model " + long_model + " --sampler ddpm --batch 1 --device cpu --noise " + dir / "z.npy" + " --out " +
              dir / "o.npy");
  INFO(r.output.substr(0, 300));
  CHECK(r.code == 1);
  CHECK(contains(r.output, "1000000 timesteps visited (999999,999998,"));
  CHECK(r.output.size() < 1200);
  // Misleading messages: a name that is only an extension, a /proc file.
  r = run_cli("sample --model " + model + " --out .npy");
  CHECK(r.code == 2);
  CHECK(contains(r.output, "no file name before the extension"));
  r = run_cli("info /proc/self/status");
  CHECK(r.code == 1);
  CHECK(contains(r.output, "pseudo-file"));
  CHECK(!contains(r.output, "0 bytes, too short"));
}
