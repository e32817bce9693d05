// cuBLAS, as far as the CUDA backend uses it: handles, stream, pointer mode, workspace and
// cublasGemmEx, with cuBLAS's documented semantics so that the backend's row-major-to-column-major
// mapping is tested rather than assumed:
//
//   C (m x n, column-major, ldc) = alpha op(A) op(B) + beta C
//   op(A) is m x k: A (m x k, lda >= m) for CUBLAS_OP_N, or the transpose of A (k x m, lda >= k)
//   for CUBLAS_OP_T; op(B) is k x n likewise (ldb >= k for N, >= n for T).
//   Element (i, j) of a column-major X is X[i + j ld]. When beta == 0, C is not read.
//
// Types: A, B and C all CUDA_R_32F (compute CUBLAS_COMPUTE_32F or _32F_PEDANTIC), all
// CUDA_R_16F or all CUDA_R_16BF (compute CUBLAS_COMPUTE_32F); anything else is
// CUBLAS_STATUS_NOT_SUPPORTED. Accumulation in fp32, each output one fused multiply-add chain
// over k in increasing order, then alpha acc + beta c, rounded once to C's type. The GEMM is an
// operation on the handle's stream (so it is captured with it), its matrices checked for bounds
// and, where read, for initialisation.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>
#include <set>

#include "internal.hpp"

namespace ddim_emu {
namespace {

struct Blas {
  cudaStream_t stream = nullptr;
  cublasPointerMode_t mode = CUBLAS_POINTER_MODE_HOST;
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

std::set<Blas*>& handles() {
  static std::set<Blas*>* s = new std::set<Blas*>();
  return *s;
}

Blas* resolve(cublasHandle_t h) {
  Blas* b = reinterpret_cast<Blas*>(h);
  return handles().count(b) ? b : nullptr;
}

std::size_t type_size(cudaDataType t) { return t == CUDA_R_32F ? 4 : 2; }

float load(const unsigned char* p, cudaDataType t) {
  if (t == CUDA_R_32F) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  if (t == CUDA_R_16F) {
    __half h;
    std::memcpy(&h, p, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, p, 2);
  return __bfloat162float(h);
}

void store(unsigned char* p, cudaDataType t, float v) {
  if (t == CUDA_R_32F) std::memcpy(p, &v, 4);
  else if (t == CUDA_R_16F) {
    const __half h = __float2half_rn(v);
    std::memcpy(p, &h, 2);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(v);
    std::memcpy(p, &h, 2);
  }
}

// Checks a column-major rows x cols matrix (leading dimension ld) column by column: bounds,
// and for reads that it was written.
bool check_matrix(const void* p, int rows, int cols, int ld, std::size_t es, Access kind) {
  if (rows == 0 || cols == 0) return true;
  const auto base = reinterpret_cast<std::uintptr_t>(p);
  for (int c = 0; c < cols; ++c)
    if (!mem::access(base + std::size_t(c) * std::size_t(ld) * es, std::size_t(rows) * es, kind, kind == Access::Read))
      return false;
  return true;
}

}  // namespace
}  // namespace ddim_emu

using namespace ddim_emu;

extern "C" {

cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  if (!h) return CUBLAS_STATUS_INVALID_VALUE;
  auto* b = new Blas();
  handles().insert(b);
  *h = reinterpret_cast<cublasHandle_t>(b);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  Blas* b = resolve(h);
  if (!b) return CUBLAS_STATUS_NOT_INITIALIZED;
  handles().erase(b);
  delete b;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t h, cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  Blas* b = resolve(h);
  if (!b) return CUBLAS_STATUS_NOT_INITIALIZED;
  b->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t h, cublasPointerMode_t mode) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  Blas* b = resolve(h);
  if (!b) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (mode != CUBLAS_POINTER_MODE_HOST && mode != CUBLAS_POINTER_MODE_DEVICE) return CUBLAS_STATUS_INVALID_VALUE;
  b->mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t h, void* workspace, std::size_t bytes) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  Blas* b = resolve(h);
  if (!b) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (bytes > 0 && (!workspace || !mem::find(workspace, bytes, nullptr))) return CUBLAS_STATUS_INVALID_VALUE;
  if (reinterpret_cast<std::uintptr_t>(workspace) % 256 != 0) return CUBLAS_STATUS_INVALID_VALUE;
  b->workspace = workspace;
  b->workspace_bytes = bytes;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}

const char* cublasGetStatusString(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "the library was not initialized";
    case CUBLAS_STATUS_INVALID_VALUE: return "an invalid numeric value was used as an argument";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "the GPU program failed to execute";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "the functionality requested is not supported";
    default: return cublasGetStatusName(s);
  }
}

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  Blas* b = resolve(handle);
  if (!b) return CUBLAS_STATUS_NOT_INITIALIZED;
  const auto op_ok = [](cublasOperation_t o) { return o == CUBLAS_OP_N || o == CUBLAS_OP_T || o == CUBLAS_OP_C; };
  if (!op_ok(transa) || !op_ok(transb) || m < 0 || n < 0 || k < 0) return CUBLAS_STATUS_INVALID_VALUE;
  const int a_rows = transa == CUBLAS_OP_N ? m : k, a_cols = transa == CUBLAS_OP_N ? k : m;
  const int b_rows = transb == CUBLAS_OP_N ? k : n, b_cols = transb == CUBLAS_OP_N ? n : k;
  if (lda < std::max(1, a_rows) || ldb < std::max(1, b_rows) || ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
  if (!alpha || !beta) return CUBLAS_STATUS_INVALID_VALUE;
  if (Atype != Btype || Atype != Ctype) return CUBLAS_STATUS_NOT_SUPPORTED;
  const bool f32 = Atype == CUDA_R_32F && (compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_32F_PEDANTIC);
  const bool f16 = (Atype == CUDA_R_16F || Atype == CUDA_R_16BF) && compute == CUBLAS_COMPUTE_32F;
  if (!f32 && !f16) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (algo != CUBLAS_GEMM_DEFAULT && algo != CUBLAS_GEMM_DEFAULT_TENSOR_OP) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  if (!C || (k > 0 && (!A || !B))) return CUBLAS_STATUS_INVALID_VALUE;
  float host_alpha = 0.f, host_beta = 0.f;
  const bool device_scalars = b->mode == CUBLAS_POINTER_MODE_DEVICE;
  if (!device_scalars) {  // read now, as cuBLAS does with host pointers
    std::memcpy(&host_alpha, alpha, 4);
    std::memcpy(&host_beta, beta, 4);
  }
  Op op;
  op.name = "cublasGemmEx";
  op.run = [=] {
    float al = host_alpha, be = host_beta;
    if (device_scalars) {
      if (!mem::access(reinterpret_cast<std::uintptr_t>(alpha), 4, Access::Read, true) ||
          !mem::access(reinterpret_cast<std::uintptr_t>(beta), 4, Access::Read, true)) {
        return;
      }
      std::memcpy(&al, alpha, 4);
      std::memcpy(&be, beta, 4);
    }
    const std::size_t es = type_size(Atype);
    bool ok = k == 0 || (check_matrix(A, a_rows, a_cols, lda, es, Access::Read) &&
                         check_matrix(B, b_rows, b_cols, ldb, es, Access::Read));
    if (ok && be != 0.f) ok = check_matrix(C, m, n, ldc, es, Access::Read);
    if (ok) ok = check_matrix(C, m, n, ldc, es, Access::Write);
    if (!ok) return;
    const auto* a = static_cast<const unsigned char*>(A);
    const auto* bb = static_cast<const unsigned char*>(B);
    auto* c = static_cast<unsigned char*>(C);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        float acc = 0.f;
        for (int p = 0; p < k; ++p) {
          const std::size_t ai = transa == CUBLAS_OP_N ? std::size_t(i) + std::size_t(p) * lda : std::size_t(p) + std::size_t(i) * lda;
          const std::size_t bi = transb == CUBLAS_OP_N ? std::size_t(p) + std::size_t(j) * ldb : std::size_t(j) + std::size_t(p) * ldb;
          acc = std::fma(load(a + ai * es, Atype), load(bb + bi * es, Btype), acc);
        }
        unsigned char* ci = c + (std::size_t(i) + std::size_t(j) * ldc) * es;
        const float prior = be != 0.f ? be * load(ci, Ctype) : 0.f;
        store(ci, Ctype, al * acc + prior);
      }
  };
  const cudaError_t e = enqueue(b->stream, std::move(op));
  if (e == cudaErrorInvalidResourceHandle) return CUBLAS_STATUS_INVALID_VALUE;
  if (e != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;  // e.g. an invalidated capture
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
