// The per-tile steps of attention over compressed KV codes (codes.cpp): scores of query
// rows against a tile of packed kivi codes, the weighted sum of a tile's value codes, and
// the loads of int8 codes and float16 scales. Codes are read where they lie and turned into
// float32 in registers; no dequantized K or V is ever written.
//
// Span order: a byte holds PER = 8 / BITS codes along dim, the first in the lowest bits,
// so VL bytes (a span) hold S = VL * PER codes. Widened to VL 32-bit lanes, lane i holds
// byte i, and (lane >> k * BITS) & mask is the code of dim PER * i + k. A span therefore
// unpacks to PER vectors whose dims are strided by PER, with one shift and one mask each
// and no shuffle. The kernel keeps q (times the key scales) and the value accumulators in
// that order (span order: position sc * S + k * VL + i holds dim sc * S + PER * i + k); a
// dot product does not care about order, and the output is put back in dim order once.
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"
#include "tiles.h"

namespace tk {

// Score rows are this far apart: a group piece scores whole key blocks, up to VL - 1 keys
// past the tile's 64.
constexpr int kScoreStride = kTileKeys + VL;

// VL bytes widened to 32-bit lanes, zero- or sign-extended. By intrinsics where they
// exist: GCC 12 lowers __builtin_convertvector of byte vectors lane by lane.
inline VU widen_u8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (VU)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (VU)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  return widen8(p);
#endif
}

inline VI widen_i8(const int8_t* p) {
#if defined(__AVX512F__)
  return (VI)_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return (VI)_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  typedef int8_t VI8 __attribute__((vector_size(VL)));
  VI8 b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, VI);
#endif
}

// int8 codes, sign-extended in registers.
struct I8 {
  using T = int8_t;
  static V load(const T* p) { return __builtin_convertvector(widen_i8(p), V); }
};

// float8 e4m3fn codes as their value times 2^-8: sign, exponent and mantissa placed as a
// float16's (bias 15 against 7), converted by the hardware (exact, subnormals included; the
// caller folds 2^8 into q and the value scales). Unlike simd.h's E4M3 the one NaN pattern
// is not put back (it reads as 480): the encoder clamps to +-448 and never writes it.
struct Fp8Codes {
  using T = uint8_t;
  static V load(const T* p) {
#if defined(__AVX512F__)
    __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    // Sign-extended, shifted by 7: the sign lands in bits 15 and 14; bit 14 is cleared.
    __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(-16385));
    return cvt_half(h);
#elif defined(__F16C__) && defined(__AVX2__)
    __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return cvt_half(_mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(-16385)));
#else
    VU w = widen8(p);
    return half_bits_to_float(((w & 0x7fu) << 7) | ((w & 0x80u) << 8));
#endif
  }
};

// n float16 values (any alignment) to float32, zero padded to a multiple of VL.
inline void halves_to_float(const void* src, int64_t n, float* dst) {
  const uint16_t* h = static_cast<const uint16_t*>(src);
  int64_t full = n / VL * VL;
  for (int64_t i = 0; i < full; i += VL) store(dst + i, F16::load(h + i));
  if (full < n) {
    uint16_t tail[VL] = {};
    std::memcpy(tail, h + full, (n - full) * sizeof(uint16_t));
    store(dst + full, F16::load(tail));
  }
}

// Lane i of the result is v[idx[i]] (0 <= idx[i] < VL).
inline V permute(V v, VI idx) {
#if defined(__AVX512F__)
  return (V)_mm512_permutexvar_ps((__m512i)idx, (__m512)v);
#elif defined(__AVX2__)
  return (V)_mm256_permutevar8x32_ps((__m256)v, (__m256i)idx);
#else
  float a[VL], r[VL];
  int32_t ix[VL];
  store(a, v);
  std::memcpy(ix, &idx, sizeof ix);
  for (int i = 0; i < VL; i++) r[i] = a[ix[i]];
  return load(r);
#endif
}

// The PER vectors of one span of BITS-bit codes, in span order.
template <int BITS>
__attribute__((always_inline)) inline void unpack(const uint8_t* p, V* out) {
  constexpr int PER = 8 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1;
  VU w = widen_u8(p);
  for (int k = 0; k < PER; k++) {
    VU c = k == PER - 1 ? w >> (k * BITS) : (w >> (k * BITS)) & kMask;
    out[k] = __builtin_convertvector((VI)c, V);
  }
}

// Lines of the next tile (up to four byte ranges) brought into L2 a few per key block of
// the score pass, so the loads overlap the arithmetic (as tiles.h's Prefetch does).
struct Lines {
  const char* p[4] = {};
  int64_t bytes[4] = {};
  int ranges = 0, at_range = 0;
  int64_t at = 0;
  int per_step = 0;
  void add(const void* ptr, int64_t n) {
    if (n > 0 && ranges < 4) {
      p[ranges] = static_cast<const char*>(ptr);
      bytes[ranges++] = n;
    }
  }
  __attribute__((always_inline)) void step(int lines) {
    for (; lines > 0 && at_range < ranges; lines--) {
      __builtin_prefetch(p[at_range] + at, 0, 2);
      at += 64;
      if (at >= bytes[at_range]) {
        at_range++;
        at = 0;
      }
    }
  }
  void rest() { step(1 << 30); }
  int64_t total_lines() const {
    int64_t n = 0;
    for (int i = 0; i < ranges; i++) n += (bytes[i] + 63) / 64;
    return n;
  }
};

// One span of RB rows against KB keys into the RB x KB accumulators (the first span sets
// them).
template <int RB, int KB, int BITS, bool First>
__attribute__((always_inline)) inline void code_score_span(const float* q, int64_t qs,
                                                           const uint8_t* const* k, int c,
                                                           V* acc) {
  constexpr int PER = 8 / BITS;
  V qv[RB][PER];
  for (int i = 0; i < RB; i++) {
    for (int kk = 0; kk < PER; kk++) {
      qv[i][kk] = load(q + i * qs + (c * PER + kk) * VL);
      if (RB * PER <= 8) pin(qv[i][kk]);  // more would crowd out the accumulators
    }
  }
  for (int j = 0; j < KB; j++) {
    V cv[PER];
    unpack<BITS>(k[j] + c * VL, cv);
    for (int i = 0; i < RB; i++) {
      V a = First ? qv[i][0] * cv[0] : acc[i * KB + j] + qv[i][0] * cv[0];
      for (int kk = 1; kk < PER; kk++) a += qv[i][kk] * cv[kk];
      acc[i * KB + j] = a;
    }
  }
}

// s[i][j] = q_i . codes_j for RB rows (span order) and KB keys over `spans` spans.
template <int RB, int KB, int BITS>
inline void code_score_tile(const float* q, int64_t qs, const uint8_t* const* k, int spans,
                            float* s, int64_t ss) {
  static_assert(RB * KB == VL, "one accumulator per lane of the result");
  V acc[VL];
  code_score_span<RB, KB, BITS, true>(q, qs, k, 0, acc);
  for (int c = 1; c < spans; c++) code_score_span<RB, KB, BITS, false>(q, qs, k, c, acc);
  float sums[VL];
  store(sums, sum_lanes(acc));
  for (int i = 0; i < RB; i++) std::memcpy(s + i * ss, sums + i * KB, KB * sizeof(float));
}

// n keys in blocks of KB; k[n .. n rounded up to KB) must point at readable codes (their
// scores land past n and are ignored).
template <int RB, int BITS>
inline void code_scores(const float* q, int64_t qs, const uint8_t* const* k, int n, int spans,
                        float* s, int64_t ss, Lines* next) {
  constexpr int KB = VL / RB;
  for (int j = 0; j < n; j += KB) {
    if (next) next->step(next->per_step);
    code_score_tile<RB, KB, BITS>(q, qs, k + j, spans, s + j, ss);
  }
}

// Rows in blocks of 4, 2, 1; the next tile's lines are prefetched during the first block.
template <int BITS>
void code_scores_rows(const float* q, int64_t rows, int64_t dp, const uint8_t* const* k, int n,
                      float* s, int64_t ss, Lines* next) {
  constexpr int S = VL * (8 / BITS);
  int spans = static_cast<int>(dp / S);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4, next = nullptr)
    code_scores<4, BITS>(q + r * dp, dp, k, n, spans, s + r * ss, ss, next);
  for (; r + 2 <= rows; r += 2, next = nullptr)
    code_scores<2, BITS>(q + r * dp, dp, k, n, spans, s + r * ss, ss, next);
  for (; r < rows; r++, next = nullptr)
    code_scores<1, BITS>(q + r * dp, dp, k, n, spans, s + r * ss, ss, next);
}

// How the per-token value scales fold into the weights of a tile's value codes:
//   kSplat   every span lies within one value group: w[row][j][e] = p[row][j] * scale[j][e],
//            span sc takes group esc[sc] (one broadcast per row and span);
//   kSpans   a span's lanes hold several groups, the same ones in each of its PER vectors:
//            w is p, and svx[j][sc] holds token j's scales spread over the span's lanes
//            (one multiply per row and span);
//   kChunks  lanes' groups differ between a span's vectors (v_group not a multiple of
//            PER): svx[j][chunk] per vector (one multiply per row and vector).
enum ScaleMode { kSplat = 0, kSpans = 1, kChunks = 2 };

struct PvIn {
  const float* w;
  int64_t ws, es, js;    // w: row, group (kSplat) and token strides
  const int32_t* esc;    // kSplat: the value group of each span
  const V* svx;          // otherwise: per token, per span or per chunk
  int64_t xs;            // svx: token stride in vectors
  const uint8_t* const* v;
  int n;
};

// acc_i += sum_j w_ij * codes_j for RB rows and CB spans from span c0.
template <int RB, int CB, int BITS, int MODE>
inline void code_pv_spans(const PvIn& in, int c0, int64_t r0, float* acc, int64_t as) {
  constexpr int PER = 8 / BITS;
  V a[RB][CB][PER];
  for (int i = 0; i < RB; i++)
    for (int b = 0; b < CB; b++)
      for (int kk = 0; kk < PER; kk++) a[i][b][kk] = load(acc + i * as + ((c0 + b) * PER + kk) * VL);
  const float* w = in.w + r0 * in.ws;
  for (int j = 0; j < in.n; j++) {
    V cv[CB][PER];
    for (int b = 0; b < CB; b++) unpack<BITS>(in.v[j] + (c0 + b) * VL, cv[b]);
    for (int i = 0; i < RB; i++) {
      for (int b = 0; b < CB; b++) {
        if (MODE == kSplat) {
          V wv = splat(w[i * in.ws + in.esc[c0 + b] * in.es + j * in.js]);
          for (int kk = 0; kk < PER; kk++) a[i][b][kk] += wv * cv[b][kk];
        } else if (MODE == kSpans) {
          V wv = splat(w[i * in.ws + j]) * in.svx[j * in.xs + c0 + b];
          for (int kk = 0; kk < PER; kk++) a[i][b][kk] += wv * cv[b][kk];
        } else {
          V pv = splat(w[i * in.ws + j]);
          const V* x = in.svx + j * in.xs + (c0 + b) * PER;
          for (int kk = 0; kk < PER; kk++) a[i][b][kk] += (pv * x[kk]) * cv[b][kk];
        }
      }
    }
  }
  for (int i = 0; i < RB; i++)
    for (int b = 0; b < CB; b++)
      for (int kk = 0; kk < PER; kk++) store(acc + i * as + ((c0 + b) * PER + kk) * VL, a[i][b][kk]);
}

template <int RB, int BITS, int MODE>
inline void code_pv(const PvIn& in, int spans, int64_t r0, float* acc, int64_t as) {
  constexpr int PER = 8 / BITS;
  constexpr int kAcc = VL == 16 ? 16 : 8;  // accumulators that leave room in the registers
  constexpr int CB = kAcc / (RB * PER) > 4 ? 4 : (kAcc / (RB * PER) > 0 ? kAcc / (RB * PER) : 1);
  int c = 0;
  for (; c + CB <= spans; c += CB) code_pv_spans<RB, CB, BITS, MODE>(in, c, r0, acc, as);
  for (; c < spans; c++) code_pv_spans<RB, 1, BITS, MODE>(in, c, r0, acc, as);
}

template <int BITS, int MODE>
void code_pv_rows(const PvIn& in, int64_t rows, int spans, float* acc, int64_t as) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) code_pv<4, BITS, MODE>(in, spans, r, acc + r * as, as);
  for (; r + 2 <= rows; r += 2) code_pv<2, BITS, MODE>(in, spans, r, acc + r * as, as);
  for (; r < rows; r++) code_pv<1, BITS, MODE>(in, spans, r, acc + r * as, as);
}

// Dims [0, spans * S) of `nat` (natural order) rewritten in span order into `out`: chunk k
// of a span takes lanes PER * i + k of its PER vectors, one permute per source vector.
// idx[k]: lane -> lane within its source vector; from[k][s]: lanes taken from vector s.
template <int BITS>
inline void to_span_order(const float* nat, int64_t spans, const VI* idx, const VI* from,
                          float* out) {
  constexpr int PER = 8 / BITS;
  for (int64_t sc = 0; sc < spans; sc++) {
    V src[PER];
    for (int s = 0; s < PER; s++) src[s] = load(nat + (sc * PER + s) * VL);
    for (int k = 0; k < PER; k++) {
      V r = permute(src[0], idx[k]);
      for (int s = 1; s < PER; s++) r = select(from[k * PER + s], permute(src[s], idx[k]), r);
      store(out + (sc * PER + k) * VL, r);
    }
  }
}

}  // namespace tk
