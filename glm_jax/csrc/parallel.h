// Helpers shared by the CPU kernels: work split over XLA's intra-op thread pool, 32-byte aligned scratch.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

#include "xla/ffi/api/ffi.h"

// Runs fn(i) for every chunk i < chunks on the calling thread and the pool's threads, returning when all are done.
// The caller takes chunks too, so this never waits on an idle pool; a pool task that starts late finds none left.
// fn is copied into every task: capture by value.
template <typename Fn>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t chunks, Fn fn) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto work = [counters, chunks, fn] {
    for (int64_t i; (i = counters->next.fetch_add(1)) < chunks;) {
      fn(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t t = 1; t < std::min(threads, chunks); ++t) pool.Schedule(decltype(work)(work));  // a copy per task
  work();
  while (counters->done.load(std::memory_order_acquire) < chunks) _mm_pause();
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
