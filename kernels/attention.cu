// Attention core, flash style: for each sample b, head h and query i,
//   o[b, i, h*D : (h+1)*D] = sum_j softmax_j(scale * q_i . k_j) v_j
// with an online softmax (a running max and sum per query, the accumulator rescaled whenever
// the max grows), so the tokens x tokens scores never reach global memory.
//
// Layout: q, k, v, o are row-major (n, tokens, ld) matrices of element type T (float, __half,
// __nv_bfloat16); head h is the column block [h*D, (h+1)*D). A fused qkv buffer is ld = 3*heads*D
// with the pointers offset by 0, heads*D, 2*heads*D. o must not overlap q, k or v (other blocks
// may still be reading them; the pointers are __restrict__).
//
// Launch shape: grid (ceil(tokens / kQueries), heads, n), block kWarps = 4 warps. Each warp owns
// kQueriesPerWarp queries (4 for D <= 128, 2 above), so a block owns kQueries = 16 or 8 query rows
// of one (sample, head). The head dimension is bucketed (DB = 32, 64, 128, 256, 512: the smallest
// >= D) so the per-lane register arrays have compile-time sizes; dims >= D are zero in registers
// and in shared memory. Lane `lane` owns the DB / 32 dims c*32*E + lane*E + e (E = the elements
// of one <= 16-byte shared load), so every shared-memory access of a warp is contiguous and free
// of bank conflicts.
//
// Per key tile of kKeys = 32 keys: the block stages K and V (32 x DB of T, raw, zero-filled past
// D and past the last token) in shared memory; every warp then, for its queries,
//   1. forms each lane's partial dot products (its dims) with the 32 keys and sums them across
//      the warp with a reduce-scatter butterfly (31 shuffles for 32 keys; lane j ends up with the
//      full dot product of key j), evaluated depth first so that only ~5 partials per query are
//      live at a time;
//   2. s_j = scale * dot (-inf for keys past the last token); m' = max(m, max_j s_j) (warp max);
//      alpha = expf(m - m'); p_j = expf(s_j - m'); l_lane = l_lane * alpha + p_j (each lane keeps
//      the sum of its own keys; one warp sum at the end); acc *= alpha;
//   3. writes p to a per-warp shared row and accumulates acc += p_j * v_j over the 32 keys (p read
//      back as float4 broadcasts, v rows read lane-contiguous from shared memory).
// At the end o = acc / sum_lanes(l), rounded once to T (round to nearest even).
//
// Shared memory per block (KiB): K and V tiles 2 * 32 * DB * sizeof(T), plus the p rows
// (kWarps * kQueriesPerWarp * 32 floats: 2 KiB for DB <= 128, 1 KiB above):
//   DB       32   64  128  256  512
//   fp32     10   18   34   65   65   (fp32 at 512: K and V take turns in one 64 KiB buffer,
//   16-bit    6   10   18   33   65    two more barriers per tile)
// Above 48 KiB the launcher opts in with cudaFuncSetAttribute (sm_80+ allow at least 99 KiB).
// Registers (ptxas, CUDA 13.0, sm_90 and sm_80): 80 for DB <= 128, 124-128 for 256, 167-168 for
// 512, no spills; __launch_bounds__ asks for 6 / 4 / 3 blocks per SM, which caps them there.
//
// Numerics: every element is loaded as fp32 and all products and sums are fp32 FMAs (no TF32, no
// tensor cores). The exponentials are expf (the accurate libdevice expf, not __expf) of
// max-subtracted scores, so every p is in [0, 1] (no overflow whatever the scores) and the final
// sum is >= 1 (the key holding the overall max contributes exp(0) = 1 and every later rescale is
// by exp(0)). The summation orders are fixed by the code (never by the launch or the batch), so
// the result is deterministic and a sample's output does not depend on the other samples of the
// batch. NaN or Inf inputs give NaN outputs for the affected queries.
//
// Where a tensor-core path would go: for 16-bit T, steps 1 and 3 are the two GEMMs of
// FlashAttention-2 (S = Q K^T over D, O += P V over the 32 keys); mma.sync m16n8k16 with fp32
// accumulation on ldmatrix-loaded tiles of ks / vs would replace the lane-partial dot products
// and the per-key FMAs, with the online softmax applied to the S fragments in registers. It is not
// implemented: it was written without a device to verify the fragment layouts on, and fp32 keeps
// this path anyway (no TF32).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <type_traits>

#include "cuda/check.hpp"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"

namespace ddim::cuda {
namespace {

constexpr int kKeys = 32;   // keys per shared-memory tile: one per lane after the reduce-scatter
constexpr int kWarps = 4;   // warps per block
constexpr int kThreads = kWarps * 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Compile-time shape of one (element type, head-dim bucket) instantiation.
template <class T, int DB>
struct Config {
  static constexpr int kPerLane = DB / 32;  // accumulator (and q) floats per lane per query
  static constexpr int kMaxVec = int(16 / sizeof(T));
  static constexpr int kVec = kPerLane < kMaxVec ? kPerLane : kMaxVec;  // elements per shared load
  static constexpr int kChunks = kPerLane / kVec;                      // shared loads per key row
  static constexpr int kQueriesPerWarp = DB <= 128 ? 4 : 2;
  // Blocks per SM that __launch_bounds__ asks registers for: caps ptxas at 85 / 128 / 170
  // registers, which these fit without spills (ptxas otherwise picks fewer and spills on sm_80).
  static constexpr int kMinBlocks = DB <= 128 ? 6 : DB == 256 ? 4 : 3;
  static constexpr int kQueries = kWarps * kQueriesPerWarp;  // query rows per block
  static constexpr std::size_t kTileBytes = std::size_t(kKeys) * DB * sizeof(T);
  static constexpr bool kSplitKV = 2 * kTileBytes > 64 * 1024;  // fp32 at 512: K and V take turns
  static constexpr std::size_t kPBytes = std::size_t(kWarps) * kQueriesPerWarp * kKeys * sizeof(float);
  static constexpr std::size_t kSmemBytes = (kSplitKV ? 1 : 2) * kTileBytes + kPBytes;
  static_assert(DB % 32 == 0 && kPerLane % kVec == 0, "bucket must be a multiple of 32");
  static_assert(DB * sizeof(T) % 16 == 0, "a shared row must hold whole 16-byte chunks");
};

struct Args {
  int tokens, head_dim;
  std::size_t ld_q, ld_k, ld_v, ld_o;  // row strides in elements
  float scale;
  bool vec;  // k and v rows allow 16-byte loads (pointers, ld and D*sizeof(T) multiples of 16)
};

// An unsigned type of `Bytes` bytes, for one vectorised shared-memory load.
template <int Bytes> struct RawVec;
template <> struct RawVec<2> { using type = unsigned short; };
template <> struct RawVec<4> { using type = unsigned int; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<16> { using type = uint4; };

// The bits of one element of T in a trivially copyable type, and their value as float.
template <class T> using Bits = std::conditional_t<sizeof(T) == 4, float, unsigned short>;
__device__ __forceinline__ float bits_f32(float b, float) { return b; }
__device__ __forceinline__ float bits_f32(unsigned short b, __half) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ float bits_f32(unsigned short b, __nv_bfloat16) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}

// out[e] = float(p[e]), e < E, with one E * sizeof(T)-byte load (p aligned to that size).
template <class T, int E>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[E]) {
  using R = typename RawVec<int(E * sizeof(T))>::type;
  const R raw = *reinterpret_cast<const R*>(p);
  Bits<T> b[E];
  memcpy(b, &raw, sizeof raw);
#pragma unroll
  for (int e = 0; e < E; ++e) out[e] = bits_f32(b[e], T{});
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, m));
  return x;
}

// Butterfly sum: every lane ends with the bitwise same value (a + b == b + a at each step).
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) x += __shfl_xor_sync(kFullMask, x, m);
  return x;
}

// Reduce-scatter of the lanes' partial dot products with 32 keys: afterwards lane L holds, per
// query, the sum over all 32 lanes of partial(key L). Level kBit combines two values whose keys
// differ in bit kBit: a lane keeps the one whose bit matches its own lane bit and sends the other
// to lane ^ (1 << kBit). Called as <0, 0>; the leaves (kBit == 5) evaluate partial(key) for the
// keys kLow, depth first, so only one value per level and query is live.
template <int kBit, int kLow, int Q, class Partial>
__device__ __forceinline__ void reduce_scatter(const Partial& partial, int lane, float (&out)[Q]) {
  if constexpr (kBit == 5) {
    partial(kLow, out);
  } else {
    float lo[Q], hi[Q];
    reduce_scatter<kBit + 1, kLow, Q>(partial, lane, lo);
    reduce_scatter<kBit + 1, kLow | (1 << kBit), Q>(partial, lane, hi);
    const bool upper = (lane >> kBit) & 1;
#pragma unroll
    for (int qq = 0; qq < Q; ++qq) {
      const float keep = upper ? hi[qq] : lo[qq], send = upper ? lo[qq] : hi[qq];
      out[qq] = keep + __shfl_xor_sync(kFullMask, send, 1 << kBit);
    }
  }
}

// dst (kKeys, DB) in shared memory <- rows t0 .. t0 + kKeys - 1, columns 0 .. DB - 1 of the head
// matrix src (tokens, ld); zero past the last token and past column hd. The whole block calls it.
template <class T, int DB>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, std::size_t ld, int t0,
                                          int tokens, int hd, bool vec) {
  if (vec) {
    constexpr int kVe = int(16 / sizeof(T)), kPerRow = DB / kVe;  // 16-byte chunks
#pragma unroll 4
    for (int idx = threadIdx.x; idx < kKeys * kPerRow; idx += kThreads) {
      const int r = idx / kPerRow, d = (idx % kPerRow) * kVe, key = t0 + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (key < tokens && d < hd) val = *reinterpret_cast<const uint4*>(src + std::size_t(key) * ld + d);
      *reinterpret_cast<uint4*>(dst + r * DB + d) = val;
    }
  } else {
    const T zero = from_f32<T>(0.f);
#pragma unroll 4
    for (int idx = threadIdx.x; idx < kKeys * DB; idx += kThreads) {
      const int r = idx / DB, d = idx % DB, key = t0 + r;
      dst[idx] = (key < tokens && d < hd) ? src[std::size_t(key) * ld + d] : zero;
    }
  }
}

// One block: kQueries query rows of sample blockIdx.z, head blockIdx.y (see the file comment).
// q, k, v: (n, tokens, ld_*) of T, o: (n, tokens, ld_o) of T.
template <class T, int DB>
__global__ void __launch_bounds__(kThreads, Config<T, DB>::kMinBlocks)
    attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                     Args a) {
  using C = Config<T, DB>;
  constexpr int Q = C::kQueriesPerWarp, NV = C::kPerLane, E = C::kVec, NC = C::kChunks;
  DDIM_DYNAMIC_SHARED(unsigned char, smem_raw);
  T* const ks = reinterpret_cast<T*>(smem_raw);                   // (kKeys, DB) keys
  T* const vs = C::kSplitKV ? ks : ks + std::size_t(kKeys) * DB;  // (kKeys, DB) values
  float* const pbuf = reinterpret_cast<float*>(smem_raw + (C::kSplitKV ? 1 : 2) * C::kTileBytes);

  const int lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5;
  float* const pw = pbuf + warp * Q * kKeys;  // this warp's (Q, kKeys) probabilities
  const std::size_t row0 = std::size_t(blockIdx.z) * std::size_t(a.tokens);  // sample's first row
  const std::size_t col0 = std::size_t(blockIdx.y) * std::size_t(a.head_dim);
  const T* const kh = k + row0 * a.ld_k + col0;
  const T* const vh = v + row0 * a.ld_v + col0;
  const int first = int(blockIdx.x) * C::kQueries + warp * Q;  // this warp's first query

  // The lane's dims: c * 32 * E + lane * E + e, held at index c * E + e.
  float qr[Q][NV], acc[Q][NV], m[Q], l[Q];
#pragma unroll
  for (int qq = 0; qq < Q; ++qq) {
    const int i = first + qq;
    const T* qrow = q + (row0 + std::size_t(i < a.tokens ? i : 0)) * a.ld_q + col0;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int d = c * 32 * E + lane * E + e;
        qr[qq][c * E + e] = (i < a.tokens && d < a.head_dim) ? to_f32(qrow[d]) : 0.f;
        acc[qq][c * E + e] = 0.f;
      }
    m[qq] = -std::numeric_limits<float>::infinity();
    l[qq] = 0.f;
  }

  // partial(key, out): out[qq] = this lane's part of q_qq . k_key (shared-memory key row).
  const T* const klane = ks + lane * E;
  const auto partial = [&](int key, float (&out)[Q]) {
#pragma unroll
    for (int qq = 0; qq < Q; ++qq) out[qq] = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      float kv[E];
      load_f32<T, E>(klane + key * DB + c * 32 * E, kv);
#pragma unroll
      for (int e = 0; e < E; ++e)
#pragma unroll
        for (int qq = 0; qq < Q; ++qq) out[qq] = fmaf(qr[qq][c * E + e], kv[e], out[qq]);
    }
  };

  for (int t0 = 0; t0 < a.tokens; t0 += kKeys) {
    __syncthreads();  // every warp is done with the previous tile (ks, vs and its p row)
    load_tile<T, DB>(ks, kh, a.ld_k, t0, a.tokens, a.head_dim, a.vec);
    if constexpr (!C::kSplitKV) load_tile<T, DB>(vs, vh, a.ld_v, t0, a.tokens, a.head_dim, a.vec);
    __syncthreads();

    float s[Q];
    reduce_scatter<0, 0, Q>(partial, lane, s);  // s[qq] = q_qq . k_(t0 + lane)
    const bool key_ok = t0 + lane < a.tokens;
#pragma unroll
    for (int qq = 0; qq < Q; ++qq) {
      const float sc = key_ok ? __fmul_rn(s[qq], a.scale) : -std::numeric_limits<float>::infinity();
      const float m_new = fmaxf(m[qq], warp_max(sc));  // finite: key t0 (lane 0) is valid
      const float alpha = expf(m[qq] - m_new);         // 0 on the first tile (m = -inf)
      const float p = expf(sc - m_new);                // 0 past the last token
      l[qq] = fmaf(l[qq], alpha, p);
      m[qq] = m_new;
#pragma unroll
      for (int x = 0; x < NV; ++x) acc[qq][x] *= alpha;
      pw[qq * kKeys + lane] = p;
    }
    __syncwarp();  // the warp's p rows are visible to all its lanes

    if constexpr (C::kSplitKV) {
      __syncthreads();  // every warp is done with the keys
      load_tile<T, DB>(vs, vh, a.ld_v, t0, a.tokens, a.head_dim, a.vec);
      __syncthreads();
    }

    const T* const vlane = vs + lane * E;
#pragma unroll 4
    for (int j = 0; j < kKeys; j += 4) {
      float p4[Q][4];
#pragma unroll
      for (int qq = 0; qq < Q; ++qq) {
        const float4 t = *reinterpret_cast<const float4*>(pw + qq * kKeys + j);  // broadcast
        p4[qq][0] = t.x;
        p4[qq][1] = t.y;
        p4[qq][2] = t.z;
        p4[qq][3] = t.w;
      }
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          float vv[E];
          load_f32<T, E>(vlane + (j + jj) * DB + c * 32 * E, vv);
#pragma unroll
          for (int e = 0; e < E; ++e)
#pragma unroll
            for (int qq = 0; qq < Q; ++qq) acc[qq][c * E + e] = fmaf(p4[qq][jj], vv[e], acc[qq][c * E + e]);
        }
    }
  }

#pragma unroll
  for (int qq = 0; qq < Q; ++qq) {
    const float sum = warp_sum(l[qq]);  // >= 1: the max key contributes exp(0)
    const int i = first + qq;
    if (i >= a.tokens) continue;
    T* const orow = o + (row0 + std::size_t(i)) * a.ld_o + col0;
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int d = c * 32 * E + lane * E + e;
        if (d < a.head_dim) orow[d] = from_f32<T>(acc[qq][c * E + e] / sum);
      }
  }
}

// ---- launcher

[[noreturn]] void invalid(const std::string& what) {
  throw Error(ErrorCode::InvalidArgument, "cuda attention: " + what);
}

bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Checks the shape and pointers; false when there is nothing to do (n == 0).
bool validate(const AttentionShape& s, const void* q, const void* k, const void* v, const void* o, DType t) {
  if (s.n < 0) invalid("n must be >= 0 (got " + std::to_string(s.n) + ")");
  if (s.tokens < 1 || s.tokens > (1 << 30))  // the kernel's int token indices run up to tokens + 31
    invalid("tokens must be in [1, 2^30] (got " + std::to_string(s.tokens) + ")");
  if (s.heads < 1) invalid("heads must be >= 1 (got " + std::to_string(s.heads) + ")");
  if (s.head_dim < 1 || s.head_dim > kMaxHeadDim)
    invalid("head_dim must be in [1, " + std::to_string(kMaxHeadDim) + "] (got " + std::to_string(s.head_dim) + ")");
  if (s.n > 65535 || s.heads > 65535)
    invalid("n and heads must be <= 65535 (got n=" + std::to_string(s.n) + " heads=" + std::to_string(s.heads) + ")");
  const long long width = static_cast<long long>(s.heads) * s.head_dim;
  const struct { const char* name; int ld; } lds[] = {{"ld_q", s.ld_q}, {"ld_k", s.ld_k}, {"ld_v", s.ld_v}, {"ld_o", s.ld_o}};
  for (const auto& x : lds)
    if (x.ld < width)
      invalid(std::string(x.name) + " (" + std::to_string(x.ld) + ") is smaller than heads * head_dim (" +
              std::to_string(width) + ")");
  if (!std::isfinite(s.scale)) invalid("scale is not finite");
  if (s.n == 0) return false;
  const std::size_t es = dtype_size(t);
  const struct { const char* name; const void* p; } ptrs[] = {{"q", q}, {"k", k}, {"v", v}, {"o", o}};
  for (const auto& x : ptrs) {
    if (!x.p) invalid(std::string(x.name) + " is null");
    if (!aligned(x.p, es)) invalid(std::string(x.name) + " is not aligned to its element size");
  }
  return true;
}

template <class T, int DB>
void launch(const AttentionShape& s, const void* q, const void* k, const void* v, void* o, cudaStream_t stream) {
  using C = Config<T, DB>;
  constexpr std::size_t es = sizeof(T);
  Args a{};
  a.tokens = s.tokens;
  a.head_dim = s.head_dim;
  a.ld_q = std::size_t(s.ld_q);
  a.ld_k = std::size_t(s.ld_k);
  a.ld_v = std::size_t(s.ld_v);
  a.ld_o = std::size_t(s.ld_o);
  a.scale = s.scale;
  a.vec = aligned(k, 16) && aligned(v, 16) && (a.ld_k * es) % 16 == 0 && (a.ld_v * es) % 16 == 0 &&
          (std::size_t(s.head_dim) * es) % 16 == 0;

  constexpr auto kernel = attention_kernel<T, DB>;
  constexpr std::size_t smem = C::kSmemBytes;
  if constexpr (smem > 48 * 1024) {
    // The opt-in above 48 KiB, once per device (not per launch: a device query and an attribute
    // write on every attention of every step would be host work inside the step).
    int device = 0;
    DDIM_CUDA_CHECK(cudaGetDevice(&device));
    static std::mutex mutex;
    static std::set<int> ready;  // devices whose attribute is set
    const std::lock_guard<std::mutex> lock(mutex);
    if (!ready.count(device)) {
      int optin = 0;
      DDIM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      if (std::size_t(optin) < smem)
        throw Error(ErrorCode::Unsupported, "cuda attention: head_dim " + std::to_string(s.head_dim) + " needs " +
                                                std::to_string(smem) + " bytes of shared memory per block; the device allows " +
                                                std::to_string(optin));
      DDIM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      ready.insert(device);
    }
  }
  const dim3 grid(unsigned((s.tokens + C::kQueries - 1) / C::kQueries), unsigned(s.heads), unsigned(s.n));
  DDIM_LAUNCH(grid, kThreads, smem, stream, kernel)(static_cast<const T*>(q), static_cast<const T*>(k),
                                           static_cast<const T*>(v), static_cast<T*>(o), a);
  check_launch("attention");
}

}  // namespace

void attention(const AttentionShape& s, const void* q, const void* k, const void* v, void* o, DType t,
               cudaStream_t stream) {
  if (!validate(s, q, k, v, o, t)) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    if (s.head_dim <= 32) launch<T, 32>(s, q, k, v, o, stream);
    else if (s.head_dim <= 64) launch<T, 64>(s, q, k, v, o, stream);
    else if (s.head_dim <= 128) launch<T, 128>(s, q, k, v, o, stream);
    else if (s.head_dim <= 256) launch<T, 256>(s, q, k, v, o, stream);
    else launch<T, 512>(s, q, k, v, o, stream);
  });
}

}  // namespace ddim::cuda
