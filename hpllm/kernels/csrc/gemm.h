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
// Where VNNI is compiled in (and, same integer arithmetic, in the scalar build), two integer
// paths replace those for quantized weights, x quantized once per call (see "integer paths"):
//   - INT4, up to kQ4MaxRows rows: x to int8 per 8 k, vpdpbusd on the stored nibbles;
//   - INT8, from kI16MinRows rows: x to int16 per row, vpdpwssd on the sign-extended codes.
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
  // One-row int8 tiles prefetch two tiles ahead (~9 KB at K = 576): one thread's M = 1 pass
  // over SmolLM2's int8 matrices took ~7 % less CPU time than one tile ahead (float rows:
  // no gain, they keep one).
  constexpr int kAhead = MR == 1 && Src::kBytes == 1 ? 2 : 1;
  Vf acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = Zero();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    Vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = w.Get(n + j, k);
    // The rows kAhead tiles ahead: the hardware prefetcher alone left M = 1 at ~half the
    // bandwidth (8 interleaved row streams). Past the last row it is a harmless hint.
    if ((k * Src::kBytes) % 64 < kLanes * Src::kBytes)  // I4Rows: every 32 bytes
      for (int j = 0; j < NR; ++j) Prefetch(w.Ptr(n + kAhead * NR + j, k));
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
  // M == 1 (decode): twice the weight rows per tile (int8: 8, which measured ~7 % less CPU
  // time than 10 with the prefetch above), for enough independent FMA chains.
  constexpr int kWide = Src::kBytes == 1 ? 8 : 2 * kNR;
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

// ------------------------------------------------------------------ integer paths (x quantized)
// Two paths multiply the integer weight codes by x quantized once per call (thread-local
// scratch), where VNNI is compiled in (vpdpbusd, vpdpwssd) and, with the same integer
// arithmetic, in the scalar (portable) build; AVX2 and AVX-512 without VNNI keep the float
// paths above. Only the float rounding order differs between the builds.
#if defined(HPLLM_GEMM_VNNI) || !(defined(HPLLM_GEMM_AVX512) || defined(HPLLM_GEMM_AVX2))
#define HPLLM_GEMM_INT_PATHS 1
#endif

inline uint8_t* Scratch(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// int4 weights x int8 x (few rows: decode). Converting nibbles to floats bound the float path
// at ~10 GB/s of codes per core; here the stored codes (code + 8, 0..15) are the unsigned
// operand of vpdpbusd as they are. x is stored in blocks of 128 k, even and odd k apart, so
// that one block's 64 bytes of codes split into low nibbles (even k) against the even x codes
// and high nibbles (odd k) against the odd ones: each 32-bit lane then sums 8 consecutive k,
// inside one weight group when group_size % 8 == 0. Each lane has its own x scale (int8 per
// 8 k, d = max|x| / 127): the lane's sum is scaled in float anyway, so finer scales cost
// nothing here, and per 128 k cost SmolLM2 int4 +1.5 % perplexity. The + 8 is removed by
// starting each lane at -8 * the sum of its x codes.
// Block layout (kQ4Bytes): 64 int8 even-k codes, 64 odd-k codes, 16 int32 lane offsets, 16 d.
constexpr int64_t kQ4Block = 128, kQ4Bytes = 256;
// Rows of x up to which INT4 takes this path: measured per core 1.2-3x the float panels at
// M = 12-64 (K = 576 / 1536); the packed float panels take over from 48 rows for prefill.
constexpr int64_t kQ4MaxRows = 47;
inline bool Int4Fast(int64_t g) {
  return g >= 8 && g % 8 == 0 && (kQ4Block % g == 0 || g % kQ4Block == 0);
}

#if defined(HPLLM_GEMM_VNNI)
inline __mmask64 ByteMask(int64_t n) { return n >= 64 ? ~__mmask64(0) : (__mmask64(1) << n) - 1; }
#endif

inline void QuantizeQ4Row(const float* x, int64_t K, uint8_t* out) {
  for (int64_t k0 = 0; k0 < K; k0 += kQ4Block, out += kQ4Bytes) {
    const int64_t r = std::min(kQ4Block, K - k0);
    int8_t* even = reinterpret_cast<int8_t*>(out);
    int8_t* odd = even + 64;
    float d[16];
#if defined(HPLLM_GEMM_VNNI)
    __m512 v[8];
    for (int i = 0; i < 8; ++i) {
      const int64_t left = r - 16 * i;
      v[i] = left >= 16 ? _mm512_loadu_ps(x + k0 + 16 * i)
             : left > 0 ? _mm512_maskz_loadu_ps(Mask16(static_cast<int>(left)), x + k0 + 16 * i)
                        : _mm512_setzero_ps();
    }
    alignas(64) float amax8[128];  // each k: the max |x| of its 8
    __m512 inv[8];
    for (int i = 0; i < 8; ++i) {
      __m512 a = _mm512_abs_ps(v[i]);
      a = _mm512_max_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(2, 3, 0, 1)));
      a = _mm512_max_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));
      a = _mm512_max_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));
      _mm512_store_ps(amax8 + 16 * i, a);
      inv[i] = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ),
                                   _mm512_set1_ps(127.0f), a);
    }
    for (int l = 0; l < 16; ++l) d[l] = amax8[8 * l] / 127.0f;
    auto codes16 = [&](int i) {  // 16 codes of k 16 i .. as int16
      return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv[i])));
    };
    for (int i = 0; i < 4; ++i) {  // k 32 i .. 32 i + 31 as int16 pairs (even k low)
      const __m512i z =
          _mm512_inserti64x4(_mm512_castsi256_si512(codes16(2 * i)), codes16(2 * i + 1), 1);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(even + 16 * i), _mm512_cvtepi32_epi8(z));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(odd + 16 * i),
                       _mm512_cvtepi32_epi8(_mm512_srai_epi32(z, 16)));
    }
    const __m512i eights = _mm512_set1_epi8(8);
    const __m512i sums = _mm512_dpbusd_epi32(
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), eights, _mm512_loadu_si512(even)), eights,
        _mm512_loadu_si512(odd));
    _mm512_storeu_si512(out + 128, _mm512_sub_epi32(_mm512_setzero_si512(), sums));
#else
    int32_t off[16];
    float inv[16];
    for (int l = 0; l < 16; ++l) {
      float amax = 0.0f;
      for (int64_t i = 8 * l; i < std::min<int64_t>(r, 8 * l + 8); ++i)
        amax = std::max(amax, std::fabs(x[k0 + i]));
      d[l] = amax / 127.0f, inv[l] = amax > 0.0f ? 127.0f / amax : 0.0f, off[l] = 0;
    }
    for (int64_t j = 0; j < kQ4Block; ++j) {
      // nearbyint(x * inv) in float, as _mm512_cvtps_epi32 rounds; |x * inv| <= 127
      const int q = j < r ? static_cast<int>(std::nearbyint(x[k0 + j] * inv[j / 8])) : 0;
      const int c = std::min(127, std::max(-127, q));
      (j % 2 ? odd : even)[j / 2] = static_cast<int8_t>(c);
      off[j / 8] -= 8 * c;
    }
    std::memcpy(out + 128, off, 64);
#endif
    std::memcpy(out + 192, d, 64);
  }
}

// out[m][j] = sum_k x~[m, k] * code[n + j, k] * scale[n + j, k / g], x~ the quantized x.
struct Q4Args {
  const uint8_t* px;  // x rows quantized by QuantizeQ4Row, prow bytes apart, nb blocks each
  int64_t prow, nb;
  const uint8_t* w;  // int4 weight rows, ldw bytes apart
  int64_t ldw;
  const float* scale;  // (N, groups)
  const float* scale_end;
  int64_t groups, g;
  int64_t ahead;  // bytes ahead to prefetch: ~6 KB of rows (one tile of short rows is too near)
};

#if defined(HPLLM_GEMM_VNNI)
// Block b of weight row `row` (already offset by 64 b bytes): the low and high nibbles and the
// scale of each lane; kTail: the row's last block, bytes and groups cut short (masked loads,
// slow on Zen 5, only there).
template <bool kTail, bool kPerm>
inline void Q4Weights(const uint8_t* p, const float* s, int64_t bytes, __mmask16 gmask,
                      __m512i idx, __m512i& lo, __m512i& hi, __m512& sw) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i raw = kTail ? _mm512_maskz_loadu_epi8(ByteMask(bytes), p) : _mm512_loadu_si512(p);
  lo = _mm512_and_si512(raw, low);
  hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
  if constexpr (!kPerm)
    sw = _mm512_set1_ps(*s);
  else if constexpr (kTail)
    sw = _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(gmask, s));
  else
    sw = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(s));
}

template <int MR, int NR, bool kTail, bool kPerm>
inline void Q4Block(const Q4Args& a, const uint8_t* px, int64_t n, int64_t b, __m512i idx,
                    __m512 (&acc)[MR][NR]) {
  const int64_t gpb = a.g < kQ4Block ? kQ4Block / a.g : 1;
  const int64_t base = a.g < kQ4Block ? b * gpb : b * kQ4Block / a.g;
  const int64_t bytes = a.ldw - 64 * b;
  const __mmask16 gmask = Mask16(static_cast<int>(std::min(gpb, a.groups - base)));
  const uint8_t* w = a.w + (n * a.ldw + 64 * b);
  const float* s = a.scale + n * a.groups + base;
  if constexpr (MR == 1) {  // x's block in registers, one weight row at a time
    const uint8_t* blk = px + kQ4Bytes * b;
    const __m512i ev = _mm512_loadu_si512(blk), od = _mm512_loadu_si512(blk + 64);
    const __m512i off = _mm512_loadu_si512(blk + 128);
    const __m512 d = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + 192));
    for (int j = 0; j < NR; ++j) {
      __m512i lo, hi;
      __m512 sw;
      Q4Weights<kTail, kPerm>(w + j * a.ldw, s + j * a.groups, bytes, gmask, idx, lo, hi, sw);
      _mm_prefetch(reinterpret_cast<const char*>(w + j * a.ldw + a.ahead), _MM_HINT_T0);
      const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo, ev), hi, od);
      acc[0][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw, d), acc[0][j]);
    }
  } else {  // the tile's weight vectors once, then every row of x
    __m512i lo[NR], hi[NR];
    __m512 sw[NR];
    for (int j = 0; j < NR; ++j) {
      Q4Weights<kTail, kPerm>(w + j * a.ldw, s + j * a.groups, bytes, gmask, idx, lo[j], hi[j],
                              sw[j]);
      _mm_prefetch(reinterpret_cast<const char*>(w + j * a.ldw + a.ahead), _MM_HINT_T0);
    }
    for (int m = 0; m < MR; ++m) {
      const uint8_t* blk = px + m * a.prow + kQ4Bytes * b;
      const __m512 d = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + 192));
      for (int j = 0; j < NR; ++j) {
        __m512i t =
            _mm512_dpbusd_epi32(_mm512_loadu_si512(blk + 128), lo[j], _mm512_loadu_si512(blk));
        t = _mm512_dpbusd_epi32(t, hi[j], _mm512_loadu_si512(blk + 64));
        acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw[j], d), acc[m][j]);
      }
    }
  }
}
#endif

template <int MR, int NR>
inline void Q4Tile(const Q4Args& a, const uint8_t* px, int64_t n, float (&out)[MR][NR]) {
  const int64_t prow = a.prow, nb = a.nb, ldw = a.ldw, groups = a.groups, g = a.g;
  const uint8_t* w = a.w;
  const float* scale = a.scale;
  const int64_t gpb = g < kQ4Block ? kQ4Block / g : 1;  // groups per block
#if defined(HPLLM_GEMM_VNNI)
  (void)prow, (void)groups, (void)w, (void)scale, (void)gpb;
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = g < kQ4Block ? static_cast<int32_t>(8 * l / g) : 0;
  const __m512i idx = _mm512_load_si512(lane_group);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_ps();
  // Blocks with all 64 bytes of codes, and whose 16 scales can be loaded whole (all but the
  // last tile of the matrix), run unmasked; the rest masked.
  int64_t full = std::min(nb, ldw / 64);
  if (g < kQ4Block && scale + (n + NR) * groups + 16 > a.scale_end) full = 0;
  if (g < kQ4Block) {
    for (int64_t b = 0; b < full; ++b) Q4Block<MR, NR, false, true>(a, px, n, b, idx, acc);
    for (int64_t b = full; b < nb; ++b) Q4Block<MR, NR, true, true>(a, px, n, b, idx, acc);
  } else {
    for (int64_t b = 0; b < full; ++b) Q4Block<MR, NR, false, false>(a, px, n, b, idx, acc);
    for (int64_t b = full; b < nb; ++b) Q4Block<MR, NR, true, false>(a, px, n, b, idx, acc);
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = _mm512_reduce_add_ps(acc[m][j]);
#else
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) {
      float total = 0.0f;
      const uint8_t* row = w + (n + j) * ldw;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = px + m * prow + kQ4Bytes * b;
        const int8_t* even = reinterpret_cast<const int8_t*>(blk);
        float d[16];
        std::memcpy(d, blk + 192, 64);
        for (int l = 0; l < 16; ++l) {  // lane l: bytes 4 l .. 4 l + 3 of the block, 8 k
          int32_t t;
          std::memcpy(&t, blk + 128 + 4 * l, 4);
          for (int i = 4 * l; i < 4 * l + 4; ++i) {
            const int64_t byte = 64 * b + i;
            const int u = byte < ldw ? row[byte] : 0;
            t += (u & 0x0F) * even[i] + (u >> 4) * even[64 + i];
          }
          const int64_t group = g < kQ4Block ? b * gpb + 8 * l / g : b * kQ4Block / g;
          if (group < groups)
            total += static_cast<float>(t) * (scale[(n + j) * groups + group] * d[l]);
        }
      }
      out[m][j] = total;
    }
#endif
}

template <int MR, int NR>
inline void Q4TileAndPut(const Q4Args& a, const uint8_t* px, int64_t n, float* y, int64_t ldy,
                         bool accumulate) {
  float out[MR][NR];
  Q4Tile<MR, NR>(a, px, n, out);
  Put<MR, NR>(out, nullptr, n, y, ldy, accumulate);
}

template <int NR, int MR = 4>
inline void Q4TileRows(int mr, const Q4Args& a, const uint8_t* px, int64_t n, float* y,
                       int64_t ldy, bool accumulate) {
  if (mr == MR)
    Q4TileAndPut<MR, NR>(a, px, n, y, ldy, accumulate);
  else if constexpr (MR > 1)
    Q4TileRows<NR, MR - 1>(mr, a, px, n, y, ldy, accumulate);
}

// matmul_block for INT4 weights (Int4Fast(group_size)) through int8 x.
inline void Int4Q8Block(const float* x, int64_t M, int64_t ldx, const WeightView& w, int64_t n0,
                        int64_t n1, float* y, int64_t ldy, bool accumulate) {
  const int64_t K = w.K, nb = (K + kQ4Block - 1) / kQ4Block, prow = nb * kQ4Bytes;
  uint8_t* px = Scratch(static_cast<size_t>(M * prow));
  for (int64_t m = 0; m < M; ++m) QuantizeQ4Row(x + m * ldx, K, px + m * prow);
  const int64_t ldw = Int4RowBytes(w), groups = 2 * ldw / w.group_size;
  const Q4Args a{px, prow, nb, static_cast<const uint8_t*>(w.data), ldw, w.scale,
                 w.scale + w.N * groups, groups, w.group_size,
                 std::max<int64_t>(8, (6144 + ldw - 1) / ldw) * ldw};
  int64_t n = n0;
  if (M == 1)
    for (; n + 8 <= n1; n += 8) Q4TileAndPut<1, 8>(a, px, n, y, ldy, accumulate);
  for (; n + 4 <= n1; n += 4)
    for (int64_t m = 0; m < M; m += 4)
      Q4TileRows<4>(static_cast<int>(std::min<int64_t>(4, M - m)), a, px + m * prow, n,
                    y + m * ldy, ldy, accumulate);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; m += 4)
      Q4TileRows<1>(static_cast<int>(std::min<int64_t>(4, M - m)), a, px + m * prow, n,
                    y + m * ldy, ldy, accumulate);
}

// int8 weights x int16 x (several rows: batched decode, prefill). x is quantized per row at 15
// bits (d = max|x| / 32767: ~1/65534 of the row's largest value, next to the weights' own
// 1/254 of theirs), the weight codes sign-extended to int16, and vpdpwssd sums 2 products per
// 32-bit lane: 32 multiply-adds per instruction, twice the float FMA's 16. A lane gains at most
// 2 * 128 * 32767 per 32 k, so the int32 sums are flushed to float every kI16Flush k.
#ifndef HPLLM_GEMM_I16_MIN_ROWS
#define HPLLM_GEMM_I16_MIN_ROWS 6
#endif
constexpr int64_t kI16MinRows = HPLLM_GEMM_I16_MIN_ROWS;  // rows of x from which INT8 takes it
// 3 x 5 tiles: measured at M = 32-512 on Zen 5 ~1.2-1.4x 4x4, 3x6, 3x7, 4x5, 3x8, 2x8 (GCC
// keeps 15 accumulators in registers; with 25 it spilled them every step).
constexpr int kI16MR = 3, kI16NR = 5, kI16Wide = 8;
constexpr int64_t kI16Flush = 4096;  // 256 products of <= 128 * 32767 per lane: < 2^31
inline int64_t I16RowBytes(int64_t K) { return (K + 31) / 32 * 64 + 64; }  // codes, then d

inline void QuantizeI16Row(const float* x, int64_t K, uint8_t* out) {
  float amax = 0.0f;
  int64_t k = 0;
#if defined(HPLLM_GEMM_AVX512)
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float d = amax / 32767.0f, inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
  int16_t* codes = reinterpret_cast<int16_t*>(out);
  const int64_t kq = (K + 31) / 32 * 32;
  k = 0;
#if defined(HPLLM_GEMM_AVX512)
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512 hi = _mm512_set1_ps(32767.0f), lo = _mm512_set1_ps(-32767.0f);
  for (; k + 16 <= K; k += 16) {
    const __m512 v =
        _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(_mm512_loadu_ps(x + k), vinv)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + k),
                        _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(v)));
  }
#endif
  for (; k < kq; ++k) {
    const float v = k < K ? std::min(32767.0f, std::max(-32767.0f, x[k] * inv)) : 0.0f;
    codes[k] = static_cast<int16_t>(std::nearbyint(v));
  }
  std::memcpy(out + 2 * kq, &d, 4);
}

#if defined(HPLLM_GEMM_VNNI)
// One 32-k step of an I16Tile; kTail: the last, masked (slow on Zen 5: only there), step.
template <int MR, int NR, bool kTail>
inline void I16Step(const uint8_t* px, int64_t prow, int64_t K, const int8_t* w, int64_t n,
                    int64_t k, __m512i (&acc)[MR][NR]) {
  __m512i wv[NR];
  for (int j = 0; j < NR; ++j) {
    const int8_t* p = w + (n + j) * K + k;
    wv[j] = _mm512_cvtepi8_epi16(
        kTail ? _mm256_maskz_loadu_epi8(static_cast<__mmask32>(ByteMask(K - k)), p)
              : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    _mm_prefetch(reinterpret_cast<const char*>(p + NR * K), _MM_HINT_T0);  // as in Tile
  }
  for (int m = 0; m < MR; ++m) {
    const __m512i xv = _mm512_loadu_si512(px + m * prow + 2 * k);
    for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpwssd_epi32(acc[m][j], xv, wv[j]);
  }
}
#endif

// out[m][j] = sum_k x~[m, k] * q[n + j, k] (the row scales are applied by the caller).
template <int MR, int NR>
inline void I16Tile(const uint8_t* px, int64_t prow, int64_t K, const int8_t* w, int64_t n,
                    float (&out)[MR][NR]) {
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) out[m][j] = 0.0f;
  for (int64_t c0 = 0; c0 < K; c0 += kI16Flush) {
    const int64_t c1 = std::min(K, c0 + kI16Flush);
#if defined(HPLLM_GEMM_VNNI)
    __m512i acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_setzero_si512();
    int64_t k = c0;
    for (; k + 32 <= c1; k += 32) I16Step<MR, NR, false>(px, prow, K, w, n, k, acc);
    if (k < c1) I16Step<MR, NR, true>(px, prow, K, w, n, k, acc);
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) out[m][j] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[m][j]));
#else
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) {
        const int16_t* xq = reinterpret_cast<const int16_t*>(px + m * prow);
        int64_t t = 0;  // one sum for the chunk's 16 lanes: int32 would overflow
        for (int64_t k = c0; k < c1; ++k) t += static_cast<int32_t>(xq[k]) * w[(n + j) * K + k];
        out[m][j] += static_cast<float>(t);
      }
#endif
  }
}

template <int MR, int NR>
inline void I16TileAndPut(const uint8_t* px, int64_t prow, int64_t K, const int8_t* w,
                          int64_t n, const float* scale, float* y, int64_t ldy, bool accumulate) {
  float out[MR][NR];
  I16Tile<MR, NR>(px, prow, K, w, n, out);
  const int64_t kq = (K + 31) / 32 * 32;
  for (int m = 0; m < MR; ++m) {
    float d;
    std::memcpy(&d, px + m * prow + 2 * kq, 4);
    for (int j = 0; j < NR; ++j) out[m][j] *= d;
  }
  Put<MR, NR>(out, scale, n, y, ldy, accumulate);
}

template <int NR, int MR = kI16MR>
inline void I16TileRows(int mr, const uint8_t* px, int64_t prow, int64_t K, const int8_t* w,
                        int64_t n, const float* scale, float* y, int64_t ldy, bool accumulate) {
  if (mr == MR)
    I16TileAndPut<MR, NR>(px, prow, K, w, n, scale, y, ldy, accumulate);
  else if constexpr (MR > 1)
    I16TileRows<NR, MR - 1>(mr, px, prow, K, w, n, scale, y, ldy, accumulate);
}

// matmul_block for INT8 weights on x prepared by QuantizeI16Row (rows prow bytes apart).
inline void Int8I16Prepared(const uint8_t* px, int64_t M, const WeightView& w, int64_t n0,
                            int64_t n1, float* y, int64_t ldy, bool accumulate) {
  const int64_t K = w.K, prow = I16RowBytes(K);
  const int8_t* q = static_cast<const int8_t*>(w.data);
  int64_t n = n0;
  if (M == 1)
    for (; n + kI16Wide <= n1; n += kI16Wide)
      I16TileAndPut<1, kI16Wide>(px, prow, K, q, n, w.scale, y, ldy, accumulate);
  for (; n + kI16NR <= n1; n += kI16NR)
    for (int64_t m = 0; m < M; m += kI16MR)
      I16TileRows<kI16NR>(static_cast<int>(std::min<int64_t>(kI16MR, M - m)), px + m * prow, prow,
                          K, q, n, w.scale, y + m * ldy, ldy, accumulate);
  for (; n < n1; ++n)
    for (int64_t m = 0; m < M; m += kI16MR)
      I16TileRows<1>(static_cast<int>(std::min<int64_t>(kI16MR, M - m)), px + m * prow, prow, K,
                     q, n, w.scale, y + m * ldy, ldy, accumulate);
}

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
#if defined(HPLLM_GEMM_INT_PATHS)
  if (w.fmt == WFormat::INT4 && M <= kQ4MaxRows && Int4Fast(w.group_size)) {
    Int4Q8Block(x, M, ldx, w, n0, n1, y, ldy, accumulate);
    return;
  }
  if (w.fmt == WFormat::INT8 && M >= kI16MinRows) {  // x quantized here, once per call
    const int64_t prow = I16RowBytes(K);
    uint8_t* px = Scratch(static_cast<size_t>(M * prow));
    for (int64_t m = 0; m < M; ++m) QuantizeI16Row(x + m * ldx, K, px + m * prow);
    Int8I16Prepared(px, M, w, n0, n1, y, ldy, accumulate);
    return;
  }
#endif
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

// ------------------------------------------------------------------ int8 x int16 (prepared x)
// What matmul_block runs for INT8 weights from gemm_detail::kI16MinRows rows of x where
// gemm_detail::kI16Fast, with x quantized once per op instead of once per call: callers that
// split one op into many calls (the FFI kernels) prepare x once. Rows of the scratch start at
// m * gemm_detail::I16RowBytes(K). Any build (scalar where VNNI is absent).
namespace gemm_detail {
#if defined(HPLLM_GEMM_INT_PATHS)
constexpr bool kI16Fast = true;
#else
constexpr bool kI16Fast = false;
#endif
}  // namespace gemm_detail

inline size_t prepared_x16_bytes(int64_t M, int64_t K) {
  return static_cast<size_t>(M * gemm_detail::I16RowBytes(K));
}

inline void prepare_x16(const float* x, int64_t M, int64_t K, int64_t ldx, void* scratch) {
  uint8_t* out = static_cast<uint8_t*>(scratch);
  for (int64_t m = 0; m < M; ++m)
    gemm_detail::QuantizeI16Row(x + m * ldx, K, out + m * gemm_detail::I16RowBytes(K));
}

inline void matmul_block_x16(const void* px, int64_t M, const WeightView& w, int64_t n0,
                             int64_t n1, float* y, int64_t ldy, bool accumulate) {
  if (M <= 0 || n1 <= n0) return;
  gemm_detail::Int8I16Prepared(static_cast<const uint8_t*>(px), M, w, n0, n1, y, ldy, accumulate);
}

}  // namespace hpllm
