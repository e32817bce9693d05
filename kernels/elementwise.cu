// Element-wise and data-movement kernels of the CUDA backend, and the host's boundary with it.
//
// Layout: activations are NHWC, (n, hw, c) with c innermost; the host side is NCHW fp32.
// Element type T is float, __half or __nv_bfloat16 (DType, dispatched at run time). Every value
// is loaded as fp32, computed in fp32 and stored rounded to nearest even (kernels/dtype.cuh), so
// an op rounds once to T. The fp32 arithmetic is written with explicitly rounded operations
// (__fadd_rn, __fmul_rn, IEEE division) in the CPU twin's order (engine/cpu/elementwise.cpp), so
// add, add_broadcast, scale_shift and avg_pool2x give the CPU's fp32 result bitwise before the
// final rounding; SiLU is x / (1 + expf(-x)) as the CPU computes it (CUDA's expf is within 2 ulp,
// so SiLU agrees to a few fp32 ulp, not bitwise).
//
// Launch shapes:
//   * element-wise maps (convert, silu, add, add_broadcast, scale_shift): 256 threads, a 1-D
//     grid-stride loop over packs of V elements (one <= 16-byte load / store per operand; V = 1
//     when a pointer is not aligned, or for add_broadcast when c is not a multiple of V), then the
//     count % V tail element by element. Indices are size_t (tensors may exceed 2^31 elements).
//   * data movement (upsample_nearest2x, avg_pool2x, concat_channels): 256 threads, a grid-stride
//     loop over packs of V channels of the output (V divides every channel count involved).
//   * layout transposes (NCHW fp32 <-> NHWC T): 32 x 8 threads per 32 x 32 tile through shared
//     memory (33 floats a row, so the column reads are free of bank conflicts): a warp reads 32
//     consecutive elements of the source and writes 32 consecutive elements of the destination.
//     grid (hw tiles, channel tiles, batch); the channel and batch dimensions loop in the kernel
//     past 65535.
// A zero element count launches nothing. Nothing here allocates or synchronises.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda/check.hpp"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"

namespace ddim::cuda {

std::size_t dtype_size(DType t) noexcept { return t == DType::F32 ? 4 : 2; }

const char* to_string(DType t) noexcept {
  switch (t) {
    case DType::F32: return "fp32";
    case DType::F16: return "fp16";
    case DType::BF16: return "bf16";
  }
  return "unknown";
}

namespace {

constexpr unsigned kThreads = 256;
constexpr int kTile = 32;      // transpose tile: 32 x 32 elements
constexpr int kTileRows = 8;   // transpose block: 32 x 8 threads, 4 rows each

// V consecutive elements of T, moved as one aligned access (V * sizeof(T) <= 16 bytes).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ std::size_t thread_index() { return blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ std::size_t grid_stride() { return std::size_t(gridDim.x) * blockDim.x; }

// ---- host-side helpers

[[noreturn]] void invalid(const char* op, const std::string& what) {
  throw Error(ErrorCode::InvalidArgument, std::string("cuda ") + op + ": " + what);
}

void require_non_negative(const char* op, std::initializer_list<std::pair<const char*, long long>> dims) {
  for (const auto& [name, v] : dims)
    if (v < 0) invalid(op, std::string(name) + " must be >= 0 (got " + std::to_string(v) + ")");
}

void require_pointers(const char* op, std::initializer_list<std::pair<const char*, const void*>> ptrs) {
  for (const auto& [name, p] : ptrs)
    if (!p) invalid(op, std::string(name) + " is null");
}

bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// The widest pack V (a power of two, V * elem <= 16 bytes) such that every pointer is aligned to
// V of its elements and `multiple_of` (0: no constraint) is a multiple of V.
int pick_vec(std::size_t elem, std::size_t multiple_of, std::initializer_list<std::pair<const void*, std::size_t>> ptrs) {
  int v = int(16 / elem);
  for (; v > 1; v /= 2) {
    bool ok = multiple_of % std::size_t(v) == 0;
    for (const auto& [p, size] : ptrs) ok = ok && (!p || aligned(p, size * std::size_t(v)));
    if (ok) break;
  }
  return v;
}

// Calls f(std::integral_constant<int, V>{}) for the pack width v (1, 2, 4, or 8 when T is 16-bit).
template <class T, class F>
void with_vec(int v, F&& f) {
  if constexpr (sizeof(T) <= 2) {
    if (v == 8) return f(std::integral_constant<int, 8>{});
  }
  if (v == 4) return f(std::integral_constant<int, 4>{});
  if (v == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

std::size_t ceil_div(std::size_t a, std::size_t b) { return (a + b - 1) / b; }

// ---- element-wise maps: y[i] = f(a[i], b[index(i)]) (b may be null: f sees 0)

struct SameIndex {
  __device__ std::size_t operator()(std::size_t i) const { return i; }
};
// b (n, c) broadcast over the hw pixels of (n, hw, c): element i reads b[sample * c + channel].
struct BroadcastIndex {
  std::size_t c, per_sample;  // per_sample = hw * c
  __device__ std::size_t operator()(std::size_t i) const { return (i / per_sample) * c + i % c; }
};

struct IdentityOp {
  __device__ float operator()(float a, float) const { return a; }
};
// SiLU exactly as the CPU writes it: x / (1 + exp(-x)) in fp32 (no multiply: nothing to contract).
struct SiluOp {
  __device__ float operator()(float x, float) const { return x / (1.0f + expf(-x)); }
};
// (a + b) / divisor, each operation rounded (division by 1 is exact: no special case needed).
struct AddOp {
  float divisor;
  __device__ float operator()(float a, float b) const { return __fdiv_rn(__fadd_rn(a, b), divisor); }
};
// x * scale + shift, the product rounded before the sum (the CPU is built without contraction).
struct ScaleShiftOp {
  float scale, shift;
  __device__ float operator()(float x, float) const { return __fadd_rn(__fmul_rn(x, scale), shift); }
};

// a: count elements of TA; b: elements of TY read at index(i) (or null); y: count elements of TY.
// Packs of V first (every pointer aligned to V elements; for a broadcast b, c is a multiple of V
// so a pack's V elements read V consecutive b elements), then the count % V tail one by one.
// y may be a or b (each element is read before the same thread writes it); hence no __restrict__.
template <class TA, class TY, int V, class F, class Index>
__global__ void map_kernel(const TA* a, const TY* b, TY* y, std::size_t count, F f, Index index) {
  const std::size_t packs = count / V;
  for (std::size_t p = thread_index(); p < packs; p += grid_stride()) {
    const std::size_t i = p * V;
    const Pack<TA, V> pa = *reinterpret_cast<const Pack<TA, V>*>(a + i);
    Pack<TY, V> pb{};
    if (b) pb = *reinterpret_cast<const Pack<TY, V>*>(b + index(i));
    Pack<TY, V> py;
#pragma unroll
    for (int k = 0; k < V; ++k) py.v[k] = from_f32<TY>(f(to_f32(pa.v[k]), b ? to_f32(pb.v[k]) : 0.0f));
    *reinterpret_cast<Pack<TY, V>*>(y + i) = py;
  }
  for (std::size_t i = packs * V + thread_index(); i < count; i += grid_stride())
    y[i] = from_f32<TY>(f(to_f32(a[i]), b ? to_f32(b[index(i)]) : 0.0f));
}

// Launches map_kernel with the widest pack the pointers allow (count > 0). b_multiple: a number
// the pack width must divide for b's packs to be contiguous (the channel count of a broadcast b;
// 0 for none).
template <class TA, class TY, class F, class Index>
void launch_map(const TA* a, const TY* b, TY* y, std::size_t count, F f, Index index, std::size_t b_multiple,
                cudaStream_t stream) {
  constexpr std::size_t widest = sizeof(TA) > sizeof(TY) ? sizeof(TA) : sizeof(TY);
  const int v = pick_vec(widest, b_multiple, {{a, sizeof(TA)}, {b, sizeof(TY)}, {y, sizeof(TY)}});
  with_vec<TY>(v, [&](auto vc) {
    constexpr int V = decltype(vc)::value;
    DDIM_LAUNCH(grid_for(ceil_div(count, V), kThreads), kThreads, 0, stream, map_kernel<TA, TY, V, F, Index>)(a, b, y, count, f, index);
  });
}

// ---- layout transposes through a 32 x 32 shared-memory tile; block (32, 8)

// y (n, hw, c) of T <- x (n, c, hw) fp32.
template <class T>
__global__ void nchw_f32_to_nhwc_kernel(const float* __restrict__ x, T* __restrict__ y, int n, int c, int hw) {
  __shared__ float tile[kTile][kTile + 1];  // tile[channel][pixel]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::size_t p0 = std::size_t(blockIdx.x) * kTile, C = std::size_t(c), HW = std::size_t(hw);
  for (std::size_t b = blockIdx.z; b < std::size_t(n); b += gridDim.z) {
    const float* xb = x + b * C * HW;
    T* yb = y + b * HW * C;
    for (std::size_t c0 = std::size_t(blockIdx.y) * kTile; c0 < C; c0 += std::size_t(gridDim.y) * kTile) {
      for (int j = ty; j < kTile; j += kTileRows) {  // a warp reads 32 pixels of one channel
        const std::size_t ch = c0 + j, p = p0 + tx;
        if (ch < C && p < HW) tile[j][tx] = xb[ch * HW + p];
      }
      __syncthreads();
      for (int j = ty; j < kTile; j += kTileRows) {  // a warp writes 32 channels of one pixel
        const std::size_t p = p0 + j, ch = c0 + tx;
        if (ch < C && p < HW) yb[p * C + ch] = from_f32<T>(tile[tx][j]);
      }
      __syncthreads();  // the tile is reused by the next (channel tile, sample)
    }
  }
}

// y (n, c, hw) fp32 <- x (n, hw, c) of T.
template <class T>
__global__ void nhwc_to_nchw_f32_kernel(const T* __restrict__ x, float* __restrict__ y, int n, int c, int hw) {
  __shared__ float tile[kTile][kTile + 1];  // tile[pixel][channel]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const std::size_t p0 = std::size_t(blockIdx.x) * kTile, C = std::size_t(c), HW = std::size_t(hw);
  for (std::size_t b = blockIdx.z; b < std::size_t(n); b += gridDim.z) {
    const T* xb = x + b * HW * C;
    float* yb = y + b * C * HW;
    for (std::size_t c0 = std::size_t(blockIdx.y) * kTile; c0 < C; c0 += std::size_t(gridDim.y) * kTile) {
      for (int j = ty; j < kTile; j += kTileRows) {  // a warp reads 32 channels of one pixel
        const std::size_t p = p0 + j, ch = c0 + tx;
        if (ch < C && p < HW) tile[j][tx] = to_f32(xb[p * C + ch]);
      }
      __syncthreads();
      for (int j = ty; j < kTile; j += kTileRows) {  // a warp writes 32 pixels of one channel
        const std::size_t ch = c0 + j, p = p0 + tx;
        if (ch < C && p < HW) yb[ch * HW + p] = tile[tx][j];
      }
      __syncthreads();
    }
  }
}

dim3 transpose_grid(int n, int c, int hw) {
  const std::size_t cy = ceil_div(std::size_t(c), kTile);
  return dim3(unsigned(ceil_div(std::size_t(hw), kTile)), unsigned(cy < 65535 ? cy : 65535),
              unsigned(n < 65535 ? n : 65535));
}

// ---- data movement on packs of V channels (V divides every channel count)

// y (n, 2h, 2w, c) <- x (n, h, w, c): output pixel (oy, ox) copies input pixel (oy/2, ox/2).
template <class T, int V>
__global__ void upsample_nearest2x_kernel(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) {
  using P = Pack<T, V>;
  const P* xp = reinterpret_cast<const P*>(x);
  P* yp = reinterpret_cast<P*>(y);
  const std::size_t cp = std::size_t(c) / V, w2 = 2 * std::size_t(w), h2 = 2 * std::size_t(h);
  const std::size_t total = std::size_t(n) * h2 * w2 * cp;
  for (std::size_t i = thread_index(); i < total; i += grid_stride()) {
    const std::size_t k = i % cp;
    std::size_t r = i / cp;
    const std::size_t ox = r % w2;
    r /= w2;
    const std::size_t oy = r % h2, b = r / h2;
    yp[i] = xp[((b * std::size_t(h) + oy / 2) * std::size_t(w) + ox / 2) * cp + k];
  }
}

// y (n, h/2, w/2, c) <- the mean of each 2x2 window of x (n, h, w, c), in PyTorch's (and the
// CPU's) order: ((x00 + x01) + x10) + x11, then / 4.
template <class T, int V>
__global__ void avg_pool2x_kernel(const T* __restrict__ x, T* __restrict__ y, int n, int h, int w, int c) {
  using P = Pack<T, V>;
  const P* xp = reinterpret_cast<const P*>(x);
  P* yp = reinterpret_cast<P*>(y);
  const std::size_t cp = std::size_t(c) / V, oh = std::size_t(h) / 2, ow = std::size_t(w) / 2;
  const std::size_t row = std::size_t(w) * cp;  // packs per input row
  const std::size_t total = std::size_t(n) * oh * ow * cp;
  for (std::size_t i = thread_index(); i < total; i += grid_stride()) {
    const std::size_t k = i % cp;
    std::size_t r = i / cp;
    const std::size_t ox = r % ow;
    r /= ow;
    const std::size_t oy = r % oh, b = r / oh;
    const std::size_t i00 = ((b * std::size_t(h) + 2 * oy) * std::size_t(w) + 2 * ox) * cp + k;
    const P x00 = xp[i00], x01 = xp[i00 + cp], x10 = xp[i00 + row], x11 = xp[i00 + row + cp];
    P out;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const float s = __fadd_rn(__fadd_rn(__fadd_rn(to_f32(x00.v[e]), to_f32(x01.v[e])), to_f32(x10.v[e])),
                                to_f32(x11.v[e]));
      out.v[e] = from_f32<T>(__fdiv_rn(s, 4.0f));
    }
    yp[i] = out;
  }
}

// The inputs of a concatenation, passed by value (kernel parameter space). Channel counts and
// offsets are in packs of V channels.
struct ConcatArgs {
  const void* x[kMaxConcat];
  int c[kMaxConcat];       // channels of input j (packs)
  int offset[kMaxConcat];  // first output channel of input j (packs); offset[0] = 0
  int count;
  int c_total;  // output channels (packs)
};

// y (rows, sum c_j) <- [x_0 | x_1 | ...], x_j (rows, c_j); rows = n * hw. Element i of the output
// (row r, channel k) comes from the last input j whose offset is <= k (an input of zero channels
// shares its offset with the next one and so is never chosen).
template <class T, int V>
__global__ void concat_kernel(ConcatArgs a, T* __restrict__ y, std::size_t rows) {
  using P = Pack<T, V>;
  P* yp = reinterpret_cast<P*>(y);
  const std::size_t ct = std::size_t(a.c_total), total = rows * ct;
  for (std::size_t i = thread_index(); i < total; i += grid_stride()) {
    const int k = int(i % ct);
    const std::size_t r = i / ct;
    int j = 0;
#pragma unroll
    for (int q = 1; q < kMaxConcat; ++q)
      if (q < a.count && k >= a.offset[q]) j = q;
    const P* xj = static_cast<const P*>(a.x[j]);
    yp[i] = xj[r * std::size_t(a.c[j]) + std::size_t(k - a.offset[j])];
  }
}

}  // namespace

// ---------------------------------------------------------------- launchers

void nchw_f32_to_nhwc(const float* x, void* y, DType t, int n, int c, int hw, cudaStream_t stream) {
  constexpr const char* op = "nchw_f32_to_nhwc";
  require_non_negative(op, {{"n", n}, {"c", c}, {"hw", hw}});
  if (n == 0 || c == 0 || hw == 0) return;
  require_pointers(op, {{"x", x}, {"y", y}});
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(transpose_grid(n, c, hw), dim3(kTile, kTileRows), 0, stream, nchw_f32_to_nhwc_kernel<T>)(x, static_cast<T*>(y), n,
                                                                                                  c, hw);
  });
  check_launch(op);
}

void nhwc_to_nchw_f32(const void* x, float* y, DType t, int n, int c, int hw, cudaStream_t stream) {
  constexpr const char* op = "nhwc_to_nchw_f32";
  require_non_negative(op, {{"n", n}, {"c", c}, {"hw", hw}});
  if (n == 0 || c == 0 || hw == 0) return;
  require_pointers(op, {{"x", x}, {"y", y}});
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(transpose_grid(n, c, hw), dim3(kTile, kTileRows), 0, stream, nhwc_to_nchw_f32_kernel<T>)(
        static_cast<const T*>(x), y, n, c, hw);
  });
  check_launch(op);
}

void convert_from_f32(const float* x, void* y, DType t, std::size_t count, cudaStream_t stream) {
  constexpr const char* op = "convert_from_f32";
  if (count == 0) return;
  require_pointers(op, {{"x", x}, {"y", y}});
  if (static_cast<const void*>(x) == y) {
    if (t == DType::F32) return;  // in place to fp32: nothing to do
    invalid(op, std::string("y may be x only for fp32 (got ") + to_string(t) + ")");
  }
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    launch_map<float, T>(x, static_cast<const T*>(nullptr), static_cast<T*>(y), count, IdentityOp{}, SameIndex{}, 0,
                         stream);
  });
  check_launch(op);
}

void silu(const void* x, void* y, DType t, std::size_t count, cudaStream_t stream) {
  if (count == 0) return;
  require_pointers("silu", {{"x", x}, {"y", y}});
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    launch_map<T, T>(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), count, SiluOp{},
                     SameIndex{}, 0, stream);
  });
  check_launch("silu");
}

void add(const void* a, const void* b, void* y, DType t, std::size_t count, float divisor, cudaStream_t stream) {
  if (count == 0) return;
  require_pointers("add", {{"a", a}, {"b", b}, {"y", y}});
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    launch_map<T, T>(static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), count, AddOp{divisor},
                     SameIndex{}, 0, stream);
  });
  check_launch("add");
}

void add_broadcast(const void* a, const void* b, void* y, DType t, int n, int hw, int c, float divisor,
                   cudaStream_t stream) {
  constexpr const char* op = "add_broadcast";
  require_non_negative(op, {{"n", n}, {"hw", hw}, {"c", c}});
  const std::size_t per_sample = std::size_t(hw) * std::size_t(c), count = std::size_t(n) * per_sample;
  if (count == 0) return;
  require_pointers(op, {{"a", a}, {"b", b}, {"y", y}});
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    launch_map<T, T>(static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), count, AddOp{divisor},
                     BroadcastIndex{std::size_t(c), per_sample}, std::size_t(c), stream);
  });
  check_launch(op);
}

void scale_shift(const void* x, void* y, DType t, std::size_t count, float scale, float shift, cudaStream_t stream) {
  if (count == 0) return;
  require_pointers("scale_shift", {{"x", x}, {"y", y}});
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    launch_map<T, T>(static_cast<const T*>(x), static_cast<const T*>(nullptr), static_cast<T*>(y), count,
                     ScaleShiftOp{scale, shift}, SameIndex{}, 0, stream);
  });
  check_launch("scale_shift");
}

void concat_channels(const void* const* xs, const int* cs, int count, void* y, DType t, int n, int hw,
                     cudaStream_t stream) {
  constexpr const char* op = "concat_channels";
  if (count < 1 || count > kMaxConcat)
    invalid(op, "count must be in [1, " + std::to_string(kMaxConcat) + "] (got " + std::to_string(count) + ")");
  require_pointers(op, {{"xs", xs}, {"cs", cs}});
  require_non_negative(op, {{"n", n}, {"hw", hw}});
  long long c_total = 0;
  for (int j = 0; j < count; ++j) {
    if (cs[j] < 0) invalid(op, "cs[" + std::to_string(j) + "] must be >= 0 (got " + std::to_string(cs[j]) + ")");
    c_total += cs[j];
  }
  if (c_total > 0x7fffffffLL) invalid(op, "the output has more than 2^31 - 1 channels");
  const std::size_t rows = std::size_t(n) * std::size_t(hw);
  if (rows == 0 || c_total == 0) return;
  require_pointers(op, {{"y", y}});
  for (int j = 0; j < count; ++j)
    if (cs[j] > 0 && !xs[j]) invalid(op, "xs[" + std::to_string(j) + "] is null");
  const std::size_t es = dtype_size(t);
  // The pack width must divide every input's channel count and align every pointer.
  int v = pick_vec(es, std::size_t(c_total), {{y, es}});
  for (int j = 0; j < count; ++j)
    if (cs[j] > 0) {
      const int vj = pick_vec(es, std::size_t(cs[j]), {{xs[j], es}});
      if (vj < v) v = vj;
    }
  ConcatArgs args{};
  args.count = count;
  int offset = 0;
  for (int j = 0; j < count; ++j) {
    args.x[j] = xs[j];
    args.c[j] = cs[j] / v;
    args.offset[j] = offset;
    offset += args.c[j];
  }
  args.c_total = offset;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    with_vec<T>(v, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      DDIM_LAUNCH(grid_for(rows * std::size_t(args.c_total), kThreads), kThreads, 0, stream, concat_kernel<T, V>)(
          args, static_cast<T*>(y), rows);
    });
  });
  check_launch(op);
}

void upsample_nearest2x(const void* x, void* y, DType t, int n, int h, int w, int c, cudaStream_t stream) {
  constexpr const char* op = "upsample_nearest2x";
  require_non_negative(op, {{"n", n}, {"h", h}, {"w", w}, {"c", c}});
  if (n == 0 || h == 0 || w == 0 || c == 0) return;
  require_pointers(op, {{"x", x}, {"y", y}});
  const std::size_t es = dtype_size(t);
  const int v = pick_vec(es, std::size_t(c), {{x, es}, {y, es}});
  const std::size_t packs = std::size_t(n) * 4 * std::size_t(h) * std::size_t(w) * (std::size_t(c) / std::size_t(v));
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    with_vec<T>(v, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      DDIM_LAUNCH(grid_for(packs, kThreads), kThreads, 0, stream, upsample_nearest2x_kernel<T, V>)(
          static_cast<const T*>(x), static_cast<T*>(y), n, h, w, c);
    });
  });
  check_launch(op);
}

void avg_pool2x(const void* x, void* y, DType t, int n, int h, int w, int c, cudaStream_t stream) {
  constexpr const char* op = "avg_pool2x";
  require_non_negative(op, {{"n", n}, {"h", h}, {"w", w}, {"c", c}});
  if (h % 2 != 0 || w % 2 != 0)
    invalid(op, "h and w must be even (got " + std::to_string(h) + "x" + std::to_string(w) + ")");
  if (n == 0 || h == 0 || w == 0 || c == 0) return;
  require_pointers(op, {{"x", x}, {"y", y}});
  const std::size_t es = dtype_size(t);
  const int v = pick_vec(es, std::size_t(c), {{x, es}, {y, es}});
  const std::size_t packs =
      std::size_t(n) * std::size_t(h / 2) * std::size_t(w / 2) * (std::size_t(c) / std::size_t(v));
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    with_vec<T>(v, [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      DDIM_LAUNCH(grid_for(packs, kThreads), kThreads, 0, stream, avg_pool2x_kernel<T, V>)(static_cast<const T*>(x),
                                                                                 static_cast<T*>(y), n, h, w, c);
    });
  });
  check_launch(op);
}

}  // namespace ddim::cuda
