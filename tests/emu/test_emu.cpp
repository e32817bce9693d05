// The emulator's own tests (suite "emu", run by gpu_emu): every check finds the defect it is for
// in a deliberately broken kernel (mutants.cu) and stays silent on the correct twin; the runtime
// keeps CUDA's rules (stream order, capture, launch configuration, memory); the cuBLAS stand-in
// has cuBLAS's column-major semantics.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "emu.hpp"
#include "mutants.hpp"

using namespace ddim_emu;
namespace m = ddim_emu::mutants;

namespace {

// A device buffer of floats (cudaMalloc, so 0xFF-filled: NaN), optionally uploaded with cudaMemcpy.
struct Dev {
  float* p = nullptr;
  std::size_t n;
  explicit Dev(std::size_t count) : n(count) { REQUIRE(cudaMalloc(reinterpret_cast<void**>(&p), n * 4) == cudaSuccess); }
  explicit Dev(const std::vector<float>& v) : Dev(v.size()) {
    REQUIRE(cudaMemcpy(p, v.data(), n * 4, cudaMemcpyHostToDevice) == cudaSuccess);
  }
  ~Dev() { (void)cudaFree(p); }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  std::vector<float> read() const {
    std::vector<float> v(n);
    CHECK(cudaMemcpy(v.data(), p, n * 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    return v;
  }
};

std::vector<float> iota(std::size_t n, float start = 0.f) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = start + float(i);
  return v;
}

// Runs f with no violation expected: none may be reported, and the device reports no error.
template <class F>
void clean(F&& f) {
  (void)take_reports();
  const std::size_t before = unexpected_violations();
  f();
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(unexpected_violations() == before);
  CHECK(take_reports().empty());
}

// Runs f expecting a violation of `check` whose report mentions `needle`; the operation's error
// reaches the host (as a real GPU's asynchronous error would) and is consumed.
template <class F>
void broken(Check check, const std::string& needle, F&& f) {
  ExpectViolations expect;
  f();
  (void)cudaDeviceSynchronize();
  (void)cudaGetLastError();
  for (const Report& r : expect.reports()) MESSAGE(r.text);
  CHECK_MESSAGE(expect.has(check, needle), "expected a " << to_string(check) << " report mentioning " << needle);
}

}  // namespace

TEST_SUITE("emu") {
  TEST_CASE("emu mutation: a transpose without the barrier between its tile's writes and reads is a race") {
    const int c = 40, hw = 70;
    Dev x(iota(std::size_t(c) * hw)), y(std::size_t(c) * hw);
    clean([&] { m::transpose(x.p, y.p, c, hw, false, nullptr); });
    const auto got = y.read();
    for (int ch = 0; ch < c; ++ch)
      for (int p = 0; p < hw; ++p) REQUIRE(got[std::size_t(p) * c + ch] == float(ch * hw + p));
    broken(Check::Racecheck, "transpose_kernel<true>", [&] { m::transpose(x.p, y.p, c, hw, true, nullptr); });
  }

  TEST_CASE("emu mutation: group_norm's block_sum without its second barrier is a race") {
    const int blocks = 3, n = 1000;
    Dev x(std::vector<float>(std::size_t(blocks) * n, 0.5f)), out(blocks);
    clean([&] { m::block_sum(x.p, out.p, blocks, n, 256, false, nullptr); });
    for (float v : out.read()) CHECK(v == 500.f);
    broken(Check::Racecheck, "block_sum_kernel<true>", [&] { m::block_sum(x.p, out.p, blocks, n, 256, true, nullptr); });
  }

  TEST_CASE("emu mutation: attention's probability row read without __syncwarp is a race") {
    Dev p(iota(256)), out(256);
    clean([&] { m::warp_row(p.p, out.p, 8, false, nullptr); });
    const auto got = out.read();
    CHECK(got[0] == 496.f);            // 0 + 1 + ... + 31
    CHECK(got[32] == 496.f + 32 * 32);  // 32 + ... + 63
    broken(Check::Racecheck, "warp_row_kernel<true>", [&] { m::warp_row(p.p, out.p, 8, true, nullptr); });
  }

  TEST_CASE("emu mutation: an epilogue loop one element too far is an out-of-bounds access") {
    const std::size_t total = 1000;
    Dev y(std::vector<float>(total, 1.f)), bias(iota(10));
    clean([&] { m::add_bias(y.p, bias.p, total, 10, false, nullptr); });
    CHECK(y.read()[17] == 8.f);
    broken(Check::Memcheck, "past the end of allocation", [&] { m::add_bias(y.p, bias.p, total, 10, true, nullptr); });
  }

  TEST_CASE("emu mutation: barriers not reached by every thread, and a shuffle naming an exited lane") {
    Dev out(64);
    broken(Check::Synccheck, "others exited", [&] { m::bad_barrier(out.p, true, nullptr); });
    broken(Check::Synccheck, "different barriers", [&] { m::bad_barrier(out.p, false, nullptr); });
    broken(Check::Synccheck, "lane 31 exited", [&] { m::shuffle_after_exit(out.p, nullptr); });
  }

  TEST_CASE("emu mutation: blocks racing on one global word give an order-dependent result") {
    unsigned* w = nullptr;
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&w), 4) == cudaSuccess);
    REQUIRE(cudaMemset(w, 0, 4) == cudaSuccess);
    clean([&] { m::last_block_wins(w, 16, true, nullptr); });
    unsigned v = 0;
    CHECK(cudaMemcpy(&v, w, 4, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(v == 15u);
    broken(Check::Schedule, "depends on the order", [&] { m::last_block_wins(w, 16, false, nullptr); });
    CHECK(cudaFree(w) == cudaSuccess);
  }

  TEST_CASE("emu: reads of memory nothing wrote are initcheck violations; fresh memory holds NaN") {
    Dev fresh(64), out(64);
    std::vector<float> bytes = fresh.read();
    CHECK(std::isnan(bytes[0]));
    std::uint32_t bits;
    std::memcpy(&bits, &bytes[63], 4);
    CHECK(bits == 0xFFFFFFFFu);
    broken(Check::Initcheck, "uninitialised device memory", [&] { m::copy(fresh.p, out.p, 64, nullptr); });
    unsigned* u = nullptr;
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&u), 64 * 4) == cudaSuccess);
    broken(Check::Initcheck, "which no thread of the block wrote", [&] { m::read_unwritten_shared(u, nullptr); });
    CHECK(cudaFree(u) == cudaSuccess);
  }

  TEST_CASE("emu: freed memory, bad copies and double frees are memcheck violations") {
    Dev out(16);
    float* gone = nullptr;
    REQUIRE(cudaMalloc(reinterpret_cast<void**>(&gone), 64) == cudaSuccess);
    REQUIRE(cudaMemset(gone, 0, 64) == cudaSuccess);
    REQUIRE(cudaFree(gone) == cudaSuccess);
    broken(Check::Memcheck, "use after free", [&] { m::copy(gone, out.p, 16, nullptr); });
    {
      ExpectViolations expect;
      CHECK(cudaFree(gone) == cudaErrorInvalidValue);
      CHECK(expect.has(Check::Memcheck, "freed before"));
      std::vector<float> host(32);
      CHECK(cudaMemcpy(host.data(), out.p, 32 * 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
      CHECK(expect.has(Check::Memcheck, "not inside one live allocation"));
      CHECK(cudaMemcpy(out.p, host.data(), 4, cudaMemcpyDeviceToHost) == cudaErrorInvalidValue);
      CHECK(expect.has(Check::Memcheck, "do not match the direction"));
      (void)cudaGetLastError();
    }
    void* huge = nullptr;
    CHECK(cudaMalloc(&huge, std::size_t(1) << 40) == cudaErrorMemoryAllocation);
    CHECK(cudaGetLastError() == cudaErrorMemoryAllocation);
  }

  TEST_CASE("emu: dynamic shared memory is bounded by the launch and needs the opt-in above 48 KiB") {
    Dev x(iota(64)), y(64);
    clean([&] { m::through_dynamic_shared(x.p, y.p, 64, 256, nullptr); });
    CHECK(y.read()[0] == 63.f);
    broken(Check::Memcheck, "past the launch's 128 bytes", [&] { m::through_dynamic_shared(x.p, y.p, 64, 128, nullptr); });
    CHECK(m::launch_with_block(64, 64 * 1024) == cudaErrorInvalidValue);
    CHECK(m::launch_with_block(2048, 0) == cudaErrorInvalidConfiguration);
    CHECK(m::launch_with_block(0, 0) == cudaErrorInvalidConfiguration);
    CHECK(m::launch_with_block(1024, 0) == cudaSuccess);
  }

  TEST_CASE("emu: work on a non-blocking stream is not ordered after the legacy stream's cudaMemcpy") {
    cudaStream_t s = nullptr;
    REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
    const auto host = iota(256);
    Dev x(256), y(256);
    // A pageable upload returns before it lands: the kernel on `s` may read x before it.
    broken(Check::StreamOrder, "without being ordered", [&] {
      REQUIRE(cudaMemcpy(x.p, host.data(), 256 * 4, cudaMemcpyHostToDevice) == cudaSuccess);
      m::copy(x.p, y.p, 256, s);
    });
    clean([&] {  // on the stream itself
      REQUIRE(cudaMemcpyAsync(x.p, host.data(), 256 * 4, cudaMemcpyHostToDevice, s) == cudaSuccess);
      m::copy(x.p, y.p, 256, s);
    });
    clean([&] {  // ordered by an event
      cudaEvent_t e = nullptr;
      REQUIRE(cudaEventCreateWithFlags(&e, cudaEventDisableTiming) == cudaSuccess);
      REQUIRE(cudaMemcpy(x.p, host.data(), 256 * 4, cudaMemcpyHostToDevice) == cudaSuccess);
      REQUIRE(cudaEventRecord(e, nullptr) == cudaSuccess);
      REQUIRE(cudaStreamWaitEvent(s, e, 0) == cudaSuccess);
      m::copy(x.p, y.p, 256, s);
      CHECK(cudaEventDestroy(e) == cudaSuccess);
    });
    clean([&] {  // ordered by the host
      REQUIRE(cudaMemcpy(x.p, host.data(), 256 * 4, cudaMemcpyHostToDevice) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(nullptr) == cudaSuccess);
      m::copy(x.p, y.p, 256, s);
    });
    CHECK(cudaStreamSynchronize(s) == cudaSuccess);
    CHECK(y.read()[255] == 255.f);
    CHECK(cudaStreamDestroy(s) == cudaSuccess);
  }

  TEST_CASE("emu: a captured graph replays its kernels with the parameters of capture time") {
    cudaStream_t s = nullptr;
    REQUIRE(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess);
    Dev y(std::vector<float>(100, 0.f)), bias(iota(4, 1.f));
    REQUIRE(cudaStreamSynchronize(nullptr) == cudaSuccess);
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    clean([&] {
      REQUIRE(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
      m::add_bias(y.p, bias.p, 100, 4, false, s);
      REQUIRE(cudaStreamEndCapture(s, &graph) == cudaSuccess);
      REQUIRE(graph != nullptr);
      REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    });
    CHECK(y.read()[5] == 0.f);  // captured, not run
    clean([&] {
      REQUIRE(cudaGraphLaunch(exec, s) == cudaSuccess);
      REQUIRE(cudaGraphLaunch(exec, s) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
    });
    CHECK(y.read()[5] == 4.f);  // bias[1] = 2, twice
    CHECK(cudaGraphExecDestroy(exec) == cudaSuccess);
    CHECK(cudaGraphDestroy(graph) == cudaSuccess);
    CHECK(cudaStreamDestroy(s) == cudaSuccess);
  }

  TEST_CASE("emu: capture rules (device synchronisation from another thread, the legacy stream, unsafe calls)") {
    cudaStream_t nb = nullptr, blocking = nullptr;
    REQUIRE(cudaStreamCreateWithFlags(&nb, cudaStreamNonBlocking) == cudaSuccess);
    REQUIRE(cudaStreamCreate(&blocking) == cudaSuccess);
    Dev y(std::vector<float>(64, 0.f)), bias(iota(4));
    cudaGraph_t graph = nullptr;
    {
      ExpectViolations expect;
      // cudaDeviceSynchronize on another thread invalidates a thread-local capture.
      REQUIRE(cudaStreamBeginCapture(nb, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
      m::add_bias(y.p, bias.p, 64, 4, false, nb);
      cudaError_t other = cudaSuccess;
      std::thread t([&] { other = cudaDeviceSynchronize(); });
      t.join();
      CHECK(other == cudaErrorStreamCaptureUnsupported);
      CHECK(cudaStreamEndCapture(nb, &graph) == cudaErrorStreamCaptureInvalidated);
      CHECK(graph == nullptr);
      CHECK(expect.has(Check::Capture, "cudaDeviceSynchronize"));
      // cudaMalloc on the capturing thread is refused and invalidates the capture.
      REQUIRE(cudaStreamBeginCapture(nb, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
      void* p = nullptr;
      CHECK(cudaMalloc(&p, 64) == cudaErrorStreamCaptureUnsupported);
      CHECK(cudaStreamEndCapture(nb, &graph) == cudaErrorStreamCaptureInvalidated);
      // The legacy stream while a blocking stream captures: an implicit dependency.
      REQUIRE(cudaStreamBeginCapture(blocking, cudaStreamCaptureModeRelaxed) == cudaSuccess);
      CHECK(cudaMemsetAsync(y.p, 0, 64, nullptr) == cudaErrorStreamCaptureImplicit);
      CHECK(cudaStreamEndCapture(blocking, &graph) == cudaErrorStreamCaptureInvalidated);
      // A thread-local capture ended by another thread.
      REQUIRE(cudaStreamBeginCapture(nb, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
      std::thread t2([&] { other = cudaStreamEndCapture(nb, &graph); });
      t2.join();
      CHECK(other == cudaErrorStreamCaptureWrongThread);
      CHECK(cudaStreamEndCapture(nb, &graph) == cudaSuccess);
      CHECK(cudaGraphDestroy(graph) == cudaSuccess);
      // A kernel launched for the first time inside a capture (its module would load there).
      REQUIRE(cudaStreamBeginCapture(nb, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
      m::launch_fresh_kernel(y.p, nb);
      CHECK(cudaStreamEndCapture(nb, &graph) == cudaSuccess);
      CHECK(cudaGraphDestroy(graph) == cudaSuccess);
      CHECK(expect.has(Check::Capture, "fresh_kernel is launched for the first time inside a stream capture"));
      (void)cudaGetLastError();
    }
    // Allocating and freeing on another thread does not disturb a thread-local capture.
    clean([&] {
      REQUIRE(cudaStreamBeginCapture(nb, cudaStreamCaptureModeThreadLocal) == cudaSuccess);
      m::add_bias(y.p, bias.p, 64, 4, false, nb);
      cudaError_t other = cudaErrorUnknown;
      std::thread t([&] {
        void* p = nullptr;
        other = cudaMalloc(&p, 64);
        if (other == cudaSuccess) other = cudaFree(p);
      });
      t.join();
      CHECK(other == cudaSuccess);
      REQUIRE(cudaStreamEndCapture(nb, &graph) == cudaSuccess);
      CHECK(cudaGraphDestroy(graph) == cudaSuccess);
    });
    CHECK(cudaStreamDestroy(nb) == cudaSuccess);
    CHECK(cudaStreamDestroy(blocking) == cudaSuccess);
  }

  TEST_CASE("emu cublas: cublasGemmEx has cuBLAS's column-major semantics (transposes, leading dimensions, alpha, beta)") {
    cublasHandle_t h = nullptr;
    REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS);
    std::mt19937 gen(5);
    std::uniform_real_distribution<float> dist(-1.f, 1.f);
    const int m = 7, n = 5, k = 6;
    for (cublasOperation_t ta : {CUBLAS_OP_N, CUBLAS_OP_T})
      for (cublasOperation_t tb : {CUBLAS_OP_N, CUBLAS_OP_T})
        for (float beta : {0.f, 0.25f}) {
          CAPTURE(int(ta));
          CAPTURE(int(tb));
          CAPTURE(beta);
          // Stored shapes (column-major) with padded leading dimensions.
          const int a_rows = ta == CUBLAS_OP_N ? m : k, a_cols = ta == CUBLAS_OP_N ? k : m;
          const int b_rows = tb == CUBLAS_OP_N ? k : n, b_cols = tb == CUBLAS_OP_N ? n : k;
          const int lda = a_rows + 3, ldb = b_rows + 1, ldc = m + 2;
          std::vector<float> a(std::size_t(lda) * a_cols), b(std::size_t(ldb) * b_cols), c(std::size_t(ldc) * n);
          for (float& v : a) v = dist(gen);
          for (float& v : b) v = dist(gen);
          for (float& v : c) v = dist(gen);
          const auto A = [&](int i, int p) { return ta == CUBLAS_OP_N ? a[std::size_t(i) + std::size_t(p) * lda] : a[std::size_t(p) + std::size_t(i) * lda]; };
          const auto B = [&](int p, int j) { return tb == CUBLAS_OP_N ? b[std::size_t(p) + std::size_t(j) * ldb] : b[std::size_t(j) + std::size_t(p) * ldb]; };
          Dev da(a), db(b), dc(c);
          if (beta == 0.f) REQUIRE(cudaMemset(dc.p, 0xFF, c.size() * 4) == cudaSuccess);  // NaN: must not be read
          const float alpha = 0.5f;
          clean([&] {
            REQUIRE(cublasGemmEx(h, ta, tb, m, n, k, &alpha, da.p, CUDA_R_32F, lda, db.p, CUDA_R_32F, ldb, &beta, dc.p,
                                 CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
          });
          const auto got = dc.read();
          for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
              double ref = 0;
              for (int p = 0; p < k; ++p) ref += double(A(i, p)) * double(B(p, j));
              ref = alpha * ref + (beta != 0.f ? beta * double(c[std::size_t(i) + std::size_t(j) * ldc]) : 0.0);
              REQUIRE(std::fabs(got[std::size_t(i) + std::size_t(j) * ldc] - ref) < 1e-5);
            }
        }
    Dev x(64);
    const float one = 1.f, zero = 0.f;
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, x.p, CUDA_R_32F, 3, x.p, CUDA_R_32F, 4, &zero, x.p,
                       CUDA_R_32F, 4, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_INVALID_VALUE);  // lda < m
    CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &one, x.p, CUDA_R_16F, 4, x.p, CUDA_R_32F, 4, &zero, x.p,
                       CUDA_R_32F, 4, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_NOT_SUPPORTED);
    CHECK(cublasDestroy(h) == CUBLAS_STATUS_SUCCESS);
  }

  TEST_CASE("emu: the device describes an H100") {
    cudaDeviceProp p{};
    REQUIRE(cudaGetDeviceProperties(&p, 0) == cudaSuccess);
    CHECK(std::string(p.name).find("H100") != std::string::npos);
    CHECK(p.major == 9);
    CHECK(p.sharedMemPerBlockOptin == 227u * 1024u);
    int count = 0;
    CHECK(cudaGetDeviceCount(&count) == cudaSuccess);
    CHECK(count == 1);
    CHECK(cudaSetDevice(1) == cudaErrorInvalidDevice);
    CHECK(cudaGetLastError() == cudaErrorInvalidDevice);
    CHECK(cudaGetLastError() == cudaSuccess);
  }
}
