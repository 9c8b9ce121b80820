// Large bfloat16 matmuls for CPU training, as XLA FFI custom calls.
//
//   HpllmBf16MatmulF32 / HpllmBf16MatmulBf16:  C (M, N) = op(A) @ op(B), float32 accumulate,
//   stored as float32 / bfloat16 (round to nearest even).
//   A is (M, K), or (K, M) with trans_a = 1; B is (K, N), or (N, K) with trans_b = 1.
//
// Why: XLA:CPU runs a bf16 dot at ~300 GFLOP/s on the 2-core Zen 5 dev machine, a third of
// what its AVX512-BF16 dot-product instruction (vdpbf16ps: 16 lanes, each a += pair of bf16
// products) reaches. The four flag combinations cover a projection's forward pass and both
// of its gradients without a transposed copy in XLA (docs/perf/train_cpu.md).
//
// Layout: B is packed once per call into panels of kNR = 64 columns, each k-pair of a column
// one 32-bit word (B[k, n] low, B[k + 1, n] high: the VNNI order vdpbf16ps multiplies), so a
// kMR x kNR tile of C (6 x 4 zmm accumulators) loads four B vectors per k-pair and
// broadcasts one 32-bit pair of each A row. A is read in place when it is (M, K) with K even;
// A^T is packed into kMR-wide panels of the same pairs, and (M, K) with K odd is copied with a
// zero column. K runs in blocks of kKC pairs into a task-local float32 tile, so a task's rows
// of A and its B panel stay in L2. Tasks (kMC rows of A x one B panel) are claimed by the
// calling thread and the workers of XLA's intra-op thread pool. Without __AVX512BF16__ a
// scalar loop over the same packed data computes the same sums (the fallback, tested too).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "parallel_chunks.h"
#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#define HPLLM_BF16_DOT 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int kMR = 6;       // rows of A per register tile
constexpr int kNR = 64;      // columns of B per panel (4 x 16 float32 lanes)
constexpr int64_t kMC = 96;  // rows of A per claimed task (16 tiles against one B panel)

using hpllm::Bf16ToF32;  // vec_math.h
using hpllm::F32ToBf16;

// ----------------------------------------------------------------------- scratch buffers
// Packed B and copied A live in buffers reused across calls: fresh multi-MB allocations
// would fault in their pages on every call.

struct Scratch {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free;  // (bytes, 64-byte aligned block)
};

Scratch& GetScratch() {
  static Scratch* s = new Scratch;  // never destroyed: workers may outlive static teardown
  return *s;
}

class Buffer {
 public:
  explicit Buffer(size_t bytes) : bytes_(std::max<size_t>(bytes, 64)) {
    Scratch& s = GetScratch();
    std::lock_guard<std::mutex> lock(s.mu);
    for (size_t i = 0; i < s.free.size(); ++i) {
      if (s.free[i].first >= bytes_) {
        bytes_ = s.free[i].first;
        data_ = s.free[i].second;
        s.free.erase(s.free.begin() + i);
        return;
      }
    }
    bytes_ = (bytes_ + 63) / 64 * 64;
    data_ = std::aligned_alloc(64, bytes_);
  }
  ~Buffer() {
    if (data_ == nullptr) return;
    Scratch& s = GetScratch();
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.free.size() < 8) {
      s.free.emplace_back(bytes_, data_);
    } else {
      std::free(data_);
    }
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* get() const { return static_cast<T*>(data_); }
  bool ok() const { return data_ != nullptr; }

 private:
  size_t bytes_;
  void* data_ = nullptr;
};

// Threads: hpllm::ParallelChunks (parallel_chunks.h), as in quant_matmul.cc.

// ------------------------------------------------------------------------------ packing

// Panels [p0, p1) of width W of a matrix whose rows are the contraction axis (k) and whose
// columns the panels split: panel p is kp-major, word [kp * W + j] = the pair
// (src[2kp, c], src[2kp + 1, c]) of column c = W p + j; zeros past `cols` and K. For B (K, N)
// and for A^T given as (K, M). k-pairs outermost: each pair of source rows is read once,
// contiguously, for all the panels.
template <int W>
void PackRowsPanels(const uint16_t* src, int64_t K, int64_t cols, int64_t p0, int64_t p1,
                    int64_t kpairs, uint32_t* out) {
  const int64_t c1 = std::min<int64_t>(p1 * W, cols);
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint16_t* r0 = src + 2 * kp * cols;
    const uint16_t* r1 = 2 * kp + 1 < K ? r0 + cols : nullptr;
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t* o = out + (p * kpairs + kp) * W;
      const int64_t lo = p * W, hi = std::min<int64_t>(lo + W, c1);
      if (r1) {
        for (int64_t c = lo; c < hi; ++c)
          o[c - lo] = r0[c] | static_cast<uint32_t>(r1[c]) << 16;
      } else {
        for (int64_t c = lo; c < hi; ++c) o[c - lo] = r0[c];
      }
      for (int64_t j = hi - lo; j < W; ++j) o[j] = 0;
    }
  }
}

// Panel p of B given as (N, K): row n's pairs are consecutive words, so this is a 32-bit
// transpose into the kp-major panel.
void PackColsPanel(const uint16_t* b, int64_t K, int64_t N, int64_t p, int64_t kpairs,
                   uint32_t* out) {
  const int64_t n0 = p * kNR, nn = std::min<int64_t>(kNR, N - n0);
  const int64_t whole = K / 2;
  for (int64_t j = 0; j < kNR; ++j) {
    if (j >= nn) {
      for (int64_t kp = 0; kp < kpairs; ++kp) out[kp * kNR + j] = 0;
      continue;
    }
    const uint16_t* row = b + (n0 + j) * K;
    for (int64_t kp = 0; kp < whole; ++kp) {
      uint32_t w;
      std::memcpy(&w, row + 2 * kp, 4);
      out[kp * kNR + j] = w;
    }
    if (whole < kpairs) out[whole * kNR + j] = row[K - 1];  // odd K: last pair (k, 0)
  }
}

// Rows [m0, m1) of A (M, K) copied to (M, 2 kpairs) with a zero column: odd K only.
void PadARows(const uint16_t* a, int64_t K, int64_t m0, int64_t m1, int64_t kpairs,
              uint16_t* out) {
  const int64_t ld = 2 * kpairs;
  for (int64_t m = m0; m < m1; ++m) {
    std::memcpy(out + m * ld, a + m * K, K * sizeof(uint16_t));
    out[m * ld + K] = 0;
  }
}

// ------------------------------------------------------------------------- the tile

// ct[0:R, 0:kNR] (+)= A rows . one packed B panel over kpairs k-pairs, float32. A's pair
// (row r, pair kp) is the word a[r * ra + kp * ka]: rows of A in place (ra = row stride,
// ka = 1) or an A^T panel (ra = 1, ka = kMR).
template <int R>
inline void Tile(const uint32_t* a, int64_t ra, int64_t ka, const uint32_t* panel,
                 int64_t kpairs, float* ct, bool accumulate) {
#ifdef HPLLM_BF16_DOT
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i)
      acc[r][i] = accumulate ? _mm512_load_ps(ct + r * kNR + 16 * i) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint32_t* bp = panel + kp * kNR;
    const uint32_t* ap = a + kp * ka;
    __m512bh b[4];
    for (int i = 0; i < 4; ++i) b[i] = (__m512bh)_mm512_load_si512(bp + 16 * i);
    for (int r = 0; r < R; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * ra]));
      for (int i = 0; i < 4; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], av, b[i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) _mm512_store_ps(ct + r * kNR + 16 * i, acc[r][i]);
#else
  if (!accumulate) std::fill(ct, ct + R * kNR, 0.0f);
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const uint32_t* bp = panel + kp * kNR;
    for (int r = 0; r < R; ++r) {
      const uint32_t w = a[r * ra + kp * ka];
      const float a0 = Bf16ToF32(static_cast<uint16_t>(w)),
                  a1 = Bf16ToF32(static_cast<uint16_t>(w >> 16));
      float* c = ct + r * kNR;
      for (int j = 0; j < kNR; ++j)
        c[j] += a0 * Bf16ToF32(static_cast<uint16_t>(bp[j])) +
                a1 * Bf16ToF32(static_cast<uint16_t>(bp[j] >> 16));
    }
  }
#endif
}

template <int R>
inline void TileAt(const uint32_t* a, int64_t ra, int64_t ka, const uint32_t* panel,
                   int64_t kpairs, float* ct, bool accumulate, int64_t rows) {
  if constexpr (R > 1) {
    if (rows < R) return TileAt<R - 1>(a, ra, ka, panel, kpairs, ct, accumulate, rows);
  }
  Tile<R>(a, ra, ka, panel, kpairs, ct, accumulate);
}

inline void StoreRow(const float* v, int64_t n, float* c) {
  std::memcpy(c, v, n * sizeof(float));
}

inline void StoreRow(const float* v, int64_t n, uint16_t* c) {
#ifdef HPLLM_BF16_DOT
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + j),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(v + j)));
  for (; j < n; ++j) c[j] = F32ToBf16(v[j]);
#else
  for (int64_t j = 0; j < n; ++j) c[j] = F32ToBf16(v[j]);
#endif
}

// ---------------------------------------------------------------------------- the call

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

constexpr int64_t kKC = 256;  // k-pairs per block: a task's A rows and B panel stay in L2

template <typename Out>
ffi::Error Matmul(ffi::ThreadPool& pool, const uint16_t* a, const uint16_t* b, Out* c,
                  int64_t M, int64_t K, int64_t N, bool trans_a, bool trans_b) {
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t kpairs = (K + 1) / 2;
  if (kpairs == 0) {
    for (int64_t i = 0; i < M * N; ++i) c[i] = Out(0);
    return ffi::Error::Success();
  }
  const int64_t panels = (N + kNR - 1) / kNR;
  const int64_t a_panels = (M + kMR - 1) / kMR;
  Buffer packed(static_cast<size_t>(panels) * kpairs * kNR * 4);
  // A^T packs into kMR-wide panels; A with odd K is copied with a zero column; else in place
  const bool pad_a = !trans_a && K % 2;
  Buffer a_copy(trans_a ? static_cast<size_t>(a_panels) * kpairs * kMR * 4
                        : pad_a ? static_cast<size_t>(M) * kpairs * 4 : 0);
  if (!packed.ok() || !a_copy.ok())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "bf16 matmul: out of memory");
  uint32_t* bp = packed.get<uint32_t>();
  uint32_t* ac = a_copy.get<uint32_t>();
  constexpr int64_t kAPanelsPerTask = kMC / kMR;
  const int64_t a_tasks = trans_a ? (a_panels + kAPanelsPerTask - 1) / kAPanelsPerTask
                          : pad_a ? (M + kMC - 1) / kMC : 0;
  hpllm::ParallelChunks(pool, panels + a_tasks, [&](int64_t t) {
    if (t < panels) {
      if (trans_b) PackColsPanel(b, K, N, t, kpairs, bp + t * kpairs * kNR);
      else PackRowsPanels<kNR>(b, K, N, t, t + 1, kpairs, bp);
    } else if (trans_a) {
      const int64_t p0 = (t - panels) * kAPanelsPerTask;
      PackRowsPanels<kMR>(a, K, M, p0, std::min(a_panels, p0 + kAPanelsPerTask), kpairs, ac);
    } else {
      const int64_t m0 = (t - panels) * kMC;
      PadARows(a, K, m0, std::min(M, m0 + kMC), kpairs, reinterpret_cast<uint16_t*>(ac));
    }
  });
  const uint32_t* aw = trans_a || pad_a ? ac : reinterpret_cast<const uint32_t*>(a);
  const int64_t lda = pad_a ? kpairs : K / 2;
  const int64_t chunks = (M + kMC - 1) / kMC;
  // Task t: A rows of chunk t / panels against panel t % panels, so consecutive tasks share
  // their rows of A while the packed panels take turns. K in blocks of kKC pairs, the
  // chunk's C block accumulated in float32 in a task-local tile.
  hpllm::ParallelChunks(pool, chunks * panels, [&](int64_t t) {
    const int64_t p = t % panels, m0 = (t / panels) * kMC;
    const int64_t n0 = p * kNR, nn = std::min<int64_t>(kNR, N - n0);
    const int64_t rows = std::min(kMC, M - m0);
    alignas(64) float ct[kMC * kNR];
    const uint32_t* panel = bp + p * kpairs * kNR;
    for (int64_t k0 = 0; k0 < kpairs; k0 += kKC) {
      const int64_t kc = std::min(kKC, kpairs - k0);
      for (int64_t m = 0; m < rows; m += kMR) {
        const uint32_t* at;
        int64_t ra, ka;
        if (trans_a) {
          at = aw + (m0 + m) / kMR * kpairs * kMR + k0 * kMR, ra = 1, ka = kMR;
        } else {
          at = aw + (m0 + m) * lda + k0, ra = lda, ka = 1;
        }
        TileAt<kMR>(at, ra, ka, panel + k0 * kNR, kc, ct + m * kNR, k0 > 0,
                    std::min<int64_t>(kMR, rows - m));
      }
    }
    for (int64_t m = 0; m < rows; ++m) StoreRow(ct + m * kNR, nn, c + (m0 + m) * N + n0);
  });
  return ffi::Error::Success();
}

template <typename OutBuffer, typename Out>
ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      OutBuffer c, int64_t trans_a, int64_t trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("bf16 matmul needs 2-D operands, got a " +
                                       ShapeString(ad) + ", b " + ShapeString(bd));
  const int64_t M = trans_a ? ad[1] : ad[0], K = trans_a ? ad[0] : ad[1];
  const int64_t Kb = trans_b ? bd[1] : bd[0], N = trans_b ? bd[0] : bd[1];
  if (K != Kb || cd[0] != M || cd[1] != N)
    return ffi::Error::InvalidArgument(
        "bf16 matmul: a " + ShapeString(ad) + (trans_a ? "^T" : "") + " @ b " +
        ShapeString(bd) + (trans_b ? "^T" : "") + " does not give c " + ShapeString(cd));
  return Matmul(pool, a.typed_data(), b.typed_data(), reinterpret_cast<Out*>(c->untyped_data()),
                M, K, N, trans_a != 0, trans_b != 0);
}

ffi::Error MatmulF32(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                     ffi::Result<ffi::Buffer<ffi::F32>> c, int64_t trans_a, int64_t trans_b) {
  return MatmulImpl<decltype(c), float>(pool, a, b, c, trans_a, trans_b);
}

ffi::Error MatmulBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b,
                      ffi::Result<ffi::Buffer<ffi::BF16>> c, int64_t trans_a, int64_t trans_b) {
  return MatmulImpl<decltype(c), uint16_t>(pool, a, b, c, trans_a, trans_b);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmBf16MatmulF32, MatmulF32,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // a (M, K) or (K, M)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // b (K, N) or (N, K)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // c (M, N)
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmBf16MatmulBf16, MatmulBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("trans_a")
                                  .Attr<int64_t>("trans_b"));
