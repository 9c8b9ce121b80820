// The whole Llama decoder step as one XLA FFI call on the CPU: a ragged batch of T tokens
// (decode tokens, prefill chunks and padding of several sequences) over a paged KV pool.
//
//   embed rows -> per layer: RMSNorm -> QKV -> RoPE -> K/V into the pool -> paged attention
//   -> o-proj + residual -> RMSNorm -> gate/up -> SiLU(gate) * up -> down + residual
//   -> final RMSNorm -> LM head for the logits_index rows only.
//
// Why: XLA:CPU runs ~36 ops per layer per token, each a dispatch and a thread-pool hand-off;
// here the step is a list of phases (5 per layer and 1 for the head; 8 per layer from
// kSplitTokens tokens on, when the norms and RoPE are worth splitting) whose work is cut into
// chunks. The calling thread and (num_threads - 1) pool tasks claim chunks with an atomic
// counter; whoever finishes a phase's last chunk runs its small serial epilogue (norms, RoPE,
// K/V writes) and publishes the next phase by bumping a generation counter, which the others
// spin on (then yield). A pool task that never starts claims nothing, so the calling thread
// can always finish the step alone: nothing can deadlock.
//
// Layout (hpllm/kernels/cpu_decoder.py `prepare` builds it): every matrix output-major
// (N, K), K contiguous, stacked over layers: wqkv (L, (H + 2 KVH) Dh, D) with Q rows
// h * Dh + d, then K rows, then V rows; wo (L, D, H Dh); wgu (L, 2F, D), gate rows then up
// rows; wdown (L, D, F); embed and head (V, D). Each matrix is float32, int8 codes with one
// scale per row (scale (..., N, 1)) or int4 codes packed two per byte as
// cpu_quant_matmul.pack_int4 (scale (..., N, Kp / g)), told apart by its dtype. Float
// matrices get a (1,) placeholder scale. The KV pool: k, v (L, blocks, bs, KVH, Dh) float32,
// aliased in place.
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
#include <string>
#include <thread>
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
// From this many tokens the norms and RoPE get phases of their own, split across threads;
// below it they run serially between phases (an extra barrier costs more than they do).
constexpr int64_t kSplitTokens = 8;
// Pauses before a waiting thread sleeps: ~10-20 us, more than one phase's imbalance on an
// idle machine. Then it sleeps on the phase counter (a futex): on a loaded machine a spinning
// or yielding waiter burns the time slices the holder of the phase's last chunk needs, and
// the scheduler favours threads that slept when they wake.
constexpr int kSpinBeforeSleep = 1024;

#ifdef __linux__
inline void FutexWait(std::atomic<int>* word, int expected) {
  static_assert(sizeof(std::atomic<int>) == sizeof(int), "futex on std::atomic<int>");
  const timespec timeout{0, 2000000};  // 2 ms: a safety net, never needed for correctness
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAIT_PRIVATE, expected, &timeout,
          nullptr, 0);
}
inline void FutexWakeAll(std::atomic<int>* word) {
  syscall(SYS_futex, reinterpret_cast<int*>(word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr,
          nullptr, 0);
}
#else
inline void FutexWait(std::atomic<int>*, int) { std::this_thread::yield(); }
inline void FutexWakeAll(std::atomic<int>*) {}
#endif

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Per-phase wall time (HPLLM_DECODER_PROFILE=1): the finisher of each phase adds the time
// since the previous phase was published to its kind; read by HpllmDecoderProfile.
constexpr int kKinds = 7;  // qkv+rope, attention, o-proj, gate/up, down, head, prologue
std::atomic<int64_t> g_profile_ns[kKinds];
std::atomic<int64_t> g_profile_steps{0};
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

// The phases of one step. Held by a shared_ptr: a pool task that starts after the call
// returned sees phase == num_phases and only drops its reference.
struct Team {
  int num_phases = 0;
  std::function<int64_t(int)> chunks;       // chunks of phase p (>= 1)
  std::function<void(int, int64_t)> run;    // chunk c of phase p
  std::function<void(int)> epilogue;        // serial, by the finisher of phase p
  std::unique_ptr<std::atomic<int64_t>[]> next, done;
  std::vector<int64_t> count;
  std::atomic<int> phase{0};
  std::atomic<int> sleepers{0};  // threads asleep (or about to be) on `phase`
  std::function<int(int)> kind;  // profile bucket of phase p
  bool profile = false;
  int64_t last_ns = 0;  // when the current phase was published (written by its publisher)

  void Work() {
    int spins = 0;
    for (;;) {
      const int p = phase.load(std::memory_order_acquire);
      if (p >= num_phases) return;
      const int64_t c = next[p].fetch_add(1, std::memory_order_relaxed);
      if (c < count[p]) {
        run(p, c);
        if (done[p].fetch_add(1, std::memory_order_acq_rel) + 1 == count[p]) {
          epilogue(p);
          if (profile) {
            const int64_t now = NowNs();
            g_profile_ns[kind(p)].fetch_add(now - last_ns, std::memory_order_relaxed);
            last_ns = now;
          }
          phase.store(p + 1, std::memory_order_seq_cst);
          if (sleepers.load(std::memory_order_seq_cst) > 0) FutexWakeAll(&phase);
        }
        spins = 0;
        continue;
      }
      // Nothing left to claim in p: wait for its last chunk to finish. The seq_cst pair
      // (sleepers++ then the futex's check of phase; phase store then sleepers load) means
      // a publisher either sees the sleeper or the sleeper sees the new phase.
      while (phase.load(std::memory_order_acquire) == p) {
        if (++spins < kSpinBeforeSleep) {
          Pause();
          continue;
        }
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        if (phase.load(std::memory_order_seq_cst) == p) FutexWait(&phase, p);
        sleepers.fetch_sub(1, std::memory_order_relaxed);
      }
    }
  }
};

void RunTeam(ffi::ThreadPool& pool, std::shared_ptr<Team> team, int64_t helpers) {
  team->next.reset(new std::atomic<int64_t>[team->num_phases]);
  team->done.reset(new std::atomic<int64_t>[team->num_phases]);
  team->count.resize(team->num_phases);
  for (int p = 0; p < team->num_phases; ++p) {
    team->next[p].store(0);
    team->done[p].store(0);
    team->count[p] = std::max<int64_t>(1, team->chunks(p));
  }
  if (team->profile) team->last_ns = NowNs();
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([team] { team->Work(); });
  team->Work();
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

// sum_d a[d] b[d] in 16 independent lanes (vectorised without reassociating a reduction).
inline float Dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int i = 0; i < 16; ++i) lanes[i] += a[d + i] * b[d + i];
  float s = 0.0f;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int i = 0; i < 16; ++i) s += lanes[i];
  return s;
}

void RmsNorm(const float* x, const float* weight, int64_t D, float eps, float* out) {
  const float ss = Dot(x, x, D);
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t i = 0; i < D; ++i) out[i] = x[i] * inv * weight[i];
}

struct Shapes {
  int64_t T, R, S, W, L, NB, BS, H, KVH, Dh, D, F, V;
};

ffi::Error StepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> tokens,
                    ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> seq_index,
                    ffi::Buffer<ffi::S32> tables, ffi::Buffer<ffi::S32> logits_index,
                    ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in,
                    ffi::AnyBuffer embed, ffi::Buffer<ffi::F32> embed_scale,
                    ffi::Buffer<ffi::F32> attn_norm, ffi::AnyBuffer wqkv,
                    ffi::Buffer<ffi::F32> wqkv_scale, ffi::AnyBuffer wo,
                    ffi::Buffer<ffi::F32> wo_scale, ffi::Buffer<ffi::F32> mlp_norm,
                    ffi::AnyBuffer wgu, ffi::Buffer<ffi::F32> wgu_scale, ffi::AnyBuffer wdown,
                    ffi::Buffer<ffi::F32> wdown_scale, ffi::Buffer<ffi::F32> final_norm,
                    ffi::AnyBuffer whead, ffi::Buffer<ffi::F32> whead_scale,
                    ffi::Result<ffi::Buffer<ffi::F32>> logits,
                    ffi::Result<ffi::Buffer<ffi::F32>> k_out,
                    ffi::Result<ffi::Buffer<ffi::F32>> v_out, int64_t n_heads,
                    int64_t n_kv_heads, float rope_theta, float norm_eps, int64_t window,
                    int64_t max_threads) {
  Shapes sh{};
  auto kd = k_in.dimensions();
  if (kd.size() != 5 || v_in.dimensions().size() != 5)
    return Bad("k, v pools must be (L, blocks, block_size, kv_heads, head_dim), got " +
               ShapeString(kd));
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
  const int64_t T = sh.T, R = sh.R, L = sh.L, H = sh.H, KVH = sh.KVH, Dh = sh.Dh, D = sh.D,
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
  float* kp = k_out->typed_data();
  float* vp = v_out->typed_data();
  // Not aliased (a caller that did not donate): start from a copy of the inputs.
  if (kp != k_in.typed_data())
    std::memcpy(kp, k_in.typed_data(), k_in.element_count() * sizeof(float));
  if (vp != v_in.typed_data())
    std::memcpy(vp, v_in.typed_data(), v_in.element_count() * sizeof(float));
  float* out_logits = logits->typed_data();
  if (T == 0) {
    std::fill(out_logits, out_logits + R * V, 0.0f);
    return ffi::Error::Success();
  }

  // Per-token checks that would otherwise read out of bounds; padding (position < 0) and
  // anything past the table reads nothing and writes nothing.
  std::vector<uint8_t> valid(T);
  for (int64_t t = 0; t < T; ++t) {
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
    if (lidx[r] < 0 || lidx[r] >= T) return Bad("logits_index out of range");

  const bool profile = ProfileOn();
  const int64_t start_ns = profile ? NowNs() : 0;
  std::vector<float> x(T * D), h(T * D), q(T * NQKV), attn(T * H * Dh), gbuf(T * 2 * F),
      act(T * F), hf(std::max<int64_t>(R, 1) * D);
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

  const float att_scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  const int64_t group = H / KVH;
  auto kv_at = [&](float* pool_base, int64_t l, int64_t blk, int64_t off, int64_t g) {
    return pool_base + (((l * NB + blk) * BS + off) * KVH + g) * Dh;
  };
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  // At least two chunks per thread, so a thread that starts late still takes a share.
  auto rows_per_chunk = [&](const WeightView& w) {
    const int64_t by_bytes = kChunkBytes / std::max<int64_t>(1, RowBytes(w));
    return std::max<int64_t>(4, std::min(by_bytes, (w.N + 2 * threads - 1) / (2 * threads)));
  };
  const int64_t qkv_rows = rows_per_chunk(*qkv), o_rows = rows_per_chunk(*ow),
                gu_rows = rows_per_chunk(*gu) / 2, dn_rows = rows_per_chunk(*dn),
                hd_rows = rows_per_chunk(*hd);
  auto cdiv = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
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
      std::memcpy(kv_at(kp, l, blk, off, g), row + (H + g) * Dh, Dh * sizeof(float));
      std::memcpy(kv_at(vp, l, blk, off, g), row + (H + KVH + g) * Dh, Dh * sizeof(float));
    }
  };
  auto mlp_norm_token = [&](int64_t l, int64_t t) {
    RmsNorm(x.data() + t * D, mlp_norm.typed_data() + l * D, D, norm_eps, h.data() + t * D);
  };
  auto next_norm_row = [&](int64_t l, int64_t i) {  // i: a token, or a logits row after L-1
    if (l + 1 < L)
      RmsNorm(x.data() + i * D, attn_norm.typed_data() + (l + 1) * D, D, norm_eps,
              h.data() + i * D);
    else
      RmsNorm(x.data() + lidx[i] * D, final_norm.typed_data(), D, norm_eps, hf.data() + i * D);
  };
  auto next_norm_rows = [&](int64_t l) { return l + 1 < L ? T : R; };

  // The phases. Few tokens: the serial pieces are epilogues of the phase before (run by its
  // finisher: no extra barrier). Many tokens (prefill chunks, big batches): phases of their
  // own, split by tokens across the threads.
  enum Kind { kQkv, kRope, kAttention, kOProj, kMlpNorm, kGateUp, kDown, kNextNorm, kHead };
  const bool split = T >= kSplitTokens;
  std::vector<std::pair<Kind, int64_t>> phases;
  for (int64_t l = 0; l < L; ++l) {
    for (Kind k : {kQkv, kRope, kAttention, kOProj, kMlpNorm, kGateUp, kDown, kNextNorm})
      if (split || (k != kRope && k != kMlpNorm && k != kNextNorm)) phases.push_back({k, l});
  }
  if (R > 0) phases.push_back({kHead, L - 1});
  constexpr int64_t kTokensPerChunk = 4;

  auto team = std::make_shared<Team>();
  team->profile = profile;
  if (profile) {
    g_profile_ns[6].fetch_add(NowNs() - start_ns, std::memory_order_relaxed);
    g_profile_steps.fetch_add(1, std::memory_order_relaxed);
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
      case kQkv: return cdiv(NQKV, qkv_rows);
      case kAttention: return T * H;
      case kOProj: return cdiv(D, o_rows);
      case kGateUp: return cdiv(F, gu_rows);
      case kDown: return cdiv(D, dn_rows);
      case kHead: return cdiv(V, hd_rows);
      case kNextNorm: return cdiv(next_norm_rows(l), kTokensPerChunk);
      default: return cdiv(T, kTokensPerChunk);  // rope, mlp norm
    }
  };
  team->run = [&](int p, int64_t c) {
    const auto [kind, l] = phases[p];
    switch (kind) {
      case kQkv: {
        const int64_t n0 = c * qkv_rows;
        matmul_block(h.data(), T, D, Layer(*qkv, l), n0, std::min(NQKV, n0 + qkv_rows),
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
      case kAttention: {  // token t, query head hh: online softmax over its sequence's blocks
        const int64_t t = c / H, hh = c % H, g = hh / group;
        float* __restrict o = attn.data() + t * H * Dh + hh * Dh;
        std::fill(o, o + Dh, 0.0f);
        if (!valid[t]) return;
        const float* qv = q.data() + t * NQKV + hh * Dh;
        const int64_t p_t = pos[t];
        const int64_t lo = window > 0 ? std::max<int64_t>(0, p_t - window + 1) : 0;
        const int32_t* row = tab + seq[t] * Wt;
        constexpr int kTile = 64;
        float scores[kTile];
        float m = -INFINITY, denom = 0.0f;
        for (int64_t j0 = lo; j0 <= p_t; j0 += kTile) {
          const int64_t n = std::min<int64_t>(kTile, p_t + 1 - j0);
          float tile_max = -INFINITY;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t j = j0 + i;
            scores[i] = Dot(qv, kv_at(kp, l, row[j / BS], j % BS, g), Dh) * att_scale;
            tile_max = std::max(tile_max, scores[i]);
          }
          const float m_new = std::max(m, tile_max);
          const float corr = std::exp(m - m_new);  // 0 on the first tile
          denom *= corr;
          for (int64_t d = 0; d < Dh; ++d) o[d] *= corr;
          for (int64_t i = 0; i < n; ++i) {
            const int64_t j = j0 + i;
            const float pr = std::exp(scores[i] - m_new);
            denom += pr;
            const float* vv = kv_at(vp, l, row[j / BS], j % BS, g);
            for (int64_t d = 0; d < Dh; ++d) o[d] += pr * vv[d];
          }
          m = m_new;
        }
        const float inv = 1.0f / denom;
        for (int64_t d = 0; d < Dh; ++d) o[d] *= inv;
        return;
      }
      case kOProj: {
        const int64_t n0 = c * o_rows;
        matmul_block(attn.data(), T, H * Dh, Layer(*ow, l), n0, std::min(D, n0 + o_rows),
                     x.data(), D, true);
        return;
      }
      case kGateUp: {
        const int64_t j0 = c * gu_rows, j1 = std::min(F, j0 + gu_rows);
        const WeightView w = Layer(*gu, l);
        matmul_block(h.data(), T, D, w, j0, j1, gbuf.data(), 2 * F, false);
        matmul_block(h.data(), T, D, w, F + j0, F + j1, gbuf.data(), 2 * F, false);
        for (int64_t t = 0; t < T; ++t) {
          const float* gt = gbuf.data() + t * 2 * F;
          for (int64_t j = j0; j < j1; ++j) {
            const float a = gt[j];
            act[t * F + j] = a / (1.0f + std::exp(-a)) * gt[F + j];
          }
        }
        return;
      }
      case kDown: {
        const int64_t n0 = c * dn_rows;
        matmul_block(act.data(), T, F, Layer(*dn, l), n0, std::min(D, n0 + dn_rows),
                     x.data(), D, true);
        return;
      }
      case kHead: {
        const int64_t n0 = c * hd_rows;
        matmul_block(hf.data(), R, D, *hd, n0, std::min(V, n0 + hd_rows), out_logits, V,
                     false);
        return;
      }
    }
  };
  team->epilogue = [&](int p) {
    if (split) return;
    const auto [kind, l] = phases[p];
    if (kind == kQkv)
      for (int64_t t = 0; t < T; ++t) rope_token(l, t);
    else if (kind == kOProj)
      for (int64_t t = 0; t < T; ++t) mlp_norm_token(l, t);
    else if (kind == kDown)
      for (int64_t i = 0; i < next_norm_rows(l); ++i) next_norm_row(l, i);
  };
  RunTeam(pool, team, std::max<int64_t>(0, threads - 1));
  return ffi::Error::Success();
}

}  // namespace hpllm_decoder

// Profile counters: out[0..6] seconds per phase kind (see kKinds), out[7] steps; reset
// clears them.
extern "C" void HpllmDecoderProfile(double* out, int reset) {
  using namespace hpllm_decoder;
  for (int i = 0; i < kKinds; ++i)
    out[i] = 1e-9 * static_cast<double>(reset ? g_profile_ns[i].exchange(0)
                                              : g_profile_ns[i].load());
  out[kKinds] = static_cast<double>(reset ? g_profile_steps.exchange(0)
                                          : g_profile_steps.load());
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmDecoderStep, hpllm_decoder::StepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tokens (T,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // positions (T,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // seq_index (T,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tables (S, W)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // logits_index (R,)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k pool
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v pool
                                  .Arg<ffi::AnyBuffer>()         // embed
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // attn_norm (L, D)
                                  .Arg<ffi::AnyBuffer>()         // wqkv
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()         // wo
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mlp_norm (L, D)
                                  .Arg<ffi::AnyBuffer>()         // wgu
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()         // wdown
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final_norm (D,)
                                  .Arg<ffi::AnyBuffer>()         // head
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()  // logits (R, V)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // k pool (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v pool (aliased)
                                  .Attr<int64_t>("n_heads")
                                  .Attr<int64_t>("n_kv_heads")
                                  .Attr<float>("rope_theta")
                                  .Attr<float>("norm_eps")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("max_threads"));
