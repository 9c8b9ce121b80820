// Float32 vectors of 16 lanes as GCC vector extensions (one zmm register with AVX-512, two
// or four narrower ones in the portable build: the same code either way), the exp they need,
// and bf16 <-> float32 conversion, for the CPU training kernels (attention_train.cc,
// bf16_matmul.cc).
#pragma once

#include <cstdint>
#include <cstring>

namespace hpllm {

typedef float V16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline float Bf16ToF32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// exp(x), float32 to ~2 ulp (Cephes' expf polynomial after a base-2 range reduction);
// exactly 0 below -87.3 (where float32's exp underflows anyway), so masked lanes give 0.
inline V16 Exp(V16 x) {
  const I16 under = x < -87.3f;
  x = x > 88.3f ? V16{} + 88.3f : x;
  x = x < -87.3f ? V16{} - 87.3f : x;
  const V16 n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V16 r = x - n * 0.693359375f - n * -2.12194440e-4f;
  V16 p = V16{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const I16 bits = (__builtin_convertvector(n, I16) + 127) << 23;
  V16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const V16 res = p * scale;
  return under ? V16{} : res;
}

inline float HSum(V16 v) {
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

inline float HMax(V16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
}

}  // namespace hpllm
