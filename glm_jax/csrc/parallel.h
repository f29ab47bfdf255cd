// Helpers shared by the CPU kernels: work split over helper threads, 32-byte aligned scratch.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

// Helper threads of our own for the kernels' chunks, which spin a while after each job before they sleep. XLA's
// intra-op pool puts its threads to sleep as soon as they are idle, and waking one took about 100 us here (a KVM
// guest): a decode step calls a kernel every 100-500 us with XLA's small ops in between, so a pool thread arrived
// when most of the product was done (measured: a 2048 x 2048 INT4 product took 87 us back to back, 190 us with 40 us
// of other work before it). Spinning helpers take the next job at once; they sleep after kSpinMicros without one.
class Helpers {
 public:
  static Helpers& get() {
    static Helpers* helpers = new Helpers();  // never destroyed: its threads outlive static destruction
    return *helpers;
  }

  // fn(i) for every chunk i < chunks on the calling thread and up to `helpers` helper threads; returns when all are
  // done. A call while another one runs (another device's computation) does its chunks alone.
  void run(int64_t helpers, int64_t chunks, std::function<void(int64_t)> fn) {
    std::unique_lock<std::mutex> one_job(job_mu_, std::try_to_lock);
    if (helpers <= 0 || chunks <= 1 || !one_job.owns_lock()) {
      for (int64_t i = 0; i < chunks; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = std::move(fn), job->chunks = chunks, job->helpers = helpers;
    start(helpers);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job->work();
    while (job->done.load(std::memory_order_acquire) < chunks) _mm_pause();
  }

 private:
  static constexpr int64_t kSpinMicros = 500;

  struct Job {
    std::function<void(int64_t)> fn;
    int64_t chunks = 0, helpers = 0;
    std::atomic<int64_t> next{0}, done{0};
    void work() {
      for (int64_t i; (i = next.fetch_add(1)) < chunks;) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  void start(int64_t helpers) {
    std::lock_guard<std::mutex> lock(mu_);
    while (int64_t(threads_.size()) < helpers) {
      const int64_t index = threads_.size();
      threads_.emplace_back([this, index] { loop(index); });
      threads_.back().detach();
    }
  }

  void loop(int64_t index) {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        _mm_pause();
        if (spins % 64 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mu_);
          wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
          break;
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job && index < job->helpers) job->work();  // a late helper finds no chunks left
    }
  }

  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;      // job_, threads_, sleeping helpers
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::shared_ptr<Job> job_;
  std::vector<std::thread> threads_;
};

// Runs fn(i) for every chunk i < chunks on the calling thread and as many helper threads as XLA's intra-op pool has
// threads besides it, returning when all are done. fn is copied: capture by value.
template <typename Fn>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t chunks, Fn fn) {
  Helpers::get().run(std::max<int64_t>(1, pool.num_threads()) - 1, chunks, std::function<void(int64_t)>(fn));
}

// std::vector<T, AlignedAllocator<T>>: storage aligned for 256-bit loads
template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = std::aligned_alloc(32, (n * sizeof(T) + 31) / 32 * 32);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
