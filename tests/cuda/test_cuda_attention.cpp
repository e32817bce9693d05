// The CUDA attention core (kernels/attention.cu, cuda::attention) against a double-precision host
// reference, for fp32 / fp16 / bf16 at the U-Net's shapes and at the layout corner cases: ragged
// token counts and head dims, several heads, a fused qkv buffer, padded row strides, 4096 tokens,
// batch independence (bitwise), guard bytes, and the shape errors. Suite "gpu": needs a device.
// Under the CUDA emulator (gpu_emu) the token counts shrink (tokens(gpu, emulated)): the cost
// there grows with tokens^2, and a few key tiles exercise the same paths as many.
//
// The reference runs on the inputs rounded to the element type (g::rounded), exactly the values
// the device reads, so the only differences are the kernel's own arithmetic and the final rounding
// of o. Tolerance (absolute, per element), with vmax = max |v| and u_t the unit roundoff of t:
//   tol = vmax * (2 u_t + 1e-5 + 3 eps_s)
// * 2 u_t: o is rounded once to t (round to nearest: at most u_t |o| <= u_t vmax, since o is a
//   convex combination of v rows); the factor 2 covers the fp32 error of the value being rounded.
//   For fp32 this term is 2^-23 and the next one dominates.
// * 1e-5 (~170 u_fp32): the fp32 work besides the scores: expf (<= 2 ulp per weight), the
//   running-max rescales, and the per-lane fp32 accumulation chains of o and of the softmax sum,
//   which run over all keys (up to 4096); their rounding errors of both signs grow like
//   sqrt(tokens) u_fp32 (<= 64 u_fp32 here), so 1e-5 leaves more than a factor two.
// * 3 eps_s: eps_s bounds the fp32 error of a scaled score, |s^ - s| <= n_r u_fp32 scale
//   max_ij sum_d |q_id k_jd|, with n_r = head_dim / 16 + 8 >= the roundings on one dot product's
//   path in the kernel (a per-lane FMA chain of at most bucket / 32 <= head_dim / 16 + 1 terms,
//   the bucket being < 2 head_dim; five butterfly levels; the scale). Perturbing every score by at
//   most eps changes each softmax weight by a factor within exp(+-2 eps), so o moves by at most
//   (exp(2 eps) - 1) vmax <= 3 eps vmax.
// Measured in a CPU emulation of the kernel, the errors were 1.2-2 u_fp32 (19 u_fp32 with
// |q|, |k| <= 4) and 0.03-0.5 u_t for fp16 / bf16: the bounds leave a margin of 4x or more.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cuda/kernels.hpp"
#include "ddim/error.hpp"
#include "gpu_util.hpp"

using namespace ddim;
namespace g = ddim::test::gpu;
using cuda::AttentionShape;
using cuda::DType;

namespace {

constexpr DType kTypes[] = {DType::F32, DType::F16, DType::BF16};

struct Problem {
  int n = 1, tokens = 1, heads = 1, head_dim = 1;
  bool fused = false;    // q, k, v in one (n * tokens, 3 * heads * head_dim) buffer
  int ld_pad = 0;        // extra (NaN) columns per q / k / v row when not fused
  int ld_o_pad = 0;      // extra columns per o row (must stay untouched)
  float qk_amp = 1.f;    // q, k uniform in [-qk_amp, qk_amp]; v in [-1, 1]
  std::uint32_t seed = 1;
  int width() const { return heads * head_dim; }
  std::size_t rows() const { return std::size_t(n) * std::size_t(tokens); }
  float scale() const { return 1.f / std::sqrt(float(head_dim)); }
};

std::string describe(const Problem& p, DType t) {
  return std::string(cuda::to_string(t)) + " n=" + std::to_string(p.n) + " tokens=" + std::to_string(p.tokens) +
         " heads=" + std::to_string(p.heads) + " head_dim=" + std::to_string(p.head_dim) +
         (p.fused ? " fused" : "") + " ld_pad=" + std::to_string(p.ld_pad) + " ld_o_pad=" + std::to_string(p.ld_o_pad);
}

// Dense (rows, width) q, k, v, already rounded to the element type.
struct Inputs {
  std::vector<float> q, k, v;
};

Inputs make_inputs(const Problem& p, DType t) {
  const std::size_t count = p.rows() * std::size_t(p.width());
  Inputs in;
  in.q = g::rounded(g::random_vector(count, p.seed * 3 + 0, -p.qk_amp, p.qk_amp), t);
  in.k = g::rounded(g::random_vector(count, p.seed * 3 + 1, -p.qk_amp, p.qk_amp), t);
  in.v = g::rounded(g::random_vector(count, p.seed * 3 + 2, -1.f, 1.f), t);
  return in;
}

// Rows of the first `samples` samples of a dense (rows, width) matrix, starting at sample `first`.
std::vector<float> sample_rows(const std::vector<float>& x, const Problem& p, int first, int samples) {
  const std::size_t per = std::size_t(p.tokens) * std::size_t(p.width());
  return std::vector<float>(x.begin() + std::ptrdiff_t(per * first), x.begin() + std::ptrdiff_t(per * (first + samples)));
}

// dense (rows, width) -> (rows, ld) with `fill` in the extra columns.
std::vector<float> strided(const std::vector<float>& x, std::size_t rows, int width, int ld, float fill) {
  std::vector<float> y(rows * std::size_t(ld), fill);
  for (std::size_t r = 0; r < rows; ++r)
    std::copy_n(x.begin() + std::ptrdiff_t(r * width), width, y.begin() + std::ptrdiff_t(r * ld));
  return y;
}

struct GpuResult {
  std::vector<float> o;       // dense (rows, width)
  std::vector<unsigned char> raw;  // o as the device wrote it: (rows, ld_o) of t
  bool guards = false;        // guard bytes of every buffer intact
  bool gaps = false;          // o's columns width .. ld_o untouched
};

GpuResult run_gpu(const Problem& p, const Inputs& in, DType t) {
  const int w = p.width();
  const std::size_t rows = p.rows(), es = g::dsize(t);
  const int ld_o = w + p.ld_o_pad;
  g::DevTensor o(rows * std::size_t(ld_o), t);  // every byte holds DevBytes::kPattern
  GpuResult r;
  bool inputs_intact = true;
  const AttentionShape base{p.n, p.tokens, p.heads, p.head_dim, 0, 0, 0, ld_o, p.scale()};
  if (p.fused) {
    std::vector<float> qkv(rows * std::size_t(3 * w));
    for (std::size_t i = 0; i < rows; ++i) {
      std::copy_n(in.q.begin() + std::ptrdiff_t(i * w), w, qkv.begin() + std::ptrdiff_t(i * 3 * w));
      std::copy_n(in.k.begin() + std::ptrdiff_t(i * w), w, qkv.begin() + std::ptrdiff_t(i * 3 * w + w));
      std::copy_n(in.v.begin() + std::ptrdiff_t(i * w), w, qkv.begin() + std::ptrdiff_t(i * 3 * w + 2 * w));
    }
    g::DevTensor buf(qkv, t);
    auto* b = static_cast<unsigned char*>(buf.data());
    AttentionShape s = base;
    s.ld_q = s.ld_k = s.ld_v = 3 * w;
    cuda::attention(s, b, b + std::size_t(w) * es, b + std::size_t(2 * w) * es, o.data(), t, nullptr);
    GPU_CHECK(cudaGetLastError());
    g::sync();
    inputs_intact = buf.mem.guards_intact();
  } else {
    // The pad columns hold NaN: a kernel that reads past its head's columns produces NaN.
    const int ld = w + p.ld_pad;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    g::DevTensor q(strided(in.q, rows, w, ld, nan), t), k(strided(in.k, rows, w, ld, nan), t),
        v(strided(in.v, rows, w, ld, nan), t);
    AttentionShape s = base;
    s.ld_q = s.ld_k = s.ld_v = ld;
    cuda::attention(s, q.data(), k.data(), v.data(), o.data(), t, nullptr);
    GPU_CHECK(cudaGetLastError());
    g::sync();
    inputs_intact = q.mem.guards_intact() && k.mem.guards_intact() && v.mem.guards_intact();
  }
  r.guards = inputs_intact && o.mem.guards_intact();
  r.raw.resize(rows * std::size_t(ld_o) * es);
  o.mem.download(r.raw.data());
  r.gaps = true;
  for (std::size_t i = 0; i < rows; ++i)
    for (std::size_t b = std::size_t(w) * es; b < std::size_t(ld_o) * es; ++b)
      if (r.raw[i * std::size_t(ld_o) * es + b] != g::DevBytes::kPattern) r.gaps = false;
  std::vector<unsigned char> dense(rows * std::size_t(w) * es);
  for (std::size_t i = 0; i < rows; ++i)
    std::memcpy(dense.data() + i * std::size_t(w) * es, r.raw.data() + i * std::size_t(ld_o) * es, std::size_t(w) * es);
  r.o = g::decode(dense, t);
  return r;
}

struct Reference {
  std::vector<double> o;  // dense (rows, width)
  double vmax = 0;        // max |v|
  double abs_dot = 0;     // max over (sample, head, i, j) of scale * sum_d |q_id k_jd|
};

// softmax(scale q k^T) v per (sample, head) in double, with the max subtracted.
Reference reference(const Problem& p, const Inputs& in) {
  const int w = p.width(), hd = p.head_dim, T = p.tokens;
  const double scale = p.scale();
  Reference ref;
  ref.o.assign(p.rows() * std::size_t(w), 0.0);
  for (float x : in.v) ref.vmax = std::max(ref.vmax, double(std::fabs(x)));
  std::vector<double> s(std::size_t(T), 0.0);
  for (int b = 0; b < p.n; ++b)
    for (int h = 0; h < p.heads; ++h) {
      auto at = [&](const std::vector<float>& x, int row) {
        return x.data() + (std::size_t(b) * T + std::size_t(row)) * std::size_t(w) + std::size_t(h) * hd;
      };
      for (int i = 0; i < T; ++i) {
        const float* qi = at(in.q, i);
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = 0; j < T; ++j) {
          const float* kj = at(in.k, j);
          double dot = 0, adot = 0;
          for (int d = 0; d < hd; ++d) {
            const double prod = double(qi[d]) * double(kj[d]);
            dot += prod;
            adot += std::fabs(prod);
          }
          s[std::size_t(j)] = scale * dot;
          mx = std::max(mx, s[std::size_t(j)]);
          ref.abs_dot = std::max(ref.abs_dot, scale * adot);
        }
        double sum = 0;
        for (int j = 0; j < T; ++j) {
          s[std::size_t(j)] = std::exp(s[std::size_t(j)] - mx);
          sum += s[std::size_t(j)];
        }
        double* oi = ref.o.data() + (std::size_t(b) * T + std::size_t(i)) * std::size_t(w) + std::size_t(h) * hd;
        for (int j = 0; j < T; ++j) {
          const float* vj = at(in.v, j);
          const double pj = s[std::size_t(j)] / sum;
          for (int d = 0; d < hd; ++d) oi[d] += pj * double(vj[d]);
        }
      }
    }
  return ref;
}

// The tolerance of the file comment.
double tolerance(const Problem& p, const Reference& ref, DType t) {
  const double n_r = double(p.head_dim) / 16.0 + 8.0;
  const double eps_s = n_r * g::unit_roundoff(DType::F32) * ref.abs_dot;
  return ref.vmax * (2.0 * g::unit_roundoff(t) + 1e-5 + 3.0 * eps_s);
}

// Runs p for type t and checks it against the reference; returns the device result.
GpuResult check_problem(const Problem& p, DType t) {
  INFO(describe(p, t));
  const Inputs in = make_inputs(p, t);
  const Reference ref = reference(p, in);
  GpuResult r = run_gpu(p, in, t);
  REQUIRE(r.o.size() == ref.o.size());
  double max_abs = 0;
  std::size_t non_finite = 0;
  for (std::size_t i = 0; i < r.o.size(); ++i) {
    if (!std::isfinite(r.o[i])) {
      ++non_finite;
      continue;
    }
    max_abs = std::max(max_abs, std::fabs(double(r.o[i]) - ref.o[i]));
  }
  const double tol = tolerance(p, ref, t);
  INFO("max abs error " << max_abs << ", tolerance " << tol << " (vmax " << ref.vmax << ", scale*sum|qk| "
                        << ref.abs_dot << ")");
  CHECK(non_finite == 0);
  CHECK(r.guards);
  CHECK(r.gaps);
  CHECK(max_abs <= tol);
  return r;
}

void check_all_types(const Problem& p) {
  for (DType t : kTypes) check_problem(p, t);
}

// The token count of a case: `gpu` on a GPU, `emulated` under the emulator (said in the log).
int tokens(int gpu, int emulated) {
  if (g::kEmulated && gpu != emulated) MESSAGE("emulated at " << emulated << " tokens (" << gpu << " on a GPU)");
  return g::on_gpu_or_emulated(gpu, emulated);
}

// The ddim::Error that f throws (code and message), or fails the test when it throws none.
template <class F>
Error error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  FAIL("no ddim::Error was thrown");
  return Error(ErrorCode::Internal, "unreachable");
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("cuda attention: 256 tokens x 256 channels as 1 head of 256") {
    Problem p;
    p.tokens = tokens(256, 64);
    p.heads = 1;
    p.head_dim = 256;
    p.seed = 11;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: 256 tokens x 256 channels as 8 heads of 32") {
    Problem p;
    p.tokens = tokens(256, 96);
    p.heads = 8;
    p.head_dim = 32;
    p.seed = 12;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: 256 tokens x 512 channels as 1 head of 512") {
    Problem p;
    p.tokens = tokens(256, 64);
    p.heads = 1;
    p.head_dim = 512;
    p.seed = 13;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: 1024 tokens x 64, 1 head") {
    Problem p;
    p.tokens = tokens(1024, 160);
    p.heads = 1;
    p.head_dim = 64;
    p.seed = 14;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: 4096 tokens x 64, 1 head, batch 1") {
    Problem p;
    p.tokens = tokens(4096, 288);
    p.heads = 1;
    p.head_dim = 64;
    p.seed = 15;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: ragged 77 tokens x 3 heads of 40") {
    Problem p;
    p.tokens = 77;
    p.heads = 3;
    p.head_dim = 40;
    p.seed = 16;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: peaked scores (|q|, |k| <= 4) move the running max across tiles") {
    Problem p;
    p.tokens = tokens(300, 130);
    p.heads = 2;
    p.head_dim = 64;
    p.qk_amp = 4.f;
    p.seed = 17;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: unaligned rows (ld = width + 1, head_dim 20) use the scalar loads") {
    Problem p;
    p.tokens = 50;
    p.heads = 2;
    p.head_dim = 20;
    p.ld_pad = 1;
    p.ld_o_pad = 3;
    p.seed = 18;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: fused qkv buffer (ld = 3 * heads * head_dim) and a padded o") {
    Problem p;
    p.n = 2;
    p.tokens = tokens(100, 70);
    p.heads = 2;
    p.head_dim = 64;
    p.fused = true;
    p.ld_o_pad = 8;
    p.seed = 19;
    check_all_types(p);
  }

  TEST_CASE("cuda attention: batch 2, sample 1 alone equals sample 1 in the batch bitwise") {
    Problem p;
    p.n = 2;
    p.tokens = tokens(130, 70);
    p.heads = 2;
    p.head_dim = 48;
    p.seed = 20;
    for (DType t : kTypes) {
      INFO(describe(p, t));
      const Inputs in = make_inputs(p, t);  // the samples differ: one random stream over both
      const GpuResult batch = check_problem(p, t);
      Problem one = p;
      one.n = 1;
      Inputs in1;
      in1.q = sample_rows(in.q, p, 1, 1);
      in1.k = sample_rows(in.k, p, 1, 1);
      in1.v = sample_rows(in.v, p, 1, 1);
      CHECK(in1.q != sample_rows(in.q, p, 0, 1));
      const GpuResult alone = run_gpu(one, in1, t);
      CHECK(alone.guards);
      const std::size_t bytes = alone.raw.size();
      REQUIRE(batch.raw.size() == 2 * bytes);
      CHECK(std::memcmp(alone.raw.data(), batch.raw.data() + bytes, bytes) == 0);
    }
  }

  TEST_CASE("cuda attention: head dims 80 and 128 (the 128 bucket), 160 and 320 (padded 256 and 512 buckets)") {
    // The buckets' other widths: a dim inside the 128 bucket and one filling it, and dims that
    // leave half of the 256 / 512 buckets as zero padding, one of them with padded rows (the
    // scalar loads) and a padded o.
    struct Shape {
      int heads, head_dim, ld_pad, ld_o_pad;
    };
    for (const Shape& sh : {Shape{2, 80, 0, 0}, Shape{1, 128, 0, 0}, Shape{2, 160, 2, 4}, Shape{1, 320, 0, 0}}) {
      CAPTURE(sh.head_dim);
      Problem p;
      p.tokens = tokens(96, 48);
      p.heads = sh.heads;
      p.head_dim = sh.head_dim;
      p.ld_pad = sh.ld_pad;
      p.ld_o_pad = sh.ld_o_pad;
      p.seed = 21 + std::uint32_t(sh.head_dim);
      check_all_types(p);
    }
  }

  TEST_CASE("cuda attention: invalid shapes throw ddim::Error naming the problem") {
    g::DevBytes mem(1 << 20);
    auto* base = static_cast<unsigned char*>(mem.data());
    const AttentionShape good{1, 16, 2, 32, 64, 64, 64, 64, 0.125f};
    struct Bad {
      AttentionShape s;
      const char* needle;
    };
    std::vector<Bad> bad;
    auto with = [&](auto mutate, const char* needle) {
      AttentionShape s = good;
      mutate(s);
      bad.push_back({s, needle});
    };
    with([](AttentionShape& s) { s.head_dim = 0; }, "head_dim");
    with([](AttentionShape& s) { s.head_dim = cuda::kMaxHeadDim + 1; }, "head_dim");
    with([](AttentionShape& s) { s.tokens = 0; }, "tokens");
    with([](AttentionShape& s) { s.tokens = -3; }, "tokens");
    with([](AttentionShape& s) { s.heads = 0; }, "heads");
    with([](AttentionShape& s) { s.n = -1; }, "n must be");
    with([](AttentionShape& s) { s.ld_q = 63; }, "ld_q");
    with([](AttentionShape& s) { s.ld_k = 32; }, "ld_k");
    with([](AttentionShape& s) { s.ld_v = 0; }, "ld_v");
    with([](AttentionShape& s) { s.ld_o = 10; }, "ld_o");
    with([](AttentionShape& s) { s.scale = std::numeric_limits<float>::quiet_NaN(); }, "scale");
    for (DType t : kTypes)
      for (const Bad& b : bad) {
        INFO(cuda::to_string(t) << ": expecting '" << b.needle << "'");
        const Error e = error_of([&] { cuda::attention(b.s, base, base, base, base + 4096, t, nullptr); });
        CHECK(e.code() == ErrorCode::InvalidArgument);
        CHECK(std::string(e.what()).find(b.needle) != std::string::npos);
      }
    // Null and misaligned pointers.
    for (DType t : {DType::F32, DType::F16}) {
      Error e = error_of([&] { cuda::attention(good, nullptr, base, base, base + 4096, t, nullptr); });
      CHECK(e.code() == ErrorCode::InvalidArgument);
      CHECK(std::string(e.what()).find("q is null") != std::string::npos);
      e = error_of([&] { cuda::attention(good, base, base, base, base + 4097, t, nullptr); });
      CHECK(e.code() == ErrorCode::InvalidArgument);
      CHECK(std::string(e.what()).find("o is not aligned") != std::string::npos);
    }
    // An empty batch is valid and does nothing.
    AttentionShape empty = good;
    empty.n = 0;
    CHECK_NOTHROW(cuda::attention(empty, base, base, base, base + 4096, DType::F32, nullptr));
    GPU_CHECK(cudaDeviceSynchronize());
    CHECK(mem.guards_intact());
  }
}
