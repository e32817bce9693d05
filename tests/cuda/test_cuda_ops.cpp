// The hand-written kernels of kernels/elementwise.cu, kernels/group_norm.cu and
// kernels/conv_direct.cu against their CPU twins (engine/cpu/ops.hpp, NCHW fp32), in fp32, fp16
// and bf16, at U-Net shapes and at odd ones (partial tiles, channel counts no pack divides,
// misaligned pointers). Suite "gpu": needs a CUDA device (see tests/cpp/main.cpp).
//
// Both sides start from the same numbers: every input the device holds in type t is rounded to t
// on the host first (g::rounded) and the CPU computes on those values. Every output buffer is
// poisoned with NaN (0xFF bytes, NaN in all three types) before the launch, so an unwritten
// element fails; every device buffer has guard bytes that must be intact afterwards; no output
// may be NaN or Inf. Launches go to stream 0, then g::sync().
//
// Tolerances, per element (u_t = g::unit_roundoff(t): 2^-24, 2^-11, 2^-8; u = 2^-24 for fp32):
//   |got - ref| <= u_t |ref| + delta * S + f_t
// The device computes in fp32 and rounds once to t: |round_t(v) - ref| <= u_t |v| + |v - ref|, and
// delta * S bounds |v - ref|, the difference of the two fp32 computations (S: the scale of the
// rounding errors, per op below). f_t = 2^-24 for fp16 (results below 2^-14 are subnormal there,
// spaced 2^-24 apart, where the relative term does not hold), 0 otherwise.
//   * Data movement (layouts, conversion, concat, upsample): exact (the value rounded to t, bitwise).
//   * add, add_broadcast, scale_shift, avg_pool2x: S = |ref| (add; a + b of two floats is one
//     correctly rounded sum), |x scale| + |shift| (scale_shift), the window's mean |x| (avg_pool);
//     delta = 8u: a few correctly rounded operations on each side (the kernels use the CPU's
//     operations in its order, so they agree bitwise in practice).
//   * silu: S = |ref|, delta = 16u: CUDA's expf is within 2 ulp and glibc's within 1; with the sum
//     and the division, each side is within 4 ulp of the exact x / (1 + e^-x) (the sum 1 + e^-x
//     does not amplify the exponential's relative error).
//   * group_norm: N = hw * c / groups values per group. The mean and the centred sum of squares are
//     fp32 sums of N terms (any order: error <= N u times the sum of |terms|), so the normalised
//     value x^ = (x - mean) / sigma is off by <= N u (mean|x| / sigma + |x^|) plus a few roundings;
//     S = |gamma| (|x^| + mean|x| / sigma + 1) + |beta| (host statistics in double), delta = (N + 16)
//     u. With SiLU (slope within [-0.1, 1.1]) S becomes 1.1 S + |ref|. An fp16 accumulation
//     (N u_16 = 2 at N = 4096) fails by far.
//   * conv2d_direct: K = kh kw cin products per output; S = sum |x w| + |bias| (the CPU's conv of
//     the absolute values); each side's fp32 sum is within (K + 2) u S (the K products, the bias),
//     so delta = (K + 2) 2^-23 (as tests/cuda/test_cudnn_conv.cpp).
//   * fp32 reductions (group_norm, conv), additionally: |got - ref| <= 1e-4 max(|ref|, 0.1 max |ref|)
//     (an output near 0 is a difference of terms of the size of max |ref|, and its absolute error
//     scales with them), and for the conv the normwise error <= 1e-5 (two fp32 summation orders of
//     K = 1152 differ by ~4e-7 normwise; TF32 would give ~3e-4).
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu/ops.hpp"
#include "cuda/kernels.hpp"
#include "ddim/error.hpp"
#include "gpu_util.hpp"

using namespace ddim;
using cuda::DType;
namespace g = ddim::test::gpu;

namespace {

constexpr DType kTypes[] = {DType::F32, DType::F16, DType::BF16};
constexpr double kU32 = 0x1p-24;  // fp32 unit roundoff
constexpr cudaStream_t kStream = nullptr;  // stream 0

// (doctest prints a const char* as a pointer.)
std::string type_name(DType t) { return cuda::to_string(t); }

double subnormal_floor(DType t) { return t == DType::F16 ? 0x1p-24 : 0.0; }

// Fills a device buffer with 0xFF bytes: NaN in fp32, fp16 and bf16.
void poison(g::DevTensor& d) { d.mem.fill(0xFF); }

// A device copy of x (rounded to t) placed `shift` elements past the start of its (256-byte
// aligned) buffer: shift 1 misaligns the pointer for every pack wider than one element, so the
// kernels' element-by-element paths run. Element 0 of the buffer is then outside the tensor.
struct Shifted {
  int shift;
  g::DevTensor mem;
  Shifted(const std::vector<float>& x, DType t, int s) : shift(s), mem(lead(x, s), t) {}
  void* ptr() const { return static_cast<unsigned char*>(mem.data()) + std::size_t(shift) * g::dsize(mem.t); }
  std::vector<float> read() const {
    const std::vector<float> v = mem.read();
    return {v.begin() + shift, v.end()};
  }
  // For an output: false when something wrote the element before the tensor (still NaN).
  bool lead_untouched() const { return shift == 0 || std::isnan(mem.read()[0]); }
  static std::vector<float> lead(const std::vector<float>& x, int s) {
    std::vector<float> v(std::size_t(s), 0.0f);
    v.insert(v.end(), x.begin(), x.end());
    return v;
  }
};

std::vector<float> absolute(std::vector<float> v) {
  for (float& a : v) a = std::fabs(a);
  return v;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float a : v) m = std::max(m, double(std::fabs(a)));
  return m;
}

// got == want element by element (the value rounded to t: data movement is exact).
void check_exact(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  CAPTURE(what);
  REQUIRE(got.size() == want.size());
  std::size_t differ = 0, first = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(got[i] == want[i]) && differ++ == 0) first = i;
  if (differ) MESSAGE(what << ": first difference at " << first << ": got " << got[first] << ", want " << want[first]);
  CHECK(differ == 0);
}

struct Bound {
  double delta;           // the fp32 computations differ by <= delta * scale_i
  double fp32_rel = 0;    // fp32 only, when > 0: |err| <= fp32_rel * max(|ref|, fp32_floor * max |ref|)
  double fp32_floor = 0;
  double fp32_norm = 0;   // fp32 only, when > 0: ||err|| / ||ref|| <= fp32_norm
};

// |got - ref| <= u_t |ref| + delta * scale + f_t per element (see the top of the file), and the
// fp32 checks of `b`; no non-finite value.
void check_close(const std::string& what, DType t, const std::vector<float>& got, const std::vector<float>& ref,
                 const std::vector<float>& scale, const Bound& b) {
  CAPTURE(what);
  CAPTURE(type_name(t));
  REQUIRE(got.size() == ref.size());
  REQUIRE(scale.size() == ref.size());
  const double u = g::unit_roundoff(t), f = subnormal_floor(t), mref = max_abs(ref);
  std::size_t non_finite = 0, over = 0, first_over = 0;
  double worst = 0, max_err = 0, e2 = 0, r2 = 0, rel = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++non_finite;
      continue;
    }
    const double e = std::fabs(double(got[i]) - double(ref[i]));
    const double tol = u * std::fabs(double(ref[i])) + b.delta * double(scale[i]) + f;
    if (e > tol && over++ == 0) first_over = i;
    if (tol > 0) worst = std::max(worst, e / tol);
    max_err = std::max(max_err, e);
    e2 += e * e;
    r2 += double(ref[i]) * double(ref[i]);
    rel = std::max(rel, e / std::max(std::fabs(double(ref[i])), b.fp32_floor * mref));
  }
  const double norm = std::sqrt(e2 / std::max(r2, 1e-300));
  MESSAGE(what << " " << type_name(t) << ": max |err| " << max_err << " (max |ref| " << mref
               << "), worst err / bound " << worst << ", normwise " << norm);
  CHECK(non_finite == 0);
  if (over)
    MESSAGE("first element over the bound: " << first_over << ": got " << got[first_over] << ", ref " << ref[first_over]
                                             << ", scale " << scale[first_over]);
  CHECK(over == 0);
  if (t == DType::F32) {
    if (b.fp32_rel > 0) CHECK(rel <= b.fp32_rel);
    if (b.fp32_norm > 0) CHECK(norm <= b.fp32_norm);
  }
}

// ---- element-wise maps: y = f(a[, b]) for count elements, aligned (shift 0) and misaligned (1)

template <class Launch>
std::vector<float> run_map(DType t, int shift, const std::vector<float>& a, const std::vector<float>* b,
                           std::size_t count, Launch&& launch) {
  Shifted da(a, t, shift), dy(std::vector<float>(count, 0.0f), t, shift);
  Shifted db(b ? *b : std::vector<float>{}, t, shift);
  poison(dy.mem);
  launch(da.ptr(), b ? db.ptr() : nullptr, dy.ptr());
  g::sync();
  CHECK(da.mem.mem.guards_intact());
  CHECK(db.mem.mem.guards_intact());
  CHECK(dy.mem.mem.guards_intact());
  CHECK(dy.lead_untouched());
  return dy.read();
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("cuda kernels: layout transposes and the conversion to the element type are exact") {
    struct Shape {
      int n, c, hw;
    };
    for (DType t : kTypes)
      for (const Shape& s : {Shape{2, 128, 32 * 32}, Shape{2, 37, 45}, Shape{3, 3, 33 * 31}, Shape{1, 70, 1}}) {
        CAPTURE(type_name(t));
        CAPTURE(s.c);
        CAPTURE(s.hw);
        const std::size_t count = std::size_t(s.n) * s.c * s.hw;
        const std::vector<float> x = g::random_vector(count, 1 + s.c, -3.f, 3.f);  // NCHW fp32, not rounded
        g::DevTensor dx(x, DType::F32), dy(count, t), dz(count, DType::F32);
        poison(dy);
        poison(dz);
        cuda::nchw_f32_to_nhwc(static_cast<const float*>(dx.data()), dy.data(), t, s.n, s.c, s.hw, kStream);
        cuda::nhwc_to_nchw_f32(dy.data(), static_cast<float*>(dz.data()), t, s.n, s.c, s.hw, kStream);
        g::sync();
        check_exact("nchw_f32_to_nhwc", dy.read(), g::rounded(g::nchw_to_nhwc(x, s.n, s.c, s.hw), t));
        check_exact("round trip", dz.read(), g::rounded(x, t));
        CHECK(dx.mem.guards_intact());
        CHECK(dy.mem.guards_intact());
        CHECK(dz.mem.guards_intact());
      }

    for (DType t : kTypes)
      for (int shift : {0, 1}) {
        CAPTURE(type_name(t));
        CAPTURE(shift);
        const std::size_t count = 4099;  // not a multiple of any pack width
        const std::vector<float> x = g::random_vector(count, 5, -60000.f, 60000.f);  // fp16's range, all exponents
        Shifted dx(x, DType::F32, shift), dy(std::vector<float>(count, 0.f), t, shift);
        poison(dy.mem);
        cuda::convert_from_f32(static_cast<const float*>(dx.ptr()), dy.ptr(), t, count, kStream);
        g::sync();
        check_exact("convert_from_f32 " + type_name(t), dy.read(), g::rounded(x, t));
        CHECK(dx.mem.mem.guards_intact());
        CHECK(dy.mem.mem.guards_intact());
        CHECK(dy.lead_untouched());
      }

    // In place: a no-op for fp32, an error for the 2-byte types (the elements would overlap).
    const std::vector<float> x = g::random_vector(100, 6);
    g::DevTensor dx(x, DType::F32);
    cuda::convert_from_f32(static_cast<const float*>(dx.data()), dx.data(), DType::F32, x.size(), kStream);
    g::sync();
    check_exact("in place fp32", dx.read(), x);
    try {
      cuda::convert_from_f32(static_cast<const float*>(dx.data()), dx.data(), DType::F16, x.size(), kStream);
      FAIL_CHECK("no error for an in-place conversion to fp16");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::InvalidArgument);
    }
  }

  TEST_CASE("cuda kernels: silu, add and scale_shift match the CPU") {
    const std::size_t count = 2 * 8 * 8 * 96 + 5;  // packs and a tail
    for (DType t : kTypes)
      for (int shift : {0, 1}) {
        CAPTURE(shift);
        const std::vector<float> a = g::rounded(g::random_vector(count, 21, -8.f, 8.f), t);
        const std::vector<float> b = g::rounded(g::random_vector(count, 22, -8.f, 8.f), t);

        {  // silu: S = |ref|, delta = 16u
          std::vector<float> ref(count);
          cpu::silu(a.data(), count, ref.data());
          const auto got = run_map(t, shift, a, nullptr, count, [&](void* x, const void*, void* y) {
            cuda::silu(x, y, t, count, kStream);
          });
          check_close("silu", t, got, ref, absolute(ref), {16 * kU32});
        }
        for (float divisor : {1.0f, 1.41421356f}) {  // add: S = |ref|, delta = 8u
          std::vector<float> ref(count);
          cpu::add(a.data(), b.data(), count, divisor, ref.data());
          const auto got = run_map(t, shift, a, &b, count, [&](void* x, const void* y2, void* y) {
            cuda::add(x, y2, y, t, count, divisor, kStream);
          });
          check_close("add / " + std::to_string(divisor), t, got, ref, absolute(ref), {8 * kU32});
        }
        {  // scale_shift: S = |x scale| + |shift|, delta = 8u
          const float scale = 0.18215f, sh = -0.5f;
          std::vector<float> ref(count), s(count);
          cpu::scale_shift(a.data(), count, scale, sh, ref.data());
          for (std::size_t i = 0; i < count; ++i) s[i] = std::fabs(a[i] * scale) + std::fabs(sh);
          const auto got = run_map(t, shift, a, nullptr, count, [&](void* x, const void*, void* y) {
            cuda::scale_shift(x, y, t, count, scale, sh, kStream);
          });
          check_close("scale_shift", t, got, ref, s, {8 * kU32});
        }
      }
  }

  TEST_CASE("cuda kernels: add in place (y == a) matches the CPU") {
    const std::size_t count = 1000;
    for (DType t : kTypes) {
      const std::vector<float> a = g::rounded(g::random_vector(count, 31), t), b = g::rounded(g::random_vector(count, 32), t);
      std::vector<float> ref(count);
      cpu::add(a.data(), b.data(), count, 2.0f, ref.data());
      g::DevTensor da(a, t), db(b, t);
      cuda::add(da.data(), db.data(), da.data(), t, count, 2.0f, kStream);
      g::sync();
      check_close("add in place", t, da.read(), ref, absolute(ref), {8 * kU32});
      CHECK(da.mem.guards_intact());
    }
  }

  TEST_CASE("cuda kernels: add_broadcast (a (n, hw, c) + b (n, c)) matches the CPU") {
    const int n = 2, hw = 7 * 9;
    for (DType t : kTypes)
      for (int c : {96, 37})  // packs, and a channel count no pack divides
        for (float divisor : {1.0f, 1.41421356f}) {
          CAPTURE(c);
          const std::size_t count = std::size_t(n) * hw * c;
          const std::vector<float> a = g::rounded(g::random_vector(count, 41, -2.f, 2.f), t);  // NCHW
          const std::vector<float> b = g::rounded(g::random_vector(std::size_t(n) * c, 42, -2.f, 2.f), t);
          std::vector<float> ref(count);
          cpu::add_broadcast(a.data(), b.data(), n, c, hw, divisor, ref.data());
          g::DevTensor da(g::nchw_to_nhwc(a, n, c, hw), t), db(b, t), dy(count, t);
          poison(dy);
          cuda::add_broadcast(da.data(), db.data(), dy.data(), t, n, hw, c, divisor, kStream);
          g::sync();
          const auto got = g::nhwc_to_nchw(dy.read(), n, c, hw);
          check_close("add_broadcast c=" + std::to_string(c), t, got, ref, absolute(ref), {8 * kU32});
          CHECK(da.mem.guards_intact());
          CHECK(db.mem.guards_intact());
          CHECK(dy.mem.guards_intact());
        }
  }

  TEST_CASE("cuda kernels: concat_channels of 3 inputs (odd channel counts) is exact") {
    const int n = 2, hw = 6 * 5;
    for (DType t : kTypes)
      for (const std::vector<int>& cs : {std::vector<int>{5, 3, 7}, std::vector<int>{64, 128, 32}, std::vector<int>{8, 0, 9}}) {
        CAPTURE(cs[0]);
        std::vector<std::vector<float>> xs;  // NCHW, rounded
        std::vector<std::unique_ptr<g::DevTensor>> dxs;  // DevTensor is neither copyable nor movable
        std::vector<const float*> cpu_xs;
        std::vector<const void*> dev_xs;
        int c_total = 0;
        for (std::size_t j = 0; j < cs.size(); ++j) {
          xs.push_back(g::rounded(g::random_vector(std::size_t(n) * cs[j] * hw, 50 + std::uint32_t(j)), t));
          dxs.push_back(std::make_unique<g::DevTensor>(g::nchw_to_nhwc(xs.back(), n, cs[j], hw), t));
          c_total += cs[j];
        }
        for (std::size_t j = 0; j < cs.size(); ++j) {
          cpu_xs.push_back(xs[j].data());
          dev_xs.push_back(dxs[j]->data());
        }
        std::vector<float> ref(std::size_t(n) * c_total * hw);
        cpu::concat_channels(cpu_xs.data(), cs.data(), int(cs.size()), n, hw, ref.data());
        g::DevTensor dy(ref.size(), t);
        poison(dy);
        cuda::concat_channels(dev_xs.data(), cs.data(), int(cs.size()), dy.data(), t, n, hw, kStream);
        g::sync();
        check_exact("concat " + type_name(t), g::nhwc_to_nchw(dy.read(), n, c_total, hw), ref);
        CHECK(dy.mem.guards_intact());
        for (const auto& d : dxs) CHECK(d->mem.guards_intact());
      }
  }

  TEST_CASE("cuda kernels: upsample_nearest2x is exact and avg_pool2x matches the CPU") {
    const int n = 2;
    struct Shape {
      int h, w, c;
    };
    for (DType t : kTypes)
      for (const Shape& s : {Shape{6, 10, 33}, Shape{8, 8, 64}, Shape{16, 16, 128}}) {
        CAPTURE(type_name(t));
        CAPTURE(s.c);
        const int hw = s.h * s.w;
        const std::vector<float> x = g::rounded(g::random_vector(std::size_t(n) * s.c * hw, 60 + s.c, -4.f, 4.f), t);
        g::DevTensor dx(g::nchw_to_nhwc(x, n, s.c, hw), t);

        std::vector<float> up(x.size() * 4);
        cpu::upsample_nearest2x(x.data(), n, s.c, s.h, s.w, up.data());
        g::DevTensor dup(up.size(), t);
        poison(dup);
        cuda::upsample_nearest2x(dx.data(), dup.data(), t, n, s.h, s.w, s.c, kStream);

        const int ohw = (s.h / 2) * (s.w / 2);
        std::vector<float> pool(std::size_t(n) * s.c * ohw), pool_scale(pool.size());
        cpu::avg_pool2x(x.data(), n, s.c, s.h, s.w, pool.data());
        const std::vector<float> ax = absolute(x);
        cpu::avg_pool2x(ax.data(), n, s.c, s.h, s.w, pool_scale.data());  // the window's mean |x|
        g::DevTensor dpool(pool.size(), t);
        poison(dpool);
        cuda::avg_pool2x(dx.data(), dpool.data(), t, n, s.h, s.w, s.c, kStream);
        g::sync();

        check_exact("upsample_nearest2x", g::nhwc_to_nchw(dup.read(), n, s.c, 4 * hw), up);
        check_close("avg_pool2x", t, g::nhwc_to_nchw(dpool.read(), n, s.c, ohw), pool, pool_scale, {8 * kU32});
        CHECK(dx.mem.guards_intact());
        CHECK(dup.mem.guards_intact());
        CHECK(dpool.mem.guards_intact());
      }
  }

  TEST_CASE("cuda kernels: group_norm (+ SiLU) matches the CPU at U-Net shapes") {
    const int n = 2;
    const float eps = 1e-6f;
    struct Shape {
      int h, w, c, groups;
    };
    std::uint32_t seed = 70;
    for (DType t : kTypes)
      // The U-Net shapes; cpg 3 (no pack divides it); cpg 40 (1280 channels); groups of 8K and 64K
      // values (the kernel's 512- and 1024-thread blocks).
      for (const Shape& s : {Shape{32, 32, 128, 32}, Shape{16, 16, 256, 32}, Shape{5, 7, 96, 32}, Shape{8, 8, 1280, 32},
                             Shape{64, 64, 64, 32}, Shape{128, 128, 128, 32}})
        for (bool silu : {false, true}) {
          CAPTURE(s.c);
          CAPTURE(s.h);
          CAPTURE(silu);
          const int hw = s.h * s.w, cpg = s.c / s.groups;
          const std::size_t count = std::size_t(n) * s.c * hw, N = std::size_t(cpg) * hw;
          // Data with a non-zero mean (the two-pass variance must not cancel), NCHW, rounded.
          const std::vector<float> x = g::rounded(g::random_vector(count, ++seed, -0.5f, 1.5f), t);
          const std::vector<float> gamma = g::random_vector(std::size_t(s.c), ++seed, 0.5f, 1.5f);
          const std::vector<float> beta = g::random_vector(std::size_t(s.c), ++seed, -0.5f, 0.5f);
          std::vector<float> ref(count);
          cpu::group_norm(x.data(), n, s.c, hw, s.groups, eps, gamma.data(), beta.data(), silu, ref.data(), nullptr);

          // S = |gamma| (|x^| + mean|x| / sigma + 1) + |beta| (1.1 S + |ref| with SiLU), in double.
          std::vector<float> scale(count);
          for (int b = 0; b < n; ++b)
            for (int gi = 0; gi < s.groups; ++gi) {
              const std::size_t off = (std::size_t(b) * s.c + std::size_t(gi) * cpg) * hw;  // NCHW: contiguous
              double sum = 0, sum_abs = 0, sq = 0;
              for (std::size_t i = 0; i < N; ++i) {
                sum += x[off + i];
                sum_abs += std::fabs(x[off + i]);
              }
              const double mean = sum / double(N);
              for (std::size_t i = 0; i < N; ++i) sq += (x[off + i] - mean) * (x[off + i] - mean);
              const double sigma = std::sqrt(sq / double(N) + eps), a = sum_abs / double(N) / sigma;
              for (std::size_t i = 0; i < N; ++i) {
                const int ch = gi * cpg + int(i / std::size_t(hw));
                const double xh = (x[off + i] - mean) / sigma;
                double sc = std::fabs(gamma[ch]) * (std::fabs(xh) + a + 1) + std::fabs(beta[ch]);
                if (silu) sc = 1.1 * sc + std::fabs(ref[off + i]);
                scale[off + i] = float(sc);
              }
            }

          g::DevTensor dx(g::nchw_to_nhwc(x, n, s.c, hw), t), dy(count, t);
          g::DevBytes dgamma(gamma.size() * 4), dbeta(beta.size() * 4);
          dgamma.upload(gamma.data());
          dbeta.upload(beta.data());
          poison(dy);
          cuda::group_norm(dx.data(), dy.data(), t, n, hw, s.c, s.groups, eps, static_cast<const float*>(dgamma.data()),
                           static_cast<const float*>(dbeta.data()), silu, kStream);
          g::sync();
          const auto got = g::nhwc_to_nchw(dy.read(), n, s.c, hw);
          Bound bound{double(N + 16) * kU32};
          bound.fp32_rel = 1e-4;
          bound.fp32_floor = 0.1;
          check_close("group_norm " + std::to_string(s.h) + "x" + std::to_string(s.w) + "x" + std::to_string(s.c) +
                          (silu ? " + silu" : ""),
                      t, got, ref, scale, bound);
          CHECK(dx.mem.guards_intact());
          CHECK(dy.mem.guards_intact());
          CHECK(dgamma.guards_intact());
          CHECK(dbeta.guards_intact());
        }
  }

  TEST_CASE("cuda kernels: group_norm in place (y == x) equals the out-of-place result") {
    const int n = 2, hw = 16 * 16, c = 256, groups = 32;
    for (DType t : kTypes) {
      const std::vector<float> x = g::random_vector(std::size_t(n) * hw * c, 80);
      g::DevTensor a(x, t), b(x, t), y(x.size(), t);
      cuda::group_norm(a.data(), y.data(), t, n, hw, c, groups, 1e-5f, nullptr, nullptr, true, kStream);
      cuda::group_norm(b.data(), b.data(), t, n, hw, c, groups, 1e-5f, nullptr, nullptr, true, kStream);
      g::sync();
      check_exact("group_norm in place " + type_name(t), b.read(), y.read());
      CHECK(b.mem.guards_intact());
    }
  }

  TEST_CASE("cuda kernels: conv2d_direct matches the CPU conv2d (3x3 pad 1, stride 2 asymmetric padding, 1x1)") {
    struct Case {
      const char* name;
      cuda::ConvShape s;
      bool bias;
    };
    // ConvShape: n, h, w, cin, cout, kh, kw, stride_h, stride_w, pad_t, pad_b, pad_l, pad_r.
    const Case cases[] = {
        {"3x3 128->256 16x16 pad 1 + bias", {2, 16, 16, 128, 256, 3, 3, 1, 1, 1, 1, 1, 1}, true},
        {"3x3 stride 2 128->128 16x16 pad (0,1,0,1) + bias", {2, 16, 16, 128, 128, 3, 3, 2, 2, 0, 1, 0, 1}, true},
        {"1x1 128->256 16x16 + bias", {2, 16, 16, 128, 256, 1, 1, 1, 1, 0, 0, 0, 0}, true},
        {"3x3 strides (2,1) 5->67 13x11 pad (2,1,0,1), no bias", {1, 13, 11, 5, 67, 3, 3, 2, 1, 2, 1, 0, 1}, false},
    };
    std::uint32_t seed = 90;
    for (DType t : kTypes)
      for (const Case& c : cases) {
        CAPTURE(c.name);
        const cuda::ConvShape& s = c.s;
        const cpu::Conv2dShape cs{s.n, s.cin, s.h, s.w, s.cout, s.kh, s.kw, s.stride_h, s.stride_w,
                                  s.pad_t, s.pad_b, s.pad_l, s.pad_r};
        const int oh = s.out_h(), ow = s.out_w(), K = s.cin * s.kh * s.kw;
        REQUIRE(oh == cs.out_h());
        REQUIRE(ow == cs.out_w());
        const float ws = 1.f / std::sqrt(float(K));
        const std::vector<float> x = g::rounded(g::random_vector(std::size_t(s.n) * s.cin * s.h * s.w, ++seed), t);
        const std::vector<float> w = g::rounded(g::random_vector(std::size_t(s.cout) * K, ++seed, -ws, ws), t);  // OIHW
        const std::vector<float> bias = g::random_vector(std::size_t(s.cout), ++seed, -0.5f, 0.5f);

        const std::size_t out_count = std::size_t(s.n) * s.cout * oh * ow;
        std::vector<float> ref(out_count), scale(out_count);
        cpu::conv2d(cs, x.data(), w.data(), c.bias ? bias.data() : nullptr, ref.data(), nullptr);
        const std::vector<float> ax = absolute(x), aw = absolute(w), ab = absolute(bias);
        cpu::conv2d(cs, ax.data(), aw.data(), c.bias ? ab.data() : nullptr, scale.data(), nullptr);

        g::DevTensor dx(g::nchw_to_nhwc(x, s.n, s.cin, s.h * s.w), t);
        g::DevTensor dw(g::nchw_to_nhwc(w, s.cout, s.cin, s.kh * s.kw), t);  // (cout, cin, kh*kw) -> KRSC
        g::DevTensor dy(out_count, t);
        g::DevBytes dbias(bias.size() * 4);
        dbias.upload(bias.data());
        poison(dy);
        cuda::conv2d_direct(s, dx.data(), dw.data(), c.bias ? static_cast<const float*>(dbias.data()) : nullptr, dy.data(),
                            t, kStream);
        g::sync();
        Bound bound{double(K + 2) * 0x1p-23};
        bound.fp32_rel = 1e-4;
        bound.fp32_floor = 0.1;
        bound.fp32_norm = 1e-5;
        check_close(c.name, t, g::nhwc_to_nchw(dy.read(), s.n, s.cout, oh * ow), ref, scale, bound);
        CHECK(dx.mem.guards_intact());
        CHECK(dw.mem.guards_intact());
        CHECK(dy.mem.guards_intact());
        CHECK(dbias.guards_intact());
      }
  }

  TEST_CASE("cuda kernels: zero-sized launches are no-ops and do not error") {
    for (DType t : kTypes) {
      CAPTURE(type_name(t));
      g::DevTensor buf(std::vector<float>(64, 0.f), t);
      poison(buf);
      void* p = buf.data();
      const float* f = static_cast<const float*>(buf.data());
      const int c = 8;
      const void* xs[] = {p, p};
      const int cs[] = {c, c};
      CHECK_NOTHROW(cuda::silu(p, p, t, 0, kStream));
      CHECK_NOTHROW(cuda::silu(nullptr, nullptr, t, 0, kStream));
      CHECK_NOTHROW(cuda::add(p, p, p, t, 0, 1.0f, kStream));
      CHECK_NOTHROW(cuda::scale_shift(p, p, t, 0, 2.0f, 1.0f, kStream));
      CHECK_NOTHROW(cuda::convert_from_f32(f, p, t, 0, kStream));
      CHECK_NOTHROW(cuda::add_broadcast(p, p, p, t, 0, 4, c, 1.0f, kStream));
      CHECK_NOTHROW(cuda::add_broadcast(p, p, p, t, 2, 0, c, 1.0f, kStream));
      CHECK_NOTHROW(cuda::nchw_f32_to_nhwc(f, p, t, 0, c, 4, kStream));
      CHECK_NOTHROW(cuda::nhwc_to_nchw_f32(p, static_cast<float*>(p), t, 2, c, 0, kStream));
      CHECK_NOTHROW(cuda::concat_channels(xs, cs, 2, p, t, 0, 4, kStream));
      CHECK_NOTHROW(cuda::upsample_nearest2x(p, p, t, 0, 2, 2, c, kStream));
      CHECK_NOTHROW(cuda::avg_pool2x(p, p, t, 2, 0, 2, c, kStream));
      CHECK_NOTHROW(cuda::group_norm(p, p, t, 0, 4, c, 2, 1e-5f, nullptr, nullptr, true, kStream));
      CHECK_NOTHROW(cuda::conv2d_direct(cuda::ConvShape{0, 4, 4, c, c, 3, 3, 1, 1, 1, 1, 1, 1}, p, p, nullptr, p, t, kStream));
      g::sync();
      const bool no_error = cudaGetLastError() == cudaSuccess;
      CHECK(no_error);
      std::size_t written = 0;
      for (float v : buf.read()) written += !std::isnan(v);
      CHECK(written == 0);
      CHECK(buf.mem.guards_intact());
    }
  }

  TEST_CASE("cuda kernels: bad arguments are InvalidArgument errors") {
    g::DevTensor buf(std::vector<float>(64, 0.f), DType::F16);
    void* p = buf.data();
    auto expect_invalid = [](const char* what, auto&& call) {
      CAPTURE(what);
      try {
        call();
        FAIL_CHECK("no error");
      } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::InvalidArgument);
      }
    };
    const void* xs[cuda::kMaxConcat + 1] = {};
    int cs[cuda::kMaxConcat + 1] = {};
    for (auto& x : xs) x = p;
    for (int& c : cs) c = 1;
    expect_invalid("concat of 0 inputs", [&] { cuda::concat_channels(xs, cs, 0, p, DType::F16, 1, 1, kStream); });
    expect_invalid("concat of kMaxConcat + 1 inputs",
                   [&] { cuda::concat_channels(xs, cs, cuda::kMaxConcat + 1, p, DType::F16, 1, 1, kStream); });
    expect_invalid("group_norm with groups not dividing c",
                   [&] { cuda::group_norm(p, p, DType::F16, 1, 4, 6, 4, 1e-5f, nullptr, nullptr, false, kStream); });
    expect_invalid("avg_pool2x of an odd height", [&] { cuda::avg_pool2x(p, p, DType::F16, 1, 3, 2, 4, kStream); });
    expect_invalid("negative count", [&] { cuda::upsample_nearest2x(p, p, DType::F16, 1, -2, 2, 4, kStream); });
    expect_invalid("conv kernel larger than the padded input", [&] {
      cuda::conv2d_direct(cuda::ConvShape{1, 2, 2, 4, 4, 5, 5, 1, 1, 0, 0, 0, 0}, p, p, nullptr, p, DType::F16, kStream);
    });
    g::sync();
    CHECK(buf.mem.guards_intact());
  }
}
