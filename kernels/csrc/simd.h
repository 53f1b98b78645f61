// Float vectors for the CPU attention kernel: one width for the whole kernel (VL floats:
// 16 with AVX-512, else 8), loads that convert each KV storage dtype to float32 in
// registers, a vector exp, and a transposing sum of VL vectors.
//
// Arithmetic uses the compiler's vector extensions (GCC >= 11, clang), so the kernel
// builds on any target; x86 intrinsics are used only where the portable form compiles to
// scalar code (float16 conversions: GCC lowers a _Float16 vector convert lane by lane).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace tk {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif

typedef float V __attribute__((vector_size(VL * 4)));
typedef int32_t VI __attribute__((vector_size(VL * 4)));
typedef uint32_t VU __attribute__((vector_size(VL * 4)));
typedef uint16_t VU16 __attribute__((vector_size(VL * 2)));
typedef uint8_t VU8 __attribute__((vector_size(VL)));

#if defined(__clang__)
#define TK_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define TK_SHUF(a, b, ...) __builtin_shuffle(a, b, VI{__VA_ARGS__})
#endif

inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
inline V splat(float x) { return V{} + x; }

// Keeps v in a register: GCC otherwise folds a reused load into each arithmetic op that
// uses it, and the loads, not the multiply-adds, then bound the score loop.
inline void pin(V& v) {
#if defined(__AVX512F__) || defined(__AVX__)  // V fits one register (a zmm or a ymm)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}
inline V select(VI mask, V yes, V no) { return (V)(((VI)yes & mask) | ((VI)no & ~mask)); }
inline V vmax(V a, V b) { return select(a > b, a, b); }

// Halves folded onto each other: log2(VL) dependent steps instead of VL - 1.
inline V fold_half(V v, bool max) {
#if defined(__AVX512F__)
  V h = TK_SHUF(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
#else
  V h = TK_SHUF(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
#endif
  return max ? vmax(v, h) : v + h;
}
inline float hreduce(V v, bool max) {
  v = fold_half(v, max);
  float r[VL];
  store(r, v);
  float a = max ? (r[0] > r[1] ? r[0] : r[1]) : r[0] + r[1];
  float b = max ? (r[2] > r[3] ? r[2] : r[3]) : r[2] + r[3];
  float c = max ? (a > b ? a : b) : a + b;
#if defined(__AVX512F__)
  float d = max ? (r[4] > r[5] ? r[4] : r[5]) : r[4] + r[5];
  float e = max ? (r[6] > r[7] ? r[6] : r[7]) : r[6] + r[7];
  float f = max ? (d > e ? d : e) : d + e;
  return max ? (c > f ? c : f) : c + f;
#else
  return c;
#endif
}
inline float hmax(V v) { return hreduce(v, true); }
inline float hsum(V v) { return hreduce(v, false); }

// Half-precision bits (in 32-bit lanes) to float, exactly: subnormals through an integer
// convert, never through denormal float arithmetic (which DAZ would flush).
inline V half_bits_to_float(VU h) {
  VU sign = (h & 0x8000u) << 16;
  VU e = (h >> 10) & 0x1fu;
  VU m = h & 0x3ffu;
  VU normal = sign | ((e + 112u) << 23) | (m << 13);
  VU special = sign | 0x7f800000u | (m << 13);
  VU sub = sign | (VU)(__builtin_convertvector((VI)m, V) * 0x1p-24f);
  VI is_sub = (VI)(e == 0u);
  VI is_special = (VI)(e == 31u);
  VI bits = ((VI)normal & ~(is_sub | is_special)) | ((VI)sub & is_sub) |
            ((VI)special & is_special);
  return (V)bits;
}

inline VU widen16(const uint16_t* p) {
  VU16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, VU);
}
inline VU widen8(const uint8_t* p) {
  VU8 b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, VU);
}

// One storage dtype each: T is the element, load() reads VL of them as float32.
struct F32 {
  using T = float;
  static V load(const T* p) { return tk::load(p); }
};

struct BF16 {
  using T = uint16_t;
  static V load(const T* p) {
#if defined(__AVX512F__)
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return (V)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif defined(__AVX2__)
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (V)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    return (V)(widen16(p) << 16);
#endif
  }
};

// Half bits as VL 16-bit lanes in one register, to float.
#if defined(__AVX512F__)
inline V cvt_half(__m256i h) { return (V)_mm512_cvtph_ps(h); }
#elif defined(__F16C__) && defined(__AVX2__)
inline V cvt_half(__m128i h) { return (V)_mm256_cvtph_ps(h); }
#endif

struct F16 {
  using T = uint16_t;
  static V load(const T* p) {
#if defined(__AVX512F__)
    return cvt_half(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__) && defined(__AVX2__)
    return cvt_half(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    return half_bits_to_float(widen16(p));
#endif
  }
};

// float8 e5m2 is the top byte of a float16: shift it up and convert as one.
struct E5M2 {
  using T = uint8_t;
  static V load(const T* p) {
#if defined(__AVX512F__)
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return cvt_half(_mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8));
#elif defined(__F16C__) && defined(__AVX2__)
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return cvt_half(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8));
#else
    return half_bits_to_float(widen8(p) << 8);
#endif
  }
};

// float8 e4m3fn (bias 7, no infinities, S.1111.111 is NaN): its exponent and mantissa
// placed as a float16's (bias 15) give the value times 2^-8, subnormals included; the one
// NaN pattern comes out as 480 (above e4m3's largest finite, 448) and is put back.
struct E4M3 {
  using T = uint8_t;
  static V finish(V f) {
    f = f * 256.0f;
    V mag = (V)((VI)f & 0x7fffffff);
    return select(mag == splat(480.0f), splat(__builtin_nanf("")), f);
  }
  static V load(const T* p) {
#if defined(__AVX512F__)
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    __m256i w = _mm256_cvtepu8_epi16(b);
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)), 7),
                                _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
    return finish(cvt_half(h));
#elif defined(__F16C__) && defined(__AVX2__)
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    __m128i w = _mm_cvtepu8_epi16(b);
    __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7f)), 7),
                             _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
    return finish(cvt_half(h));
#else
    VU w = widen8(p);
    return finish(half_bits_to_float(((w & 0x7fu) << 7) | ((w & 0x80u) << 8)));
#endif
  }
};

// e^x for x <= 0 (scores minus a running max; -inf gives 0): Cody-Waite reduction to
// |r| <= ln2/2 and a degree-7 Taylor polynomial, a few ulp; below -87.3 the result is 0.
inline V vexp(V x) {
  const V lo = splat(-87.33654f);
  VI under = x < lo;
  x = select(under, lo, x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  V t = x * 1.44269504088896341f + magic;
  V n = t - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  VI ni = (VI)t - (VI)splat(magic);
  V scale = (V)((ni + 127) << 23);
  return select(under, V{}, p * scale);
}

// x[0..VL) -> one vector whose lane i is the sum of x[i]'s lanes: a transposing tree
// of pairwise half-swaps, VL - 1 shuffle pairs for VL sums.
__attribute__((always_inline)) inline V sum_lanes(const V* x) {
#if defined(__AVX512F__)
  V y[8], z[4], w[2];
  for (int i = 0; i < 8; i++) {
    V a = x[2 * i], b = x[2 * i + 1];
    y[i] = TK_SHUF(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           TK_SHUF(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; i++) {
    V a = y[2 * i], b = y[2 * i + 1];
    z[i] = TK_SHUF(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           TK_SHUF(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; i++) {
    V a = z[2 * i], b = z[2 * i + 1];
    w[i] = TK_SHUF(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           TK_SHUF(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return TK_SHUF(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         TK_SHUF(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else
  V y[4], z[2];
  for (int i = 0; i < 4; i++) {
    V a = x[2 * i], b = x[2 * i + 1];
    y[i] = TK_SHUF(a, b, 0, 1, 2, 3, 8, 9, 10, 11) + TK_SHUF(a, b, 4, 5, 6, 7, 12, 13, 14, 15);
  }
  for (int i = 0; i < 2; i++) {
    V a = y[2 * i], b = y[2 * i + 1];
    z[i] = TK_SHUF(a, b, 0, 1, 4, 5, 8, 9, 12, 13) + TK_SHUF(a, b, 2, 3, 6, 7, 10, 11, 14, 15);
  }
  return TK_SHUF(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         TK_SHUF(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15);
#endif
}

}  // namespace tk
