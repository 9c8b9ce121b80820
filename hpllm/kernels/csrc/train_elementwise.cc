// The CPU training step's elementwise layers as XLA FFI custom calls, forward and backward:
//
//   HpllmSwigluFwd: g, u (any shape, bf16) -> h = silu(g) * u (bf16)
//   HpllmSwigluBwd: g, u, dh -> dg = dh u s (1 + g (1 - s)), du = dh g s   (s = sigmoid(g))
//   HpllmRmsNormFwd: x (N, D), w (D) bf16 -> y = x r w (bf16), r (N) float32, where
//     r = 1 / sqrt(mean(x^2) + eps) per row
//   HpllmRmsNormBwd: x, w, r, dy -> dx = r (w dy - x^ mean(x^ w dy)) (bf16), x^ = x r;
//     dw = sum over rows of dy x^ (bf16; float32 partial sums per chunk, added in chunk
//     order, so the result does not depend on which thread ran which chunk)
//   HpllmRopeFwd / HpllmRopeBwd: x (..., H, D) bf16, cos, sin (..., D) float32 -> the
//     rotate-half rotation (bf16) and its transpose
//   HpllmLossFwd: logits (..., V) float32, targets (...) int32 -> nll, lse (...) float32
//   HpllmLossBwd: logits, targets, lse, g -> dlogits = g (softmax - onehot) float32
//
// Why: XLA:CPU runs these as loop fusions on one thread, and in bf16 it rounds after every
// op (a convert pair each): SwiGLU's forward and backward took ~16 ms of CPU time per layer
// of the default preset, RMSNorm's and RoPE's a few ms each, and the loss's exp over the
// (4096, 2048) logits ~24 ms (docs/perf/train_cpu.md). Here each is one
// pass over its operands on every thread of XLA's intra-op pool, float32 math, rounded to
// bf16 once. Vectors are GCC vector extensions (vec_math.h): the portable build is the same
// code on narrower registers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "parallel_chunks.h"
#include "vec_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using hpllm::Exp;
using hpllm::HMax;
using hpllm::HSum;
using hpllm::I16;
using hpllm::V16;
constexpr int kL = hpllm::kLanes;
constexpr int64_t kChunk = 16384;  // elements per claimed chunk of a SwiGLU call

typedef uint16_t H16 __attribute__((vector_size(32)));  // 16 bf16 values
typedef uint32_t U16 __attribute__((vector_size(64)));

inline V16 Load(const uint16_t* p) {
  H16 h;
  std::memcpy(&h, p, sizeof(h));
  const U16 bits = __builtin_convertvector(h, U16) << 16;
  V16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void Store(V16 v, uint16_t* p) {  // round to nearest even, NaN stays NaN (F32ToBf16)
  U16 u;
  std::memcpy(&u, &v, sizeof(u));
  const U16 nan = (u & 0x7fffffffu) > 0x7f800000u;
  const U16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U16 out = nan ? ((u >> 16) | 0x40u) : rounded;
  const H16 h = __builtin_convertvector(out, H16);
  std::memcpy(p, &h, sizeof(h));
}

// Runs `body(in pointers, out pointers)` over [0, n) in vectors of 16; the tail goes through
// zero-padded local copies, so every element takes the same vector math.
template <int kIn, int kOut, typename Body>
void Vectors(const uint16_t* const (&in)[kIn], uint16_t* const (&out)[kOut], int64_t n,
             Body body) {
  int64_t i = 0;
  for (; i + kL <= n; i += kL) {
    const uint16_t* ip[kIn];
    uint16_t* op[kOut];
    for (int j = 0; j < kIn; ++j) ip[j] = in[j] + i;
    for (int j = 0; j < kOut; ++j) op[j] = out[j] + i;
    body(ip, op);
  }
  if (i == n) return;
  uint16_t tin[kIn][kL] = {}, tout[kOut][kL];
  const uint16_t* ip[kIn];
  uint16_t* op[kOut];
  for (int j = 0; j < kIn; ++j) {
    std::memcpy(tin[j], in[j] + i, (n - i) * 2);
    ip[j] = tin[j];
  }
  for (int j = 0; j < kOut; ++j) op[j] = tout[j];
  body(ip, op);
  for (int j = 0; j < kOut; ++j) std::memcpy(out[j] + i, tout[j], (n - i) * 2);
}

inline V16 Sigmoid(V16 g) { return 1.0f / (1.0f + Exp(-g)); }

template <typename Dims>
std::string ShapeString(const Dims& dims) {
  std::string s = "(";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

template <typename A, typename B>
bool SameShape(const A& a, const B& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// ------------------------------------------------------------------------------- SwiGLU

ffi::Error SwigluFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> g, ffi::Buffer<ffi::BF16> u,
                     ffi::Result<ffi::Buffer<ffi::BF16>> h) {
  if (!SameShape(g.dimensions(), u.dimensions()) ||
      !SameShape(g.dimensions(), h->dimensions()))
    return ffi::Error::InvalidArgument("swiglu: g " + ShapeString(g.dimensions()) + " and u " +
                                       ShapeString(u.dimensions()) + " differ");
  const int64_t n = g.element_count();
  const uint16_t* gd = g.typed_data();
  const uint16_t* ud = u.typed_data();
  uint16_t* hd = reinterpret_cast<uint16_t*>(h->untyped_data());
  hpllm::ParallelChunks(pool, (n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
    Vectors<2, 1>({gd + i0, ud + i0}, {hd + i0}, m, [](const uint16_t** in, uint16_t** out) {
      const V16 gv = Load(in[0]);
      Store(gv * Sigmoid(gv) * Load(in[1]), out[0]);
    });
  });
  return ffi::Error::Success();
}

ffi::Error SwigluBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> g, ffi::Buffer<ffi::BF16> u,
                     ffi::Buffer<ffi::BF16> dh, ffi::Result<ffi::Buffer<ffi::BF16>> dg,
                     ffi::Result<ffi::Buffer<ffi::BF16>> du) {
  const auto dims = g.dimensions();
  if (!SameShape(dims, u.dimensions()) || !SameShape(dims, dh.dimensions()) ||
      !SameShape(dims, dg->dimensions()) || !SameShape(dims, du->dimensions()))
    return ffi::Error::InvalidArgument("swiglu backward: g " + ShapeString(dims) + ", u " +
                                       ShapeString(u.dimensions()) + " and dh " +
                                       ShapeString(dh.dimensions()) + " differ");
  const int64_t n = g.element_count();
  const uint16_t *gd = g.typed_data(), *ud = u.typed_data(), *dhd = dh.typed_data();
  uint16_t* dgd = reinterpret_cast<uint16_t*>(dg->untyped_data());
  uint16_t* dud = reinterpret_cast<uint16_t*>(du->untyped_data());
  hpllm::ParallelChunks(pool, (n + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
    Vectors<3, 2>({gd + i0, ud + i0, dhd + i0}, {dgd + i0, dud + i0}, m,
                  [](const uint16_t** in, uint16_t** out) {
                    const V16 gv = Load(in[0]), uv = Load(in[1]), dv = Load(in[2]);
                    const V16 s = Sigmoid(gv);
                    Store(dv * uv * s * (1.0f + gv * (1.0f - s)), out[0]);
                    Store(dv * gv * s, out[1]);
                  });
  });
  return ffi::Error::Success();
}

// ------------------------------------------------------------------------------ RMSNorm

constexpr int64_t kNormRows = 64;  // rows per claimed chunk

struct NormDims {
  int64_t N, D;
};

// (N, D) from x's dimensions (rows: all but the last), checked against the others.
ffi::Error NormShape(ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::BF16>& w, NormDims* d) {
  const auto xd = x.dimensions();
  if (xd.size() < 1 || w.dimensions().size() != 1 || w.dimensions()[0] != xd.back())
    return ffi::Error::InvalidArgument("rms_norm: x " + ShapeString(xd) + " and weight " +
                                       ShapeString(w.dimensions()) + " do not fit");
  d->D = xd.back();
  d->N = d->D ? x.element_count() / d->D : 0;
  return ffi::Error::Success();
}

// A row of D bf16 values as float32 vectors, zero-padded to a multiple of 16.
void RowF32(const uint16_t* src, int64_t D, V16* dst) {
  const int64_t whole = D / kL;
  for (int64_t j = 0; j < whole; ++j) dst[j] = Load(src + j * kL);
  if (whole * kL < D) {
    uint16_t t[kL] = {};
    std::memcpy(t, src + whole * kL, (D - whole * kL) * 2);
    dst[whole] = Load(t);
  }
}

void StoreRow(const V16* v, int64_t D, uint16_t* dst) {
  const int64_t whole = D / kL;
  for (int64_t j = 0; j < whole; ++j) Store(v[j], dst + j * kL);
  if (whole * kL < D) {
    uint16_t t[kL];
    Store(v[whole], t);
    std::memcpy(dst + whole * kL, t, (D - whole * kL) * 2);
  }
}

ffi::Error RmsNormFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::Result<ffi::Buffer<ffi::BF16>> y,
                      ffi::Result<ffi::Buffer<ffi::F32>> r, float eps) {
  NormDims d;
  if (auto e = NormShape(x, w, &d); e.failure()) return e;
  if (!SameShape(x.dimensions(), y->dimensions()) || r->element_count() != d.N)
    return ffi::Error::InvalidArgument("rms_norm: results do not fit x " +
                                       ShapeString(x.dimensions()));
  const int64_t dv = (d.D + kL - 1) / kL;
  std::vector<V16> wv(dv);
  RowF32(w.typed_data(), d.D, wv.data());
  const uint16_t* xd = x.typed_data();
  uint16_t* yd = reinterpret_cast<uint16_t*>(y->untyped_data());
  float* rd = r->typed_data();
  hpllm::ParallelChunks(pool, (d.N + kNormRows - 1) / kNormRows, [&](int64_t c) {
    std::vector<V16> row(dv);
    for (int64_t n = c * kNormRows; n < std::min(d.N, (c + 1) * kNormRows); ++n) {
      RowF32(xd + n * d.D, d.D, row.data());
      V16 ss{};
      for (int64_t j = 0; j < dv; ++j) ss += row[j] * row[j];
      const float rn = 1.0f / std::sqrt(HSum(ss) / static_cast<float>(d.D) + eps);
      for (int64_t j = 0; j < dv; ++j) row[j] = row[j] * rn * wv[j];
      StoreRow(row.data(), d.D, yd + n * d.D);
      rd[n] = rn;
    }
  });
  return ffi::Error::Success();
}

ffi::Error RmsNormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                      ffi::Buffer<ffi::F32> r, ffi::Buffer<ffi::BF16> dy,
                      ffi::Result<ffi::Buffer<ffi::BF16>> dx,
                      ffi::Result<ffi::Buffer<ffi::BF16>> dw) {
  NormDims d;
  if (auto e = NormShape(x, w, &d); e.failure()) return e;
  if (!SameShape(x.dimensions(), dy.dimensions()) ||
      !SameShape(x.dimensions(), dx->dimensions()) || r.element_count() != d.N ||
      dw->element_count() != d.D)
    return ffi::Error::InvalidArgument("rms_norm backward: dy " +
                                       ShapeString(dy.dimensions()) + " or r do not fit x " +
                                       ShapeString(x.dimensions()));
  const int64_t dv = (d.D + kL - 1) / kL;
  std::vector<V16> wv(dv);
  RowF32(w.typed_data(), d.D, wv.data());
  const int64_t chunks = (d.N + kNormRows - 1) / kNormRows;
  std::vector<V16> partial(std::max<int64_t>(chunks, 1) * dv);  // per chunk: sum of dy x^
  const uint16_t *xd = x.typed_data(), *dyd = dy.typed_data();
  const float* rd = r.typed_data();
  uint16_t* dxd = reinterpret_cast<uint16_t*>(dx->untyped_data());
  const float inv_d = 1.0f / static_cast<float>(std::max<int64_t>(d.D, 1));
  hpllm::ParallelChunks(pool, chunks, [&](int64_t c) {
    std::vector<V16> xr(dv), gr(dv);
    V16* acc = partial.data() + c * dv;
    for (int64_t n = c * kNormRows; n < std::min(d.N, (c + 1) * kNormRows); ++n) {
      RowF32(xd + n * d.D, d.D, xr.data());
      RowF32(dyd + n * d.D, d.D, gr.data());
      const float rn = rd[n];
      V16 dot{};
      for (int64_t j = 0; j < dv; ++j) {
        xr[j] *= rn;                 // x^
        acc[j] += gr[j] * xr[j];     // dw
        gr[j] *= wv[j];              // w dy
        dot += xr[j] * gr[j];
      }
      const float mean = HSum(dot) * inv_d;
      for (int64_t j = 0; j < dv; ++j) gr[j] = rn * (gr[j] - xr[j] * mean);
      StoreRow(gr.data(), d.D, dxd + n * d.D);
    }
  });
  std::vector<V16> total(dv);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t j = 0; j < dv; ++j) total[j] += partial[c * dv + j];
  StoreRow(total.data(), d.D, reinterpret_cast<uint16_t*>(dw->untyped_data()));
  return ffi::Error::Success();
}

// --------------------------------------------------------------------------------- RoPE
// Rotate-half layout (hpllm.model.layers.apply_rope): out = x cos + rot(x) sin with
// rot(x) = (-x2, x1) over the two halves of the head dimension; its transpose is
// dx = dy cos + (dy2 s2, -dy1 s1).

template <bool kBackward>
ffi::Error Rope(ffi::ThreadPool& pool, ffi::Buffer<ffi::BF16>& x, ffi::Buffer<ffi::F32>& cos,
                ffi::Buffer<ffi::F32>& sin, ffi::Result<ffi::Buffer<ffi::BF16>>& out) {
  const auto xd = x.dimensions(), cd = cos.dimensions();
  if (xd.size() < 2 || cd.size() + 1 != xd.size() || !SameShape(cd, sin.dimensions()) ||
      cd.back() != xd.back() || xd.back() % 2 ||
      !std::equal(cd.begin(), cd.end() - 1, xd.begin()) ||
      !SameShape(xd, out->dimensions()))
    return ffi::Error::InvalidArgument("rope: x " + ShapeString(xd) + " (..., heads, even D) "
                                       "does not fit cos/sin " + ShapeString(cd));
  const int64_t D = xd.back(), H = xd[xd.size() - 2], half = D / 2;
  const int64_t rows = D ? cos.element_count() / D : 0;
  const uint16_t* xp = x.typed_data();
  const float *cp = cos.typed_data(), *sp = sin.typed_data();
  uint16_t* op = reinterpret_cast<uint16_t*>(out->untyped_data());
  hpllm::ParallelChunks(pool, (rows + kNormRows - 1) / kNormRows, [&](int64_t c) {
    std::vector<float> xf(D), of(D);
    for (int64_t r = c * kNormRows; r < std::min(rows, (c + 1) * kNormRows); ++r) {
      const float *cr = cp + r * D, *sr = sp + r * D;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t off = (r * H + h) * D;
        for (int64_t i = 0; i < D; ++i) xf[i] = hpllm::Bf16ToF32(xp[off + i]);
        for (int64_t i = 0; i < half; ++i) {
          if (kBackward) {
            of[i] = xf[i] * cr[i] + xf[i + half] * sr[i + half];
            of[i + half] = xf[i + half] * cr[i + half] - xf[i] * sr[i];
          } else {
            of[i] = xf[i] * cr[i] - xf[i + half] * sr[i];
            of[i + half] = xf[i + half] * cr[i + half] + xf[i] * sr[i + half];
          }
        }
        for (int64_t i = 0; i < D; ++i) op[off + i] = hpllm::F32ToBf16(of[i]);
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error RopeFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::F32> cos,
                   ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::Buffer<ffi::BF16>> out) {
  return Rope<false>(pool, x, cos, sin, out);
}

ffi::Error RopeBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> dy, ffi::Buffer<ffi::F32> cos,
                   ffi::Buffer<ffi::F32> sin, ffi::Result<ffi::Buffer<ffi::BF16>> dx) {
  return Rope<true>(pool, dy, cos, sin, dx);
}

// ------------------------------------------------------------------- softmax cross-entropy
// Per row of logits (N, V) float32 and its target: nll = lse - logits[target], with lse the
// log-sum-exp; the backward dlogits = g (softmax - onehot(target)), from the saved lse.
// Targets are clamped into [0, V) (the caller's are token ids).

constexpr int64_t kLossRows = 16;

ffi::Error LossShape(ffi::Buffer<ffi::F32>& logits, ffi::Buffer<ffi::S32>& targets,
                     int64_t* N, int64_t* V) {
  const auto ld = logits.dimensions();
  if (ld.size() < 1 || targets.element_count() * std::max<int64_t>(ld.back(), 1) !=
                           logits.element_count() || ld.back() < 1)
    return ffi::Error::InvalidArgument("cross-entropy: logits " + ShapeString(ld) +
                                       " do not fit targets " +
                                       ShapeString(targets.dimensions()));
  *V = ld.back();
  *N = targets.element_count();
  return ffi::Error::Success();
}

// max, then the sum of exp(l - max), over one row in vectors (the tail lanes at -inf).
float RowLse(const float* l, int64_t V) {
  const int64_t whole = V / kL * kL;
  V16 mv = V16{} - INFINITY;
  for (int64_t j = 0; j < whole; j += kL) {
    V16 v;
    std::memcpy(&v, l + j, sizeof(v));
    mv = v > mv ? v : mv;
  }
  float m = HMax(mv);
  for (int64_t j = whole; j < V; ++j) m = std::max(m, l[j]);
  if (!std::isfinite(m)) return m;
  V16 sv{};
  for (int64_t j = 0; j < whole; j += kL) {
    V16 v;
    std::memcpy(&v, l + j, sizeof(v));
    sv += Exp(v - m);
  }
  if (whole < V) {
    V16 v = V16{} - INFINITY;
    std::memcpy(&v, l + whole, (V - whole) * 4);
    sv += Exp(v - m);
  }
  return m + std::log(HSum(sv));
}

ffi::Error LossFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                   ffi::Buffer<ffi::S32> targets, ffi::Result<ffi::Buffer<ffi::F32>> nll,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse) {
  int64_t N, V;
  if (auto e = LossShape(logits, targets, &N, &V); e.failure()) return e;
  const float* l = logits.typed_data();
  const int32_t* t = targets.typed_data();
  float *np_ = nll->typed_data(), *lp = lse->typed_data();
  hpllm::ParallelChunks(pool, (N + kLossRows - 1) / kLossRows, [&](int64_t c) {
    for (int64_t n = c * kLossRows; n < std::min(N, (c + 1) * kLossRows); ++n) {
      const float z = RowLse(l + n * V, V);
      const int64_t target = std::clamp<int64_t>(t[n], 0, V - 1);
      lp[n] = z;
      np_[n] = z - l[n * V + target];
    }
  });
  return ffi::Error::Success();
}

ffi::Error LossBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                   ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> lse,
                   ffi::Buffer<ffi::F32> g, ffi::Result<ffi::Buffer<ffi::F32>> dlogits) {
  int64_t N, V;
  if (auto e = LossShape(logits, targets, &N, &V); e.failure()) return e;
  if (lse.element_count() != N || g.element_count() != N)
    return ffi::Error::InvalidArgument("cross-entropy backward: lse or g do not fit targets");
  const float *l = logits.typed_data(), *lp = lse.typed_data(), *gp = g.typed_data();
  const int32_t* t = targets.typed_data();
  float* d = dlogits->typed_data();
  const int64_t whole = V / kL * kL;
  hpllm::ParallelChunks(pool, (N + kLossRows - 1) / kLossRows, [&](int64_t c) {
    for (int64_t n = c * kLossRows; n < std::min(N, (c + 1) * kLossRows); ++n) {
      const float *row = l + n * V, z = lp[n], gn = gp[n];
      float* out = d + n * V;
      for (int64_t j = 0; j < whole; j += kL) {
        V16 v;
        std::memcpy(&v, row + j, sizeof(v));
        v = gn * Exp(v - z);
        std::memcpy(out + j, &v, sizeof(v));
      }
      for (int64_t j = whole; j < V; ++j) {
        V16 v = V16{} - INFINITY;
        v[0] = row[j];
        out[j] = gn * Exp(v - z)[0];
      }
      out[std::clamp<int64_t>(t[n], 0, V - 1)] -= gn;
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmSwigluFwd, SwigluFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // g
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // u
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // h

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmSwigluBwd, SwigluBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // g
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // u
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // dh
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // dg
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // du

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmRmsNormFwd, RmsNormFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // x (..., D)
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w (D)
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // y (..., D)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // r (...)
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmRmsNormBwd, RmsNormBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // w
                                  .Arg<ffi::Buffer<ffi::F32>>()    // r
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // dy
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // dx
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // dw

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmRopeFwd, RopeFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x (..., H, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cos (..., D)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // sin (..., D)
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // out (..., H, D)

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmRopeBwd, RopeBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // dy (..., H, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()    // sin
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // dx

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmLossFwd, LossFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits (..., V)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets (...)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // nll (...)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse (...)

XLA_FFI_DEFINE_HANDLER_SYMBOL(HpllmLossBwd, LossBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // logits
                                  .Arg<ffi::Buffer<ffi::S32>>()   // targets
                                  .Arg<ffi::Buffer<ffi::F32>>()   // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()   // g (...)
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dlogits (..., V)
