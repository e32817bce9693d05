#pragma once
// A small persistent worker pool for the CPU backend: parallel_for over [0, count) in
// contiguous chunks. The calling thread takes part. Not reentrant: parallel_for must not be
// called from inside a task.
#include <cstdint>
#include <functional>

namespace ddim::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);  // threads <= 0: std::thread::hardware_concurrency()
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const noexcept;  // worker count including the caller
  // Runs fn(begin, end) over chunks covering [0, count); blocks until all are done. An exception
  // thrown by fn is rethrown here (the first one).
  void parallel_for(std::int64_t count, const std::function<void(std::int64_t, std::int64_t)>& fn);

 private:
  struct State;
  State* state_;
};

// parallel_for on pool, or inline when pool is null.
void parallel_for(ThreadPool* pool, std::int64_t count, const std::function<void(std::int64_t, std::int64_t)>& fn);

}  // namespace ddim::cpu
