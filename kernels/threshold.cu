// Dynamic thresholding (engine/cuda/threshold.hpp): per sample b, over its E values,
//   s = clamp(quantile(|x0|, ratio), 1, max_value)
// bitwise equal to the host's ddim::dynamic_threshold (engine/schedule/ddim_step.cpp).
//
// The host sorts a = |double(x0)| and interpolates a[below] and a[above] (below =
// floor(ratio (E - 1)), above = min(below + 1, E - 1), weight w = ratio (E - 1) - below) with
// torch.lerp's two-sided formula. The launcher computes below, above, w and 1 - w with the host's
// own expressions (in double, on the host), so only the two order statistics come from the device.
//
// Order statistics by radix select. |x| of a float is exact in float, and non-negative floats
// (+0 ... subnormals ... normals ... +inf, then the NaNs) order like their bit patterns as uint32,
// so the k-th smallest |x0| is the k-th smallest u = bits(x) & 0x7fffffff (clearing the sign maps
// -0 to +0, which equals the host's fabs(-0.0) = +0.0; the double the host sorts is the same value
// widened, which widen() reproduces exactly with integer operations). Four
// passes of 8 bits, most significant first. Pass p histograms digit p of the candidates, the
// values whose higher digits equal the prefix found so far, then one block per sample scans the
// 256 bins and takes the digit whose bin holds the remaining rank. Two targets (ranks below and
// above) are selected in the same passes; while their prefixes agree (always in pass 0, usually
// all the way) they share the candidate set and one histogram.
//
// Kernels, in stream order, for p = 0..3:
//   histogram (grid (chunks, n), 256 threads): each block counts its chunk of a sample in shared
//     memory (shared atomics), then adds its non-zero bins to the sample's global histogram
//     (global atomics). Counts are integers, so the sums do not depend on the launch shape or on
//     the order of the atomics: the result is deterministic.
//   select (grid n, 256 threads): thread t owns bin t; an inclusive scan of the bins finds the one
//     digit d with (count below d) <= rank < (count up to d); the prefix gains d, the rank drops
//     by the count below d. The block zeroes the histograms for the next pass and stores the
//     state. After pass 3 the prefixes are the full bit patterns of a[below] and a[above], and
//     thread 0 evaluates the host's expression.
// A memset of the whole scratch first zeroes the histograms and the NaN flags, so every call
// starts from a clean scratch (the histograms are also left zeroed after each select).
//
// Scratch per sample (uint32 words): [0, 256) histogram of target 0 (below), [256, 512) of
// target 1 (above, used only while its prefix differs), then 8 words of state: prefix 0, prefix 1,
// rank 0, rank 1, NaN flag, 3 unused. 520 words = 2080 bytes.
//
// The final expression (host: q = w < 0.5 ? lo + w (hi - lo) : hi - (hi - lo) (1 - w); then
// std::min(std::max(q, 1.0), max_value) rounded to float) uses __dadd_rn / __dsub_rn / __dmul_rn
// so nvcc cannot contract it into an FMA, and the conditional forms of std::max / std::min (which
// keep q when q is NaN, and q when max_value is NaN).
//
// NaN: the first pass flags any |x| with bits above +inf; a flagged sample's threshold is the
// quiet NaN 0x7fc00000, the host's std::numeric_limits<float>::quiet_NaN(). A NaN produced by the
// arithmetic (infinite order statistics) is returned as the same quiet NaN.
//
// Cost: 4 reads of x0 (n E floats each) plus 2 small kernels per pass. Ties (many equal values)
// only serialise the shared atomics of the bins they hit.
#include <cstddef>
#include <cstdint>
#include <string>

#include "cuda/check.hpp"
#include "cuda/threshold.hpp"
#include "kernels/launch.cuh"
#include "ddim/error.hpp"

namespace ddim::cuda {
namespace {

constexpr int kThreads = 256;  // == kBins: the select kernel's thread t owns bin t
constexpr int kBins = 256;
constexpr int kPasses = 4;
constexpr int kItemsPerThread = 16;  // per histogram block: 4096 values
constexpr unsigned kMaxChunks = 1024;
constexpr std::uint32_t kQuietNaN = 0x7fc00000u;
constexpr std::uint32_t kInfBits = 0x7f800000u;

// Scratch layout per sample, in uint32 words.
constexpr int kHist0 = 0;
constexpr int kHist1 = kBins;
constexpr int kState = 2 * kBins;
constexpr int kPrefix0 = kState + 0;
constexpr int kPrefix1 = kState + 1;
constexpr int kRank0 = kState + 2;
constexpr int kRank1 = kState + 3;
constexpr int kNanFlag = kState + 4;
constexpr int kWordsPerSample = kState + 8;

static_assert(kThreads == kBins, "select kernel: one thread per bin");

__device__ __forceinline__ int pass_shift(int pass) { return 24 - 8 * pass; }
// The bits above digit `pass` (the prefix decided by the earlier passes).
__device__ __forceinline__ std::uint32_t high_mask(int pass) {
  return pass == 0 ? 0u : ~0u << (pass_shift(pass) + 8);
}

// double(float) of the bit pattern u of a non-negative, non-NaN float, exactly, by integer
// operations: cvt.f64.f32 would flush subnormals to 0 if the file were ever built with -ftz=true.
__device__ __forceinline__ double widen(std::uint32_t u) {
  const std::uint32_t e = u >> 23, m = u & 0x7fffffu;
  if (e == 0u) return __dmul_rn(__uint2double_rn(m), 0x1p-149);  // zero or subnormal: m 2^-149, exact
  if (e == 255u) return __longlong_as_double(0x7ff0000000000000ll);  // +inf
  return __longlong_as_double(static_cast<long long>(e + (1023u - 127u)) << 52 | static_cast<long long>(m) << 29);
}

__global__ void __launch_bounds__(kThreads)
    threshold_histogram_kernel(const float* __restrict__ x0, unsigned E, std::uint32_t* __restrict__ scratch,
                               int pass) {
  __shared__ std::uint32_t hist[2 * kBins];
  __shared__ std::uint32_t nan_seen;
  const unsigned b = blockIdx.y;
  std::uint32_t* s = scratch + std::size_t(b) * kWordsPerSample;
  for (int i = int(threadIdx.x); i < 2 * kBins; i += int(blockDim.x)) hist[i] = 0u;
  if (threadIdx.x == 0) nan_seen = 0u;
  // Written by the previous select kernel (stream order); pass 0 has no prefix yet.
  const std::uint32_t p0 = pass == 0 ? 0u : s[kPrefix0];
  const std::uint32_t p1 = pass == 0 ? 0u : s[kPrefix1];
  const bool split = p0 != p1;
  const int shift = pass_shift(pass);
  const std::uint32_t mask = high_mask(pass);
  __syncthreads();

  const float* x = x0 + std::size_t(b) * E;
  std::uint32_t nan_local = 0u;
  const std::size_t stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < E; i += stride) {
    const std::uint32_t u = __float_as_uint(x[i]) & 0x7fffffffu;  // |x| (-0 -> +0), immune to -ftz
    nan_local |= u > kInfBits ? 1u : 0u;
    const std::uint32_t digit = (u >> shift) & 0xFFu;
    const std::uint32_t high = u & mask;
    if (high == p0) atomicAdd(&hist[digit], 1u);
    if (split && high == p1) atomicAdd(&hist[kBins + digit], 1u);
  }
  if (pass == 0 && nan_local != 0u) atomicOr(&nan_seen, 1u);
  __syncthreads();

  for (int i = int(threadIdx.x); i < 2 * kBins; i += int(blockDim.x)) {
    const std::uint32_t c = hist[i];
    if (c != 0u) atomicAdd(&s[kHist0 + i], c);
  }
  if (threadIdx.x == 0 && nan_seen != 0u) atomicOr(&s[kNanFlag], 1u);
}

// rank0 / rank1: the host's `below` and `above` (pass 0 only; later passes read the state).
// w, one_minus_w: the host's w and 1.0 - w.
__global__ void __launch_bounds__(kThreads)
    threshold_select_kernel(std::uint32_t* __restrict__ scratch, int pass, std::uint32_t rank0, std::uint32_t rank1,
                            double w, double one_minus_w, double max_value, float* __restrict__ thresholds) {
  __shared__ std::uint32_t scan[2 * kBins];
  __shared__ std::uint32_t found_prefix[2], found_rank[2];
  const unsigned b = blockIdx.x;
  const int t = int(threadIdx.x);
  std::uint32_t* s = scratch + std::size_t(b) * kWordsPerSample;
  std::uint32_t prefix[2], rank[2];
  if (pass == 0) {
    prefix[0] = prefix[1] = 0u;
    rank[0] = rank0;
    rank[1] = rank1;
  } else {
    prefix[0] = s[kPrefix0];
    prefix[1] = s[kPrefix1];
    rank[0] = s[kRank0];
    rank[1] = s[kRank1];
  }
  const bool split = prefix[0] != prefix[1];
  // Thread t reads and then zeroes only its own bins: no hazard between threads.
  const std::uint32_t c0 = s[kHist0 + t];
  const std::uint32_t c1 = split ? s[kHist1 + t] : c0;
  s[kHist0 + t] = 0u;
  s[kHist1 + t] = 0u;
  scan[t] = c0;
  scan[kBins + t] = c1;
  if (t == 0) {  // overwritten below by the one thread whose bin holds the rank
    found_prefix[0] = prefix[0];
    found_prefix[1] = prefix[1];
    found_rank[0] = rank[0];
    found_rank[1] = rank[1];
  }
  __syncthreads();
  // Inclusive scan (Hillis-Steele) of both histograms.
  for (int off = 1; off < kBins; off *= 2) {
    const std::uint32_t a0 = t >= off ? scan[t - off] : 0u;
    const std::uint32_t a1 = t >= off ? scan[kBins + t - off] : 0u;
    __syncthreads();
    scan[t] += a0;
    scan[kBins + t] += a1;
    __syncthreads();
  }
  const int shift = 24 - 8 * pass;
  for (int k = 0; k < 2; ++k) {
    const std::uint32_t inclusive = scan[k * kBins + t];
    const std::uint32_t exclusive = inclusive - (k == 0 ? c0 : c1);
    if (exclusive <= rank[k] && rank[k] < inclusive) {
      found_prefix[k] = prefix[k] | (std::uint32_t(t) << shift);
      found_rank[k] = rank[k] - exclusive;
    }
  }
  __syncthreads();
  if (t != 0) return;
  s[kPrefix0] = found_prefix[0];
  s[kPrefix1] = found_prefix[1];
  s[kRank0] = found_rank[0];
  s[kRank1] = found_rank[1];
  if (pass != kPasses - 1) return;

  float r = __uint_as_float(kQuietNaN);
  if (s[kNanFlag] == 0u) {
    const double lo = widen(found_prefix[0]);
    const double hi = widen(found_prefix[1]);
    const double d = __dsub_rn(hi, lo);
    const double q = w < 0.5 ? __dadd_rn(lo, __dmul_rn(w, d)) : __dsub_rn(hi, __dmul_rn(d, one_minus_w));
    const double at_least_1 = q < 1.0 ? 1.0 : q;                               // std::max(q, 1.0)
    const double clamped = max_value < at_least_1 ? max_value : at_least_1;  // std::min(., max_value)
    const float f = __double2float_rn(clamped);
    if (!(f != f)) r = f;
  }
  thresholds[b] = r;
}

[[noreturn]] void invalid(const std::string& what) {
  throw Error(ErrorCode::InvalidArgument, "cuda dynamic_thresholds: " + what);
}

}  // namespace

std::size_t dynamic_threshold_scratch_bytes(int n, std::size_t /*E*/) {
  return n <= 0 ? 0 : std::size_t(n) * kWordsPerSample * sizeof(std::uint32_t);
}

void dynamic_thresholds(const float* x0, int n, std::size_t E, double ratio, double max_value, float* thresholds,
                        void* scratch, std::size_t scratch_bytes, cudaStream_t stream) {
  // The host function's checks first, in its order.
  if (E == 0) invalid("dynamic thresholding of an empty sample");
  if (!(ratio > 0.0 && ratio <= 1.0)) invalid("dynamic_thresholding_ratio must be in (0, 1]");
  if (n < 0) invalid("negative sample count " + std::to_string(n));
  if (n > 65535) invalid("more than 65535 samples (" + std::to_string(n) + ")");
  if (E > 0xffffffffull) invalid("more than 2^32 - 1 values per sample (" + std::to_string(E) + ")");
  if (n == 0) return;
  if (x0 == nullptr || thresholds == nullptr || scratch == nullptr) invalid("null pointer");
  const std::size_t need = dynamic_threshold_scratch_bytes(n, E);
  if (scratch_bytes < need)
    invalid("scratch of " + std::to_string(scratch_bytes) + " bytes, " + std::to_string(need) + " needed");
  if (reinterpret_cast<std::uintptr_t>(scratch) % alignof(std::uint32_t) != 0) invalid("scratch not 4-byte aligned");

  // The host's expressions (ddim_step.cpp), evaluated here identically.
  const double rank = ratio * static_cast<double>(E - 1);
  const std::size_t below = static_cast<std::size_t>(rank);
  const std::size_t above = below + 1 < E - 1 ? below + 1 : E - 1;  // std::min(below + 1, E - 1)
  const double w = rank - static_cast<double>(below);
  const double one_minus_w = 1.0 - w;

  auto* words = static_cast<std::uint32_t*>(scratch);
  DDIM_CUDA_CHECK(cudaMemsetAsync(scratch, 0, need, stream));
  const std::size_t per_block = std::size_t(kThreads) * kItemsPerThread;
  const std::size_t chunks = (E + per_block - 1) / per_block;
  const dim3 hist_grid(static_cast<unsigned>(chunks < kMaxChunks ? chunks : kMaxChunks), static_cast<unsigned>(n));
  for (int pass = 0; pass < kPasses; ++pass) {
    DDIM_LAUNCH(hist_grid, kThreads, 0, stream, threshold_histogram_kernel)(x0, static_cast<unsigned>(E), words, pass);
    check_launch("dynamic_thresholds (histogram)");
    DDIM_LAUNCH(static_cast<unsigned>(n), kThreads, 0, stream, threshold_select_kernel)(
        words, pass, static_cast<std::uint32_t>(below), static_cast<std::uint32_t>(above), w, one_minus_w, max_value,
        thresholds);
    check_launch("dynamic_thresholds (select)");
  }
}

void load_threshold_kernels() {
  cudaFuncAttributes attr{};
  DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, threshold_histogram_kernel));
  DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, threshold_select_kernel));
}

}  // namespace ddim::cuda
