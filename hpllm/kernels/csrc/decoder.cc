// The whole Llama decoder step as one XLA FFI call on the CPU: a ragged batch of T tokens
// (decode tokens, prefill chunks and padding of several sequences) over a paged KV pool.
//
//   embed rows -> per layer: RMSNorm -> QKV -> RoPE -> K/V into the pool -> paged attention
//   -> o-proj + residual -> RMSNorm -> gate/up -> SiLU(gate) * up -> down + residual
//   -> final RMSNorm -> LM head for the logits_index rows only.
//
// Why: XLA:CPU runs ~36 ops per layer per token, each a dispatch and a thread-pool hand-off;
// here the step is a list of phases (5 per layer and 1 for the head; 4 when the attention is
// tiny and runs in the QKV epilogue; 8 from kSplitTokens tokens on, when the norms and RoPE
// are worth splitting) whose work is cut into chunks (guided: large first, small last). The
// calling thread and (num_threads - 1) pool tasks claim chunks with an atomic counter;
// whoever finishes a phase's last chunk runs its small serial epilogue (norms, RoPE, K/V
// writes) and publishes the next phase by bumping a generation counter. The others spin on
// it, prefetching the next phase's first weight rows meanwhile, then sleep (futex). A pool
// task that never starts claims nothing, so the calling thread can always finish the step
// alone: nothing can deadlock.
//
// Layout (hpllm/kernels/cpu_decoder.py `prepare` builds it): every matrix output-major
// (N, K), K contiguous, stacked over layers: wqkv (L, (H + 2 KVH) Dh, D) with Q rows
// h * Dh + d, then K rows, then V rows; wo (L, D, H Dh); wgu (L, 2F, D), gate rows then up
// rows; wdown (L, D, F); embed and head (V, D). Each matrix is float32, int8 codes with one
// scale per row (scale (..., N, 1)) or int4 codes packed two per byte as
// cpu_quant_matmul.pack_int4 (scale (..., N, Kp / g)), told apart by its dtype. Float
// matrices get a (1,) placeholder scale. The KV pool: k, v (L, blocks, bs, KVH, Dh) float32
// (target HpllmDecoderStep), or int8 codes plus k, v scales (L, blocks, bs, KVH) float32
// (HpllmDecoderStepKv8), aliased in place.
//
// The matmul core is gemm.h's matmul_block; this file owns the phases around it.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "xla/ffi/api/ffi.h"

#ifdef __linux__
#include <climits>
#include <ctime>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace hpllm_decoder {

// ----------------------------------------------------------------- weights (gemm.h)

using hpllm::matmul_block;
using hpllm::matmul_block_x16;
using hpllm::WeightView;
using hpllm::WFormat;

inline float Int4Code(const uint8_t* p, int64_t k) {
  const uint8_t b = p[k >> 1];
  return static_cast<float>(static_cast<int>((k & 1) ? (b >> 4) : (b & 0x0F)) - 8);
}

// Row n of w as floats (the embedding lookup).
void DequantizeRow(const WeightView& w, int64_t n, float* out) {
  switch (w.fmt) {
    case WFormat::F32:
      std::memcpy(out, static_cast<const float*>(w.data) + n * w.K, w.K * sizeof(float));
      break;
    case WFormat::INT8: {
      const int8_t* row = static_cast<const int8_t*>(w.data) + n * w.K;
      for (int64_t k = 0; k < w.K; ++k) out[k] = static_cast<float>(row[k]) * w.scale[n];
      break;
    }
    case WFormat::INT4: {
      const int64_t kp = (w.K + w.group_size - 1) / w.group_size * w.group_size;
      const uint8_t* row = static_cast<const uint8_t*>(w.data) + n * (kp / 2);
      const float* s = w.scale + n * (kp / w.group_size);
      for (int64_t k = 0; k < w.K; ++k) out[k] = Int4Code(row, k) * s[k / w.group_size];
      break;
    }
  }
}

int64_t RowBytes(const WeightView& w) {
  switch (w.fmt) {
    case WFormat::F32: return 4 * w.K;
    case WFormat::INT8: return w.K;
    default: return (w.K + w.group_size - 1) / w.group_size * w.group_size / 2;
  }
}

// ---------------------------------------------------------------------------- threading

// Weight bytes per claimed matmul chunk, at most: long sequential runs keep the hardware
// prefetchers streaming (SmolLM2 int8 decode, idle: 24 KB chunks read ~20 GB/s, 256 KB ~30).
constexpr int64_t kChunkBytes = 256 << 10;
// ... and at least (but 16 rows): the chunks shrink towards a phase's end (guided
// scheduling), so the threads reach its barrier within a small chunk of each other.
constexpr int64_t kMinChunkBytes = 16 << 10;
// Bytes of a phase's first rows that threads waiting at the barrier before it prefetch.
constexpr int64_t kPrefetchBytes = 256 << 10;

// Row bounds of a phase's chunks over N rows of row_bytes each: chunk sizes remaining /
// (2 threads), clamped to [kMinChunkBytes, kChunkBytes] and rounded to `quantum` rows (16:
// gemm.h's panels; 32 where its packed panels run, which pair 16-row strips), so each
// thread's share ends with small chunks.
std::vector<int64_t> ChunkBounds(int64_t N, int64_t row_bytes, int64_t threads,
                                 int64_t quantum = 16) {
  const int64_t q = quantum;
  const int64_t max_rows = std::max<int64_t>(q, kChunkBytes / std::max<int64_t>(1, row_bytes));
  const int64_t min_rows =
      std::max<int64_t>(q, kMinChunkBytes / std::max<int64_t>(1, row_bytes)) / q * q;
  std::vector<int64_t> bounds{0};
  for (int64_t n = 0; n < N;) {
    int64_t rows = std::clamp((N - n) / (2 * threads), min_rows, max_rows) / q * q;
    rows = std::max<int64_t>(rows, q);
    n = N - n <= rows + min_rows / 2 ? N : n + rows;  // no sliver at the end
    bounds.push_back(n);
  }
  return bounds;
}
// From this many tokens the norms and RoPE get phases of their own, split across threads;
// below it they run serially between phases (an extra barrier costs more than they do).
constexpr int64_t kSplitTokens = 8;
// Attention of at most this many (query head, position) pairs per layer runs serially in the
// QKV epilogue, where it costs less than a barrier (~7 ns per pair: SmolLM2 decode at 128
// positions is ~8 us per layer, more than the ~1-2 us of a barrier with both threads on it).
constexpr int64_t kSerialAttentionWork = 256;
// Pauses before a waiting thread sleeps: ~50 us (a pause is ~50 ns on Zen 5), more than one
// phase's imbalance on an idle machine. Then it sleeps on the phase counter (a futex): on a
// loaded machine a spinning or yielding waiter burns the time slices the holder of the
// phase's last chunk needs, and the scheduler favours threads that slept when they wake.
constexpr int kSpinBeforeSleep = 1024;

#ifdef __linux__
// timeout: a safety net, never needed for correctness.
inline void FutexWait(std::atomic<int>* word, int expected, long timeout_ns = 2000000) {
  static_assert(sizeof(std::atomic<int>) == sizeof(int), "futex on std::atomic<int>");
  const timespec timeout{timeout_ns / 1000000000, timeout_ns % 1000000000};
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAIT_PRIVATE, expected, &timeout,
          nullptr, 0);
}
inline void FutexWakeAll(std::atomic<int>* word) {
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}
#else
inline void FutexWait(std::atomic<int>*, int, long = 0) { std::this_thread::yield(); }
inline void FutexWakeAll(std::atomic<int>*) {}
#endif

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Per-phase wall time (HPLLM_DECODER_PROFILE=1): the finisher of each phase adds the time
// since the previous phase was published to its kind; read by HpllmDecoderProfile. The
// counters say who did the work: chunks run by the calling thread and by pool tasks, pool
// tasks that joined a step before its end (and at which phase, summed), futex sleeps, and
// the threads a step could use (summed over steps), ns from scheduling a pool task to its
// start, ns threads spent waiting at barriers, thread-CPU ns of serial attention, ns between
// the end of a step and the start of the next, helpers that found a step while still
// spinning after the last one (not asleep).
constexpr int kKinds = 7;  // qkv+rope, attention, o-proj, gate/up, down, head, prologue
enum Counter { kCallerChunks, kHelperChunks, kHelpersJoined, kJoinPhaseSum, kSleeps,
               kThreadsSum, kJoinNs, kWaitNs, kAttentionCpuNs, kGapNs, kCaughtSpinning,
               kCounters };
std::atomic<int64_t> g_profile_ns[kKinds];
std::atomic<int64_t> g_profile_steps{0};
std::atomic<int64_t> g_counters[kCounters];
bool ProfileOn() {
  static const bool on = [] {
    const char* v = std::getenv("HPLLM_DECODER_PROFILE");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  return on;
}
int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
void Count(Counter c, int64_t n = 1) { g_counters[c].fetch_add(n, std::memory_order_relaxed); }
int64_t ThreadCpuNs() {
#ifdef __linux__
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1000000000LL + ts.tv_nsec;
#else
  return NowNs();
#endif
}

inline void PrefetchLine(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, 3);
#endif
}

// Weight bytes a phase reads first (up to two streams, e.g. gate rows and up rows): a thread
// waiting at the barrier before it pulls them into the caches meanwhile, so the phase does
// not start on cold streams.
struct Stream {
  const char* a = nullptr;
  const char* b = nullptr;
  int64_t bytes = 0;  // per stream
};
// Lines a waiting thread prefetches per pause: 8 x 64 B per ~50 ns pause (Zen 5) is ~10 GB/s,
// a third of one core's bandwidth, so the holder of the last chunk keeps most of it.
constexpr int kPrefetchLinesPerSpin = 8;

// The phases of one step. Held by a shared_ptr: a helper that joins after the call returned
// sees phase == num_phases and only drops its reference. phase is -1 until the caller has
// set everything up (helpers are woken before the prologue and wait for it).
struct Team {
  int num_phases = 0;  // read by helpers only once phase >= 0 (published with it)
  int64_t max_helpers = 0;
  std::atomic<int64_t> joined{0};
  std::function<int64_t(int)> chunks;       // chunks of phase p (>= 1)
  std::function<void(int, int64_t)> run;    // chunk c of phase p
  std::function<void(int)> epilogue;        // serial, by the finisher of phase p
  std::function<Stream(int)> first_bytes;   // what phase p reads first (prefetched)
  std::unique_ptr<std::atomic<int64_t>[]> next, done;
  std::vector<int64_t> count;
  std::vector<Stream> streams;
  std::atomic<int> phase{-1};
  std::atomic<int> sleepers{0};  // threads asleep (or about to be) on `phase`
  std::function<int(int)> kind;  // profile bucket of phase p
  bool profile = false;
  int64_t last_ns = 0;  // when the current phase was published (written by its publisher)
  int64_t scheduled_ns = 0;

  void Work(bool caller) {
    int spins = 0;
    int64_t mine = 0, waited_ns = 0;
    if (!caller && profile) {
      const int p = phase.load(std::memory_order_acquire);
      if (p < 0 || p < num_phases)
        Count(kHelpersJoined), Count(kJoinPhaseSum, std::max(p, 0)),
            Count(kJoinNs, NowNs() - scheduled_ns);
    }
    for (;;) {
      const int p = phase.load(std::memory_order_acquire);
      if (p >= 0 && p >= num_phases) break;
      if (p < 0) {  // woken before the caller published the step: wait for phase 0
        Wait(p, Stream{}, spins, waited_ns);
        continue;
      }
      const int64_t c = next[p].fetch_add(1, std::memory_order_relaxed);
      if (c < count[p]) {
        run(p, c);
        ++mine;
        if (done[p].fetch_add(1, std::memory_order_acq_rel) + 1 == count[p]) {
          epilogue(p);
          if (profile) {
            const int64_t now = NowNs();
            g_profile_ns[kind(p)].fetch_add(now - last_ns, std::memory_order_relaxed);
            last_ns = now;
          }
          Publish(p + 1);
        }
        spins = 0;
        continue;
      }
      // Nothing left to claim in p: wait for its last chunk (and the epilogue) to finish,
      // prefetching what phase p + 1 reads first.
      Wait(p, p + 1 < num_phases ? streams[p + 1] : Stream{}, spins, waited_ns);
    }
    if (profile) Count(caller ? kCallerChunks : kHelperChunks, mine), Count(kWaitNs, waited_ns);
  }

  // Until phase != p: spin (prefetching s), then sleep on the counter. The seq_cst pair
  // (sleepers++ then the futex's check of phase; phase store then sleepers load) means a
  // publisher either sees the sleeper or the sleeper sees the new phase.
  void Wait(int p, const Stream& s, int& spins, int64_t& waited_ns) {
    int64_t fetched = 0;
    const int64_t wait_start = profile ? NowNs() : 0;
    while (phase.load(std::memory_order_acquire) == p) {
      if (fetched < s.bytes) {
        for (int i = 0; i < kPrefetchLinesPerSpin && fetched < s.bytes; ++i, fetched += 64) {
          PrefetchLine(s.a + fetched);
          if (s.b) PrefetchLine(s.b + fetched);
        }
      }
      if (++spins < kSpinBeforeSleep) {
        Pause();
        continue;
      }
      if (profile) Count(kSleeps);
      sleepers.fetch_add(1, std::memory_order_seq_cst);
      if (phase.load(std::memory_order_seq_cst) == p) FutexWait(&phase, p);
      sleepers.fetch_sub(1, std::memory_order_relaxed);
    }
    if (profile) waited_ns += NowNs() - wait_start;
  }

  void Publish(int p) {
    phase.store(p, std::memory_order_seq_cst);
    if (sleepers.load(std::memory_order_seq_cst) > 0) FutexWakeAll(&phase);
  }
};

// ---------------------------------------------------------------------- helper threads
//
// Persistent helpers owned by this library (started on first use, detached, never freed):
// XLA's pool wakes a task only when the step schedules it, and a sleeping worker on this VM
// took a large part of the step to arrive. A step posts its Team (the caller bumps
// `generation`, before its prologue); helpers spin LingerNs() after each step's end (decode
// calls the next step sooner than that) and then sleep on `generation`. Each step also
// schedules one task on XLA's pool that takes a helper's place if it arrives first (on a
// loaded machine a woken pool worker often does). A helper that is late, busy or absent
// claims nothing that the caller cannot do itself. HPLLM_DECODER_LINGER_US sets a spin after
// each step; the default is 0 (sleep at once): idle SmolLM2 decode measured as fast or faster
// without the spin (int8 158-182 vs 152-171 tok/s) for 2-3 ms less CPU per step, and a
// spinning helper takes a core from the server's other threads.
int64_t LingerNs() {
  static const int64_t ns = [] {
    const char* v = std::getenv("HPLLM_DECODER_LINGER_US");
    return v != nullptr && v[0] != '\0' ? 1000 * std::max(0L, std::atol(v)) : 0L;
  }();
  return ns;
}
constexpr int64_t kMaxHelpers = 63;

struct Helpers {
  std::mutex mu;
  std::shared_ptr<Team> current;  // the newest step's team (guarded by mu)
  int64_t started = 0;            // guarded by mu
  std::atomic<int> generation{0};
  std::atomic<int> sleepers{0};
};

Helpers& Global() {
  static Helpers* h = new Helpers;  // never destroyed: detached threads use it until exit
  return *h;
}

void HelperMain(int seen) {
  Helpers& g = Global();
  for (;;) {
    const int64_t linger_until = NowNs() + LingerNs();
    bool slept = false;
    while (g.generation.load(std::memory_order_acquire) == seen) {
      if (NowNs() < linger_until) {
        Pause();
        continue;
      }
      slept = true;
      g.sleepers.fetch_add(1, std::memory_order_seq_cst);
      if (g.generation.load(std::memory_order_seq_cst) == seen)
        FutexWait(&g.generation, seen, 100000000);  // 100 ms
      g.sleepers.fetch_sub(1, std::memory_order_relaxed);
    }
    seen = g.generation.load(std::memory_order_acquire);
    std::shared_ptr<Team> team;
    {
      std::lock_guard<std::mutex> lock(g.mu);
      team = g.current;
    }
    if (team && team->joined.fetch_add(1, std::memory_order_relaxed) < team->max_helpers) {
      if (team->profile && !slept) Count(kCaughtSpinning);
      team->Work(false);
    }
  }
}

// Posts `team` to up to `helpers` helper threads (started as needed).
void PostTeam(const std::shared_ptr<Team>& team, int64_t helpers) {
  helpers = std::min(helpers, kMaxHelpers);
  team->max_helpers = helpers;
  if (helpers <= 0) return;
  Helpers& g = Global();
  {
    std::lock_guard<std::mutex> lock(g.mu);
    g.current = team;
    for (; g.started < helpers; ++g.started) {
      // A new thread waits for the generation after this one's: it joins this step.
      std::thread(HelperMain, g.generation.load(std::memory_order_relaxed)).detach();
    }
  }
  g.generation.fetch_add(1, std::memory_order_seq_cst);
  if (g.sleepers.load(std::memory_order_seq_cst) > 0) FutexWakeAll(&g.generation);
}

// Ends a posted team however the step returns (an error before its phases ran: none).
std::atomic<int64_t> g_last_step_end_ns{0};

struct TeamGuard {
  std::shared_ptr<Team> team;
  ~TeamGuard() {
    if (team->profile) g_last_step_end_ns.store(NowNs(), std::memory_order_relaxed);
    if (team->phase.load(std::memory_order_acquire) < 0) {
      team->num_phases = 0;
      team->Publish(0);
    }
    Helpers& g = Global();
    std::lock_guard<std::mutex> lock(g.mu);
    if (g.current == team) g.current.reset();
  }
};

// Sets up the phases' counters and runs the step on the calling thread (with the helpers).
void RunTeam(const std::shared_ptr<Team>& team) {
  team->next.reset(new std::atomic<int64_t>[team->num_phases]);
  team->done.reset(new std::atomic<int64_t>[team->num_phases]);
  team->count.resize(team->num_phases);
  team->streams.resize(team->num_phases);
  for (int p = 0; p < team->num_phases; ++p) {
    team->next[p].store(0);
    team->done[p].store(0);
    team->count[p] = std::max<int64_t>(1, team->chunks(p));
    team->streams[p] = team->first_bytes ? team->first_bytes(p) : Stream{};
  }
  if (team->profile) team->last_ns = NowNs();
  team->Publish(0);
  team->Work(true);
}

// ------------------------------------------------------------------------------- the step

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

ffi::Error Bad(const std::string& what) { return ffi::Error::InvalidArgument(what); }

// A stacked (or single) matrix of `layers` x (N, K): its format from the dtype, checked.
ffi::ErrorOr<WeightView> View(const char* name, const ffi::AnyBuffer& data,
                              const ffi::Buffer<ffi::F32>& scale, int64_t layers, int64_t N,
                              int64_t K) {
  auto d = data.dimensions();
  auto s = scale.dimensions();
  WeightView w{WFormat::F32, data.untyped_data(), scale.typed_data(), N, K, 0};
  const int64_t lead = layers > 0 ? 1 : 0;
  auto fail = [&](const std::string& why) {
    return ffi::Unexpected(Bad(std::string(name) + " " + ShapeString(d) + " scale " +
                               ShapeString(s) + ": " + why));
  };
  if (static_cast<int64_t>(d.size()) != 2 + lead || (lead && d[0] != layers) ||
      d[lead] != N)
    return fail("needs shape (" + std::string(lead ? "L, " : "") + std::to_string(N) +
                ", K) for N = " + std::to_string(N));
  switch (data.element_type()) {
    case ffi::DataType::F32:
      if (d[lead + 1] != K) return fail("float32 rows need K = " + std::to_string(K));
      return w;
    case ffi::DataType::S8:
      w.fmt = WFormat::INT8;
      if (d[lead + 1] != K || scale.element_count() != std::max<int64_t>(layers, 1) * N)
        return fail("int8 needs K = " + std::to_string(K) + " and one scale per row");
      return w;
    case ffi::DataType::U8: {
      w.fmt = WFormat::INT4;
      const int64_t kp = 2 * d[lead + 1];
      const int64_t groups = s.size() == 0 ? 0 : s.back();
      if (groups <= 0 || kp % groups || kp < K ||
          scale.element_count() != std::max<int64_t>(layers, 1) * N * groups)
        return fail("int4 codes and group scales do not fit K = " + std::to_string(K));
      w.group_size = kp / groups;
      if (w.group_size % 2 || kp - w.group_size >= K) return fail("bad int4 group size");
      return w;
    }
    default:
      return fail("must be float32, int8 or uint8 (int4) codes");
  }
}

WeightView Layer(const WeightView& w, int64_t l) {
  WeightView v = w;
  v.data = static_cast<const char*>(w.data) + l * w.N * RowBytes(w);
  const int64_t per_row = w.fmt == WFormat::INT4
                              ? (w.K + w.group_size - 1) / w.group_size
                              : (w.fmt == WFormat::INT8 ? 1 : 0);
  v.scale = w.scale + l * w.N * per_row;
  return v;
}

namespace gd = hpllm::gemm_detail;

// sum_d a[d] b[d] in two vector accumulators (gemm.h's vectors: AVX-512, AVX2 or scalar).
inline float Dot(const float* a, const float* b, int64_t n) {
  constexpr int64_t kL = gd::kLanes;
  gd::Vf s0 = gd::Zero(), s1 = gd::Zero();
  int64_t d = 0;
  for (; d + 2 * kL <= n; d += 2 * kL) {
    s0 = gd::Fma(gd::Load(a + d), gd::Load(b + d), s0);
    s1 = gd::Fma(gd::Load(a + d + kL), gd::Load(b + d + kL), s1);
  }
  for (; d + kL <= n; d += kL) s0 = gd::Fma(gd::Load(a + d), gd::Load(b + d), s0);
  float s = gd::Sum(s0 + s1);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// e^x, x clamped to [-87, 88]: Cephes' expf polynomial (within ~2 ulp of libm's), no libm
// call and no float -> int conversion (that one could trap, which stops GCC from
// vectorising), so loops over it vectorise: SiLU over 1536 floats 0.8 us vs libm's 3.5.
inline float ExpClamped(float x) {
  const float c = std::min(std::max(x, -87.0f), 88.0f);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float big = c * 1.44269504089f + kRound;
  const float n = big - kRound;
  const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  int32_t big_bits, round_bits;
  std::memcpy(&big_bits, &big, sizeof(big));
  std::memcpy(&round_bits, &kRound, sizeof(kRound));
  const int32_t bits = (big_bits - round_bits + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// e^x for softmax weights (x <= 0): 0 below -87 (and for -inf).
inline float ExpNonPositive(float x) { return x < -87.0f ? 0.0f : ExpClamped(x); }

// Online softmax over positions lo..hi of a sequence in tiles of kTile positions: scores,
// their weights in one vectorised pass, then the V sum. row(j0, n, offset) writes the
// offsets of the K/V rows of positions j0..j0+n-1; score(offset) is a K row's scaled score;
// rescale(c) multiplies the output accumulators by c; add(offset, w, n) adds the tile's V
// rows times their weights and returns the weights' sum. Returns the softmax denominator.
constexpr int kTile = 64;
template <typename RowOffset, typename Score, typename Rescale, typename Add>
float OnlineSoftmax(int64_t lo, int64_t hi, const RowOffset& row, const Score& score,
                    const Rescale& rescale, const Add& add) {
  float w[kTile];
  int64_t offset[kTile];
  float m = -INFINITY, denom = 0.0f;
  for (int64_t j0 = lo; j0 <= hi; j0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, hi + 1 - j0);
    row(j0, n, offset);
    float tile_max = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      w[i] = score(offset[i]);
      tile_max = std::max(tile_max, w[i]);
    }
    const float m_new = std::max(m, tile_max);
    const float corr = ExpNonPositive(m - m_new);  // 0 on the first tile
    denom *= corr;
    rescale(corr);
    for (int64_t i = 0; i < n; ++i) w[i] = ExpNonPositive(w[i] - m_new);
    denom += add(offset, w, n);
    m = m_new;
  }
  return denom;
}

// One query head q: Dh = ND vectors, q and the output kept in registers. int8 pools: codes
// with one scale per (position, head) row, ks / vs at offset / Dh, folded into the scores
// and the weights.
inline gd::Vf LoadKv(const float* p) { return gd::Load(p); }
inline gd::Vf LoadKv(const int8_t* p) { return gd::LoadI8(p); }
template <int ND, typename KV, typename RowOffset>
void AttendVec(const float* q, const KV* k, const KV* v, const float* ks, const float* vs,
               int64_t Dh, int64_t lo, int64_t hi, float scale, const RowOffset& row,
               float* out) {
  constexpr bool kCodes = std::is_same<KV, int8_t>::value;
  constexpr int64_t kL = gd::kLanes;
  // Two accumulator sets (even / odd positions): the V sum is not one FMA latency chain.
  gd::Vf qr[ND], acc[2][ND];
  for (int i = 0; i < ND; ++i)
    qr[i] = gd::Load(q + i * kL), acc[0][i] = gd::Zero(), acc[1][i] = gd::Zero();
  auto score = [&](int64_t off) {
    const KV* kr = k + off;
    gd::Vf s0 = gd::Fma(qr[0], LoadKv(kr), gd::Zero()), s1 = gd::Zero();
    for (int d = 1; d < ND; ++d)
      (d & 1 ? s1 : s0) = gd::Fma(qr[d], LoadKv(kr + d * kL), d & 1 ? s1 : s0);
    return gd::Sum(s0 + s1) * (kCodes ? scale * ks[off / Dh] : scale);
  };
  auto rescale = [&](float c) {
    for (int d = 0; d < ND; ++d) acc[0][d] = acc[0][d] * c, acc[1][d] = acc[1][d] * c;
  };
  auto add = [&](const int64_t* offset, const float* w, int64_t n) {
    auto weight = [&](int64_t i) { return kCodes ? w[i] * vs[offset[i] / Dh] : w[i]; };
    float sum = 0.0f;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
      const KV *v0 = v + offset[i], *v1 = v + offset[i + 1];
      const gd::Vf p0 = gd::Zero() + weight(i), p1 = gd::Zero() + weight(i + 1);
      sum += w[i] + w[i + 1];
      for (int d = 0; d < ND; ++d) {
        acc[0][d] = gd::Fma(p0, LoadKv(v0 + d * kL), acc[0][d]);
        acc[1][d] = gd::Fma(p1, LoadKv(v1 + d * kL), acc[1][d]);
      }
    }
    if (i < n) {
      const gd::Vf p0 = gd::Zero() + weight(i);
      sum += w[i];
      for (int d = 0; d < ND; ++d)
        acc[0][d] = gd::Fma(p0, LoadKv(v + offset[i] + d * kL), acc[0][d]);
    }
    return sum;
  };
  const float inv = 1.0f / OnlineSoftmax(lo, hi, row, score, rescale, add);
  for (int d = 0; d < ND; ++d) gd::Store(out + d * kL, (acc[0][d] + acc[1][d]) * inv);
}

// The same for any head_dim (scalar loops; the output accumulates in out).
template <typename KV, typename RowOffset>
void AttendAny(const float* q, const KV* k, const KV* v, const float* ks, const float* vs,
               int64_t Dh, int64_t lo, int64_t hi, float scale, const RowOffset& row,
               float* __restrict out) {
  constexpr bool kCodes = std::is_same<KV, int8_t>::value;
  std::fill(out, out + Dh, 0.0f);
  auto score = [&](int64_t off) {
    const KV* kr = k + off;
    if constexpr (kCodes) {
      float dot = 0.0f;
      for (int64_t d = 0; d < Dh; ++d) dot += q[d] * static_cast<float>(kr[d]);
      return dot * ks[off / Dh] * scale;
    } else {
      return Dot(q, kr, Dh) * scale;
    }
  };
  auto rescale = [&](float c) {
    for (int64_t d = 0; d < Dh; ++d) out[d] *= c;
  };
  auto add = [&](const int64_t* offset, const float* w, int64_t n) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const KV* __restrict vr = v + offset[i];
      const float p = kCodes ? w[i] * vs[offset[i] / Dh] : w[i];
      sum += w[i];
      for (int64_t d = 0; d < Dh; ++d) out[d] += p * static_cast<float>(vr[d]);
    }
    return sum;
  };
  const float inv = 1.0f / OnlineSoftmax(lo, hi, row, score, rescale, add);
  for (int64_t d = 0; d < Dh; ++d) out[d] *= inv;
}

#if defined(HPLLM_GEMM_AVX512)
// e^x of 16 lanes (ExpClamped's polynomial), 0 where x < -87 (and for -inf).
inline __m512 ExpNonPositive16(__m512 x) {
  const __m512 c = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 round = _mm512_set1_ps(12582912.0f);
  const __m512 big = _mm512_fmadd_ps(c, _mm512_set1_ps(1.44269504089f), round);
  const __m512 n = _mm512_sub_ps(big, round);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), c);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(big), _mm512_castps_si512(round)),
                       _mm512_set1_epi32(127)),
      23);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  return _mm512_maskz_mul_ps(keep, y, _mm512_castsi512_ps(bits));
}

// Blocked attention (prefill chunks): `rows` query rows (the query heads of one KV head for a
// few consecutive tokens of one sequence; row r attends positions lo[r]..hi[r]) against the
// keys lo_all..hi_all in tiles of kTile positions. Each K tile is transposed once (k-major,
// an int8 pool's row scale folded in) and each V tile gathered once for all the rows, so
// the scores and the V sum are outer products: no horizontal sum per (row, position), and
// each K/V byte is read once per block instead of once per query row. ND = head_dim / 16.
constexpr int kBlockRows = 48;  // query rows per block at most (16 tokens x 3 heads)
template <int ND, typename KV, typename RowOffset>
void AttendBlock(const float* const* q, float* const* out, int rows, const int64_t* lo,
                 const int64_t* hi, const KV* k, const KV* v, const float* ks, const float* vs,
                 float scale, const RowOffset& row) {
  constexpr int Dh = 16 * ND, kRT = 4, kPT = ND >= 4 ? 16 / ND : 4;  // row tiles: scores, PV
  constexpr bool kCodes = std::is_same<KV, int8_t>::value;
  alignas(64) static thread_local float kt[Dh][kTile], vt[kTile][Dh], qs[kBlockRows][Dh],
      acc[kBlockRows][Dh], sc[kBlockRows][kTile];
  float m[kBlockRows], den[kBlockRows];
  int64_t lo_all = lo[0], hi_all = hi[0];
  for (int r = 0; r < rows; ++r) {
    for (int d = 0; d < Dh; ++d) qs[r][d] = q[r][d] * scale, acc[r][d] = 0.0f;
    m[r] = -INFINITY, den[r] = 0.0f;
    lo_all = std::min(lo_all, lo[r]), hi_all = std::max(hi_all, hi[r]);
  }
  const int padded = (rows + kRT - 1) / kRT * kRT;
  for (int r = rows; r < padded; ++r)  // score tiles run whole: spare rows score zeros
    for (int d = 0; d < Dh; ++d) qs[r][d] = 0.0f;
  int64_t offset[kTile];
  for (int64_t j0 = lo_all; j0 <= hi_all; j0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, hi_all + 1 - j0));
    row(j0, n, offset);
    for (int j = 0; j < kTile; ++j) {
      const KV* kr = k + offset[j < n ? j : 0];
      const KV* vr = v + offset[j < n ? j : 0];
      const float cs = j >= n ? 0.0f : kCodes ? ks[offset[j] / Dh] : 1.0f;
      const float cv = j >= n ? 0.0f : kCodes ? vs[offset[j] / Dh] : 1.0f;
      for (int d = 0; d < Dh; ++d)
        kt[d][j] = static_cast<float>(kr[d]) * cs, vt[j][d] = static_cast<float>(vr[d]) * cv;
    }
    for (int r0 = 0; r0 < padded; r0 += kRT) {  // scores: kRT rows x 64 positions
      __m512 s[kRT][4];
      for (int i = 0; i < kRT; ++i)
        for (int c = 0; c < 4; ++c) s[i][c] = _mm512_setzero_ps();
      for (int d = 0; d < Dh; ++d) {
        __m512 kv[4];
        for (int c = 0; c < 4; ++c) kv[c] = _mm512_load_ps(&kt[d][16 * c]);
        for (int i = 0; i < kRT; ++i) {
          const __m512 b = _mm512_set1_ps(qs[r0 + i][d]);
          for (int c = 0; c < 4; ++c) s[i][c] = _mm512_fmadd_ps(b, kv[c], s[i][c]);
        }
      }
      for (int i = 0; i < kRT && r0 + i < rows; ++i)
        for (int c = 0; c < 4; ++c) _mm512_store_ps(&sc[r0 + i][16 * c], s[i][c]);
    }
    for (int r = 0; r < rows; ++r) {  // online softmax, the row's positions only
      const __m512i j = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(j0)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                           11, 12, 13, 14, 15));
      const int64_t a = std::max(lo[r], j0), b = std::min(hi[r], j0 + n - 1);
      if (a > b) {  // no position of this tile: weights 0
        for (int c = 0; c < 4; ++c) _mm512_store_ps(&sc[r][16 * c], _mm512_setzero_ps());
        continue;
      }
      __m512 x[4], mx = _mm512_set1_ps(-INFINITY);
      for (int c = 0; c < 4; ++c) {
        const __m512i jc = _mm512_add_epi32(j, _mm512_set1_epi32(16 * c));
        const __mmask16 in = _mm512_cmp_epi32_mask(jc, _mm512_set1_epi32(static_cast<int>(a)),
                                                   _MM_CMPINT_NLT) &
                             _mm512_cmp_epi32_mask(jc, _mm512_set1_epi32(static_cast<int>(b)),
                                                   _MM_CMPINT_LE);
        x[c] = _mm512_mask_blend_ps(in, _mm512_set1_ps(-INFINITY), _mm512_load_ps(&sc[r][16 * c]));
        mx = _mm512_max_ps(mx, x[c]);
      }
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx));
      const float corr = ExpNonPositive(m[r] - m_new);  // 0 on the row's first tile
      __m512 sum = _mm512_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        const __m512 w = ExpNonPositive16(_mm512_sub_ps(x[c], _mm512_set1_ps(m_new)));
        _mm512_store_ps(&sc[r][16 * c], w);
        sum = _mm512_add_ps(sum, w);
      }
      den[r] = den[r] * corr + _mm512_reduce_add_ps(sum);
      m[r] = m_new;
      if (corr != 1.0f)
        for (int d = 0; d < Dh; d += 16)
          _mm512_store_ps(&acc[r][d], _mm512_mul_ps(_mm512_load_ps(&acc[r][d]), _mm512_set1_ps(corr)));
    }
    for (int r0 = 0; r0 < rows; r0 += kPT) {  // the V sum: kPT rows x Dh
      const int rt = std::min(kPT, rows - r0);
      __m512 o[kPT][ND];
      for (int i = 0; i < kPT; ++i)
        for (int c = 0; c < ND; ++c)
          o[i][c] = i < rt ? _mm512_load_ps(&acc[r0 + i][16 * c]) : _mm512_setzero_ps();
      for (int jj = 0; jj < n; ++jj) {
        __m512 vv[ND];
        for (int c = 0; c < ND; ++c) vv[c] = _mm512_load_ps(&vt[jj][16 * c]);
        for (int i = 0; i < kPT; ++i) {
          const __m512 w = _mm512_set1_ps(sc[r0 + std::min(i, rt - 1)][jj]);
          for (int c = 0; c < ND; ++c) o[i][c] = _mm512_fmadd_ps(w, vv[c], o[i][c]);
        }
      }
      for (int i = 0; i < rt; ++i)
        for (int c = 0; c < ND; ++c) _mm512_store_ps(&acc[r0 + i][16 * c], o[i][c]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    const float inv = 1.0f / den[r];
    for (int d = 0; d < Dh; ++d) out[r][d] = acc[r][d] * inv;
  }
}
#endif

void RmsNorm(const float* x, const float* weight, int64_t D, float eps, float* out) {
  const float ss = Dot(x, x, D);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * inv * weight[i];
}

struct Shapes {
  int64_t T, R, S, W, L, NB, BS, H, KVH, Dh, D, F, V;
};

// The pool's buffers: float32 k, v, or int8 codes with float32 scales (L, blocks, bs, KVH).
template <typename KV>
struct PoolBuffers {
  std::vector<int64_t> dims, v_dims, ks_dims, vs_dims;  // scale dims empty for float32
  const KV *k_in, *v_in;
  KV *k, *v;
  const float *ks_in = nullptr, *vs_in = nullptr;
  float *ks = nullptr, *vs = nullptr;
};

template <typename Dims>
std::vector<int64_t> DimVector(const Dims& d) {
  return std::vector<int64_t>(d.begin(), d.end());
}

template <typename KV>
ffi::Error StepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> tokens,
                    ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> seq_index,
                    ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> logits_index,
                    const PoolBuffers<KV>& kv, ffi::AnyBuffer embed,
                    ffi::Buffer<ffi::F32> embed_scale,
                    ffi::Buffer<ffi::F32> attn_norm, ffi::AnyBuffer wqkv,
                    ffi::Buffer<ffi::F32> wqkv_scale, ffi::AnyBuffer wo,
                    ffi::Buffer<ffi::F32> wo_scale, ffi::Buffer<ffi::F32> mlp_norm,
                    ffi::AnyBuffer wgu, ffi::Buffer<ffi::F32> wgu_scale, ffi::AnyBuffer wdown,
                    ffi::Buffer<ffi::F32> wdown_scale, ffi::Buffer<ffi::F32> final_norm,
                    ffi::AnyBuffer whead, ffi::Buffer<ffi::F32> whead_scale,
                    ffi::Result<ffi::Buffer<ffi::F32>> logits, int64_t n_heads,
                    int64_t n_kv_heads, float rope_theta, float norm_eps, int64_t window,
                    int64_t max_threads) {
  constexpr bool kCodes = std::is_same<KV, int8_t>::value;
  // The helpers are woken first: they arrive while the inputs are checked and the prologue
  // runs (the guard ends the team on every return).
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  auto team = std::make_shared<Team>();
  team->profile = ProfileOn();
  if (team->profile) {
    team->scheduled_ns = NowNs();
    const int64_t last_end = g_last_step_end_ns.load(std::memory_order_relaxed);
    if (last_end > 0) Count(kGapNs, team->scheduled_ns - last_end);
  }
  PostTeam(team, threads - 1);
  TeamGuard guard{team};
  for (int64_t i = 0; i < team->max_helpers; ++i)
    pool.Schedule([team] {
      if (team->joined.fetch_add(1, std::memory_order_relaxed) < team->max_helpers)
        team->Work(false);
    });
  Shapes sh{};
  const std::vector<int64_t>& kd = kv.dims;
  if (kd.size() != 5 || kv.v_dims != kd)
    return Bad("k, v pools must be (L, blocks, block_size, kv_heads, head_dim), got " +
               ShapeString(kd) + " and " + ShapeString(kv.v_dims));
  if (kCodes && (kv.ks_dims != std::vector<int64_t>(kd.begin(), kd.end() - 1) ||
                 kv.vs_dims != kv.ks_dims))
    return Bad("int8 pools need k, v scales of shape (L, blocks, block_size, kv_heads), got " +
               ShapeString(kv.ks_dims) + " and " + ShapeString(kv.vs_dims));
  sh.T = tokens.element_count();
  sh.R = logits_index.element_count();
  if (tables.dimensions().size() != 2) return Bad("tables must be (S, W)");
  sh.S = tables.dimensions()[0];
  sh.W = tables.dimensions()[1];
  sh.L = kd[0], sh.NB = kd[1], sh.BS = kd[2], sh.KVH = kd[3], sh.Dh = kd[4];
  sh.H = n_heads;
  if (sh.KVH != n_kv_heads || sh.H % sh.KVH || sh.Dh % 2)
    return Bad("pool kv heads / head_dim do not fit the config");
  if (positions.element_count() != sh.T || seq_index.element_count() != sh.T)
    return Bad("tokens, positions and seq_index must all be (T,)");
  auto nd = attn_norm.dimensions();
  if (nd.size() != 2 || nd[0] != sh.L) return Bad("attn_norm must be (L, D)");
  sh.D = nd[1];
  sh.F = wgu.dimensions().size() == 3 ? wgu.dimensions()[1] / 2 : 0;
  sh.V = embed.dimensions()[0];
  const int64_t R = sh.R, L = sh.L, H = sh.H, KVH = sh.KVH, Dh = sh.Dh, D = sh.D,
                F = sh.F, V = sh.V, BS = sh.BS, NB = sh.NB, Wt = sh.W, S = sh.S;
  const int64_t NQKV = (H + 2 * KVH) * Dh;
  auto emb = View("embed", embed, embed_scale, 0, V, D);
  auto qkv = View("wqkv", wqkv, wqkv_scale, L, NQKV, D);
  auto ow = View("wo", wo, wo_scale, L, D, H * Dh);
  auto gu = View("wgu", wgu, wgu_scale, L, 2 * F, D);
  auto dn = View("wdown", wdown, wdown_scale, L, D, F);
  auto hd = View("head", whead, whead_scale, 0, V, D);
  for (auto* e : {&emb, &qkv, &ow, &gu, &dn, &hd})
    if (!*e) return e->error();
  if (mlp_norm.element_count() != L * D || final_norm.element_count() != D)
    return Bad("mlp_norm must be (L, D) and final_norm (D,)");
  if (logits->element_count() != R * V) return Bad("logits must be (R, V)");

  const int32_t* tok = tokens.typed_data();
  const int32_t* pos = positions.typed_data();
  const int32_t* seq = seq_index.typed_data();
  const int32_t* tab = tables.typed_data();
  const int32_t* lidx = logits_index.typed_data();
  KV* kp = kv.k;
  KV* vp = kv.v;
  float* ksp = kv.ks;
  float* vsp = kv.vs;
  // Not aliased (a caller that did not donate): start from a copy of the inputs.
  const int64_t kv_rows = kd[0] * kd[1] * kd[2] * kd[3];
  if (kp != kv.k_in) std::memcpy(kp, kv.k_in, kv_rows * kd[4] * sizeof(KV));
  if (vp != kv.v_in) std::memcpy(vp, kv.v_in, kv_rows * kd[4] * sizeof(KV));
  if (kCodes && ksp != kv.ks_in) std::memcpy(ksp, kv.ks_in, kv_rows * sizeof(float));
  if (kCodes && vsp != kv.vs_in) std::memcpy(vsp, kv.vs_in, kv_rows * sizeof(float));
  float* out_logits = logits->typed_data();
  if (sh.T == 0) {
    std::fill(out_logits, out_logits + R * V, 0.0f);
    return ffi::Error::Success();
  }

  // Per-token checks that would otherwise read out of bounds; padding (position < 0) and
  // anything past the table reads nothing and writes nothing.
  std::vector<uint8_t> valid(sh.T);
  for (int64_t t = 0; t < sh.T; ++t) {
    valid[t] = pos[t] >= 0 && seq[t] >= 0 && seq[t] < S && pos[t] / BS < Wt;
    if (valid[t]) {  // every block it reads or writes must exist
      for (int64_t b = 0; b <= pos[t] / BS; ++b) {
        const int32_t blk = tab[seq[t] * Wt + b];
        if (blk < 0 || blk >= NB) valid[t] = 0;
      }
    }
    if (tok[t] < 0 || tok[t] >= V) return Bad("token id out of range: " + std::to_string(tok[t]));
  }
  for (int64_t r = 0; r < R; ++r)
    if (lidx[r] < 0 || lidx[r] >= sh.T) return Bad("logits_index out of range");
  // Trailing padding (the engine's token buckets pad at the end) is not computed at all: the
  // step runs on the tokens before it, and logits rows of padding tokens come out zero.
  int64_t T_run = sh.T;
  while (T_run > 0 && pos[T_run - 1] < 0) --T_run;
  const int64_t T = T_run;
  if (T == 0) {
    std::fill(out_logits, out_logits + R * V, 0.0f);
    return ffi::Error::Success();
  }

  const bool profile = ProfileOn();
  const int64_t start_ns = profile ? NowNs() : 0;
  std::vector<float> x(T * D), h(T * D), q(T * NQKV), attn(T * H * Dh), gbuf(T * 2 * F),
      act(T * F), hf(std::max<int64_t>(R, 1) * D);
  // int8 weights from gd::kI16MinRows rows of x take gemm.h's int8 x int16 path; its x is
  // quantized here once, as each input row is complete, not again in every chunk's call.
  auto x16 = [](const WeightView& w, int64_t rows) {
    return gd::kI16Fast && w.fmt == WFormat::INT8 && rows >= gd::kI16MinRows;
  };
  const bool q16_qkv = x16(*qkv, T), q16_o = x16(*ow, T), q16_gu = x16(*gu, T),
             q16_dn = x16(*dn, T), q16_hd = x16(*hd, R);
  std::vector<uint8_t> xq(q16_qkv || q16_o || q16_gu || q16_dn
                              ? T * gd::I16RowBytes(std::max({D, H * Dh, F}))
                              : 0),
      hq(q16_hd ? R * gd::I16RowBytes(D) : 0);
  auto quantize16 = [](const float* row, int64_t K, int64_t i, std::vector<uint8_t>& buf) {
    gd::QuantizeI16Row(row, K, buf.data() + i * gd::I16RowBytes(K));
  };
  const int64_t half = Dh / 2;
  std::vector<float> cosv(T * half), sinv(T * half);
  for (int64_t i = 0; i < half; ++i) {
    const float inv_freq = static_cast<float>(
        std::pow(static_cast<double>(rope_theta), -static_cast<double>(2 * i) / Dh));
    for (int64_t t = 0; t < T; ++t) {
      const float angle = static_cast<float>(pos[t]) * inv_freq;
      cosv[t * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sinv[t * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
  }
  for (int64_t t = 0; t < T; ++t) DequantizeRow(*emb, tok[t], x.data() + t * D);
  for (int64_t t = 0; t < T; ++t)
    RmsNorm(x.data() + t * D, attn_norm.typed_data(), D, norm_eps, h.data() + t * D);
  if (q16_qkv)
    for (int64_t t = 0; t < T; ++t) quantize16(h.data() + t * D, D, t, xq);

  const float att_scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const int64_t group = H / KVH;
  auto kv_row = [&](int64_t l, int64_t blk, int64_t off, int64_t g) {  // (position, head)
    return ((l * NB + blk) * BS + off) * KVH + g;
  };
  // A K or V row into the pool: copied, or int8 codes of x / s with s = max |x| / 127 (1 for
  // an all-zero row), rounded half to even as hpllm.quantized.quantize_kv does.
  auto store_row = [&](KV* pool_base, float* scales, int64_t r, const float* src) {
    KV* dst = pool_base + r * Dh;
    if constexpr (kCodes) {
      float amax = 0.0f;
      for (int64_t d = 0; d < Dh; ++d) amax = std::max(amax, std::fabs(src[d]));
      const float s = amax / 127.0f > 0.0f ? amax / 127.0f : 1.0f;
      for (int64_t d = 0; d < Dh; ++d)
        dst[d] = static_cast<int8_t>(std::clamp(std::nearbyint(src[d] / s), -127.0f, 127.0f));
      scales[r] = s;
    } else {
      (void)scales;
      std::memcpy(dst, src, Dh * sizeof(float));
    }
  };
  // Chunks of 32 rows where gemm.h runs its packed panels on `rows` rows of x (strip pairs).
  auto quantum = [](const WeightView& w, int64_t rows) -> int64_t {
#if defined(HPLLM_GEMM_AVX512)
    const bool int8_path = gd::kI16Fast && w.fmt == WFormat::INT8 && rows >= gd::kI16MinRows;
    if (rows >= gd::kPackedRows && !int8_path) return 32;
#endif
    (void)w, (void)rows;
    return 16;
  };
  const std::vector<int64_t>
      qkv_b = ChunkBounds(NQKV, RowBytes(*qkv), threads, quantum(*qkv, T)),
      o_b = ChunkBounds(D, RowBytes(*ow), threads, quantum(*ow, T)),
      gu_b = ChunkBounds(F, 2 * RowBytes(*gu), threads, quantum(*gu, T)),
      dn_b = ChunkBounds(D, RowBytes(*dn), threads, quantum(*dn, T)),
      hd_b = ChunkBounds(V, RowBytes(*hd), threads, quantum(*hd, R));
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  auto chunks_of = [](const std::vector<int64_t>& b) {
    return static_cast<int64_t>(b.size()) - 1;
  };
  // The serial pieces between matmuls, per token: RoPE + K/V writes after the QKV matmul,
  // the MLP norm after the o-proj, the next layer's (or the final) norm after the down-proj.
  auto rope_token = [&](int64_t l, int64_t t) {
    if (!valid[t]) return;
    const float* cs = cosv.data() + t * half;
    const float* sn = sinv.data() + t * half;
    float* row = q.data() + t * NQKV;
    for (int64_t hh = 0; hh < H + KVH; ++hh) {
      float* v = row + hh * Dh;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
      }
    }
    const int64_t blk = tab[seq[t] * Wt + pos[t] / BS], off = pos[t] % BS;
    for (int64_t g = 0; g < KVH; ++g) {
      store_row(kp, ksp, kv_row(l, blk, off, g), row + (H + g) * Dh);
      store_row(vp, vsp, kv_row(l, blk, off, g), row + (H + KVH + g) * Dh);
    }
  };
  auto mlp_norm_token = [&](int64_t l, int64_t t) {
    RmsNorm(x.data() + t * D, mlp_norm.typed_data() + l * D, D, norm_eps, h.data() + t * D);
    if (q16_gu) quantize16(h.data() + t * D, D, t, xq);
  };
  auto next_norm_row = [&](int64_t l, int64_t i) {  // i: a token, or a logits row after L-1
    if (l + 1 < L)
      RmsNorm(x.data() + i * D, attn_norm.typed_data() + (l + 1) * D, D, norm_eps,
              h.data() + i * D);
    else if (lidx[i] < T)
      RmsNorm(x.data() + lidx[i] * D, final_norm.typed_data(), D, norm_eps, hf.data() + i * D);
    else  // a trailing padding token's row
      std::fill(hf.data() + i * D, hf.data() + (i + 1) * D, 0.0f);
    if (l + 1 < L ? q16_qkv : q16_hd)
      quantize16((l + 1 < L ? h : hf).data() + i * D, D, i, l + 1 < L ? xq : hq);
  };
  auto next_norm_rows = [&](int64_t l) { return l + 1 < L ? T : R; };
  // Token t, query head hh of layer l over its sequence's blocks (within the window).
  // Pool offsets of cache positions j0..j0+n-1 of sequence slot s (no division per row).
  const auto rows_of = [&](int64_t s) {
    const int32_t* blocks = tab + s * Wt;
    return [=](int64_t j0, int64_t n, int64_t* offset) {
      int64_t b = j0 / BS, r = j0 % BS;
      for (int64_t i = 0; i < n; ++i) {
        offset[i] = (blocks[b] * BS + r) * KVH * Dh;
        if (++r == BS) r = 0, ++b;
      }
    };
  };
  auto attend = [&](int64_t l, int64_t t, int64_t hh) {
    float* o = attn.data() + t * H * Dh + hh * Dh;
    if (!valid[t]) {
      std::fill(o, o + Dh, 0.0f);
      return;
    }
    const int64_t g = hh / group, p_t = pos[t];
    const int64_t lo = window > 0 ? std::max<int64_t>(0, p_t - window + 1) : 0;
    const float* qv = q.data() + t * NQKV + hh * Dh;
    const int64_t base = (l * NB * BS * KVH + g) * Dh;  // layer l, head g
    const auto row = rows_of(seq[t]);
    const KV *kb = kp + base, *vb = vp + base;
    const float *ksb = ksp ? ksp + base / Dh : nullptr, *vsb = vsp ? vsp + base / Dh : nullptr;
    switch (Dh % gd::kLanes ? 0 : Dh / gd::kLanes) {
      case 1: return AttendVec<1>(qv, kb, vb, ksb, vsb, Dh, lo, p_t, att_scale, row, o);
      case 2: return AttendVec<2>(qv, kb, vb, ksb, vsb, Dh, lo, p_t, att_scale, row, o);
      case 4: return AttendVec<4>(qv, kb, vb, ksb, vsb, Dh, lo, p_t, att_scale, row, o);
      case 8: return AttendVec<8>(qv, kb, vb, ksb, vsb, Dh, lo, p_t, att_scale, row, o);
      default: return AttendAny(qv, kb, vb, ksb, vsb, Dh, lo, p_t, att_scale, row, o);
    }
  };
#if defined(HPLLM_GEMM_AVX512)
  // Tokens t0..t0+nt-1 (valid, one sequence, consecutive positions) x the query heads of KV
  // head g of layer l: one AttendBlock.
  auto attend_block = [&](int64_t l, int64_t t0, int64_t nt, int64_t g) {
    const float* qr[kBlockRows];
    float* orow[kBlockRows];
    int64_t lo[kBlockRows], hi[kBlockRows];
    int rows = 0;
    for (int64_t t = t0; t < t0 + nt; ++t)
      for (int64_t hh = g * group; hh < (g + 1) * group; ++hh, ++rows) {
        qr[rows] = q.data() + t * NQKV + hh * Dh;
        orow[rows] = attn.data() + t * H * Dh + hh * Dh;
        hi[rows] = pos[t];
        lo[rows] = window > 0 ? std::max<int64_t>(0, pos[t] - window + 1) : 0;
      }
    const int64_t base = (l * NB * BS * KVH + g) * Dh;
    const auto row = rows_of(seq[t0]);
    const KV *kb = kp + base, *vb = vp + base;
    const float *ksb = ksp ? ksp + base / Dh : nullptr, *vsb = vsp ? vsp + base / Dh : nullptr;
    switch (Dh / 16) {
      case 1: return AttendBlock<1>(qr, orow, rows, lo, hi, kb, vb, ksb, vsb, att_scale, row);
      case 2: return AttendBlock<2>(qr, orow, rows, lo, hi, kb, vb, ksb, vsb, att_scale, row);
      case 4: return AttendBlock<4>(qr, orow, rows, lo, hi, kb, vb, ksb, vsb, att_scale, row);
      default: return AttendBlock<8>(qr, orow, rows, lo, hi, kb, vb, ksb, vsb, att_scale, row);
    }
  };
#endif

  // The phases. Few tokens: the serial pieces are epilogues of the phase before (run by its
  // finisher: no extra barrier). Many tokens (prefill chunks, big batches): phases of their
  // own, split by tokens across the threads.
  // Little attention (a few decode tokens over short contexts) runs in the QKV epilogue
  // too: one barrier less per layer, and the waiting threads prefetch the o-proj weights
  // meanwhile.
  enum Kind { kQkv, kRope, kAttention, kOProj, kMlpNorm, kGateUp, kDown, kNextNorm, kHead };
  const bool split = T >= kSplitTokens;
  int64_t attention_work = 0;  // (query head, position) pairs per layer
  for (int64_t t = 0; t < T; ++t)
    if (valid[t])
      attention_work += H * (window > 0 ? std::min<int64_t>(window, pos[t] + 1) : pos[t] + 1);
  const bool serial_attention = !split && attention_work <= kSerialAttentionWork;
  std::vector<std::pair<Kind, int64_t>> phases;
  for (int64_t l = 0; l < L; ++l) {
    for (Kind k : {kQkv, kRope, kAttention, kOProj, kMlpNorm, kGateUp, kDown, kNextNorm})
      if ((split || (k != kRope && k != kMlpNorm && k != kNextNorm)) &&
          !(k == kAttention && serial_attention))
        phases.push_back({k, l});
  }
  if (R > 0) phases.push_back({kHead, L - 1});
  constexpr int64_t kTokensPerChunk = 4;
  // Attention chunks: (token, KV head) - its query heads one after the other, the K/V rows
  // still in L1/L2 for the second and third (batches: each K/V byte comes from memory once,
  // not once per core) - or (token, query head) where that leaves too few chunks to share.
  // Prefill chunks instead (AVX-512, head_dim 16, 32, 64 or 128): runs of consecutive
  // positions of one sequence in blocks of up to kBlockRows / group tokens, a chunk per
  // (block, KV head), the blocks with the most work first (guided: the small ones end the
  // phase); the single tokens among them keep the (token, KV head) chunks.
  struct AttBlock {
    int64_t t0, nt, work;
  };
  std::vector<AttBlock> att_blocks;
#if defined(HPLLM_GEMM_AVX512)
  const int64_t block_tokens = kBlockRows / group;
  if (!serial_attention && Dh % 16 == 0 && (Dh / 16 & (Dh / 16 - 1)) == 0 && Dh <= 128 &&
      block_tokens >= 2) {
    bool any = false;
    for (int64_t t = 0; t < T;) {
      int64_t e = t + 1;
      while (e < T && e - t < block_tokens && valid[t] && valid[e] && seq[e] == seq[t] &&
             pos[e] == pos[e - 1] + 1)
        ++e;
      att_blocks.push_back({t, e - t, valid[t] ? (e - t) * (pos[e - 1] + 1) : 0});
      any = any || e - t > 1;
      t = e;
    }
    if (!any) att_blocks.clear();
    std::stable_sort(att_blocks.begin(), att_blocks.end(),
                     [](const AttBlock& a, const AttBlock& b) { return a.work > b.work; });
  }
#endif
  const bool blocked = !att_blocks.empty();
  const int64_t heads_per_chunk = blocked || T * KVH >= 4 * threads ? group : 1;
  const int64_t count_attention =
      blocked ? static_cast<int64_t>(att_blocks.size()) * KVH : T * H / heads_per_chunk;

  if (profile) {
    g_profile_ns[6].fetch_add(NowNs() - start_ns, std::memory_order_relaxed);
    g_profile_steps.fetch_add(1, std::memory_order_relaxed);
    Count(kThreadsSum, threads);
  }
  team->kind = [&phases](int p) {  // the profile buckets: see kKinds
    switch (phases[p].first) {
      case kQkv: case kRope: return 0;
      case kAttention: return 1;
      case kOProj: case kMlpNorm: return 2;
      case kGateUp: return 3;
      case kDown: case kNextNorm: return 4;
      default: return 5;
    }
  };
  team->num_phases = static_cast<int>(phases.size());
  team->chunks = [&](int p) -> int64_t {
    const auto [kind, l] = phases[p];
    switch (kind) {
      case kQkv: return chunks_of(qkv_b);
      case kAttention: return count_attention;
      case kOProj: return chunks_of(o_b);
      case kGateUp: return chunks_of(gu_b);
      case kDown: return chunks_of(dn_b);
      case kHead: return chunks_of(hd_b);
      case kNextNorm: return cdiv(next_norm_rows(l), kTokensPerChunk);
      default: return cdiv(T, kTokensPerChunk);  // rope, mlp norm
    }
  };
  team->run = [&](int p, int64_t c) {
    const auto [kind, l] = phases[p];
    switch (kind) {
      case kQkv: {
        if (q16_qkv)
          matmul_block_x16(xq.data(), T, Layer(*qkv, l), qkv_b[c], qkv_b[c + 1], q.data(), NQKV,
                           false);
        else
          matmul_block(h.data(), T, D, Layer(*qkv, l), qkv_b[c], qkv_b[c + 1],
                       q.data(), NQKV, false);
        return;
      }
      case kRope: case kMlpNorm: case kNextNorm: {
        const int64_t rows = kind == kNextNorm ? next_norm_rows(l) : T;
        for (int64_t t = c * kTokensPerChunk; t < std::min(rows, (c + 1) * kTokensPerChunk);
             ++t) {
          if (kind == kRope) rope_token(l, t);
          else if (kind == kMlpNorm) mlp_norm_token(l, t);
          else next_norm_row(l, t);
        }
        return;
      }
      case kAttention: {
        // Attention reads no weights: this chunk's share of the o-proj's first bytes is
        // pulled into the caches meanwhile (issued first, in flight during the math).
        const WeightView w = Layer(*ow, l);
        const int64_t bytes = std::min<int64_t>(D * RowBytes(w), kChunkBytes * threads);
        const int64_t share = (bytes / count_attention + 63) / 64 * 64;
        const char* base = static_cast<const char*>(w.data);
        for (int64_t b = c * share; b < std::min(bytes, (c + 1) * share); b += 64)
          PrefetchLine(base + b);
        if (blocked) {
          const AttBlock& b = att_blocks[c / KVH];
          const int64_t g = c % KVH;
#if defined(HPLLM_GEMM_AVX512)
          if (b.nt > 1) return attend_block(l, b.t0, b.nt, g);
#endif
          for (int64_t hh = g * group; hh < (g + 1) * group; ++hh) attend(l, b.t0, hh);
          return;
        }
        const int64_t first = c * heads_per_chunk;  // token first / H, heads of one group
        for (int64_t hh = first % H; hh < first % H + heads_per_chunk; ++hh)
          attend(l, first / H, hh);
        return;
      }
      case kOProj: {
        if (q16_o)
          matmul_block_x16(xq.data(), T, Layer(*ow, l), o_b[c], o_b[c + 1], x.data(), D, true);
        else
          matmul_block(attn.data(), T, H * Dh, Layer(*ow, l), o_b[c], o_b[c + 1],
                       x.data(), D, true);
        return;
      }
      case kGateUp: {
        const int64_t j0 = gu_b[c], j1 = gu_b[c + 1];
        const WeightView w = Layer(*gu, l);
        for (int64_t j : {j0, F + j0}) {  // the gate rows, then the up rows
          if (q16_gu)
            matmul_block_x16(xq.data(), T, w, j, j + j1 - j0, gbuf.data(), 2 * F, false);
          else
            matmul_block(h.data(), T, D, w, j, j + j1 - j0, gbuf.data(), 2 * F, false);
        }
        for (int64_t t = 0; t < T; ++t) {
          const float* gt = gbuf.data() + t * 2 * F;
          for (int64_t j = j0; j < j1; ++j) {
            const float a = gt[j];
            act[t * F + j] = a / (1.0f + ExpClamped(-a)) * gt[F + j];  // SiLU(gate) * up
          }
        }
        return;
      }
      case kDown: {
        if (q16_dn)
          matmul_block_x16(xq.data(), T, Layer(*dn, l), dn_b[c], dn_b[c + 1], x.data(), D, true);
        else
          matmul_block(act.data(), T, F, Layer(*dn, l), dn_b[c], dn_b[c + 1],
                       x.data(), D, true);
        return;
      }
      case kHead: {
        if (q16_hd)
          matmul_block_x16(hq.data(), R, *hd, hd_b[c], hd_b[c + 1], out_logits, V, false);
        else
          matmul_block(hf.data(), R, D, *hd, hd_b[c], hd_b[c + 1], out_logits, V,
                       false);
        return;
      }
    }
  };
  // The inputs of the o-proj and the down-proj are whole only once their phase is done.
  auto quantize_attn = [&] {
    for (int64_t t = 0; t < T; ++t) quantize16(attn.data() + t * H * Dh, H * Dh, t, xq);
  };
  team->epilogue = [&](int p) {
    if (q16_o && phases[p].first == kAttention) quantize_attn();
    if (q16_dn && phases[p].first == kGateUp)
      for (int64_t t = 0; t < T; ++t) quantize16(act.data() + t * F, F, t, xq);
    if (split) return;
    const auto [kind, l] = phases[p];
    if (kind == kQkv) {
      for (int64_t t = 0; t < T; ++t) rope_token(l, t);
      if (serial_attention) {
        const int64_t t0 = profile ? NowNs() : 0, c0 = profile ? ThreadCpuNs() : 0;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t hh = 0; hh < H; ++hh) attend(l, t, hh);
        if (profile) {  // attention's time, not the QKV phase's
          const int64_t dt = NowNs() - t0;
          g_profile_ns[1].fetch_add(dt, std::memory_order_relaxed);
          g_profile_ns[0].fetch_sub(dt, std::memory_order_relaxed);
          Count(kAttentionCpuNs, ThreadCpuNs() - c0);
        }
        if (q16_o) quantize_attn();
      }
    }
    else if (kind == kOProj)
      for (int64_t t = 0; t < T; ++t) mlp_norm_token(l, t);
    else if (kind == kDown)
      for (int64_t i = 0; i < next_norm_rows(l); ++i) next_norm_row(l, i);
  };
  team->first_bytes = [&](int p) -> Stream {  // the first chunk's rows
    const auto [kind, l] = phases[p];
    auto first = [](const WeightView& w, int64_t n0, int64_t rows) {
      return Stream{static_cast<const char*>(w.data) + n0 * RowBytes(w), nullptr,
                    std::min(rows * RowBytes(w), kPrefetchBytes)};
    };
    switch (kind) {
      case kQkv: return first(Layer(*qkv, l), 0, NQKV);
      case kOProj: return first(Layer(*ow, l), 0, D);
      case kGateUp: {  // the gate and the up rows of the first chunks
        Stream s = first(Layer(*gu, l), 0, F);
        s.b = first(Layer(*gu, l), F, F).a;
        s.bytes /= 2;
        return s;
      }
      case kDown: return first(Layer(*dn, l), 0, D);
      case kHead: return first(*hd, 0, V);
      default: return {};
    }
  };
  RunTeam(team);
  return ffi::Error::Success();
}

// The two FFI handlers: float32 pools, and int8 pools with their scales.
ffi::Error StepF32(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> tokens,
                   ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> seq_index,
                   ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> logits_index,
                   ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in, ffi::AnyBuffer embed,
                   ffi::Buffer<ffi::F32> embed_scale, ffi::Buffer<ffi::F32> attn_norm,
                   ffi::AnyBuffer wqkv, ffi::Buffer<ffi::F32> wqkv_scale, ffi::AnyBuffer wo,
                   ffi::Buffer<ffi::F32> wo_scale, ffi::Buffer<ffi::F32> mlp_norm,
                   ffi::AnyBuffer wgu, ffi::Buffer<ffi::F32> wgu_scale, ffi::AnyBuffer wdown,
                   ffi::Buffer<ffi::F32> wdown_scale, ffi::Buffer<ffi::F32> final_norm,
                   ffi::AnyBuffer whead, ffi::Buffer<ffi::F32> whead_scale,
                   ffi::Result<ffi::Buffer<ffi::F32>> logits,
                   ffi::Result<ffi::Buffer<ffi::F32>> k_out,
                   ffi::Result<ffi::Buffer<ffi::F32>> v_out, int64_t n_heads,
                   int64_t n_kv_heads, float rope_theta, float norm_eps, int64_t window,
                   int64_t max_threads) {
  PoolBuffers<float> kv{DimVector(k_in.dimensions()), DimVector(v_in.dimensions()), {}, {},
                        k_in.typed_data(), v_in.typed_data(), k_out->typed_data(),
                        v_out->typed_data()};
  return StepImpl<float>(pool, tokens, positions, seq_index, tables, logits_index, kv, embed,
                         embed_scale, attn_norm, wqkv, wqkv_scale, wo, wo_scale, mlp_norm, wgu,
                         wgu_scale, wdown, wdown_scale, final_norm, whead, whead_scale, logits,
                         n_heads, n_kv_heads, rope_theta, norm_eps, window, max_threads);
}

ffi::Error StepKv8(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> tokens,
                   ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> seq_index,
                   ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> logits_index,
                   ffi::Buffer<ffi::S8> k_in, ffi::Buffer<ffi::S8> v_in,
                   ffi::Buffer<ffi::F32> ks_in, ffi::Buffer<ffi::F32> vs_in,
                   ffi::AnyBuffer embed, ffi::Buffer<ffi::F32> embed_scale,
                   ffi::Buffer<ffi::F32> attn_norm, ffi::AnyBuffer wqkv,
                   ffi::Buffer<ffi::F32> wqkv_scale, ffi::AnyBuffer wo,
                   ffi::Buffer<ffi::F32> wo_scale, ffi::Buffer<ffi::F32> mlp_norm,
                   ffi::AnyBuffer wgu, ffi::Buffer<ffi::F32> wgu_scale, ffi::AnyBuffer wdown,
                   ffi::Buffer<ffi::F32> wdown_scale, ffi::Buffer<ffi::F32> final_norm,
                   ffi::AnyBuffer whead, ffi::Buffer<ffi::F32> whead_scale,
                   ffi::Result<ffi::Buffer<ffi::F32>> logits,
                   ffi::Result<ffi::Buffer<ffi::S8>> k_out,
                   ffi::Result<ffi::Buffer<ffi::S8>> v_out,
                   ffi::Result<ffi::Buffer<ffi::F32>> ks_out,
                   ffi::Result<ffi::Buffer<ffi::F32>> vs_out, int64_t n_heads,
                   int64_t n_kv_heads, float rope_theta, float norm_eps, int64_t window,
                   int64_t max_threads) {
  PoolBuffers<int8_t> kv{DimVector(k_in.dimensions()), DimVector(v_in.dimensions()),
                         DimVector(ks_in.dimensions()), DimVector(vs_in.dimensions()),
                         k_in.typed_data(), v_in.typed_data(), k_out->typed_data(),
                         v_out->typed_data(), ks_in.typed_data(), vs_in.typed_data(),
                         ks_out->typed_data(), vs_out->typed_data()};
  return StepImpl<int8_t>(pool, tokens, positions, seq_index, tables, logits_index, kv,
                          embed, embed_scale, attn_norm, wqkv, wqkv_scale, wo, wo_scale,
                          mlp_norm, wgu, wgu_scale, wdown, wdown_scale, final_norm, whead,
                          whead_scale, logits, n_heads, n_kv_heads, rope_theta, norm_eps,
                          window, max_threads);
}

}  // namespace hpllm_decoder

// Profile counters: out[0..6] seconds per phase kind (see kKinds), out[7] steps, out[8..18]
// the Counter values; reset clears them.
extern "C" void HpllmDecoderProfile(double* out, int reset) {
  using namespace hpllm_decoder;
  for (int i = 0; i < kKinds; ++i)
    out[i] = 1e-9 * static_cast<double>(reset ? g_profile_ns[i].exchange(0)
                                              : g_profile_ns[i].load());
  out[kKinds] = static_cast<double>(reset ? g_profile_steps.exchange(0)
                                          : g_profile_steps.load());
  for (int i = 0; i < kCounters; ++i)
    out[kKinds + 1 + i] = static_cast<double>(reset ? g_counters[i].exchange(0)
                                                    : g_counters[i].load());
}

namespace hpllm_decoder {

// The parts of the two bindings that are the same, in call order (builders move along).
template <typename B>
auto BindIndices(B&& b) {
  return std::move(b)
      .template Arg<ffi::Buffer<ffi::S32>>()   // tokens (T,)
      .template Arg<ffi::Buffer<ffi::S32>>()   // positions (T,)
      .template Arg<ffi::Buffer<ffi::S32>>()   // seq_index (T,)
      .template Arg<ffi::Buffer<ffi::S32>>()   // tables (S, W)
      .template Arg<ffi::Buffer<ffi::S32>>();  // logits_index (R,)
}

template <typename B>
auto BindWeights(B&& b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // embed
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // attn_norm (L, D)
      .template Arg<ffi::AnyBuffer>()         // wqkv
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::AnyBuffer>()  // wo
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // mlp_norm (L, D)
      .template Arg<ffi::AnyBuffer>()         // wgu
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::AnyBuffer>()  // wdown
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<ffi::F32>>()  // final_norm (D,)
      .template Arg<ffi::AnyBuffer>()         // head
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();  // logits (R, V)
}

template <typename B>
auto BindAttrs(B&& b) {
  return std::move(b)
      .template Attr<int64_t>("n_heads")
      .template Attr<int64_t>("n_kv_heads")
      .template Attr<float>("rope_theta")
      .template Attr<float>("norm_eps")
      .template Attr<int64_t>("window")
      .template Attr<int64_t>("max_threads");
}

}  // namespace hpllm_decoder

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HpllmDecoderStep, hpllm_decoder::StepF32,
    hpllm_decoder::BindAttrs(
        hpllm_decoder::BindWeights(
            hpllm_decoder::BindIndices(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                .Arg<ffi::Buffer<ffi::F32>>()   // k pool
                .Arg<ffi::Buffer<ffi::F32>>())  // v pool
            .Ret<ffi::Buffer<ffi::F32>>()       // k pool (aliased)
            .Ret<ffi::Buffer<ffi::F32>>()));    // v pool (aliased)

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    HpllmDecoderStepKv8, hpllm_decoder::StepKv8,
    hpllm_decoder::BindAttrs(
        hpllm_decoder::BindWeights(
            hpllm_decoder::BindIndices(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())
                .Arg<ffi::Buffer<ffi::S8>>()    // k pool codes
                .Arg<ffi::Buffer<ffi::S8>>()    // v pool codes
                .Arg<ffi::Buffer<ffi::F32>>()   // k scales
                .Arg<ffi::Buffer<ffi::F32>>())  // v scales
            .Ret<ffi::Buffer<ffi::S8>>()        // k codes (aliased)
            .Ret<ffi::Buffer<ffi::S8>>()        // v codes (aliased)
            .Ret<ffi::Buffer<ffi::F32>>()       // k scales (aliased)
            .Ret<ffi::Buffer<ffi::F32>>()));    // v scales (aliased)
