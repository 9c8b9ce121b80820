// Causal grouped-query attention for CPU training, as XLA FFI custom calls.
//
//   HpllmAttentionFwd: q (B, S, H, D), k, v (B, T, KV, D) bf16, positions and segment ids
//     (B, S) / (B, T) int32 -> out (B, S, H, D) bf16, lse (B, H, S) float32 (log-sum-exp of
//     each query row's scaled scores; 1e30 for a row that sees no key).
//   HpllmAttentionBwd: the same inputs with out, d_out and lse -> dq, dk, dv (bf16), P
//     recomputed from lse (FlashAttention-2's backward), never stored.
//
// Why: the training step's dense reference attention spends its time on memory passes over
// the float32 (B, H, S, T) scores, mask selects and transposes (docs/perf/train_cpu.md);
// here one task owns a (batch row, KV head): its K and V (float32, both layouts) stay in L1/L2
// while all G x S query rows of the group run against them in blocks of 4 rows, so each
// loaded key vector feeds 4 FMAs. Masking is the rule of hpllm/kernels/masking.py (kv_pos <=
// q_pos, equal non-zero segments, window); key chunks of 16 that no row of a block can see
// (judged from the chunk's position/segment ranges) are skipped. Math in float32; vectors are
// GCC vector extensions (vec_math.h), so the portable build is the same code on narrower
// registers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "parallel_chunks.h"
#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using hpllm::Bf16ToF32;
using hpllm::Exp;
using hpllm::F32ToBf16;
using hpllm::HMax;
using hpllm::HSum;
using hpllm::I16;
using hpllm::V16;
constexpr int kL = hpllm::kLanes;
constexpr int kR = 4;    // query rows per block
constexpr float kNoKeyLse = 1e30f;  // as hpllm/kernels/flash_attention.py: exp(s - lse) = 0

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Dims {
  int64_t B, S, T, H, KV, G, D, Tp, Dp, chunks;
};

// One (batch row, KV head): its keys/values in float32 and the key chunks' mask ranges.
struct KeyBlock {
  std::vector<V16> kt, vt;  // (D, Tp): score and dP matmuls, 16 keys per vector
  std::vector<V16> kr, vr;  // (Tp, Dp): the P V, dS K, dK and dV updates, 16 dims per vector
  std::vector<I16> kpv, ksv;                     // (Tp) positions, segments (0 past T)
  int32_t* kp;
  int32_t* ks;
  std::vector<int32_t> kp_min, kp_max, ks_min, ks_max;  // per chunk of 16, valid keys only

  KeyBlock(const Dims& d, bool need_v_rows, bool need_v_cols)
      : kt(d.D * d.Tp / kL), vt(need_v_cols ? d.D * d.Tp / kL : 0), kr(d.Tp * d.Dp / kL),
        vr(need_v_rows ? d.Tp * d.Dp / kL : 0), kpv(d.chunks), ksv(d.chunks),
        kp(reinterpret_cast<int32_t*>(kpv.data())), ks(reinterpret_cast<int32_t*>(ksv.data())),
        kp_min(d.chunks), kp_max(d.chunks), ks_min(d.chunks), ks_max(d.chunks) {}

  float* Kt() { return reinterpret_cast<float*>(kt.data()); }
  float* Vt() { return reinterpret_cast<float*>(vt.data()); }
  float* Kr() { return reinterpret_cast<float*>(kr.data()); }
  float* Vr() { return reinterpret_cast<float*>(vr.data()); }

  void Load(const Dims& d, const uint16_t* k, const uint16_t* v, const int32_t* kv_pos,
            const int32_t* kv_seg, int64_t b, int64_t h) {
    std::fill(kt.begin(), kt.end(), V16{});
    std::fill(kr.begin(), kr.end(), V16{});
    std::fill(vt.begin(), vt.end(), V16{});
    std::fill(vr.begin(), vr.end(), V16{});
    for (int64_t j = 0; j < d.T; ++j) {
      const int64_t off = ((b * d.T + j) * d.KV + h) * d.D;
      for (int64_t e = 0; e < d.D; ++e) {
        const float kf = Bf16ToF32(k[off + e]), vf = Bf16ToF32(v[off + e]);
        Kt()[e * d.Tp + j] = kf;
        Kr()[j * d.Dp + e] = kf;
        if (!vt.empty()) Vt()[e * d.Tp + j] = vf;
        if (!vr.empty()) Vr()[j * d.Dp + e] = vf;
      }
      kp[j] = kv_pos[b * d.T + j];
      ks[j] = kv_seg[b * d.T + j];
    }
    for (int64_t j = d.T; j < d.Tp; ++j) kp[j] = 0, ks[j] = 0;
    for (int64_t c = 0; c < d.chunks; ++c) {
      int32_t pmin = std::numeric_limits<int32_t>::max(), pmax = std::numeric_limits<int32_t>::min();
      int32_t smin = pmin, smax = pmax;
      for (int64_t j = c * kL; j < (c + 1) * kL; ++j) {
        if (ks[j] == 0) continue;
        pmin = std::min(pmin, kp[j]), pmax = std::max(pmax, kp[j]);
        smin = std::min(smin, ks[j]), smax = std::max(smax, ks[j]);
      }
      kp_min[c] = pmin, kp_max[c] = pmax, ks_min[c] = smin, ks_max[c] = smax;
    }
  }
};

// A block of kR query rows of one task; rows past the task's end are padding (segment 0:
// they see nothing and add nothing).
struct RowBlock {
  int64_t n = 0;                 // real rows
  int64_t row[kR];               // offsets (in elements) of each row in q / out
  int64_t lse_at[kR];            // index into lse
  int32_t qp[kR], qs[kR];
  alignas(64) float q[kR][256];  // scaled or plain q rows (D <= 256)
  std::vector<uint8_t> visible;  // per chunk: may any row see a key of it
};

void SetupRows(const Dims& d, const int32_t* q_pos, const int32_t* q_seg, int64_t b, int64_t h,
               int64_t r0, RowBlock& rb) {
  const int64_t rows = d.G * d.S;
  rb.n = std::min<int64_t>(kR, rows - r0);
  for (int r = 0; r < kR; ++r) {
    const int64_t t = std::min<int64_t>(r0 + r, rows - 1);
    const int64_t g = t / d.S, i = t % d.S, head = h * d.G + g;
    rb.row[r] = ((b * d.S + i) * d.H + head) * d.D;
    rb.lse_at[r] = (b * d.H + head) * d.S + i;
    rb.qp[r] = q_pos[b * d.S + i];
    rb.qs[r] = r < rb.n ? q_seg[b * d.S + i] : 0;
  }
}

// Asks for the rows of the block after r0 (a query row is one 64-byte line at D = 32, 512
// bytes from the next: the hardware prefetcher does not follow 4 rows per block).
void PrefetchNextRows(const Dims& d, const uint16_t* src, int64_t b, int64_t h, int64_t r0) {
  const int64_t rows = d.G * d.S;
  for (int64_t t = r0 + kR; t < std::min(r0 + 2 * kR, rows); ++t) {
    const int64_t g = t / d.S, i = t % d.S;
    const uint16_t* row = src + ((b * d.S + i) * d.H + h * d.G + g) * d.D;
    for (int64_t e = 0; e < d.D; e += 32) __builtin_prefetch(row + e);
  }
}

void ChunkVisibility(const Dims& d, const KeyBlock& kb, int64_t window, RowBlock& rb) {
  int32_t qp_max = std::numeric_limits<int32_t>::min(), qp_min = std::numeric_limits<int32_t>::max();
  int32_t qs_max = qp_max, qs_min = qp_min;
  bool any = false;
  for (int r = 0; r < kR; ++r) {
    if (rb.qs[r] == 0) continue;
    any = true;
    qp_max = std::max(qp_max, rb.qp[r]), qp_min = std::min(qp_min, rb.qp[r]);
    qs_max = std::max(qs_max, rb.qs[r]), qs_min = std::min(qs_min, rb.qs[r]);
  }
  rb.visible.assign(d.chunks, 0);
  if (!any) return;
  for (int64_t c = 0; c < d.chunks; ++c) {
    bool ok = kb.kp_min[c] <= qp_max && kb.ks_min[c] <= qs_max && kb.ks_max[c] >= qs_min;
    if (window > 0) ok = ok && static_cast<int64_t>(qp_min) - kb.kp_max[c] < window;
    rb.visible[c] = ok;
  }
}

// Visibility of keys c*16 .. c*16+15 for row r, as a lane mask (-1 visible).
inline I16 Mask(const KeyBlock& kb, const RowBlock& rb, int r, int64_t c, int64_t window) {
  const I16 kp = kb.kpv[c], ks = kb.ksv[c];
  I16 m = (kp <= rb.qp[r]) & (ks == rb.qs[r]) & (ks != 0);
  if (window > 0) m &= (rb.qp[r] - kp) < static_cast<int32_t>(window);
  return m;
}

// s[r][j] = sum_e a[r][e] * mt[e * Tp + j] on the visible chunks.
void Scores(const Dims& d, const float (*a)[256], const float* mt, const RowBlock& rb,
            float* s /* (kR, Tp) */) {
  for (int64_t c = 0; c < d.chunks; ++c) {
    if (!rb.visible[c]) continue;
    V16 acc[kR] = {};
    for (int64_t e = 0; e < d.D; ++e) {
      const V16 m = *reinterpret_cast<const V16*>(mt + e * d.Tp + c * kL);
      for (int r = 0; r < kR; ++r) acc[r] += a[r][e] * m;
    }
    for (int r = 0; r < kR; ++r) *reinterpret_cast<V16*>(s + r * d.Tp + c * kL) = acc[r];
  }
}

// out[r][e] = sum_j p[r][j] * rows[j * Dp + e] over the visible chunks (rows: (Tp, Dp)).
void RowsTimesKeys(const Dims& d, const float* p, const float* rows, const RowBlock& rb,
                   float (*out)[256]) {
  for (int64_t e0 = 0; e0 < d.Dp; e0 += kL) {
    V16 acc[kR] = {};
    for (int64_t c = 0; c < d.chunks; ++c) {
      if (!rb.visible[c]) continue;
      for (int64_t j = c * kL; j < (c + 1) * kL; ++j) {
        const V16 x = *reinterpret_cast<const V16*>(rows + j * d.Dp + e0);
        for (int r = 0; r < kR; ++r) acc[r] += p[r * d.Tp + j] * x;
      }
    }
    for (int r = 0; r < kR; ++r) *reinterpret_cast<V16*>(&out[r][e0]) = acc[r];
  }
}

// rows[j * Dp + e] += sum_r p[r][j] * a[r][e] over the visible chunks.
void AddOuter(const Dims& d, const float* p, const float (*a)[256], const RowBlock& rb,
              float* rows) {
  for (int64_t e0 = 0; e0 < d.Dp; e0 += kL) {
    V16 av[kR];
    for (int r = 0; r < kR; ++r) av[r] = *reinterpret_cast<const V16*>(&a[r][e0]);
    for (int64_t c = 0; c < d.chunks; ++c) {
      if (!rb.visible[c]) continue;
      for (int64_t j = c * kL; j < (c + 1) * kL; ++j) {
        V16* y = reinterpret_cast<V16*>(rows + j * d.Dp + e0);
        V16 acc = *y;
        for (int r = 0; r < kR; ++r) acc += p[r * d.Tp + j] * av[r];
        *y = acc;
      }
    }
  }
}

void LoadRow(const uint16_t* src, int64_t D, float scale, float* dst) {
  for (int64_t e = 0; e < D; ++e) dst[e] = Bf16ToF32(src[e]) * scale;
  for (int64_t e = D; e < RoundUp(D, kL); ++e) dst[e] = 0;
}

template <typename Dimensions>
std::string ShapeString(const Dimensions& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

ffi::Error CheckDims(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd,
                     ffi::Span<const int64_t> vd, ffi::Span<const int64_t> qpd,
                     ffi::Span<const int64_t> kpd, Dims& d) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || qpd.size() != 2 || kpd.size() != 2)
    return ffi::Error::InvalidArgument("attention: q, k, v must be 4-D and positions 2-D, got q " +
                                       ShapeString(qd) + ", k " + ShapeString(kd));
  d.B = qd[0], d.S = qd[1], d.H = qd[2], d.D = qd[3], d.T = kd[1], d.KV = kd[2];
  if (kd[0] != d.B || kd[3] != d.D || !std::equal(kd.begin(), kd.end(), vd.begin()) ||
      d.KV == 0 || d.H % d.KV != 0 || qpd[0] != d.B || qpd[1] != d.S || kpd[0] != d.B ||
      kpd[1] != d.T)
    return ffi::Error::InvalidArgument("attention: shapes do not fit: q " + ShapeString(qd) +
                                       ", k " + ShapeString(kd) + ", v " + ShapeString(vd) +
                                       ", q_pos " + ShapeString(qpd) + ", kv_pos " +
                                       ShapeString(kpd));
  if (d.D > 256) return ffi::Error::InvalidArgument("attention: head_dim > 256");
  d.G = d.H / d.KV;
  d.Tp = RoundUp(std::max<int64_t>(d.T, 1), kL);
  d.Dp = RoundUp(d.D, kL);
  d.chunks = d.Tp / kL;
  return ffi::Error::Success();
}

// The operands both calls share, checked.
struct Inputs {
  Dims d;
  const uint16_t *q, *k, *v;
  const int32_t *qp, *kp, *qs, *ks;
};

ffi::Error Bind(ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k, ffi::Buffer<ffi::BF16> v,
                ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg, Inputs& in) {
  if (auto e = CheckDims(q.dimensions(), k.dimensions(), v.dimensions(), q_pos.dimensions(),
                         kv_pos.dimensions(), in.d);
      e.failure())
    return e;
  in.q = reinterpret_cast<const uint16_t*>(q.untyped_data());
  in.k = reinterpret_cast<const uint16_t*>(k.untyped_data());
  in.v = reinterpret_cast<const uint16_t*>(v.untyped_data());
  in.qp = q_pos.typed_data(), in.kp = kv_pos.typed_data();
  in.qs = q_seg.typed_data(), in.ks = kv_seg.typed_data();
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                   ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::S32> q_pos,
                   ffi::Buffer<ffi::S32> kv_pos, ffi::Buffer<ffi::S32> q_seg,
                   ffi::Buffer<ffi::S32> kv_seg, ffi::Result<ffi::Buffer<ffi::BF16>> out,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse, int64_t window) {
  Inputs in;
  if (auto e = Bind(q, k, v, q_pos, kv_pos, q_seg, kv_seg, in); e.failure()) return e;
  const Dims& d = in.d;
  const uint16_t *qd = in.q, *kd = in.k, *vd = in.v;
  const int32_t *qp = in.qp, *kp = in.kp, *qs = in.qs, *ks = in.ks;
  uint16_t* od = reinterpret_cast<uint16_t*>(out->untyped_data());
  float* ld = lse->typed_data();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  hpllm::ParallelChunks(pool, d.B * d.KV, [&](int64_t task) {
    const int64_t b = task / d.KV, h = task % d.KV;
    KeyBlock kb(d, /*need_v_rows=*/true, /*need_v_cols=*/false);
    kb.Load(d, kd, vd, kp, ks, b, h);
    RowBlock rb;
    std::vector<V16> sbuf(kR * d.Tp / kL);
    float* s = reinterpret_cast<float*>(sbuf.data());
    alignas(64) float o[kR][256];
    for (int64_t r0 = 0; r0 < d.G * d.S; r0 += kR) {
      SetupRows(d, qp, qs, b, h, r0, rb);
      PrefetchNextRows(d, qd, b, h, r0);
      ChunkVisibility(d, kb, window, rb);
      for (int r = 0; r < kR; ++r) LoadRow(qd + rb.row[r], d.D, scale, rb.q[r]);
      Scores(d, rb.q, kb.Kt(), rb, s);
      float row_lse[kR];
      for (int r = 0; r < kR; ++r) {  // softmax of each row over its visible keys
        float* sr = s + r * d.Tp;
        V16 mx = V16{} - std::numeric_limits<float>::infinity();
        bool any = false;
        for (int64_t c = 0; c < d.chunks; ++c) {
          if (!rb.visible[c]) continue;
          const I16 m = Mask(kb, rb, r, c, window);
          V16& x = *reinterpret_cast<V16*>(sr + c * kL);
          x = m ? x : V16{} - std::numeric_limits<float>::infinity();
          mx = x > mx ? x : mx;
          for (int i = 0; i < kL; ++i) any |= m[i] != 0;
        }
        if (!any) {
          for (int64_t c = 0; c < d.chunks; ++c)
            if (rb.visible[c]) *reinterpret_cast<V16*>(sr + c * kL) = V16{};
          row_lse[r] = kNoKeyLse;
          continue;
        }
        const float m = HMax(mx);
        V16 sum = {};
        for (int64_t c = 0; c < d.chunks; ++c) {
          if (!rb.visible[c]) continue;
          V16& x = *reinterpret_cast<V16*>(sr + c * kL);
          x = Exp(x - m);  // -inf (masked) -> 0
          sum += x;
        }
        const float l = HSum(sum);
        const float inv = 1.0f / l;
        for (int64_t c = 0; c < d.chunks; ++c)
          if (rb.visible[c]) *reinterpret_cast<V16*>(sr + c * kL) *= inv;
        row_lse[r] = m + std::log(l);
      }
      RowsTimesKeys(d, s, kb.Vr(), rb, o);
      for (int r = 0; r < rb.n; ++r) {
        for (int64_t e = 0; e < d.D; ++e) od[rb.row[r] + e] = F32ToBf16(o[r][e]);
        ld[rb.lse_at[r]] = row_lse[r];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                    ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::BF16> out,
                    ffi::Buffer<ffi::BF16> d_out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::S32> q_pos, ffi::Buffer<ffi::S32> kv_pos,
                    ffi::Buffer<ffi::S32> q_seg, ffi::Buffer<ffi::S32> kv_seg,
                    ffi::Result<ffi::Buffer<ffi::BF16>> dq, ffi::Result<ffi::Buffer<ffi::BF16>> dk,
                    ffi::Result<ffi::Buffer<ffi::BF16>> dv, int64_t window) {
  Inputs in;
  if (auto e = Bind(q, k, v, q_pos, kv_pos, q_seg, kv_seg, in); e.failure()) return e;
  const Dims& d = in.d;
  const uint16_t *qd = in.q, *kd = in.k, *vd = in.v;
  const uint16_t* outd = reinterpret_cast<const uint16_t*>(out.untyped_data());
  const uint16_t* dod = reinterpret_cast<const uint16_t*>(d_out.untyped_data());
  const float* ld = lse.typed_data();
  uint16_t* dqd = reinterpret_cast<uint16_t*>(dq->untyped_data());
  uint16_t* dkd = reinterpret_cast<uint16_t*>(dk->untyped_data());
  uint16_t* dvd = reinterpret_cast<uint16_t*>(dv->untyped_data());
  const int32_t *qp = in.qp, *kp = in.kp, *qs = in.qs, *ks = in.ks;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.D));
  hpllm::ParallelChunks(pool, d.B * d.KV, [&](int64_t task) {
    const int64_t b = task / d.KV, h = task % d.KV;
    KeyBlock kb(d, /*need_v_rows=*/false, /*need_v_cols=*/true);
    kb.Load(d, kd, vd, kp, ks, b, h);
    std::vector<V16> dkb(d.Tp * d.Dp / kL), dvb(d.Tp * d.Dp / kL);
    float* dkr = reinterpret_cast<float*>(dkb.data());
    float* dvr = reinterpret_cast<float*>(dvb.data());
    std::vector<V16> pbuf(kR * d.Tp / kL), dsbuf(kR * d.Tp / kL);
    float* p = reinterpret_cast<float*>(pbuf.data());
    float* ds = reinterpret_cast<float*>(dsbuf.data());
    RowBlock rb;
    alignas(64) float dor[kR][256];
    alignas(64) float dqr[kR][256];
    for (int64_t r0 = 0; r0 < d.G * d.S; r0 += kR) {
      SetupRows(d, qp, qs, b, h, r0, rb);
      for (const uint16_t* src : {qd, dod, outd}) PrefetchNextRows(d, src, b, h, r0);
      ChunkVisibility(d, kb, window, rb);
      float delta[kR], row_lse[kR];
      for (int r = 0; r < kR; ++r) {
        LoadRow(qd + rb.row[r], d.D, 1.0f, rb.q[r]);
        LoadRow(dod + rb.row[r], d.D, 1.0f, dor[r]);
        float acc = 0;
        for (int64_t e = 0; e < d.D; ++e) acc += dor[r][e] * Bf16ToF32(outd[rb.row[r] + e]);
        delta[r] = acc;
        row_lse[r] = r < rb.n ? ld[rb.lse_at[r]] : kNoKeyLse;
      }
      Scores(d, rb.q, kb.Kt(), rb, p);   // q k^T (unscaled)
      Scores(d, dor, kb.Vt(), rb, ds);   // dP = dO v^T
      for (int r = 0; r < kR; ++r) {
        float* pr = p + r * d.Tp;
        float* dsr = ds + r * d.Tp;
        for (int64_t c = 0; c < d.chunks; ++c) {
          if (!rb.visible[c]) continue;
          const I16 m = Mask(kb, rb, r, c, window);
          V16& x = *reinterpret_cast<V16*>(pr + c * kL);
          V16& y = *reinterpret_cast<V16*>(dsr + c * kL);
          x = m ? Exp(x * scale - row_lse[r]) : V16{};
          y = x * (y - delta[r]) * scale;
        }
      }
      AddOuter(d, p, dor, rb, dvr);     // dV += P^T dO
      AddOuter(d, ds, rb.q, rb, dkr);   // dK += dS^T Q
      RowsTimesKeys(d, ds, kb.Kr(), rb, dqr);  // dQ = dS K
      for (int r = 0; r < rb.n; ++r)
        for (int64_t e = 0; e < d.D; ++e) dqd[rb.row[r] + e] = F32ToBf16(dqr[r][e]);
    }
    for (int64_t j = 0; j < d.T; ++j) {
      const int64_t off = ((b * d.T + j) * d.KV + h) * d.D;
      for (int64_t e = 0; e < d.D; ++e) {
        dkd[off + e] = F32ToBf16(dkr[j * d.Dp + e]);
        dvd[off + e] = F32ToBf16(dvr[j * d.Dp + e]);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q (B, S, H, D)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // k (B, T, KV, D)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // v (B, T, KV, D)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos (B, S)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_pos (B, T)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_seg (B, S)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_seg (B, T)
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // out (B, S, H, D)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // lse (B, H, S)
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // k
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // v
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // out
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // d_out
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_pos
                                  .Arg<ffi::Buffer<ffi::S32>>()   // q_seg
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_seg
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // dq
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // dk
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // dv
                                  .Attr<int64_t>("window"));
