// The CPU matmul core every hpllm CPU kernel builds on (header-only, C++17).
//
//   y[m * ldy + n] (=, or += when accumulate) sum_k x[m * ldx + k] * W[n, k],  m < M, n0 <= n < n1
//
// W is output-major (N, K), K contiguous, as hpllm.quantized stores it:
//   F32:  float (N, K)
//   INT8: int8 codes (N, K), one float scale per row:            W[n, k] = q[n, k] * scale[n]
//   INT4: two codes per byte (N, Kp / 2), Kp = K rounded up to whole groups, code + 8 in the low
//         nibble for even k and the high nibble for odd k (cpu_quant_matmul.pack_int4), one float
//         scale per group of group_size k (N, Kp / group_size).  Padding codes are never used.
//
// matmul_block runs on the calling thread; a caller splits [0, N) across its threads. It tiles M
// and N in registers (dot-product form: both x and W are K-contiguous, so each tile keeps MR x NR
// vector accumulators and reduces them once at the end), reading each weight vector once per
// tile and reusing it across the tile's MR rows of x:
//   - few rows (decode, verify; M <= 2 MR): the weight rows stream from memory once, converted
//     in registers, the next tile's rows prefetched;
//   - more rows: a panel of weight rows is converted to float once into a thread-local buffer
//     (L2-sized) and every MR-row tile of x runs over it, K in chunks that keep the tile in L1;
//   - from 48 rows (prefill chunks; AVX-512): the panel is packed k-major in strips of 16 rows
//     and an outer-product 12 x 32 tile runs over it (no horizontal sums).
// docs/perf/cpu_gemm.md has the measurements behind each choice.
// AVX-512 (F + BW + VL) where the compiler targets it, AVX2 + FMA, and a scalar fallback for a
// portable (-march=x86-64) build.
//
// The int8 x int8 path (VNNI): prepare_x quantizes x once per op in blocks of kQBlock k (a float
// scale per block, codes stored + 128 as unsigned bytes); matmul_block_prepared then multiplies
// those bytes by the int8 weight codes with vpdpbusd, the + 128 offset removed with the weight
// block sums (computed in registers, shared across the rows of x). Same integer arithmetic in
// every build (scalar where VNNI is absent), so only the float rounding order differs.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HPLLM_GEMM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define HPLLM_GEMM_AVX2 1
#endif
#if defined(HPLLM_GEMM_AVX512) && defined(__AVX512VNNI__)
#define HPLLM_GEMM_VNNI 1
#endif

namespace hpllm {

enum class WFormat { F32, INT8, INT4 };

struct WeightView {
  WFormat fmt;
  const void* data;
  const float* scale;  // INT8: (N,); INT4: (N, Kp / group_size); F32: unused
  int64_t N, K, group_size;
};

namespace gemm_detail {

// ------------------------------------------------------------------ vectors of floats
#if defined(HPLLM_GEMM_AVX512)
constexpr int kLanes = 16;
#ifndef HPLLM_GEMM_MR
#define HPLLM_GEMM_MR 5
#define HPLLM_GEMM_NR 5
#endif
// 25 accumulators + 5 weight vectors + x of the 32 zmm: measured on Zen 5 at M = 512, 5 x 5
// ran 135 GFLOP/s per core where 4x4, 6x4, 8x3, 4x6, 3x8, 6x5 ran 71-92.
constexpr int kMR = HPLLM_GEMM_MR, kNR = HPLLM_GEMM_NR;
using Vf = __m512;
inline Vf Zero() { return _mm512_setzero_ps(); }
inline Vf Load(const float* p) { return _mm512_loadu_ps(p); }
inline __mmask16 Mask16(int n) { return static_cast<__mmask16>((1u << n) - 1); }
inline Vf LoadPart(const float* p, int n) { return _mm512_maskz_loadu_ps(Mask16(n), p); }
inline Vf Fma(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float Sum(Vf v) { return _mm512_reduce_add_ps(v); }
inline Vf LoadI8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vf LoadI8Part(const int8_t* p, int n) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(Mask16(n), p)));
}
inline void Store(float* p, Vf v) { _mm512_storeu_ps(p, v); }
#elif defined(HPLLM_GEMM_AVX2)
constexpr int kLanes = 8;
constexpr int kMR = 2, kNR = 4;  // 8 accumulators + 4 weight vectors + x: of 16 ymm
using Vf = __m256;
inline Vf Zero() { return _mm256_setzero_ps(); }
inline Vf Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vf LoadPart(const float* p, int n) {
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(t, p, sizeof(float) * n);
  return _mm256_load_ps(t);
}
inline Vf Fma(Vf a, Vf b, Vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float Sum(Vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline Vf LoadI8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline Vf LoadI8Part(const int8_t* p, int n) {
  int8_t t[16] = {0};
  std::memcpy(t, p, n);
  return LoadI8(t);
}
inline void Store(float* p, Vf v) { _mm256_storeu_ps(p, v); }
#else
constexpr int kLanes = 1;
constexpr int kMR = 2, kNR = 4;
using Vf = float;
inline Vf Zero() { return 0.0f; }
inline Vf Load(const float* p) { return *p; }
inline Vf LoadPart(const float* p, int) { return *p; }
inline Vf Fma(Vf a, Vf b, Vf c) { return a * b + c; }
inline float Sum(Vf v) { return v; }
inline Vf LoadI8(const int8_t* p) { return static_cast<float>(*p); }
inline Vf LoadI8Part(const int8_t* p, int) { return static_cast<float>(*p); }
inline void Store(float* p, Vf v) { *p = v; }
#endif

inline void Prefetch(const void* p) {
#if defined(HPLLM_GEMM_AVX512) || defined(HPLLM_GEMM_AVX2)
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// ------------------------------------------------------------------ weight sources
// Rows of float weights (the F32 matrix itself, or a converted panel), stride ld.
struct F32Rows {
  static constexpr int kBytes = 4;
  const float* w;
  int64_t ld;
  const void* Ptr(int64_t n, int64_t k) const { return w + n * ld + k; }
  Vf Get(int64_t n, int64_t k) const { return Load(w + n * ld + k); }
  Vf GetPart(int64_t n, int64_t k, int r) const { return LoadPart(w + n * ld + k, r); }
};

// Rows of int8 codes, converted to float in registers (the row scale is applied on output).
struct I8Rows {
  static constexpr int kBytes = 1;
  const int8_t* w;
  int64_t ld;
  const void* Ptr(int64_t n, int64_t k) const { return w + n * ld + k; }
  Vf Get(int64_t n, int64_t k) const { return LoadI8(w + n * ld + k); }
  Vf GetPart(int64_t n, int64_t k, int r) const { return LoadI8Part(w + n * ld + k, r); }
};

#if defined(HPLLM_GEMM_AVX512)
// Rows of int4 codes with group scales, dequantized in registers, 16 k per vector: only for
// group sizes that are whole vectors (one scale per vector).
struct I4Rows {
  static constexpr int kBytes = 1;  // for Prefetch: Ptr takes the byte offset k / 2
  const uint8_t* w;
  int64_t ld;  // bytes per row
  const float* scale;
  int64_t groups, group_size;
  const void* Ptr(int64_t n, int64_t k) const { return w + n * ld + k / 2; }
  static __m512 Codes(__m128i b, __m512 s) {  // 8 bytes -> 16 codes (k order) * s
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
    const __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    return _mm512_mul_ps(_mm512_sub_ps(u, _mm512_set1_ps(8.0f)), s);
  }
  __m512 Scale(int64_t n, int64_t k) const {
    return _mm512_set1_ps(scale[n * groups + k / group_size]);
  }
  Vf Get(int64_t n, int64_t k) const {
    return Codes(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + n * ld + k / 2)),
                 Scale(n, k));
  }
  Vf GetPart(int64_t n, int64_t k, int r) const {  // r < 16 codes: (r + 1) / 2 bytes
    const __m128i b = _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << ((r + 1) / 2)) - 1),
                                           w + n * ld + k / 2);
    return Codes(b, Scale(n, k));  // codes past r meet zeros of x
  }
};
#endif

// out[m][j] = dot(x[m, :K], W row n + j) for an MR x NR tile.
template <int MR, int NR, typename Src>
inline void Tile(const float* x, int64_t ldx, int64_t K, const Src& w, int64_t n,
                 float (&out)[MR][NR]) {
  Vf acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = Zero();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = w.Get(n + j, k);
    // The next tile's rows, a tile ahead: the hardware prefetcher alone left M = 1 at ~half
    // the bandwidth (8 interleaved row streams). Past the last row it is a harmless hint.
    if ((k * Src::kBytes) % 64 < kLanes * Src::kBytes)  // I4Rows: every 32 bytes
      for (int j = 0; j < NR; ++j) Prefetch(w.Ptr(n + NR + j, k));
    for (int m = 0; m < MR; ++m) {
      const Vf xv = Load(x + m * ldx + k);
      for (int j = 0; j < NR; ++j) acc[m][j] = Fma(xv, wv[j], acc[m][j]);
    }
  }
  if (k < K) {
    const int r = static_cast<int>(K - k);
    Vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = w.GetPart(n + j, k, r);
    for (int m = 0; m < MR; ++m) {
      const Vf xv = LoadPart(x + m * ldx + k, r);
      for (int j = 0; j < NR; ++j) acc[m][j] = Fma(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = Sum(acc[m][j]);
}

// Writes a tile: y = (y if accumulate) + out * (scale[n] if scale).
template <int MR, int NR>
inline void Put(const float (&out)[MR][NR], const float* scale, int64_t n, float* y, int64_t ldy,
                bool accumulate) {
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) {
      const float v = scale ? out[m][j] * scale[n + j] : out[m][j];
      float& dst = y[m * ldy + n + j];
      dst = accumulate ? dst + v : v;
    }
}

template <int MR, int NR, typename Src>
inline void TileAndPut(const float* x, int64_t ldx, int64_t K, const Src& w, int64_t n,
                       const float* scale, float* y, int64_t ldy, bool accumulate) {
  float out[MR][NR];
  Tile<MR, NR>(x, ldx, K, w, n, out);
  Put<MR, NR>(out, scale, n, y, ldy, accumulate);
}

// Rows [m, m + mr) of x (1 <= mr <= MR) against weight rows [n, n + NR): one tile.
template <int NR, int MR = kMR, typename Src>
inline void TileRows(int mr, const float* x, int64_t ldx, int64_t K, const Src& w, int64_t n,
                     const float* scale, float* y, int64_t ldy, bool accumulate) {
  if (mr == MR)
    TileAndPut<MR, NR>(x, ldx, K, w, n, scale, y, ldy, accumulate);
  else if constexpr (MR > 1)
    TileRows<NR, MR - 1>(mr, x, ldx, K, w, n, scale, y, ldy, accumulate);
}

// All M rows of x against weight rows [n0, n1): for each group of NR weight rows, every MR-row
// tile of x (the group's rows stay in L1 while the tiles pass; x stays in L1/L2).
// `scale`: per-row output scale (INT8) or null. `w` indexes rows relative to `base`.
template <typename Src>
inline void Rows(const float* x, int64_t M, int64_t ldx, int64_t K, const Src& w, int64_t base,
                 int64_t n0, int64_t n1, const float* scale, float* y, int64_t ldy,
                 bool accumulate) {
  // M == 1 (decode): twice the weight rows per tile, for enough independent FMA chains.
  constexpr int kWide = 2 * kNR;
  int64_t n = n0;
  if (M == 1) {
    for (; n + kWide <= n1; n += kWide)
      TileAndPut<1, kWide>(x, ldx, K, w, n - base, scale ? scale + base : nullptr, y + base,
                           ldy, accumulate);
  }
  for (; n + kNR <= n1; n += kNR)
    for (int64_t m = 0; m < M; m += kMR)
      TileRows<kNR>(static_cast<int>(std::min<int64_t>(kMR, M - m)), x + m * ldx, ldx, K, w,
                    n - base, scale ? scale + base : nullptr, y + m * ldy + base, ldy,
                    accumulate);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; m += kMR)
      TileRows<1>(static_cast<int>(std::min<int64_t>(kMR, M - m)), x + m * ldx, ldx, K, w,
                  n - base, scale ? scale + base : nullptr, y + m * ldy + base, ldy, accumulate);
}

// ------------------------------------------------------------------ int4 -> float rows
inline int Int4Code(const uint8_t* row, int64_t k) {
  const uint8_t b = row[k >> 1];
  return static_cast<int>((k & 1) ? (b >> 4) : (b & 0x0F)) - 8;
}

// out[k] = code(k) * scale[k / group_size] for k < K: one dequantized int4 row.
inline void Int4RowToFloat(const uint8_t* row, const float* scale, int64_t K, int64_t group_size,
                           float* out) {
  int64_t k = 0;
#if defined(HPLLM_GEMM_AVX512)
  if (group_size % 16 == 0) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m512i eight = _mm512_set1_epi32(8);
    for (; k + 16 <= K; k += 16) {  // 8 bytes -> 16 codes, one group
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
      const __m128i lo = _mm_and_si128(b, low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      const __m512i c = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), eight);
      _mm512_storeu_ps(out + k, _mm512_mul_ps(_mm512_cvtepi32_ps(c),
                                              _mm512_set1_ps(scale[k / group_size])));
    }
  }
#elif defined(HPLLM_GEMM_AVX2)
  if (group_size % 8 == 0) {
    const __m128i low = _mm_set1_epi8(0x0F);
    const __m256i eight = _mm256_set1_epi32(8);
    for (; k + 8 <= K; k += 8) {  // 4 bytes -> 8 codes, one group
      int32_t four;
      std::memcpy(&four, row + k / 2, 4);
      const __m128i b = _mm_cvtsi32_si128(four);
      const __m128i lo = _mm_and_si128(b, low);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
      const __m256i c = _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), eight);
      _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_cvtepi32_ps(c),
                                              _mm256_set1_ps(scale[k / group_size])));
    }
  }
#endif
  for (; k < K; ++k) out[k] = static_cast<float>(Int4Code(row, k)) * scale[k / group_size];
}

inline void Int8RowToFloat(const int8_t* row, int64_t K, float* out) {
  int64_t k = 0;
#if defined(HPLLM_GEMM_AVX512) || defined(HPLLM_GEMM_AVX2)
  for (; k + kLanes <= K; k += kLanes) Store(out + k, LoadI8(row + k));
#endif
  for (; k < K; ++k) out[k] = static_cast<float>(row[k]);
}

// Weight rows per converted panel: ~192 KiB of floats (L2), a multiple of kNR.
inline int64_t PanelRows(int64_t K) {
  const int64_t rows = (192 << 10) / (4 * std::max<int64_t>(K, 1));
  return std::max<int64_t>(kNR, rows / kNR * kNR);
}

inline int64_t Int4RowBytes(const WeightView& w) {
  const int64_t kp = (w.K + w.group_size - 1) / w.group_size * w.group_size;
  return kp / 2;
}

// Many rows of x: K in chunks of at most kKChunk, so that an MR-row tile of x (MR x chunk
// floats) stays in L1 while the panel's rows pass; later chunks accumulate into y.
constexpr int64_t kKChunk = 640;

// Float rows w (row p0 of the matrix first, stride K) against all M rows of x, rows [p0, p1).
inline void ChunkedRows(const float* x, int64_t M, int64_t ldx, int64_t K, const float* w,
                        int64_t p0, int64_t p1, const float* scale, float* y, int64_t ldy,
                        bool accumulate) {
  const int64_t chunks = (K + kKChunk - 1) / kKChunk;
  const int64_t kc = (K / chunks + kLanes) / kLanes * kLanes;  // >= K / chunks, whole vectors
  const float* sc = scale ? scale + p0 : nullptr;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const F32Rows src{w + k0, K};
    const int64_t kk = std::min(kc, K - k0);
    const bool acc = accumulate || k0 > 0;
    // tiles of x outer (one stays in L1), the panel's row groups inner (the panel is in L2)
    for (int64_t m = 0; m < M; m += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m));
      const float* xm = x + m * ldx + k0;
      float* ym = y + m * ldy + p0;
      int64_t n = 0;
      for (; n + kNR <= p1 - p0; n += kNR) TileRows<kNR>(mr, xm, ldx, kk, src, n, sc, ym, ldy, acc);
      for (; n < p1 - p0; ++n) TileRows<1>(mr, xm, ldx, kk, src, n, sc, ym, ldy, acc);
    }
  }
}

#if defined(HPLLM_GEMM_AVX512)
// Many rows of x (prefill): outer-product form on a packed panel. The panel's rows are
// converted to float and transposed into strips of 16 rows, k-major ([k][16]), so a tile
// of MR rows of x x 32 weight rows needs no horizontal sums: per k, two weight vectors and
// MR broadcasts of x feed 2 MR FMAs (24 accumulators at MR = 12).
constexpr int64_t kPackedRows = 48;  // rows of x from which the packed panel pays
constexpr int kPackMR = 12;

template <int MR>
inline void PackedTile(const float* x, int64_t ldx, int64_t kk, const float* s0,
                       const float* s1, __mmask16 m0, __mmask16 m1, const float* scale,
                       float* y, int64_t ldy, bool accumulate) {
  __m512 a0[MR], a1[MR];
  for (int m = 0; m < MR; ++m) a0[m] = a1[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kk; ++k) {
    const __m512 w0 = _mm512_loadu_ps(s0 + 16 * k), w1 = _mm512_loadu_ps(s1 + 16 * k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      a0[m] = _mm512_fmadd_ps(xb, w0, a0[m]);
      a1[m] = _mm512_fmadd_ps(xb, w1, a1[m]);
    }
  }
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 c0 = scale ? _mm512_mask_loadu_ps(one, m0, scale) : one;
  const __m512 c1 = scale ? _mm512_mask_loadu_ps(one, m1, scale + 16) : one;
  for (int m = 0; m < MR; ++m) {
    float* row = y + m * ldy;
    __m512 v0 = _mm512_mul_ps(a0[m], c0), v1 = _mm512_mul_ps(a1[m], c1);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row + 16));
    }
    _mm512_mask_storeu_ps(row, m0, v0);
    _mm512_mask_storeu_ps(row + 16, m1, v1);
  }
}

// All M rows of x against a packed panel of P rows (strips of 16, the last zero-padded).
inline void PackedPanel(const float* x, int64_t M, int64_t ldx, int64_t K, const float* packed,
                        int64_t P, const float* scale, float* y, int64_t ldy, bool accumulate) {
  const int64_t chunks = (K + kKChunk - 1) / kKChunk, kc = (K + chunks - 1) / chunks;
  const int64_t strips = (P + 15) / 16;
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t kk = std::min(kc, K - k0);
    const bool acc = accumulate || k0 > 0;
    for (int64_t m = 0; m < M;) {
      const int64_t left = M - m;
      const int mr = left >= 12 ? 12 : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
      for (int64_t st = 0; st < strips; st += 2) {
        const int64_t n = 16 * st, r0 = std::min<int64_t>(16, P - n);
        const int64_t r1 = st + 1 < strips ? std::min<int64_t>(16, P - n - 16) : 0;
        const float* s0 = packed + st * 16 * K + 16 * k0;
        const float* s1 = r1 > 0 ? s0 + 16 * K : s0;
        const __mmask16 m0 = Mask16(static_cast<int>(r0));
        const __mmask16 m1 = r1 > 0 ? Mask16(static_cast<int>(r1)) : 0;
        const float* sc = scale ? scale + n : nullptr;
        float* yt = y + m * ldy + n;
        const float* xt = x + m * ldx + k0;
        switch (mr) {
          case 12: PackedTile<12>(xt, ldx, kk, s0, s1, m0, m1, sc, yt, ldy, acc); break;
          case 8: PackedTile<8>(xt, ldx, kk, s0, s1, m0, m1, sc, yt, ldy, acc); break;
          case 4: PackedTile<4>(xt, ldx, kk, s0, s1, m0, m1, sc, yt, ldy, acc); break;
          case 2: PackedTile<2>(xt, ldx, kk, s0, s1, m0, m1, sc, yt, ldy, acc); break;
          default: PackedTile<1>(xt, ldx, kk, s0, s1, m0, m1, sc, yt, ldy, acc); break;
        }
      }
      m += mr;
    }
  }
}

// Rows [n, n + r) (r <= 16) of float rows `rows` (stride K) into one k-major strip.
inline void PackStrip(const float* rows, int64_t r, int64_t K, float* strip) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < 16; ++i) strip[16 * k + i] = i < r ? rows[i * K + k] : 0.0f;
}
#endif

// Rows of x up to which INT8 weights are converted in registers per tile rather than once per
// panel (each extra MR-row tile converts the weight vectors again).
constexpr int64_t kDirectRows = 2 * kMR;

}  // namespace gemm_detail

inline void matmul_block(const float* x, int64_t M, int64_t ldx, const WeightView& w, int64_t n0,
                         int64_t n1, float* y, int64_t ldy, bool accumulate) {
  using namespace gemm_detail;
  if (M <= 0 || n1 <= n0) return;
  const int64_t K = w.K;
  if (K <= 0) {  // an empty sum
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n)
        if (!accumulate) y[m * ldy + n] = 0.0f;
    return;
  }
  if (w.fmt == WFormat::F32) {
    if (M <= kDirectRows) {
      Rows(x, M, ldx, K, F32Rows{static_cast<const float*>(w.data), K}, 0, n0, n1, nullptr, y,
           ldy, accumulate);
      return;
    }
#if defined(HPLLM_GEMM_AVX512)
    if (M < kPackedRows)
#endif
    {
      const int64_t rows = PanelRows(std::min(K, kKChunk));
      for (int64_t p0 = n0; p0 < n1; p0 += rows)
        ChunkedRows(x, M, ldx, K, static_cast<const float*>(w.data) + p0 * K, p0,
                    std::min(n1, p0 + rows), nullptr, y, ldy, accumulate);
      return;
    }
  }
  if (w.fmt == WFormat::INT8 && M <= kDirectRows) {
    Rows(x, M, ldx, K, I8Rows{static_cast<const int8_t*>(w.data), K}, 0, n0, n1, w.scale, y, ldy,
         accumulate);
    return;
  }
#if defined(HPLLM_GEMM_AVX512)
  if (w.fmt == WFormat::INT4 && M <= kDirectRows && w.group_size % kLanes == 0) {
    const int64_t half = Int4RowBytes(w);
    Rows(x, M, ldx, K,
         I4Rows{static_cast<const uint8_t*>(w.data), half, w.scale, 2 * half / w.group_size,
                w.group_size},
         0, n0, n1, nullptr, y, ldy, accumulate);
    return;
  }
#endif
  const int64_t half = w.fmt == WFormat::INT4 ? Int4RowBytes(w) : 0;
  const int64_t groups = w.fmt == WFormat::INT4 ? 2 * half / w.group_size : 0;
  // Weight rows [n, n + r) as float rows (stride K) in `out`, scale folded in for INT4.
  auto to_float = [&](int64_t n, int64_t r, float* out) {
    for (int64_t i = 0; i < r; ++i) {
      if (w.fmt == WFormat::INT8)
        Int8RowToFloat(static_cast<const int8_t*>(w.data) + (n + i) * K, K, out + i * K);
      else if (w.fmt == WFormat::INT4)
        Int4RowToFloat(static_cast<const uint8_t*>(w.data) + (n + i) * half,
                       w.scale + (n + i) * groups, K, w.group_size, out + i * K);
      else
        std::memcpy(out + i * K, static_cast<const float*>(w.data) + (n + i) * K, 4 * K);
    }
  };
#if defined(HPLLM_GEMM_AVX512)
  if (M >= kPackedRows) {
    thread_local std::vector<float> packed, rows16;
    const int64_t rows = std::max<int64_t>(32, (256 << 10) / (4 * K) / 32 * 32);
    if (packed.size() < static_cast<size_t>(rows * K)) packed.resize(rows * K);
    if (rows16.size() < static_cast<size_t>(16 * K)) rows16.resize(16 * K);
    for (int64_t p0 = n0; p0 < n1; p0 += rows) {
      const int64_t p1 = std::min(n1, p0 + rows);
      for (int64_t n = p0; n < p1; n += 16) {
        const int64_t r = std::min<int64_t>(16, p1 - n);
        to_float(n, r, rows16.data());
        PackStrip(rows16.data(), r, K, packed.data() + (n - p0) * K);
      }
      PackedPanel(x, M, ldx, K, packed.data(), p1 - p0,
                  w.fmt == WFormat::INT8 ? w.scale + p0 : nullptr, y + p0, ldy, accumulate);
    }
    return;
  }
#endif
  // Converted panels: INT8 codes as floats (scale on output), INT4 codes times group scales.
  thread_local std::vector<float> panel;
  const int64_t rows = PanelRows(K);
  if (panel.size() < static_cast<size_t>(rows * K)) panel.resize(rows * K);
  for (int64_t p0 = n0; p0 < n1; p0 += rows) {
    const int64_t p1 = std::min(n1, p0 + rows);
    to_float(p0, p1 - p0, panel.data());
    ChunkedRows(x, M, ldx, K, panel.data(), p0, p1, w.fmt == WFormat::INT8 ? w.scale : nullptr,
                y, ldy, accumulate);
  }
}


// ------------------------------------------------------------------ int8 x int8 (prepared x)
// x quantized per row in blocks of kQBlock k: d = max|x| / 127, codes round(x / d) + 128 as
// unsigned bytes (the block's tail past K holds 128: its weights are loaded as zeros), then the
// block scales. Row m of the scratch starts at m * PreparedRowBytes(K).
namespace gemm_detail {
constexpr int64_t kQBlock = 64;
inline int64_t QBlocks(int64_t K) { return (K + kQBlock - 1) / kQBlock; }
inline int64_t PreparedRowBytes(int64_t K) { return QBlocks(K) * (kQBlock + 4); }
#if defined(HPLLM_GEMM_VNNI)
constexpr bool kPreparedFast = true;
#else
constexpr bool kPreparedFast = false;
#endif

inline void QuantizeRow(const float* x, int64_t K, uint8_t* codes, uint8_t* scales) {
  for (int64_t b = 0; b < QBlocks(K); ++b) {
    const int64_t k0 = b * kQBlock, r = std::min(kQBlock, K - k0);
    float amax = 0.0f;
    for (int64_t i = 0; i < r; ++i) amax = std::max(amax, std::fabs(x[k0 + i]));
    const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    std::memcpy(scales + 4 * b, &d, 4);
    for (int64_t i = 0; i < kQBlock; ++i) {
      const int q = i < r ? static_cast<int>(std::nearbyint(x[k0 + i] * inv)) : 0;
      codes[k0 + i] = static_cast<uint8_t>(std::min(127, std::max(-127, q)) + 128);
    }
  }
}

#if defined(HPLLM_GEMM_VNNI)
inline __mmask64 Mask64(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }

// out[m][j] = sum_b d[m, b] * sum_{k in b} (code[m, k] - 128) * q[n + j, k] for an MR x NR tile.
template <int MR, int NR>
inline void PreparedTile(const uint8_t* px, int64_t row_bytes, int64_t K, const int8_t* w,
                         int64_t n, float (&out)[MR][NR]) {
  const int64_t nb = QBlocks(K);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t k0 = b * kQBlock;
    const bool full = k0 + kQBlock <= K;  // masked loads only for the tail: they are slower
    const __mmask64 mask = Mask64(K - k0);
    __m512i wv[NR], off[NR];  // codes, and -128 * their sums per 4-byte lane group
    for (int j = 0; j < NR; ++j) {
      const int8_t* p = w + (n + j) * K + k0;
      wv[j] = full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(mask, p);
      _mm_prefetch(reinterpret_cast<const char*>(p + NR * K), _MM_HINT_T0);  // as in Tile
      off[j] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                                                      ones, wv[j]), 7));
    }
    for (int m = 0; m < MR; ++m) {
      const uint8_t* row = px + m * row_bytes;
      const __m512i xq = _mm512_loadu_si512(row + k0);
      float d;
      std::memcpy(&d, row + nb * kQBlock + 4 * b, 4);
      const __m512 dv = _mm512_set1_ps(d);
      for (int j = 0; j < NR; ++j)
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(off[j], xq, wv[j])),
                                    dv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = _mm512_reduce_add_ps(acc[m][j]);
}
#else
template <int MR, int NR>
inline void PreparedTile(const uint8_t* px, int64_t row_bytes, int64_t K, const int8_t* w,
                         int64_t n, float (&out)[MR][NR]) {
  const int64_t nb = QBlocks(K);
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) {
      const uint8_t* row = px + m * row_bytes;
      float total = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t t = 0;
        for (int64_t k = b * kQBlock; k < std::min(K, (b + 1) * kQBlock); ++k)
          t += (static_cast<int32_t>(row[k]) - 128) * w[(n + j) * K + k];
        float d;
        std::memcpy(&d, row + nb * kQBlock + 4 * b, 4);
        total += d * static_cast<float>(t);
      }
      out[m][j] = total;
    }
}
#endif

template <int MR, int NR>
inline void PreparedTileAndPut(const uint8_t* px, int64_t row_bytes, int64_t K, const int8_t* w,
                               int64_t n, const float* scale, float* y, int64_t ldy,
                               bool accumulate) {
  float out[MR][NR];
  PreparedTile<MR, NR>(px, row_bytes, K, w, n, out);
  Put<MR, NR>(out, scale, n, y, ldy, accumulate);
}

template <int NR>
inline void PreparedTileRows(int mr, const uint8_t* px, int64_t row_bytes, int64_t K,
                             const int8_t* w, int64_t n, const float* scale, float* y,
                             int64_t ldy, bool accumulate) {
  switch (mr) {
    case 1: PreparedTileAndPut<1, NR>(px, row_bytes, K, w, n, scale, y, ldy, accumulate); break;
    case 2: PreparedTileAndPut<2, NR>(px, row_bytes, K, w, n, scale, y, ldy, accumulate); break;
    case 3: PreparedTileAndPut<3, NR>(px, row_bytes, K, w, n, scale, y, ldy, accumulate); break;
    case 4: PreparedTileAndPut<4, NR>(px, row_bytes, K, w, n, scale, y, ldy, accumulate); break;
    default: break;
  }
}
constexpr int kPMR = 4, kPNR = 4;
}  // namespace gemm_detail

// Bytes of scratch prepare_x needs for M rows of K.
inline size_t prepared_x_bytes(int64_t M, int64_t K) {
  return static_cast<size_t>(M * gemm_detail::PreparedRowBytes(K));
}

// Quantizes x (M, K), row stride ldx, into `scratch` (prepared_x_bytes(M, K), any alignment).
inline void prepare_x(const float* x, int64_t M, int64_t K, int64_t ldx, void* scratch) {
  using namespace gemm_detail;
  uint8_t* out = static_cast<uint8_t*>(scratch);
  const int64_t row_bytes = PreparedRowBytes(K);
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* row = out + m * row_bytes;
    QuantizeRow(x + m * ldx, K, row, row + QBlocks(K) * kQBlock);
  }
}

// matmul_block for INT8 weights on x prepared by prepare_x (rows m of px at
// m * prepared row bytes): int8 x int8 products, the quantized x's rounding added.
inline void matmul_block_prepared(const void* px, int64_t M, const WeightView& w, int64_t n0,
                                  int64_t n1, float* y, int64_t ldy, bool accumulate) {
  using namespace gemm_detail;
  if (M <= 0 || n1 <= n0) return;
  const uint8_t* p = static_cast<const uint8_t*>(px);
  const int8_t* q = static_cast<const int8_t*>(w.data);
  const int64_t K = w.K, rb = PreparedRowBytes(K);
  int64_t n = n0;
  if (M == 1)
    for (; n + 2 * kPNR <= n1; n += 2 * kPNR)
      PreparedTileAndPut<1, 2 * kPNR>(p, rb, K, q, n, w.scale, y, ldy, accumulate);
  for (; n + kPNR <= n1; n += kPNR)
    for (int64_t m = 0; m < M; m += kPMR)
      PreparedTileRows<kPNR>(static_cast<int>(std::min<int64_t>(kPMR, M - m)), p + m * rb, rb, K,
                             q, n, w.scale, y + m * ldy, ldy, accumulate);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; m += kPMR)
      PreparedTileRows<1>(static_cast<int>(std::min<int64_t>(kPMR, M - m)), p + m * rb, rb, K, q,
                          n, w.scale, y + m * ldy, ldy, accumulate);
}

}  // namespace hpllm
