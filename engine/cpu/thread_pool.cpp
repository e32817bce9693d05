// Persistent worker pool. One job at a time: the caller publishes (fn, chunk count) under the
// mutex and bumps a generation counter; idle workers sleep on a condition variable, after
// watching the counter for up to kSpin first (a forward pass issues its jobs, one per op, a few
// microseconds apart: a worker that went to sleep between them would cost a wake-up each).
// Chunks are claimed with an atomic counter, so a slow thread never holds up the others. The
// caller takes chunks too and then waits until every worker that joined the job has left it.
// A worker only joins while unclaimed chunks remain, so none can touch a job after
// parallel_for has returned.
#include "cpu/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "ddim/error.hpp"

namespace ddim::cpu {

namespace {
using Fn = std::function<void(std::int64_t, std::int64_t)>;

// Set while a thread runs a task: parallel_for is not reentrant and says so instead of deadlocking.
thread_local bool t_in_task = false;

constexpr std::chrono::microseconds kSpin{100};  // how long an idle worker watches for the next job
}  // namespace

struct ThreadPool::State {
  std::mutex mutex;
  std::condition_variable work_cv;  // workers: a new job or stop
  std::condition_variable done_cv;  // caller: the last worker left the job
  std::vector<std::thread> workers;
  bool stop = false;

  // The current job; written under the mutex while no worker is inside a job.
  std::atomic<std::uint64_t> generation{0};  // written under the mutex; read without it while spinning
  const Fn* fn = nullptr;
  std::int64_t count = 0;
  std::int64_t chunks = 0;
  std::atomic<std::int64_t> next_chunk{0};
  std::atomic<int> active{0};  // workers inside the current job (changed under the mutex)
  std::exception_ptr error;

  // Claims and runs chunks until none are left. Chunk i covers [i*count/chunks, (i+1)*count/chunks).
  void run_chunks() {
    t_in_task = true;
    for (;;) {
      const std::int64_t i = next_chunk.fetch_add(1, std::memory_order_relaxed);
      if (i >= chunks) break;
      const std::int64_t begin = i * count / chunks;
      const std::int64_t end = (i + 1) * count / chunks;
      try {
        (*fn)(begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!error) error = std::current_exception();
        next_chunk.store(chunks, std::memory_order_relaxed);  // stop handing out work
      }
    }
    t_in_task = false;
  }

  void worker_loop() {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      if (generation.load(std::memory_order_relaxed) == seen) {
        lock.unlock();
        const auto until = std::chrono::steady_clock::now() + kSpin;
        while (generation.load(std::memory_order_relaxed) == seen && std::chrono::steady_clock::now() < until)
          std::this_thread::yield();
        lock.lock();
      }
      work_cv.wait(lock, [&] { return stop || generation.load(std::memory_order_relaxed) != seen; });
      if (stop) return;
      seen = generation.load(std::memory_order_relaxed);
      if (next_chunk.load(std::memory_order_relaxed) >= chunks) continue;  // nothing left to join
      ++active;
      lock.unlock();
      run_chunks();
      lock.lock();
      if (--active == 0) done_cv.notify_one();
    }
  }

  void shutdown() noexcept {
    {
      std::lock_guard<std::mutex> lock(mutex);
      stop = true;
    }
    work_cv.notify_all();
    for (std::thread& t : workers)
      if (t.joinable()) t.join();
    workers.clear();
  }
};

ThreadPool::ThreadPool(int threads) : state_(new State) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  try {
    state_->workers.reserve(static_cast<std::size_t>(threads - 1));
    for (int i = 1; i < threads; ++i) state_->workers.emplace_back([s = state_] { s->worker_loop(); });
  } catch (const std::exception& e) {
    // std::system_error (EAGAIN: out of memory for the stacks, or a thread limit) or bad_alloc:
    // a resource limit, which the caller can meet with fewer threads.
    const std::size_t started = state_->workers.size() + 1;
    state_->shutdown();
    delete state_;
    throw Error(ErrorCode::OutOfMemory, "cpu thread pool: could not start " + std::to_string(threads) +
                                            " threads (" + std::to_string(started) + " started: " + e.what() +
                                            "); out of memory or of threads: use fewer (SessionOptions::threads)");
  }
}

ThreadPool::~ThreadPool() {
  state_->shutdown();
  delete state_;
}

int ThreadPool::size() const noexcept { return static_cast<int>(state_->workers.size()) + 1; }

void ThreadPool::parallel_for(std::int64_t count, const Fn& fn) {
  if (count <= 0) return;
  if (t_in_task) throw Error(ErrorCode::Internal, "cpu thread pool: parallel_for called from inside a task");
  State& s = *state_;
  if (s.workers.empty() || count == 1) {
    t_in_task = true;
    try {
      fn(0, count);
    } catch (...) {
      t_in_task = false;
      throw;
    }
    t_in_task = false;
    return;
  }
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    s.fn = &fn;
    s.count = count;
    // A few chunks per thread balance uneven work without making chunks tiny.
    s.chunks = std::min<std::int64_t>(count, static_cast<std::int64_t>(size()) * 4);
    s.next_chunk.store(0, std::memory_order_relaxed);
    s.error = nullptr;
    s.generation.fetch_add(1, std::memory_order_relaxed);
  }
  s.work_cv.notify_all();
  s.run_chunks();
  std::exception_ptr error;
  {
    // The workers usually finish their last chunks within microseconds of the caller: watch
    // before sleeping, as they do.
    const auto until = std::chrono::steady_clock::now() + kSpin;
    while (s.active.load(std::memory_order_relaxed) != 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
    std::unique_lock<std::mutex> lock(s.mutex);
    s.done_cv.wait(lock, [&] { return s.active.load(std::memory_order_relaxed) == 0; });
    s.fn = nullptr;
    error = s.error;
    s.error = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

void parallel_for(ThreadPool* pool, std::int64_t count, const Fn& fn) {
  if (count <= 0) return;
  if (pool) {
    pool->parallel_for(count, fn);
  } else {
    fn(0, count);
  }
}

}  // namespace ddim::cpu
