// Memory bandwidth probe for `hpllm hw` (hpllm/perf/hardware.py): one thread per core, each
// streaming its own slice of one large buffer. XLA:CPU runs a reduction on one thread, which
// sees about half of what both cores of a machine can read; a decode step's weight reads
// are spread over all cores, so this is the bandwidth its roofline needs.
//
// Plain C ABI, loaded with ctypes. GCC vector types: the compiler lowers them to whatever
// the target has (AVX-512 with -march=native, SSE2 with -march=x86-64).

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <thread>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64)));

v16 splat(float x) {
  v16 v = {};
  return v + x;
}

// Four independent accumulators: the adds of one do not wait on the others.
float read_slice(const v16* p, size_t n) {
  v16 a = {}, b = {}, c = {}, d = {};
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += p[i];
    b += p[i + 1];
    c += p[i + 2];
    d += p[i + 3];
  }
  for (; i < n; ++i) a += p[i];
  v16 s = (a + b) + (c + d);
  float total = 0;
  for (int k = 0; k < 16; ++k) total += s[k];
  return total;
}

void scale_slice(v16* dst, const v16* src, size_t n) {
  const v16 f = splat(1.0001f);
  for (size_t i = 0; i < n; ++i) dst[i] = src[i] * f;
}

// Runs init(begin, end) once and then body(thread, begin, end) `repeats` times on `threads`
// threads (the caller's is thread 0) over n vectors, each repeat released to all at once;
// returns the best wall time of one repeat. Each thread first-touches its own slice in
// init, so its pages are faulted in before the clock starts.
template <typename Init, typename Body>
double best_seconds(size_t n, int threads, int repeats, Init init, Body body) {
  std::atomic<int> ready{0}, round{-1}, done{0};
  auto work = [&](int t) {
    size_t begin = n * t / threads, end = n * (t + 1) / threads;
    init(begin, end);
    ready.fetch_add(1);
    for (int r = 0; r < repeats; ++r) {
      while (round.load(std::memory_order_acquire) < r) std::this_thread::yield();
      body(t, begin, end);
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
  size_t begin = 0, end = n / threads;
  init(begin, end);
  ready.fetch_add(1);
  while (ready.load() < threads) std::this_thread::yield();
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    round.store(r, std::memory_order_release);
    body(0, begin, end);
    done.fetch_add(1, std::memory_order_acq_rel);
    // yield: on a loaded machine a waiting thread hands its core to a straggler
    while (done.load(std::memory_order_acquire) < threads * (r + 1)) std::this_thread::yield();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0)
                              .count());
  }
  for (auto& th : pool) th.join();
  return best;
}

v16* alloc_vectors(size_t n) {
  return static_cast<v16*>(std::aligned_alloc(64, n * sizeof(v16)));
}

}  // namespace

extern "C" {

// Best bytes/s of reading `nbytes` with `threads` threads (0 when allocation fails).
double hpllm_read_bandwidth(size_t nbytes, int threads, int repeats) {
  if (threads < 1 || repeats < 1) return 0.0;
  size_t n = nbytes / sizeof(v16);
  v16* buf = alloc_vectors(n);
  if (buf == nullptr) return 0.0;
  std::vector<float> sink(threads);
  double s = best_seconds(
      n, threads, repeats,
      [&](size_t b, size_t e) { std::fill(buf + b, buf + e, splat(1.0f)); },
      [&](int t, size_t b, size_t e) { sink[t] += read_slice(buf + b, e - b); });
  volatile float keep = 0;
  for (float x : sink) keep += x;  // the sums are used: the reads cannot be dropped
  std::free(buf);
  return n * sizeof(v16) / s;
}

// Best bytes/s (read + write counted, as STREAM does) of dst = src * 1.0001.
double hpllm_copy_bandwidth(size_t nbytes, int threads, int repeats) {
  size_t n = nbytes / sizeof(v16);
  v16* src = alloc_vectors(n);
  v16* dst = alloc_vectors(n);
  if (src == nullptr || dst == nullptr || threads < 1 || repeats < 1) {
    std::free(src);
    std::free(dst);
    return 0.0;
  }
  double s = best_seconds(
      n, threads, repeats,
      [&](size_t b, size_t e) {
        std::fill(src + b, src + e, splat(1.0f));
        std::fill(dst + b, dst + e, splat(0.0f));
      },
      [&](int, size_t b, size_t e) { scale_slice(dst + b, src + b, e - b); });
  volatile float keep = reinterpret_cast<float*>(dst)[n * 8];
  (void)keep;
  std::free(src);
  std::free(dst);
  return 2.0 * n * sizeof(v16) / s;
}
}
