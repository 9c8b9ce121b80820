// Chunks of one call's work, claimed through an atomic counter by the calling thread and
// (num_threads - 1) tasks on XLA's intra-op thread pool: the threading of hpllm's CPU FFI
// kernels (quant_matmul.cc, bf16_matmul.cc).
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace hpllm {

constexpr int kSpinBeforeBlocking = 1024;  // ~20-60 us of pause before sleeping on the wait

// Row chunks claimed by an atomic counter. Held by a shared_ptr: a pool task that starts
// after the call returned finds nothing to claim and only drops its reference.
struct Work {
  std::function<void(int64_t)> run_chunk;  // touches the call's buffers: only while claimable
  int64_t num_chunks = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable all_done;

  void ClaimAndRun() {
    for (;;) {
      const int64_t c = next.fetch_add(1, std::memory_order_relaxed);
      if (c >= num_chunks) return;
      run_chunk(c);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == num_chunks) {
        std::lock_guard<std::mutex> lock(mu);
        all_done.notify_all();
      }
    }
  }
};

inline void ParallelChunks(xla::ffi::ThreadPool& pool, int64_t num_chunks,
                    std::function<void(int64_t)> run_chunk) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, num_chunks - 1);
  if (helpers <= 0) {
    for (int64_t c = 0; c < num_chunks; ++c) run_chunk(c);
    return;
  }
  auto work = std::make_shared<Work>();
  work->run_chunk = std::move(run_chunk);
  work->num_chunks = num_chunks;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->ClaimAndRun(); });
  work->ClaimAndRun();
  // Every chunk is claimed now; wait only for those claimed by helpers and still running
  // (a helper task still queued claims nothing, so a busy pool cannot deadlock this).
  for (int spin = 0; work->done.load(std::memory_order_acquire) < num_chunks; ++spin) {
    if (spin < kSpinBeforeBlocking) {
#ifdef __AVX2__
      _mm_pause();
#endif
      continue;
    }
    std::unique_lock<std::mutex> lock(work->mu);
    work->all_done.wait(lock, [&] {
      return work->done.load(std::memory_order_acquire) == num_chunks;
    });
    break;
  }
}

}  // namespace hpllm
